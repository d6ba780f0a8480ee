"""The job pipeline as a pure state machine: ``step(record, event, policy) -> (record, commands)``.

Two rules, as in h11: everything that decides a transition lives in this file, and nothing here does I/O —
no clock, no randomness, no asyncio. Time arrives inside events; the shell (`jobforge.service`) executes the
returned commands and stores the returned record.

Transitions are data (`_TRANSITIONS[status][event type]`). An event the table does not allow raises
`IllegalTransition`, except that phase events for another phase or attempt, and any event but a kill for a
finished job, are dropped: event streams replay and processes report after being killed. A finished job still
takes `TempImageDeleted`: it settles after the first attempt to delete its temp image, and a failed deletion
is retried (`DeleteTempImage.delay_seconds`) a bounded number of times.

The service's own failure policy lives here too, so it is decided in one place: `Tick` (the clock, as an event)
fails a phase that no backend event finished by its deadline, `JobFailed` ends a job the service cannot carry
on (its state or logs cannot be stored), and `store_retry_delay` says how often a failed store write is retried.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from jobforge.config import JobConfig, Resources, format_duration
from jobforge.errors import IllegalTransition
from jobforge.models import PHASES, JobRecord, JobStatus, Phase, PhaseRun, PhaseStatus, WebhookEvent

KILLED_BY_USER = "killed by user"

STATUS_OF_PHASE = {Phase.BUILD: JobStatus.BUILDING, Phase.TEST: JobStatus.TESTING, Phase.PUBLISH: JobStatus.PUBLISHING}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Policy(_Frozen):
    """Service-wide defaults the pipeline needs; a job config may override the timeouts."""

    build_timeout: float = 30 * 60
    test_timeout: float = 15 * 60
    publish_timeout: float = 15 * 60
    max_attempts: int = 2
    deadline_grace: float = 5 * 60
    """A phase not finished by backend events within its timeout plus this is failed by the service itself."""
    store_attempts: int = 5
    store_backoff: float = 0.05
    """Seconds before the first retry of a failed store write; doubled per attempt."""
    cleanup_attempts: int = 8
    cleanup_backoff: float = 10.0
    """Seconds before the first retry of a failed temp image deletion; doubled per attempt, at most an hour."""


# ---------------------------------------------------------------- events

class Event(_Frozen):
    at: datetime


class Admitted(Event):
    """A concurrency slot is free: start the job."""


class KillRequested(Event):
    pass


class TempImageDeleted(Event):
    """The finished job's temp image was deleted (ok) or could not be (`error` says why)."""

    ok: bool
    error: str | None = None


class Tick(Event):
    """The clock: a running phase past its deadline is failed (its backend never reported an end)."""


class JobFailed(Event):
    """The service cannot carry the job on (e.g. its state or logs cannot be stored): fail it with `error`."""

    error: str


class PhaseEvent(Event):
    phase: Phase
    attempt: int


class PhaseStarted(PhaseEvent):
    pass


class ResourceUsage(_Frozen):
    """What one phase's processes consumed, as its backend measured them (not as the task said)."""

    cpu_seconds: float = Field(ge=0)
    """User + system time."""
    memory_peak_bytes: int = Field(ge=0)


class CacheUse(_Frozen):
    """One build's layer cache use: cacheable steps taken from a cache (local store or registry cache) and built."""

    hits: int = Field(ge=0)
    misses: int = Field(ge=0)


class PhaseEnded(PhaseEvent):
    """What a backend reports with a phase's end besides how it ended: the facts for the metrics, when known."""

    usage: ResourceUsage | None = None
    cache: CacheUse | None = None
    """From the task's control line (jobforge.control), never from a line its commands could print."""


class PhaseSucceeded(PhaseEnded):
    pass


class PhaseFailed(PhaseEnded):
    error: str
    retryable: bool = False
    """True when the failure was the infrastructure's (lost allocation), not the job's."""


# ---------------------------------------------------------------- commands

class Command(_Frozen):
    job_id: str


