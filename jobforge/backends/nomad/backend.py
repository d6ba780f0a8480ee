"""Nomad backend: phases are dispatched runs of pre-registered parameterized jobs, followed on the event stream.

- **Dispatch.** A phase runs on `jobforge-<phase>` or, when its config needs a different job spec (resources,
  GPU, constraints, Vault), on a variant `jobforge-<phase>-<hash>` registered once (`jobforge.nomad`). The task
  script's JSON input is the dispatch payload; `job_id`/`attempt` are meta; the pipeline's dispatch key is the
  idempotency token, so a retried dispatch never starts a second run.
- **Events.** One subscription to `Allocation` events (no polling). A child's first running allocation is
  `PhaseStarted`; a terminal one ends the phase once its logs are drained. Runs are found by child job id, or,
  after a restart, from the child's meta.
- **Logs.** Each running allocation's stdout/stderr are followed as frames and reported line by line; when the
  allocation ends, the rest is read from the last offset, so nothing the task wrote is lost.
- **Timeouts and kills** stop the dispatched child job (deregister), never the parameterized parent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from jobforge.backends.base import BackendMessage, JobEvent, LogChunk
from jobforge.backends.nomad.api import MAX_PAYLOAD, NomadAPI
from jobforge.backends.nomad.wire import (
    AllocState,
    LineSplitter,
    alloc_outcome,
    frame_data,
)
from jobforge.config import JobConfig, format_duration
from jobforge.errors import BackendError
from jobforge.models import JobRecord, LogLine, LogStream, Phase, utcnow
from jobforge.nomad import RenderParams, render_job, variant_id, variant_spec
from jobforge.pipeline import (
    KILLED_BY_USER,
    DispatchPhase,
    PhaseFailed,
    PhaseStarted,
    PhaseSucceeded,
    StopPhase,
)

log = logging.getLogger("jobforge.backends.nomad")

_ERROR_PREFIX = "ERROR: "
_STREAMS = (("stdout", LogStream.STDOUT), ("stderr", LogStream.STDERR))
CLEANUP = "cleanup"



@dataclass
class _Run:
    """One dispatched child job: a phase attempt, or a temp-image cleanup."""

    job_id: str
    phase: str
    attempt: int
    child: str
    alloc_id: str | None = None
    started: bool = False
    finished: bool = False
    stopped: bool = False
    timed_out: float | None = None
    followers: list[asyncio.Task] = field(default_factory=list)
    received: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    splitters: dict[str, LineSplitter] = field(default_factory=lambda: {"stdout": LineSplitter(),
                                                                       "stderr": LineSplitter()})
    last_error: str | None = None
    done: asyncio.Future | None = None
    deadline: asyncio.Task | None = None

    @property
    def key(self) -> str:
        return f"{self.job_id}-{self.phase}-{self.attempt}"


class NomadBackend:
    resumable = True

    def __init__(self, api: NomadAPI, render: RenderParams, *, cleanup_timeout: float = 600.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._api = api
        self._render = render
        self._cleanup_timeout = cleanup_timeout
        self._clock = clock
        self._queue: asyncio.Queue[BackendMessage] = asyncio.Queue()
        self._registered: set[str] = set()
        self._register_lock = asyncio.Lock()
        self._by_child: dict[str, _Run] = {}
        self._by_key: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._event_index = 0

    # ------------------------------------------------------------ Backend API

    async def dispatch(self, command: DispatchPhase, payload: dict, config: JobConfig) -> None:
        if command.dispatch_key in self._by_key:
            return
        parent = await self._ensure_job(command.phase.value, config)
        run = _Run(command.job_id, command.phase.value, command.attempt, child="")
        self._by_key[run.key] = run
        try:
            run.child = await self._dispatch(parent, run, payload, command.dispatch_key, config.owner)
        except BaseException:
            self._by_key.pop(run.key, None)
            raise
        run.deadline = self._spawn(self._expire(run, command.timeout_seconds))
        await self._attach(run)

    async def stop(self, command: StopPhase) -> None:
        run = self._by_key.get(f"{command.job_id}-{command.phase.value}-{command.attempt}")
        if run is None or run.finished:
            return
        run.stopped = True
        await self._api.deregister(run.child)

    async def cleanup(self, job_id: str, payload: dict, config: JobConfig) -> bool:
        parent = await self._ensure_job(CLEANUP, config)
        run = _Run(job_id, CLEANUP, 0, child="", done=asyncio.get_running_loop().create_future())
        # A fresh token per call: a manual cleanup after the automatic one must run again.
        run.child = await self._dispatch(parent, run, payload, f"{job_id}-cleanup-{uuid.uuid4().hex[:8]}",
                                         config.owner)
        await self._attach(run)
        try:
            return await asyncio.wait_for(asyncio.shield(run.done), self._cleanup_timeout)
        except TimeoutError:
            await self._api.deregister(run.child)
            return False

    async def resume(self, running: Iterable[tuple[DispatchPhase, JobRecord]]) -> None:
        """Re-attach to phases that ran while the server was down: find each child, replay its allocation."""
        for command, record in running:
            parent = variant_id(command.phase.value, variant_spec(command.phase.value, record.config))
            run = _Run(command.job_id, command.phase.value, command.attempt, child="")
            child = next((stub["ID"] for stub in await self._api.children(parent)
                          if (stub.get("Meta") or {}).get("job_id") == command.job_id
                          and (stub.get("Meta") or {}).get("attempt") == str(command.attempt)), None)
            if child is None:
                self._report(run, PhaseFailed, retryable=True,
                             error=f"{run.phase} phase: its Nomad job was not found after a restart")
                continue
            run.child = child
            self._by_key[run.key] = run
            dispatched = record.phases[command.phase].dispatched_at or record.submitted_at
            left = command.timeout_seconds - (self._clock() - dispatched).total_seconds()
            run.deadline = self._spawn(self._expire(run, left))
            await self._attach(run)

    async def events(self) -> AsyncIterator[BackendMessage]:
        if self._watcher is None:
            self._watcher = self._spawn(self._watch())
        while True:
            yield await self._queue.get()

    async def check(self) -> dict[str, str]:
        try:
            leader = await self._api.leader()
        except BackendError as exc:
            return {"nomad": exc.message}
        return {} if leader else {"nomad": "the Nomad cluster has no leader"}

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._api.http.aclose()

    # ------------------------------------------------------------ dispatching

    async def _ensure_job(self, phase: str, config: JobConfig) -> str:
        """Register the phase's job (variant) once per process; Nomad ignores an identical re-registration."""
        spec = variant_spec(phase, config)
        job_id = variant_id(phase, spec)
        async with self._register_lock:
            if job_id not in self._registered:
                job = await self._api.parse_job(render_job(phase, spec, self._render))
                await self._api.register_job(job)
                self._registered.add(job_id)
        return job_id

    async def _dispatch(self, parent: str, run: _Run, payload: dict, token: str, owner: str) -> str:
        body = json.dumps(payload, separators=(",", ":")).encode()
        if len(body) > MAX_PAYLOAD:
            raise BackendError(f"the {run.phase} payload is {len(body)} bytes; Nomad dispatches at most "
                               f"{MAX_PAYLOAD}: shorten test commands, test env or build args")
        meta = {"job_id": run.job_id, "owner": owner}
        if run.phase != CLEANUP:
            meta["attempt"] = str(run.attempt)
        reply = await self._api.dispatch(parent, meta, body, token)
        return reply["DispatchedJobID"]

    async def _attach(self, run: _Run) -> None:
        """Follow the child from now on, and catch up on what happened before we listened (events that arrived
        while the dispatch reply was on its way, or while the server was down)."""
        self._by_child[run.child] = run
        for alloc in await self._api.job_allocations(run.child):
            await self._on_alloc(alloc)

    async def _expire(self, run: _Run, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))  # a deadline timer, not synchronisation
        if run.finished:
            return
        run.timed_out, run.finished = seconds, True
        await self._api.deregister(run.child)
        await self._finish(run, AllocState.FAILED, None)

    # ------------------------------------------------------------ following

    async def _watch(self) -> None:
        """Follow `Allocation` events for good; reconnect from the next index after any interruption."""
        delay = 0.5
        while True:
            try:
                async for batch in self._api.events("Allocation", self._event_index):
                    delay = 0.5
                    for event in batch.get("Events") or []:
                        alloc = (event.get("Payload") or {}).get("Allocation")
                        if alloc:
                            await self._on_alloc(alloc)
                    self._event_index = batch["Index"] + 1
            except BackendError as exc:
                log.warning("nomad event stream interrupted (%s); reconnecting from index %d",
                            exc.message, self._event_index)
            except ValueError as exc:  # a non-JSON tail: the server closed the subscription
                log.warning("nomad event stream closed by the server (%s); resubscribing", exc)
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 10.0)

    async def _on_alloc(self, alloc: dict) -> None:
        run = self._by_child.get(alloc.get("JobID", ""))
        if run is None or run.finished:
            return
        if run.alloc_id not in (None, alloc["ID"]):
            return  # an older allocation of the same child: restart and reschedule are off, so not ours
        run.alloc_id = alloc["ID"]
        outcome = alloc_outcome(alloc, run.phase)
        if outcome.state is not AllocState.PENDING and not run.started:
            run.started = True
            if run.phase != CLEANUP:
                self._report(run, PhaseStarted)
            for name, stream in _STREAMS:
                run.followers.append(self._spawn(self._follow(run, name, stream)))
        if outcome.terminal:
            run.finished = True  # later events for this child are ignored from here on
            self._spawn(self._finish(run, outcome.state, outcome.detail))

    async def _follow(self, run: _Run, name: str, stream: LogStream) -> None:
        async for frame in self._api.logs(run.alloc_id, run.phase, name, follow=True):
            self._take(run, name, stream, frame)

    def _take(self, run: _Run, name: str, stream: LogStream, frame: dict) -> None:
        data = frame_data(frame)
        if not data:
            return
        run.received[name] += len(data)
        self._lines(run, stream, run.splitters[name].feed(data))

    def _lines(self, run: _Run, stream: LogStream, lines: list[str]) -> None:
        if not lines:
            return
        now = self._clock()
        for line in lines:
            if stream is LogStream.STDERR and line.startswith(_ERROR_PREFIX):
                run.last_error = line[len(_ERROR_PREFIX):]
        self._queue.put_nowait(LogChunk(run.job_id, run.phase, [LogLine(ts=now, stream=stream, line=line)
                                                                for line in lines]))

    async def _drain(self, run: _Run) -> None:
        """Stop following and read what the task wrote after the last frame we saw."""
        for follower in run.followers:
            follower.cancel()
        await asyncio.gather(*run.followers, return_exceptions=True)
        if run.alloc_id is None:
            return
        for name, stream in _STREAMS:
            try:
                async for frame in self._api.logs(run.alloc_id, run.phase, name, follow=False,
                                                  offset=run.received[name]):
                    self._take(run, name, stream, frame)
            except BackendError as exc:  # e.g. no log file: the task never started
                log.info("no more %s for allocation %s: %s", name, run.alloc_id, exc.message)
            self._lines(run, stream, run.splitters[name].flush())

    async def _finish(self, run: _Run, state: AllocState, detail: str | None) -> None:
        if run.deadline is not None and run.deadline is not asyncio.current_task():
            run.deadline.cancel()
        await self._drain(run)
        if run.done is not None:
            run.done.set_result(state is AllocState.SUCCEEDED)
        elif run.stopped:
            self._report(run, PhaseFailed, error=KILLED_BY_USER)
        elif run.timed_out is not None:
            self._report(run, PhaseFailed,
                         error=f"{run.phase} phase timed out after {format_duration(round(run.timed_out))}")
        elif state is AllocState.SUCCEEDED:
            self._report(run, PhaseSucceeded)
        elif state is AllocState.LOST:
            # The pipeline retries with a new dispatch; stop this child so Nomad's replacement does not run too.
            await self._api.deregister(run.child)
            self._report(run, PhaseFailed, error=f"{run.phase} phase: allocation lost", retryable=True)
        else:
            self._report(run, PhaseFailed, error=f"{run.phase} phase failed: {run.last_error or detail}")
        self._by_child.pop(run.child, None)
        self._by_key.pop(run.key, None)

    def _report(self, run: _Run, event_cls, **kw) -> None:
        event = event_cls(phase=Phase(run.phase), attempt=run.attempt, at=self._clock(), **kw)
        self._queue.put_nowait(JobEvent(run.job_id, event))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
