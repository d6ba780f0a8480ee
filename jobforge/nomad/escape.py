"""Escaping for the three languages a Nomad job file nests: HCL, Go templates, and the text inside them.

A Nomad job file is HCL; a `template` block's `data` is a Go template (consul-template) inside an HCL string.
Anything that reaches the file goes through exactly one of these functions:

- `hcl_literal(value)`: an HCL expression for a Python value (`str` -> quoted string, `bool`, `int`, lists).
  Every `{{ ... }}` in the Jinja job templates is finalized through it (see `render.py`), so a job-config value
  can never reach the file unescaped.
- `hcl_heredoc(text)`: a `<<MARKER` heredoc for multi-line text we ship (the task scripts); marked `Hcl` so the
  finalizer leaves it alone.
- `go_template_text(text)`: text that consul-template must copy verbatim (the task scripts).
- `go_string(value)`: a string literal inside a Go-template action (Vault paths and field names).

HCL rules (hclsyntax spec, "Template Expressions"): in quoted strings `\\`, `"` and control characters need
backslash escapes; in quoted strings *and* heredocs the template introducers `${` and `%{` are escaped by
doubling their first character (`$${`, `%%{`). Heredocs have no backslash escapes at all.
Go template rule: only the left delimiter `{{` is special in plain text; `{{"{{"}}` prints it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence

__all__ = ["HEREDOC_MARKER", "Hcl", "go_string", "go_template_text", "hcl_heredoc", "hcl_literal", "hcl_string"]

HEREDOC_MARKER = "JOBFORGE_EOF"

_NAMED_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "${": "$${", "%{": "%%{"}
# One pass, so no replacement is ever re-escaped by a later one.
_QUOTED_SPECIALS = re.compile(r'\$\{|%\{|[\\"]|[\x00-\x1f\x7f-\x9f]')
_TEMPLATE_INTRODUCERS = re.compile(r"\$\{|%\{")
_GO_LEFT_DELIM = re.compile(r"\{\{")


class Hcl(str):
    """Text that already is a valid HCL expression; produced only by the functions in this module."""


def _check_encodable(value: str) -> None:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("string holds a lone surrogate; it cannot be written as UTF-8")


def hcl_string(value: str) -> Hcl:
    """A quoted HCL string literal whose parsed value is exactly `value` (no interpolation, no directives)."""
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    _check_encodable(value)

    def escape(match: re.Match[str]) -> str:
        token = match.group(0)
        return _NAMED_ESCAPES.get(token) or f"\\u{ord(token):04x}"

    return Hcl('"' + _QUOTED_SPECIALS.sub(escape, value) + '"')


def hcl_literal(value: object) -> Hcl:
    """HCL expression for a str, bool, int, or a list/tuple/mapping of those. `None` and floats are refused:
    a missing value is a bug in the caller, never something to render as `null`."""
    if isinstance(value, Hcl):
        return value
    if isinstance(value, bool):
        return Hcl("true" if value else "false")
    if isinstance(value, int):
        return Hcl(str(value))
    if isinstance(value, str):
        return hcl_string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{hcl_string(str(k))} = {hcl_literal(v)}" for k, v in value.items())
        return Hcl("{" + items + "}")
    if isinstance(value, Sequence):
        return Hcl("[" + ", ".join(hcl_literal(v) for v in value) + "]")
    raise TypeError(f"cannot write {type(value).__name__} into HCL")


def hcl_heredoc(text: str, marker: str = HEREDOC_MARKER) -> Hcl:
    """`<<MARKER` heredoc whose parsed value is exactly `text`.

    Only for multi-line text that ends with a newline (a heredoc's value always does) and has no control
    characters but tab and newline; anything else is refused rather than silently altered.
    """
    _check_encodable(text)
    if not text.endswith("\n"):
        raise ValueError("heredoc text must end with a newline")
    bad = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n"}
    if bad:
        raise ValueError(f"heredoc text holds control characters {sorted(map(ord, bad))}")
    if any(line.strip() == marker for line in text.splitlines()):
        raise ValueError(f"heredoc text holds the marker line {marker!r}")
    body = _TEMPLATE_INTRODUCERS.sub(lambda m: m.group(0)[0] + m.group(0), text)
    return Hcl(f"<<{marker}\n{body}{marker}")


def go_template_text(text: str) -> str:
    """Go-template source that renders to exactly `text`: every `{{` becomes the action `{{"{{"}}`."""
    return _GO_LEFT_DELIM.sub('{{"{{"}}', text)


def go_string(value: str) -> str:
    """A double-quoted Go string literal for use inside a template action, e.g. `{{ with secret <here> }}`.

    JSON string syntax (without `\\u` surrogate pairs, which Go rejects: non-ASCII stays literal UTF-8) is a
    subset of Go's interpreted string literal syntax. A `}}` inside the quotes does not end the action: Go's
    lexer reads the quoted string as one token.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    _check_encodable(value)
    return json.dumps(value, ensure_ascii=False)
