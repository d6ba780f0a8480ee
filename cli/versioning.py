"""Branch-aware semantic versioning kept in ``<deploy_dir>/version.yaml``.

A number is used only when the server accepts the submission, so `reserve` holds a file lock across
read → submit → write: concurrent submissions queue behind each other and each gets its own patch number, and a
rejected submission writes nothing. The tag is ``<branch>-v<major>.<minor>.<patch>``, sanitised to the OCI tag
grammar (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobforge_cli._files import atomic_write, locked
from jobforge.errors import ConfigError

VERSION_FILE = "version.yaml"
LOCK_FILE = ".version.lock"
TAG_MAX = 128
INITIAL = (0, 1, 0)


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def next_patch(self) -> "Version":
        return Version(self.major, self.minor, self.patch + 1)


def sanitize_branch(branch: str) -> str:
    """Branch name → tag-safe text: accents dropped (``café`` → ``cafe``), anything else outside ``[A-Za-z0-9.-]``
    (``/``, ``_``, ``@``, spaces, other scripts) → ``-``, runs of ``-`` collapsed, ``-``/``.`` trimmed at both ends."""
    unaccented = "".join(c for c in unicodedata.normalize("NFKD", branch) if not unicodedata.combining(c))
    text = re.sub(r"[^A-Za-z0-9.-]", "-", unaccented)
    return re.sub(r"-{2,}", "-", text).strip("-.")


def version_tag(branch: str | None, version: Version) -> str:
    """``<branch>-v<version>`` cut to 128 characters (the branch part shrinks); ``v<version>`` without a branch."""
    suffix = f"v{version}"
    prefix = sanitize_branch(branch or "")[: TAG_MAX - len(suffix) - 1].rstrip("-.")
    return f"{prefix}-{suffix}" if prefix else suffix


def current_branch(path: str | Path = ".") -> str | None:
    """The checked-out branch of the working copy at `path`; the short sha on a detached HEAD; None outside git."""
    try:
        import git  # imported here: gitpython looks for the git binary at import time (ImportError if missing)
    except ImportError:
        return None
    try:
        repo = git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    with repo:
        if repo.head.is_detached:
            return repo.head.commit.hexsha[:7]
        return repo.active_branch.name


def read_version(deploy_dir: Path) -> Version:
    path = deploy_dir / VERSION_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Version(*INITIAL)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        v = data["version"]
        parts = [v[k] for k in ("major", "minor", "patch")]
        if not all(type(p) is int and p >= 0 for p in parts):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f"{path}: expected 'version: {{major, minor, patch}}' with non-negative integers",
                          [{"field": "version", "rule": "major, minor and patch must be non-negative integers"}])
    return Version(*parts)


def write_version(deploy_dir: Path, version: Version) -> None:
    data = {"version": {"major": version.major, "minor": version.minor, "patch": version.patch}}
    atomic_write(deploy_dir / VERSION_FILE, yaml.safe_dump(data, sort_keys=False))


@dataclass
class Reservation:
    """The next version, held under the lock; `commit` records it once the server accepted the job."""

    deploy_dir: Path
    version: Version
    tag: str
    committed: bool = False

    def commit(self) -> None:
        write_version(self.deploy_dir, self.version)
        self.committed = True


@contextmanager
def reserve(deploy_dir: Path, branch: str | None) -> Iterator[Reservation]:
    with locked(deploy_dir / LOCK_FILE):
        version = read_version(deploy_dir).next_patch()
        yield Reservation(deploy_dir, version, version_tag(branch, version))


def peek(deploy_dir: Path, branch: str | None) -> tuple[Version, Version, str]:
    """(current, next, next tag) without reserving anything: for ``version-info`` and ``--dry-run``."""
    current = read_version(deploy_dir)
    nxt = current.next_patch()
    return current, nxt, version_tag(branch, nxt)


def set_version(deploy_dir: Path, *, major: int | None = None, minor: int | None = None) -> Version:
    """``version-major N`` → N.0.0; ``version-minor N`` → M.N.0."""
    with locked(deploy_dir / LOCK_FILE):
        current = read_version(deploy_dir)
        if major is not None:
            new = Version(major, 0, 0)
        else:
            new = Version(current.major, minor if minor is not None else current.minor, 0)
        write_version(deploy_dir, new)
        return new
