"""Wire and record models: one pydantic model per object that crosses a boundary.

The job config itself lives in `jobforge.config`; this module holds the job record the store keeps, the log
lines, and the params/result model of every API method. JSON-RPC, REST, MCP, OpenAPI and the client all derive
from these classes, so a field exists in exactly one place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from jobforge.config import JobConfig, JsonInt
from jobforge.rules import OWNER_MAX_LENGTH, mask_url_passwords

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_HISTORY_LIMIT = 500
MAX_LOG_LIMIT = 10_000
MAX_OFFSET = 1_000_000_000
"""Paging bounds: no reply is unbounded, and no offset overflows a store's integer (SQLite: 64 bits)."""


def utcnow() -> datetime:
    """The clock every record and log timestamp comes from (timezone-aware UTC); injected where tests need."""
    return datetime.now(UTC)


class Phase(str, Enum):
    BUILD = "build"
    TEST = "test"
    PUBLISH = "publish"


PHASES: tuple[Phase, ...] = (Phase.BUILD, Phase.TEST, Phase.PUBLISH)


class JobStatus(str, Enum):
    PENDING = "PENDING"
    BUILDING = "BUILDING"
    TESTING = "TESTING"
    PUBLISHING = "PUBLISHING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)

    @property
    def running(self) -> bool:
        return self in (JobStatus.BUILDING, JobStatus.TESTING, JobStatus.PUBLISHING)


class PhaseStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PhaseRun(_Frozen):
    """One phase of one job: facts only; durations are derived."""

    status: PhaseStatus = PhaseStatus.PENDING
    attempt: int = 0
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None

    @property
    def duration_seconds(self) -> float | None:
        start = self.started_at or self.dispatched_at
        if start is None or self.ended_at is None:
            return None
        return max(0.0, (self.ended_at - start).total_seconds())


class JobRecord(_Frozen):
    """What the store keeps per job; the pipeline derives the next record from it."""

    job_id: str
    config: JobConfig
    status: JobStatus = JobStatus.PENDING
    current_phase: Phase | None = None
    failed_phase: Phase | None = None
    error: str | None = None
    phases: dict[Phase, PhaseRun] = Field(default_factory=lambda: {p: PhaseRun() for p in PHASES})
    image_tags: list[str]
    submitted_at: datetime
    finished_at: datetime | None = None
    cleanup_pending: bool = False
    """The temp image is being deleted; the job is settled once this is False again."""
    temp_image_deleted: bool | None = None
    cleanup_retry: bool = False
    """Deleting the temp image failed and will be retried (in the background, and after a restart)."""
    cleanup_attempts: int = 0
    cleanup_error: str | None = None
    """Why the temp image could not be deleted (last attempt)."""

    @property
    def settled(self) -> bool:
        """Finished, and nothing of it is still being cleaned up: watchers get their last message."""
        return self.status.terminal and not self.cleanup_pending

    @property
    def outstanding(self) -> bool:
        """The service still owes this job work: running it, or deleting its temp image (restart recovery)."""
        return not self.status.terminal or self.cleanup_pending or self.cleanup_retry


