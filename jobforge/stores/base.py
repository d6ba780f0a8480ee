"""The store contract: job records with compare-and-set, and append-only per-phase logs.

Every store implements the same CAS: `put(record, expected_version)` succeeds only if the stored version still
equals `expected_version` (0 = must not exist yet), else raises `Conflict`. SQLite uses a version column,
Consul its ModifyIndex.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from jobforge.config import SECRETS_CONTEXT
from jobforge.models import JobRecord, JobStatus, LogLine


class Versioned(NamedTuple):
    record: JobRecord
    version: int


class SeqLine(NamedTuple):
    """A stored log line with its position: `seq` increases with every line of a job, in write order."""

    seq: int
    phase: str
    line: LogLine


class Store(Protocol):
    async def get(self, job_id: str) -> Versioned:
        """Raises `NotFound`."""

    async def put(self, record: JobRecord, expected_version: int) -> int:
        """Compare-and-set; returns the new version. Raises `Conflict`."""

    async def list(self, limit: int, offset: int, owner: str | None = None,
                   status: JobStatus | None = None) -> tuple[list[JobRecord], int]:
        """Newest first, with the total count matching the filters."""

    async def unfinished(self) -> list[JobRecord]:
        """Jobs not yet SUCCEEDED/FAILED, oldest first (restart recovery and admission)."""

    async def append_logs(self, job_id: str, phase: str, lines: Sequence[LogLine]) -> None: ...

    async def get_logs(self, job_id: str, phase: str | None = None) -> dict[str, list[LogLine]]:
        """Complete logs per phase, in write order."""

    async def read_logs(self, job_id: str, after: int = 0, limit: int = 500,
                        phase: str | None = None) -> list[SeqLine]:
        """Up to `limit` lines with `seq > after`, in write order: the cursor of log streams (any replica)."""

    async def ping(self) -> None:
        """Raises `StoreError` when the store is not usable (readiness)."""

    async def aclose(self) -> None: ...


def dump_record(record: JobRecord) -> str:
    """Serialise for storage. Unlike API responses this keeps the webhook secret: it is needed to sign webhooks."""
    return record.model_dump_json(context=SECRETS_CONTEXT)


def load_record(raw: str | bytes) -> JobRecord:
    return JobRecord.model_validate_json(raw)