class DispatchPhase(Command):
    phase: Phase
    attempt: int
    timeout_seconds: float
    resources: Resources

    @property
    def dispatch_key(self) -> str:
        """Stable per (job, phase, attempt): dispatching twice is a no-op for an idempotent backend."""
        return f"{self.job_id}-{self.phase.value}-{self.attempt}"


class StopPhase(Command):
    phase: Phase
    attempt: int


class DeleteTempImage(Command):
    delay_seconds: float = 0.0
    """A retry waits this long first."""


class FireWebhook(Command):
    """Queue one webhook. Its facts are decided here, time included; the shell adds the job's metadata."""

    event: WebhookEvent
    status: JobStatus
    """The job's status once the transition is done (e.g. TESTING for build.completed when a test follows)."""
    phase: Phase | None
    at: datetime
    duration: float
    """Seconds: of the phase for phase events (0 when it starts), of the whole job for job events."""
    error: str | None = None


# ---------------------------------------------------------------- helpers

def new_job(job_id: str, config: JobConfig, at: datetime) -> JobRecord:
    return JobRecord(job_id=job_id, config=config, image_tags=config.image_tags_for(job_id), submitted_at=at)


def phase_plan(config: JobConfig) -> tuple[Phase, ...]:
    return PHASES if config.test_enabled else (Phase.BUILD, Phase.PUBLISH)


def _timeout(config: JobConfig, phase: Phase, policy: Policy) -> float:
    if phase is Phase.BUILD:
        return config.build_timeout_seconds or policy.build_timeout
    if phase is Phase.TEST:
        return (config.test.timeout_seconds if config.test else None) or policy.test_timeout
    return policy.publish_timeout


def deadline_seconds(config: JobConfig, phase: Phase, policy: Policy) -> float:
    """Seconds after dispatch at which the service fails the phase itself."""
    return _timeout(config, phase, policy) + policy.deadline_grace


def store_retry_delay(attempt: int, policy: Policy) -> float | None:
    """Seconds to wait before retrying a store write that failed `attempt` times; None: give up."""
    if attempt >= policy.store_attempts:
        return None
    return policy.store_backoff * 2 ** (attempt - 1)


def cleanup_retry_delay(attempts: int, policy: Policy) -> float | None:
    """Seconds before retrying a temp image deletion that failed `attempts` times; None: give up."""
    if attempts >= policy.cleanup_attempts:
        return None
    return min(policy.cleanup_backoff * 2 ** (attempts - 1), 3600.0)


def current_dispatch(record: JobRecord, policy: Policy) -> DispatchPhase | None:
    """The command that started the job's running phase, for a backend that re-attaches after a restart."""
    phase = record.current_phase
    if phase is None:
        return None
    return DispatchPhase(job_id=record.job_id, phase=phase, attempt=record.phases[phase].attempt,
                         timeout_seconds=_timeout(record.config, phase, policy),
                         resources=record.config.resources_for(phase.value))


def _with_phase(record: JobRecord, phase: Phase, **changes) -> dict[Phase, PhaseRun]:
    phases = dict(record.phases)
    phases[phase] = phases[phase].model_copy(update=changes)
    return phases


def _webhooks(new: JobRecord, event: WebhookEvent, phase: Phase | None, at: datetime, duration: float,
              error: str | None = None) -> list[Command]:
    """The webhook for `event`, if the config asks for it: `webhook_on_success` gates the `*.completed` events,
    `webhook_on_failure` the `*.failed` events; `*.started` events go whenever `webhook_url` is set."""
    cfg = new.config
    if not cfg.webhook_url:
        return []
    outcome = event.value.rsplit(".", 1)[1]
    if (outcome == "completed" and not cfg.webhook_on_success) or (outcome == "failed" and not cfg.webhook_on_failure):
        return []
    return [FireWebhook(job_id=new.job_id, event=event, status=new.status, phase=phase, at=at, duration=duration,
                        error=error)]


