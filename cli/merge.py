"""Job config input: read a source (file, inline YAML/JSON or stdin), deep-merge global and per-build config.

The merge fixes the reference CLI's shallow merge: mappings merge recursively, so a per-build ``test:`` block
refines the global one instead of wiping it; any value the per-build file states wins, including ``false``, ``0``
and empty values (``{}`` clears a global mapping); lists (``image_tags`` too) are replaced whole.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from jobforge.errors import ConfigError


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `override` on top of `base`; a non-empty mapping into a mapping recurses, anything else
    (including ``{}``, which clears a global mapping) replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and value and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


STDIN = "\0stdin"  # what the CLI passes for a "-" argument


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML/JSON: {exc}", [{"field": "", "rule": "must be YAML or JSON"}])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a job config must be a mapping, got {type(data).__name__}",
                          [{"field": "", "rule": "must be a mapping of config fields"}])
    return data


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse(text, str(path))


def load_source(source: str | None, stdin: TextIO) -> dict[str, Any]:
    """`source` is a file path, inline YAML/JSON, or ``-``/None for stdin."""
    if source is None or source in ("-", STDIN):
        if stdin.isatty():
            raise ConfigError("no job config given: pass a file, inline YAML/JSON, or pipe it on stdin")
        return _parse(stdin.read(), "<stdin>")
    if Path(source).is_file():
        return load_file(source)
    if "\n" not in source and ":" not in source and "{" not in source:
        raise ConfigError(f"{source}: no such file (and not inline YAML/JSON)")
    return _parse(source, "<inline config>")


def split_tags(values: Iterable[str] | None) -> list[str]:
    """``--image-tags a,b --image-tags c`` → ``[a, b, c]``."""
    return [tag.strip() for value in values or () for tag in value.split(",") if tag.strip()]


def add_tags(config: dict[str, Any], tags: Iterable[str]) -> dict[str, Any]:
    """Append `tags` to ``image_tags`` (keeping order, dropping repeats); leaves a non-list for validation."""
    tags = list(tags)
    if not tags:
        return config
    current = config.get("image_tags") or []
    if not isinstance(current, list):
        return config
    return config | {"image_tags": list(dict.fromkeys([*current, *tags]))}


def merged_config(source: str | None, global_file: str | None, image_tags: Iterable[str] | None,
                  stdin: TextIO) -> dict[str, Any]:
    base = load_file(global_file) if global_file else {}
    return add_tags(deep_merge(base, load_source(source, stdin)), split_tags(image_tags))
