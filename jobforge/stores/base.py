"""The store contract: job records with compare-and-set, append-only per-phase logs, and the webhook outbox.

Every store implements the same CAS: `put(record, expected_version)` succeeds only if the stored version still
equals `expected_version` (0 = must not exist yet), else raises `Conflict`. SQLite uses a version column,
Consul its ModifyIndex. Webhook deliveries use the same CAS (`put_delivery`): creating one that exists is a
`Conflict` (delivery ids are deterministic, so queuing an event twice is harmless), and a sender claims a
delivery by writing a lease with the version it read, so two replicas never send it at once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from jobforge.config import SECRETS_CONTEXT
from jobforge.rules import STORED_CONTEXT
from jobforge.models import PHASES, JobRecord, JobStatus, LogLine, WebhookDelivery


class Versioned(NamedTuple):
    record: JobRecord
    version: int


class VersionedDelivery(NamedTuple):
    delivery: WebhookDelivery
    version: int


class DueDeliveries(NamedTuple):
    """What the webhook worker may send now: each job's first pending delivery, when its time has come."""

    due: list[VersionedDelivery]
    """Heads due now (past their backoff, not leased), oldest first (created_at, job_id)."""
    next_due: datetime | None
    """When the earliest head not yet due comes due (None: no head waits)."""


def due_at(delivery: WebhookDelivery) -> datetime:
    """When a pending delivery may be sent: after its backoff, and after the lease of a sender that claimed it
    (in UTC, so stores can compare it as text)."""
    lease = delivery.lease_until or delivery.next_attempt_at
    return max(delivery.next_attempt_at, lease).astimezone(UTC)


def due_heads(heads: Iterable[VersionedDelivery], now: datetime, limit: int) -> DueDeliveries:
    """`Store.due_deliveries` over the heads read (stores that cannot filter on the server side)."""
    due: list[VersionedDelivery] = []
    waiting: list[datetime] = []
    for head in heads:
        when = due_at(head.delivery)
        if when <= now:
            due.append(head)
        else:
            waiting.append(when)
    due.sort(key=lambda v: (v.delivery.created_at, v.delivery.job_id))
    return DueDeliveries(due[:limit], min(waiting, default=None))


class LogPage(NamedTuple):
    lines: list[tuple[str, LogLine]]
    """(phase, line) in reading order: phase by phase (`phase_order`), each in write order."""
    total: int
    """Lines matching the request in all (every page)."""
    texts: list[tuple[str, str]] | None = None
    """With `text_only`: (phase, text) in the same order, and `lines` empty. A plain getLogs page needs only
    the text, and building a `LogLine` per line is most of the cost of a 10,000-line page."""


_PHASE_RANK = {p.value: i for i, p in enumerate(PHASES)}


def phase_order(name: str) -> tuple[int, str]:
    """Reading order of a job's log phases: build, test, publish, then any other (e.g. cleanup) by name."""
    return _PHASE_RANK.get(name, len(_PHASE_RANK)), name


def page_of(logs: dict[str, list[LogLine]], offset: int, limit: int, max_chars: int,
            text_only: bool = False) -> LogPage:
    """`log_page` over complete logs in memory (stores that cannot page on the server side)."""
    if text_only:
        page = page_of(logs, offset, limit, max_chars)
        return LogPage([], page.total, [(name, line.line) for name, line in page.lines])
    lines: list[tuple[str, LogLine]] = []
    chars, skip = 0, offset
    for name in sorted(logs, key=phase_order):
        for line in logs[name][skip:]:
            if len(lines) >= limit or (lines and chars + len(line.line) > max_chars):
                return LogPage(lines, sum(map(len, logs.values())))
            lines.append((name, line))
            chars += len(line.line)
        skip = max(0, skip - len(logs[name]))
    return LogPage(lines, sum(map(len, logs.values())))


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

    async def list(self, limit: int, offset: int, owners: Collection[str] | None = None,
                   status: JobStatus | None = None) -> tuple[list[JobRecord], int]:
        """Newest first, with the total count matching the filters (`owners` None: every owner)."""

    async def unfinished(self) -> list[JobRecord]:
        """Jobs the service still owes work (`JobRecord.outstanding`: not yet SUCCEEDED/FAILED, or a temp image
        deletion in flight or to retry), oldest first (restart recovery, admission, cleanup retries)."""

    async def open_jobs(self) -> list[tuple[str, JobStatus]]:
        """(job id, status) of the jobs not finished yet (PENDING or running), oldest first: what admission
        counts, read without parsing whole records."""

    async def append_logs(self, job_id: str, phase: str, lines: Sequence[LogLine]) -> None: ...

    async def get_logs(self, job_id: str, phase: str | None = None) -> dict[str, list[LogLine]]:
        """Complete logs per phase, in write order."""

    async def put_delivery(self, delivery: WebhookDelivery, expected_version: int) -> int:
        """Compare-and-set of one outbox entry (0 = create); returns the new version. Raises `Conflict` when
        it exists already (0) or changed since `expected_version`, and for any update of a finished delivery
        (one no longer PENDING is final)."""

    async def pending_deliveries(self, limit: int) -> list[VersionedDelivery]:
        """Up to `limit` deliveries still PENDING, oldest first (created_at, job_id, event order)."""

    async def due_deliveries(self, now: datetime, limit: int) -> DueDeliveries:
        """The worker's read: of each job with PENDING deliveries only the first (event order) — a job's later
        events wait for it — and of those, up to `limit` due at `now` (`due_at`), oldest first, plus when the
        next of the others comes due. Heads in backoff are left out, so jobs stuck on a dead receiver, however
        many, never crowd another job's due delivery out of the answer."""

    async def job_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """Every delivery of one job, in event order, whatever its state."""

    async def log_page(self, job_id: str, phase: str | None, offset: int, limit: int, max_chars: int,
                       text_only: bool = False) -> LogPage:
        """At most `limit` lines from `offset` (over the phases in `phase_order`), ending early once the lines
        hold more than `max_chars` characters (at least one line is returned when any is left); with
        `text_only`, in `texts` instead of `lines`."""

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
    return JobRecord.model_validate_json(raw, context=dict(STORED_CONTEXT))


def dump_delivery(delivery: WebhookDelivery) -> str:
    return delivery.model_dump_json()


def load_delivery(raw: str | bytes) -> WebhookDelivery:
    return WebhookDelivery.model_validate_json(raw)
