"""Settings-dependent checks of a job config at submit time: which repositories and Vault paths a job may name.

`JobConfig` holds the rules every service shares; this module holds the ones an operator chooses, as a frozen
`SubmitPolicy` built from the settings at the entry point and handed to the service. `check` is pure (it never
reads the environment) and raises one `ConfigError` listing every offending field, before anything is stored or
dispatched.

Vault path rules (`JOBFORGE_VAULT_ALLOWED_PATHS`, comma-separated):

    secret/data/shared           every owner may name this path and paths below it
    team-a=secret/data/team-a    only owner `team-a`
    secret/data/jobs/{owner}     each owner its own subtree (owners that are not one plain path segment get none)

A prefix matches whole segments: `secret/data/team` allows `secret/data/team/x`, never `secret/data/team-b`.
No rules: no Vault path is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from jobforge.config import JobConfig
from jobforge.errors import ConfigError
from jobforge.rules import VAULT_NAME_PATTERN, VAULT_PATH_PATTERN

OWNER_PLACEHOLDER = "{owner}"
_OWNER_SEGMENT = re.compile(VAULT_NAME_PATTERN)
# The `{owner}` placeholder may only stand for whole segments: 'a/{owner}/b', '{owner}', not 'a-{owner}'.
_RULE_PREFIX = re.compile(VAULT_PATH_PATTERN.replace(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*",
                                                     r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]*|\{owner\})"))


@dataclass(frozen=True)
class VaultPathRule:
    """`prefix` (may hold `{owner}`) allowed for `owner`, or for every owner when `owner` is None."""

    prefix: str
    owner: str | None = None

    def allows(self, owner: str, path: str) -> bool:
        if self.owner is not None and self.owner != owner:
            return False
        prefix = self.prefix
        if OWNER_PLACEHOLDER in prefix:
            if not _OWNER_SEGMENT.fullmatch(owner):
                return False
            prefix = prefix.replace(OWNER_PLACEHOLDER, owner)
        return path == prefix or path.startswith(prefix + "/")

    def __str__(self) -> str:
        return f"{self.owner}={self.prefix}" if self.owner is not None else self.prefix


def parse_vault_path_rules(text: str) -> tuple[VaultPathRule, ...]:
    """`JOBFORGE_VAULT_ALLOWED_PATHS` -> rules; ValueError names a malformed entry."""
    rules = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        owner, sep, prefix = entry.rpartition("=")
        prefix = prefix.strip().strip("/")
        if (sep and not owner.strip()) or not _RULE_PREFIX.fullmatch(prefix):
            raise ValueError(f"JOBFORGE_VAULT_ALLOWED_PATHS entry {entry!r}: expected 'prefix' or 'owner=prefix', "
                             "the prefix being '/'-separated Vault path segments ('{owner}' as a whole segment)")
        rules.append(VaultPathRule(prefix=prefix, owner=owner.strip() if sep else None))
    return tuple(rules)


def is_local_repo(repo_url: str) -> bool:
    """file:// URLs and local paths: clones of the server's own filesystem."""
    if "://" in repo_url:
        return urlsplit(repo_url).scheme.lower() == "file"
    return repo_url.startswith("/")


@dataclass(frozen=True)
class SubmitPolicy:
    """What the operator lets job configs name. The default is the safe one: no local repos, no Vault paths."""

    allow_file_repos: bool = False
    vault_paths: tuple[VaultPathRule, ...] = ()
    any_vault_path: bool = False

    @classmethod
    def permissive(cls) -> SubmitPolicy:
        """Every Vault path and local repos: for tests and in-process tools, never a service default."""
        return cls(allow_file_repos=True, any_vault_path=True)

    def vault_path_allowed(self, owner: str, path: str) -> bool:
        return self.any_vault_path or any(rule.allows(owner, path) for rule in self.vault_paths)

    def check(self, config: JobConfig, field_prefix: str = "job_config.") -> None:
        """Raise ConfigError (400) naming every field this policy refuses; return None when all is allowed."""
        errors = []
        if not self.allow_file_repos and is_local_repo(config.repo_url):
            errors.append({"field": f"{field_prefix}repo_url",
                           "rule": "file:// and local-path repositories are refused by this service "
                                   "(JOBFORGE_ALLOW_FILE_REPOS=true allows them)"})
        for field, path in vault_paths(config):
            if not self.vault_path_allowed(config.owner, path):
                errors.append({"field": f"{field_prefix}{field}",
                               "rule": f"Vault path is outside the prefixes allowed for owner {config.owner!r} "
                                       f"(JOBFORGE_VAULT_ALLOWED_PATHS: {self._describe(config.owner)})"})
        if errors:
            shown = "; ".join(f"{e['field']}: {e['rule']}" for e in errors[:5])
            raise ConfigError(f"job config refused by service policy: {shown}", errors)

    def _describe(self, owner: str) -> str:
        """The rules that apply to `owner` (never other owners' prefixes)."""
        mine = [rule.prefix for rule in self.vault_paths if rule.owner in (None, owner)]
        return ", ".join(mine) if mine else "none for this owner, so no Vault path is allowed"


def vault_paths(config: JobConfig) -> list[tuple[str, str]]:
    """(field, path) of every Vault path a config names."""
    found = []
    if config.git_credentials_path:
        found.append(("git_credentials_path", config.git_credentials_path))
    if config.registry_credentials_path:
        found.append(("registry_credentials_path", config.registry_credentials_path))
    for number, secret in enumerate(config.test.vault_secrets if config.test else []):
        found.append((f"test.vault_secrets[{number}].path", secret.path))
    return found