def _phase_hook(new: JobRecord, phase: Phase, outcome: str, at: datetime) -> list[Command]:
    run = new.phases[phase]
    return _webhooks(new, WebhookEvent.of_phase(phase, outcome), phase, at, run.duration_seconds or 0.0, run.error)


def _dispatch(record: JobRecord, phase: Phase, attempt: int, at: datetime, policy: Policy,
              before: list[Command] | None = None):
    """Dispatch `phase`; `before` are the webhooks of the transition that led here (e.g. build.completed)."""
    phases = _with_phase(record, phase, status=PhaseStatus.RUNNING, attempt=attempt, dispatched_at=at,
                         started_at=None, ended_at=None, error=None)
    new = record.model_copy(update={"status": STATUS_OF_PHASE[phase], "current_phase": phase, "phases": phases})
    started = _phase_hook(new, phase, "started", at) if attempt == 1 else []  # a retry is the same phase going on
    hooks = [c.model_copy(update={"status": new.status}) for c in before or []]
    return new, [current_dispatch(new, policy), *hooks, *started]


def _finish(record: JobRecord, status: JobStatus, at: datetime, phases: dict[Phase, PhaseRun],
            failed_phase: Phase | None = None, error: str | None = None):
    phases = {p: (run.model_copy(update={"status": PhaseStatus.SKIPPED}) if run.status is PhaseStatus.PENDING else run)
              for p, run in phases.items()}
    built = record.phases[Phase.BUILD].attempt > 0
    new = record.model_copy(update={
        "status": status, "current_phase": None, "failed_phase": failed_phase, "error": error,
        "phases": phases, "finished_at": at, "cleanup_pending": built,
    })
    commands: list[Command] = [DeleteTempImage(job_id=record.job_id)] if built else []
    if failed_phase is not None and phases[failed_phase].status is PhaseStatus.FAILED:
        commands += _phase_hook(new, failed_phase, "failed", at)
    elif status is JobStatus.SUCCEEDED:
        commands += _phase_hook(new, phase_plan(record.config)[-1], "completed", at)
    event = WebhookEvent.JOB_COMPLETED if status is JobStatus.SUCCEEDED else WebhookEvent.JOB_FAILED
    duration = max(0.0, (at - record.submitted_at).total_seconds())
    commands += _webhooks(new, event, failed_phase, at, duration, error)
    return new, commands


# ---------------------------------------------------------------- transitions

def _admit(record: JobRecord, event: Admitted, policy: Policy):
    return _dispatch(record, Phase.BUILD, 1, event.at, policy)


def _started(record: JobRecord, event: PhaseStarted, policy: Policy):
    if record.phases[event.phase].started_at is not None:  # replayed by a replica that took the job over
        return record, []
    return record.model_copy(update={"phases": _with_phase(record, event.phase, started_at=event.at)}), []


def _succeeded(record: JobRecord, event: PhaseSucceeded, policy: Policy):
    phases = _with_phase(record, event.phase, status=PhaseStatus.SUCCEEDED, ended_at=event.at)
    plan = phase_plan(record.config)
    done = record.model_copy(update={"phases": phases})
    position = plan.index(event.phase)
    if position + 1 < len(plan):
        return _dispatch(done, plan[position + 1], 1, event.at, policy,
                         before=_phase_hook(done, event.phase, "completed", event.at))
    return _finish(done, JobStatus.SUCCEEDED, event.at, phases)


def _failed(record: JobRecord, event: PhaseFailed, policy: Policy):
    if event.retryable and event.attempt < policy.max_attempts:
        return _dispatch(record, event.phase, event.attempt + 1, event.at, policy)
    phases = _with_phase(record, event.phase, status=PhaseStatus.FAILED, ended_at=event.at, error=event.error)
    return _finish(record, JobStatus.FAILED, event.at, phases, failed_phase=event.phase, error=event.error)


