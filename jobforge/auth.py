"""Who may call the API and on whose jobs: token-file parsing, token matching and the owner decision.

Pure functions over text and values; the server reads the file (`jobforge.server.tokens`) and asks here. Every
transport (JSON-RPC, REST, WebSocket, SSE, MCP) reaches the same decision through `jobforge.api`.

Token file format (``JOBFORGE_API_TOKENS_FILE``), one token a line::

    # comments start with '#' at the start of a line or after whitespace
    s3cr3t-token-for-ops                    # every owner
    s3cr3t-token-for-team-a   team-a        # only team-a's jobs, and submits only as team-a
    s3cr3t-token-for-both     team-a,team-b
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from jobforge.errors import Forbidden, Unauthorized

__all__ = ["EVERYONE", "MIN_TOKEN_LENGTH", "Principal", "TokenEntry", "TokenFileProblem", "authenticate",
           "authorize", "bearer_token", "parse_tokens"]

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """The caller: `owners` it may act for (None: every owner) and a label for logs (never the token)."""

    owners: frozenset[str] | None
    label: str

    def may_act_for(self, owner: str) -> bool:
        return self.owners is None or owner in self.owners


EVERYONE = Principal(owners=None, label="anonymous (no API tokens configured)")


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes  # sha256 of the token: fixed-length, constant-time comparable, the token itself is not kept
    principal: Principal


@dataclass(frozen=True)
class TokenFileProblem:
    line: int
    rule: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _strip_comment(line: str) -> str:
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse_tokens(text: str) -> tuple[list[TokenEntry], list[TokenFileProblem]]:
    """Entries of the valid lines and one problem per invalid line (the invalid line grants nothing)."""
    entries: list[TokenEntry] = []
    problems: list[TokenFileProblem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = _strip_comment(raw).split()
        if not fields:
            continue
        if len(fields) > 2:
            problems.append(TokenFileProblem(number, "expected '<token>' or '<token> <owner>[,<owner>...]'"))
            continue
        token = fields[0]
        if len(token) < MIN_TOKEN_LENGTH:
            problems.append(TokenFileProblem(number, f"token shorter than {MIN_TOKEN_LENGTH} characters"))
            continue
        owners: frozenset[str] | None = None
        if len(fields) == 2:
            names = fields[1].split(",")
            if any(not name for name in names):
                problems.append(TokenFileProblem(number, "empty owner name in the owner list"))
                continue
            owners = frozenset(names)
        label = f"token of line {number} ({'every owner' if owners is None else ','.join(sorted(owners))})"
        entries.append(TokenEntry(_digest(token), Principal(owners, label)))
    return entries, problems


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(entries: Iterable[TokenEntry], authorization: str | None) -> Principal:
    """The principal of the presented bearer token; `Unauthorized` when missing or unknown.

    Every entry is compared (no early exit) with `hmac.compare_digest` over fixed-length digests, so the time
    taken says nothing about which token, or how much of one, matched.
    """
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", {"reason": "missing_token"})
    presented = _digest(token)
    found: Principal | None = None
    for entry in entries:
        if hmac.compare_digest(entry.digest, presented) and found is None:
            found = entry.principal
    if found is None:
        raise Unauthorized("invalid bearer token", {"reason": "invalid_token"})
    return found


def authorize(principal: Principal, owner: str, *, job_id: str | None = None) -> None:
    """`Forbidden` unless `principal` may see and act on jobs of `owner` (or submit as `owner`)."""
    if not principal.may_act_for(owner):
        what = f"job {job_id} belongs to owner {owner!r}" if job_id else f"owner {owner!r}"
        raise Forbidden(f"{what}; this token may act only for {', '.join(sorted(principal.owners or ()))}",
                        {"owner": owner, **({"job_id": job_id} if job_id else {})})
