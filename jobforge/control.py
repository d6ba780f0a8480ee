"""Control lines: what a task script tells its backend besides its log (the build's cache use), on stderr.

A job's own commands (a Dockerfile `RUN` step, a test command) write to the same stderr, so a fixed marker could
be printed by them too. Each phase therefore gets a random nonce from its backend (`NONCE_ENV` for the local
backend, the dispatch meta `NONCE_META` on Nomad); the task script takes it out of its environment before it
starts any tool (templates/tasks/_common.py), and prefixes its control lines with it: `::jobforge-<nonce> <kind>
<json>`. A line with another or no nonce is an ordinary log line, whatever it looks like.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from jobforge.pipeline import CacheUse

NONCE_ENV = "JOBFORGE_CONTROL_NONCE"
NONCE_META = "control_nonce"
"""Nomad exposes it to the task as NOMAD_META_control_nonce."""


def new_nonce() -> str:
    return secrets.token_hex(16)


@dataclass
class ControlLines:
    """One phase's control lines: recognised by its nonce, folded into what the phase end reports."""

    nonce: str
    cache: CacheUse | None = None

    def take(self, line: str) -> bool:
        """True when `line` is a control line of this phase (then it is not part of the job's log). A
        malformed report with the right nonce is dropped: only our own script knows the nonce."""
        if not self.nonce or not line.startswith(prefix := f"::jobforge-{self.nonce} "):
            return False
        kind, _, body = line[len(prefix):].partition(" ")
        if kind == "cache":
            try:
                self.cache = CacheUse.model_validate(json.loads(body))
            except ValueError:  # not JSON, or not a report (pydantic's ValidationError is a ValueError)
                pass
        return True