class LogStream(str, Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    SYSTEM = "system"


class LogLine(_Frozen):
    ts: datetime
    stream: LogStream
    line: str


# ---------------------------------------------------------------- webhooks

class WebhookEvent(str, Enum):
    """The reference's webhook events, in lifecycle order: a job's deliveries are sent in this order."""

    BUILD_STARTED = "build.started"
    BUILD_COMPLETED = "build.completed"
    BUILD_FAILED = "build.failed"
    TEST_STARTED = "test.started"
    TEST_COMPLETED = "test.completed"
    TEST_FAILED = "test.failed"
    PUBLISH_STARTED = "publish.started"
    PUBLISH_COMPLETED = "publish.completed"
    PUBLISH_FAILED = "publish.failed"
    JOB_COMPLETED = "job.completed"
    JOB_FAILED = "job.failed"

    @property
    def seq(self) -> int:
        """Position in the lifecycle; each event happens at most once per job, so (job, seq) orders deliveries."""
        return list(WebhookEvent).index(self)

    @classmethod
    def of_phase(cls, phase: Phase, outcome: Literal["started", "completed", "failed"]) -> "WebhookEvent":
        return cls(f"{phase.value}.{outcome}")


class DeliveryState(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    """Gave up: a non-retryable answer (4xx, 3xx), or every attempt failed."""
    REFUSED = "refused"
    """The outbound policy refused the destination; nothing was sent."""


class WebhookDelivery(_Frozen):
    """One queued webhook in the store's outbox. The body is the exact signed JSON; it holds no secret (the
    signing key, URL and custom headers are read from the job's stored config when sending)."""

    delivery_id: str
    job_id: str
    event: WebhookEvent
    body: str
    created_at: datetime
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    next_attempt_at: datetime
    lease_until: datetime | None = None
    """A sender claimed it until then (so two replicas never send one delivery at once)."""
    last_status: int | None = None
    outcome: str | None = None
    finished_at: datetime | None = None

    @property
    def seq(self) -> int:
        return self.event.seq


def masked_line(line: LogLine) -> LogLine:
    """The line with URL passwords masked (what the store keeps and watchers see)."""
    text = mask_url_passwords(line.line)
    return line if text == line.line else line.model_copy(update={"line": text})


def _masked(text: str | None) -> str | None:
    return None if text is None else mask_url_passwords(text)


# ---------------------------------------------------------------- API params

class _Params(BaseModel):
    """Strict numbers and booleans (no `false` for an offset, no `1` for a flag), as the JSON Schema says; the
    GET routes turn their query strings into numbers and booleans first (`jobforge.server.app`)."""

    model_config = ConfigDict(extra="forbid")


class SubmitJobParams(_Params):
    job_config: JobConfig


class JobIdParams(_Params):
    job_id: str = Field(pattern=JOB_ID_PATTERN)


class GetLogsParams(JobIdParams):
    phase: Phase | None = None
    structured: StrictBool = Field(False, description="also return entries with timestamp and stream")
    offset: JsonInt = Field(0, ge=0, le=MAX_OFFSET,
                        description="first line to return, counted over the phases in order (build, test, publish, "
                                    "then others)")
    limit: JsonInt = Field(MAX_LOG_LIMIT, ge=1, le=MAX_LOG_LIMIT,
                       description="most lines to return; a page also ends early at the reply size limit "
                                   "(see next_offset)")


class HistoryParams(_Params):
    limit: JsonInt = Field(10, ge=1, le=MAX_HISTORY_LIMIT)
    offset: JsonInt = Field(0, ge=0, le=MAX_OFFSET)
    owner: str | None = Field(None, max_length=OWNER_MAX_LENGTH)
    status: JobStatus | None = None


class WatchParams(JobIdParams):
    logs: StrictBool = Field(False, description="also stream log lines as they are written")


class StreamLogsParams(JobIdParams):
    phase: Phase | None = Field(None, description="only this phase's lines")
    after: JsonInt = Field(0, ge=0, le=2**62, description="resume after this line sequence number (an SSE event id)")


# ---------------------------------------------------------------- API results

class SubmitJobResult(BaseModel):
    job_id: str
    status: JobStatus


class JobMetrics(BaseModel):
    job_start: datetime | None = None
    job_end: datetime | None = None
    build_start: datetime | None = None
    build_end: datetime | None = None
    test_start: datetime | None = None
    test_end: datetime | None = None
    publish_start: datetime | None = None
    publish_end: datetime | None = None
    build_duration: float | None = None
    test_duration: float | None = None
    publish_duration: float | None = None
    total_duration: float | None = None


class PhaseSummary(BaseModel):
    status: PhaseStatus
    attempt: int
    started_at: datetime | None
    ended_at: datetime | None
    duration: float | None
    error: str | None


class JobStatusResult(BaseModel):
    job_id: str
    status: JobStatus
    current_phase: Phase | None
    failed_phase: Phase | None
    error: str | None
    config: dict = Field(description="the job config with secrets redacted")
    metrics: JobMetrics
    image_tags: list[str]
    phases: dict[Phase, PhaseSummary]
    submitted_at: datetime
    finished_at: datetime | None
    temp_image_deleted: bool | None = None
    cleanup_error: str | None = Field(None, description="why the temp image could not be deleted (retried)")

    @classmethod
    def from_record(cls, record: JobRecord) -> "JobStatusResult":
        m: dict = {"job_start": record.submitted_at, "job_end": record.finished_at}
        phases = {}
        for phase, run in record.phases.items():
            m[f"{phase.value}_start"] = run.started_at or run.dispatched_at
            m[f"{phase.value}_end"] = run.ended_at
            m[f"{phase.value}_duration"] = run.duration_seconds
            phases[phase] = PhaseSummary(
                status=run.status, attempt=run.attempt, started_at=run.started_at or run.dispatched_at,
                ended_at=run.ended_at, duration=run.duration_seconds, error=_masked(run.error),
            )
        if record.finished_at is not None:
            m["total_duration"] = (record.finished_at - record.submitted_at).total_seconds()
        return cls(
            job_id=record.job_id, status=record.status, current_phase=record.current_phase,
            failed_phase=record.failed_phase, error=_masked(record.error), config=record.config.redacted(),
            metrics=JobMetrics(**m), image_tags=record.image_tags, phases=phases,
            submitted_at=record.submitted_at, finished_at=record.finished_at,
            temp_image_deleted=record.temp_image_deleted, cleanup_error=record.cleanup_error,
        )


class HistoryItem(JobStatusResult):
    id: str = Field(description="same as job_id (the reference's history field name)")


class HistoryResult(BaseModel):
    jobs: list[HistoryItem]
    total: int
    limit: int
    offset: int


class LogsResult(BaseModel):
    job_id: str
    logs: dict[str, list[str]]
    entries: dict[str, list[LogLine]] | None = None
    offset: int = 0
    total: int | None = Field(None, description="lines of the job (or phase) in all; None from older services")
    next_offset: int | None = Field(None, description="offset of the next page; None when this page is the last")


class KillJobResult(BaseModel):
    job_id: str
    status: JobStatus
    message: str


class CleanupResult(BaseModel):
    job_id: str
    cleaned: list[str]


class HealthResult(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class WatchUpdate(BaseModel):
    """One message of a watch stream: a status change, a log line, or the end of the stream."""

    type: Literal["status", "log", "end"]
    job: JobStatusResult | None = None
    phase: Phase | None = None
    log: LogLine | None = None


class LogMessage(BaseModel):
    """One line of a log stream: the reference's `{job_id, phase, timestamp, level, message}` plus `stream` and
    `seq`, the line's position in the store (increasing per job; an SSE event id, a resume point)."""

    type: Literal["log"] = "log"
    job_id: str
    seq: int
    phase: str
    timestamp: datetime
    level: Literal["info", "error"]
    stream: LogStream
    message: str


class StreamStatus(BaseModel):
    """The last message of a log stream: how the job ended."""

    type: Literal["status"] = "status"
    job_id: str
    status: JobStatus
    failed_phase: Phase | None
    error: str | None


# ---------------------------------------------------------------- the method table

class Access(str, Enum):
    """Whose jobs a method touches, so one authorisation rule (`jobforge.auth`) serves every transport."""

    JOB = "job"          # one existing job (params carry job_id): the token must act for the job's owner
    SUBMIT = "submit"    # a new job: the token must act for job_config.owner
    HISTORY = "history"  # a listing: narrowed to the owners the token may act for


class MethodSpec(BaseModel):
    """One API method: the single source for JSON-RPC, REST, MCP tools, OpenAPI and the client."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    params: type[BaseModel]
    result: type[BaseModel]
    summary: str
    access: Access
    mutates: bool = False


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec(name="submitJob", params=SubmitJobParams, result=SubmitJobResult, mutates=True, access=Access.SUBMIT,
               summary="Validate a job config and queue a build -> test -> publish job."),
    MethodSpec(name="getStatus", params=JobIdParams, result=JobStatusResult, access=Access.JOB,
               summary="Status, phase timings and redacted config of one job."),
    MethodSpec(name="getLogs", params=GetLogsParams, result=LogsResult, access=Access.JOB,
               summary="Complete logs of a job, per phase (optionally one phase)."),
    MethodSpec(name="killJob", params=JobIdParams, result=KillJobResult, mutates=True, access=Access.JOB,
               summary="Stop a pending or running job; it ends FAILED with 'killed by user'."),
    MethodSpec(name="cleanup", params=JobIdParams, result=CleanupResult, mutates=True, access=Access.JOB,
               summary="Delete a finished job's temporary image and scratch files (idempotent)."),
    MethodSpec(name="getHistory", params=HistoryParams, result=HistoryResult, access=Access.HISTORY,
               summary="Jobs newest first, paged with limit/offset, optionally filtered by owner or status."),
)}
