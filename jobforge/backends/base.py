"""The backend contract: run a phase somewhere, report what happened as events.

A backend only runs things and reports facts (phase started / succeeded / failed, log lines). Retries,
webhooks, timeouts policy and storage live above it, in the pipeline and the service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from jobforge.config import JobConfig
from jobforge.models import JobRecord, LogLine
from jobforge.pipeline import DispatchPhase, Event, StopPhase


@dataclass(frozen=True)
class JobEvent:
    """A pipeline event for one job."""

    job_id: str
    event: Event


@dataclass(frozen=True)
class LogChunk:
    """Log lines of one job's phase ("build", "test", "publish" or "cleanup"), in order."""

    job_id: str
    phase: str
    lines: Sequence[LogLine]


BackendMessage = JobEvent | LogChunk


class Backend(Protocol):
    resumable: bool
    """True when phases keep running without the server, so a restarted server re-attaches instead of failing them."""

    async def dispatch(self, command: DispatchPhase, payload: dict, config: JobConfig) -> None:
        """Start the phase; idempotent per `command.dispatch_key`. `config` decides where it runs (a scheduler's
        job spec: resources, GPU, constraints, Vault); `payload` is the task script's input. Raises `BackendError`."""

    async def stop(self, command: StopPhase) -> None:
        """Stop a running phase; stopping a finished one is a no-op."""

    async def cleanup(self, job_id: str, payload: dict, config: JobConfig) -> bool:
        """Delete the job's temp image; its output is reported as a `LogChunk` for phase "cleanup"."""

    def events(self) -> AsyncIterator[BackendMessage]:
        """Everything that happens, in order per job: a phase's log lines come before its end event."""

    async def check(self) -> dict[str, str]:
        """Readiness problems by name (empty when usable)."""

    async def aclose(self) -> None: ...


class ResumableBackend(Backend, Protocol):
    async def resume(self, running: list[tuple[DispatchPhase, JobRecord]]) -> None:
        """After a restart: re-attach to each job's running phase (the command that started it) and report what
        happened since, through `events()`."""
