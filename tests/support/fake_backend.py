"""An in-memory backend for service and server tests (like httpx's MockTransport).

Each phase's outcome is scripted: "ok" and "fail" finish at once, "hold" waits for `finish()`. It records every
command it receives, so tests can assert what was (not) dispatched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from jobforge.backends.base import BackendMessage, JobEvent, LogChunk
from jobforge.config import JobConfig
from jobforge.models import LogLine, LogStream, Phase
from jobforge.pipeline import (
    DispatchPhase,
    PhaseFailed,
    PhaseStarted,
    PhaseSucceeded,
    StopPhase,
)


def now() -> datetime:
    return datetime.now(UTC)


class FakeBackend:
    resumable = False

    def __init__(self) -> None:
        self.queue: asyncio.Queue[BackendMessage] = asyncio.Queue()
        self.outcomes: dict[Phase, str] = {}
        self.dispatched: list[DispatchPhase] = []
        self.payloads: list[dict] = []
        self.stopped: list[StopPhase] = []
        self.cleaned: list[str] = []
        self.problems: dict[str, str] = {}
        self.stop_error: Exception | None = None
        """Raised by `stop` (after recording the command), like a scheduler that is down."""
        self.cleanup_gate: asyncio.Event | None = None
        """When set, cleanups wait for this event (a deletion still running at shutdown)."""
        self.cleanup_failures: list[Exception | bool] = []
        """Outcomes of the next cleanups, in order: an exception to raise or False; then success."""

    async def dispatch(self, command: DispatchPhase, payload: dict, config: JobConfig) -> None:
        self.dispatched.append(command)
        self.payloads.append(payload)
        self._emit(command, PhaseStarted)
        self.queue.put_nowait(LogChunk(command.job_id, command.phase.value, [
            LogLine(ts=now(), stream=LogStream.STDOUT, line=f"{command.phase.value} line {i}") for i in range(3)]))
        outcome = self.outcomes.get(command.phase, "ok")
        if outcome != "hold":
            self.finish(command, ok=outcome == "ok")

    def finish(self, command: DispatchPhase, ok: bool = True) -> None:
        if ok:
            self._emit(command, PhaseSucceeded)
        else:
            self._emit(command, PhaseFailed, error=f"{command.phase.value} phase failed: scripted failure")

    def _emit(self, command: DispatchPhase, cls, **kw) -> None:
        self.queue.put_nowait(JobEvent(command.job_id, cls(phase=command.phase, attempt=command.attempt, at=now(), **kw)))

    async def stop(self, command: StopPhase) -> None:
        self.stopped.append(command)
        if self.stop_error is not None:
            raise self.stop_error

    async def cleanup(self, job_id: str, payload: dict, config: JobConfig) -> bool:
        self.cleaned.append(job_id)
        if self.cleanup_gate is not None:
            await self.cleanup_gate.wait()
        if self.cleanup_failures:
            outcome = self.cleanup_failures.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return True

    async def events(self) -> AsyncIterator[BackendMessage]:
        while True:
            yield await self.queue.get()

    async def check(self) -> dict[str, str]:
        return dict(self.problems)

    async def aclose(self) -> None:
        pass