def _abort(record: JobRecord, at: datetime, error: str):
    """Fail the job now; a running phase is failed with it and stopped."""
    phase = record.current_phase
    if phase is None:
        return _finish(record, JobStatus.FAILED, at, dict(record.phases), error=error)
    run = record.phases[phase]
    phases = _with_phase(record, phase, status=PhaseStatus.FAILED, ended_at=at, error=error)
    new, commands = _finish(record, JobStatus.FAILED, at, phases, failed_phase=phase, error=error)
    return new, [StopPhase(job_id=record.job_id, phase=phase, attempt=run.attempt), *commands]


def _kill(record: JobRecord, event: KillRequested, policy: Policy):
    return _abort(record, event.at, KILLED_BY_USER)


def _job_failed(record: JobRecord, event: JobFailed, policy: Policy):
    return _abort(record, event.at, event.error)


def _tick(record: JobRecord, event: Tick, policy: Policy):
    phase = record.current_phase
    dispatched = record.phases[phase].dispatched_at if phase else None
    if phase is None or dispatched is None:
        return record, []
    limit = deadline_seconds(record.config, phase, policy)
    if (event.at - dispatched).total_seconds() < limit:
        return record, []
    return _abort(record, event.at, f"{phase.value} phase did not finish within {format_duration(round(limit))} "
                                    "(its timeout plus grace) and its runner never reported an end")


def _temp_deleted(record: JobRecord, event: TempImageDeleted, policy: Policy):
    if record.temp_image_deleted:
        return record, []
    if event.ok:
        return record.model_copy(update={"cleanup_pending": False, "cleanup_retry": False,
                                         "temp_image_deleted": True, "cleanup_error": None}), []
    attempts = record.cleanup_attempts + 1
    delay = cleanup_retry_delay(attempts, policy)
    new = record.model_copy(update={
        "cleanup_pending": False, "cleanup_retry": delay is not None, "temp_image_deleted": False,
        "cleanup_attempts": attempts, "cleanup_error": event.error or "the temp image could not be deleted"})
    return new, ([DeleteTempImage(job_id=record.job_id, delay_seconds=delay)] if delay is not None else [])


Transition = Callable[[JobRecord, Event, Policy], tuple[JobRecord, list[Command]]]
_RUNNING = {PhaseStarted: _started, PhaseSucceeded: _succeeded, PhaseFailed: _failed, KillRequested: _kill,
            JobFailed: _job_failed, Tick: _tick}
_TRANSITIONS: dict[JobStatus, dict[type[Event], Transition]] = {
    JobStatus.PENDING: {Admitted: _admit, KillRequested: _kill, JobFailed: _job_failed, Tick: _tick},
    JobStatus.BUILDING: _RUNNING,
    JobStatus.TESTING: _RUNNING,
    JobStatus.PUBLISHING: _RUNNING,
    JobStatus.SUCCEEDED: {TempImageDeleted: _temp_deleted},
    JobStatus.FAILED: {TempImageDeleted: _temp_deleted},
}


def _is_stale(record: JobRecord, event: Event) -> bool:
    if isinstance(event, PhaseEvent):
        return event.phase is not record.current_phase or event.attempt != record.phases[event.phase].attempt
    return record.status.terminal and not isinstance(event, (KillRequested, TempImageDeleted))


def step(record: JobRecord, event: Event, policy: Policy) -> tuple[JobRecord, list[Command]]:
    """Apply one event; returns the new record and the commands the shell must execute, in order."""
    if _is_stale(record, event):
        return record, []
    transition = _TRANSITIONS[record.status].get(type(event))
    if transition is None:
        raise IllegalTransition(record.status.value, type(event).__name__)
    return transition(record, event, policy)


def transition_table() -> str:
    """The transition table as Markdown; docs/architecture.md embeds it (a test keeps the two equal)."""
    rows = ["| status | event | handled by |", "|---|---|---|"]
    for status, events in _TRANSITIONS.items():
        for event, handler in events.items():
            rows.append(f"| {status.value} | {event.__name__} | `{handler.__name__.lstrip('_')}` |")
    return "\n".join(rows)
