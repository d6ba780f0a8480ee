"""Nomad backend: phases are dispatched runs of pre-registered parameterized jobs, followed on the event stream.

- **Dispatch.** A phase runs on `jobforge-<phase>` or, when its config needs a different job spec (resources,
  GPU, constraints, Vault), on a variant `jobforge-<phase>-<hash>` registered once (`jobforge.nomad`). The task
  script's JSON input is the dispatch payload; `job_id`/`attempt` are meta; the pipeline's dispatch key is the
  idempotency token, so a retried dispatch never starts a second run.
- **Dispatch retries.** Network errors and 5xx answers are retried (bounded, with backoff) with the same
  idempotency token; a parent job stopped or purged by an operator is re-registered first.
- **Events.** One subscription to `Allocation` and `Evaluation` events (no polling), with a read timeout (Nomad
  heartbeats every 30 s; two missed = a dead connection). Nomad keeps only its last events: after every
  (re)connect, and after `event dropped from buffer`, each running phase is reconciled from its child's
  allocations and evaluations. A child's first running allocation is `PhaseStarted`; a terminal one ends the
  phase once its logs are drained. Allocations are picked by CreateIndex/ModifyIndex, never by list order.
- **Placement.** An evaluation that cannot place the child fails the phase with Nomad's reason: at once when no
  node could ever take it (no node in the datacenters, all filtered), else after `placement_timeout`.
- **Outside stops.** An allocation the server stopped (`alloc stop`, `job stop`, a drain) or whose task was
  killed, that Job Forge did not stop, is a failure "stopped outside Job Forge", not the `complete` Nomad says.
- **Logs.** Each running allocation's stdout/stderr are followed as frames and reported line by line; when the
  allocation ends, the rest is read from the last offset, so nothing the task wrote is lost. Control lines with
  the phase's nonce (dispatch meta `control_nonce`, see jobforge.control) are taken out and reported with the end.
- **Resource usage.** Nomad's client keeps a running task's stats only while it holds the allocation, and
  reports CPU as a rate: each running phase's `/v1/client/allocation/:id/stats` is read every `stats_interval`
  seconds (at most `_STATS_AT_ONCE` reads at a time, each given up after `_STATS_WAIT`) and once more when the
  allocation ends; the samples add up
  to the CPU seconds and peak memory reported with the phase's end (`UsageTally`). A 404 (garbage-collected,
  node gone) only means no more samples.
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
from jobforge.backends.nomad.http import NomadError
from jobforge.backends.nomad.models import Allocation, Evaluation
from jobforge.backends.nomad.wire import (
    AllocState,
    UsageTally,
    alloc_outcome,
    frame_data,
    placement_failure,
)
from jobforge.config import JobConfig, format_duration
from jobforge.control import NONCE_META, ControlLines, new_nonce
from jobforge.errors import BackendError
from jobforge.logcaps import DEFAULT_MAX_LINE_BYTES, LineSplitter, decode_piece
from jobforge.models import JobRecord, LogLine, LogStream, Phase, utcnow
from jobforge.nomad import RenderParams, render_job, variant_id, variant_spec
from jobforge.pipeline import (
    KILLED_BY_USER,
    DispatchPhase,
    PhaseEnded,
    PhaseFailed,
    PhaseStarted,
    PhaseSucceeded,
    StopPhase,
)

log = logging.getLogger("jobforge.backends.nomad")

_ERROR_PREFIX = "ERROR: "
_STREAMS = (("stdout", LogStream.STDOUT), ("stderr", LogStream.STDERR))
CLEANUP = "cleanup"
_TOPICS = ["Allocation", "Evaluation"]
_RECONCILE_AT_ONCE = 16  # runs looked up side by side after a (re)subscription
_STATS_AT_ONCE = 4  # stats reads in flight at once, whatever the number of running phases
_STATS_WAIT = 5.0  # seconds a stats read may take, a free slot included: a phase's end never waits longer for it
# Dispatch answers (HTTP 500, like all of Nomad's RPC errors) that no retry changes, and those that mean the
# parameterized parent is gone (purged or GC'd) or stopped: registering it again is the fix.
_PERMANENT = ("Payload", "meta keys", "metadata keys", "not a parameterized job")
_PARENT_GONE = ("parameterized job not found", "is stopped")


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
    splitters: dict[str, LineSplitter] = field(default_factory=dict)
    """Per log, created on first data: lines are cut at the cap while reading (never a whole huge line held)."""
    last_error: str | None = None
    failure: str | None = None
    """Set when the backend itself decides the phase failed (placement), overriding the allocation's story."""
    placement: asyncio.Task | None = None
    done: asyncio.Future | None = None
    deadline: asyncio.Task | None = None
    control: ControlLines = field(default_factory=lambda: ControlLines(""))
    """Its nonce travels as dispatch meta; a run without one (a child an older version dispatched) takes none."""
    tally: UsageTally | None = None
    """Set once the allocation runs: its stats samples so far."""
    sampler: asyncio.Task | None = None
    stop_sampling: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        return f"{self.job_id}-{self.phase}-{self.attempt}"


class NomadBackend:
    resumable = True

    def __init__(self, api: NomadAPI, render: RenderParams, *, cleanup_timeout: float = 600.0,
                 placement_timeout: float = 300.0, stream_timeout: float = 65.0, log_read_timeout: float = 300.0,
                 dispatch_attempts: int = 5, retry_delay: float = 0.5,
                 clock: Callable[[], datetime] = utcnow,
                 on_event_lag: Callable[[float], None] | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, stats_interval: float = 10.0) -> None:
        self._api = api
        self._stats_interval = stats_interval
        self._stats_slots = asyncio.Semaphore(_STATS_AT_ONCE)
        self._max_line_bytes = max_line_bytes
        self._on_event_lag = on_event_lag
        self._render = render
        self._cleanup_timeout = cleanup_timeout
        self._placement_timeout = placement_timeout
        self._stream_timeout = stream_timeout
        self._log_read_timeout = log_read_timeout
        self._dispatch_attempts = max(1, dispatch_attempts)
        self._retry_delay = retry_delay
        self._clock = clock
        self._queue: asyncio.Queue[BackendMessage] = asyncio.Queue()
        self._registered: set[str] = set()
        self._register_lock = asyncio.Lock()
        self._by_child: dict[str, _Run] = {}
        self._by_key: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._reconciling: asyncio.Task | None = None
        self._event_index = 0

    # ------------------------------------------------------------ Backend API

    async def dispatch(self, command: DispatchPhase, payload: dict, config: JobConfig) -> None:
        if command.dispatch_key in self._by_key:
            return
        parent = await self._ensure_job(command.phase.value, config)
        run = _Run(command.job_id, command.phase.value, command.attempt, child="", control=ControlLines(new_nonce()))
        self._by_key[run.key] = run
        try:
            run.child = await self._dispatch(parent, run, payload, command.dispatch_key, config.owner, config)
        except BaseException:
            self._by_key.pop(run.key, None)
            raise
        run.deadline = self._spawn(self._expire(run, command.timeout_seconds))
        if run.stopped:  # killed while the dispatch was on its way
            await self._stop_child(run)
            return
        await self._attach(run)

    async def stop(self, command: StopPhase) -> None:
        run = self._by_key.get(f"{command.job_id}-{command.phase.value}-{command.attempt}")
        if run is None or run.finished:
            return
        run.stopped = True
        if run.child:  # else `dispatch` stops it as soon as the child exists
            await self._stop_child(run)

    async def _stop_child(self, run: _Run) -> None:
        """Deregister the child; a child with no allocation yet (never placed) has nothing left to report, so
        the phase ends now instead of at its timeout."""
        await self._api.deregister(run.child)
        if run.alloc_id is None and not run.finished:
            run.finished = True
            self._spawn(self._finish(run, AllocState.STOPPED, None))

    async def cleanup(self, job_id: str, payload: dict, config: JobConfig) -> bool:
        parent = await self._ensure_job(CLEANUP, config)
        run = _Run(job_id, CLEANUP, 0, child="", done=asyncio.get_running_loop().create_future(),
                   control=ControlLines(new_nonce()))
        # A fresh token per call: a manual cleanup after the automatic one must run again.
        run.child = await self._dispatch(parent, run, payload, f"{job_id}-cleanup-{uuid.uuid4().hex[:8]}",
                                         config.owner, config)
        await self._attach(run)
        try:
            return await asyncio.wait_for(asyncio.shield(run.done), self._cleanup_timeout)
        except TimeoutError:
            await self._api.deregister(run.child)
            return False

    async def resume(self, running: Iterable[tuple[DispatchPhase, JobRecord]]) -> None:
        """Re-attach to phases that ran while the server was down: find each child, replay its allocation. A
        phase that cannot be looked up now (Nomad unreachable) is retried in the background until its deadline."""
        for command, record in running:
            try:
                await self._resume_one(command, record)
            except BackendError as exc:
                log.warning("cannot resume %s yet (%s); retrying", command.dispatch_key, exc.message,
                            extra={"job_id": command.job_id})
                self._spawn(self._resume_later(command, record))

    async def _resume_later(self, command: DispatchPhase, record: JobRecord) -> None:
        delay = self._retry_delay
        while True:
            await asyncio.sleep(delay)  # retry backoff
            delay = min(delay * 2, 10.0)
            try:
                await self._resume_one(command, record)
                return
            except BackendError as exc:
                if self._time_left(command, record) <= 0:
                    run = _Run(command.job_id, command.phase.value, command.attempt, child="")
                    self._report(run, PhaseFailed, retryable=True,
                                 error=f"{run.phase} phase: Nomad unreachable after a restart: {exc.message}")
                    return

    def _time_left(self, command: DispatchPhase, record: JobRecord) -> float:
        dispatched = record.phases[command.phase].dispatched_at or record.submitted_at
        return command.timeout_seconds - (self._clock() - dispatched).total_seconds()

    async def _resume_one(self, command: DispatchPhase, record: JobRecord) -> None:
        parent = variant_id(command.phase.value, variant_spec(command.phase.value, record.config))
        run = _Run(command.job_id, command.phase.value, command.attempt, child="")
        mine = [stub for stub in await self._api.children(parent)
                if stub.meta.get("job_id") == command.job_id and stub.meta.get("attempt") == str(command.attempt)]
        if not mine:
            self._report(run, PhaseFailed, retryable=True,
                         error=f"{run.phase} phase: its Nomad job was not found after a restart")
            return
        newest = max(mine, key=lambda stub: stub.age)  # by index, not list order
        run.child, run.control = newest.id, ControlLines(newest.meta.get(NONCE_META, ""))
        self._by_key[run.key] = run
        run.deadline = self._spawn(self._expire(run, self._time_left(command, record)))
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

    async def _ensure_job(self, phase: str, config: JobConfig, *, again: bool = False) -> str:
        """Register the phase's job (variant) once per process, or `again` when an operator stopped or purged
        it; Nomad ignores an identical re-registration, and re-registering a stopped job runs it again."""
        spec = variant_spec(phase, config)
        job_id = variant_id(phase, spec)
        async with self._register_lock:
            if again:
                self._registered.discard(job_id)
            if job_id not in self._registered:
                job = await self._api.parse_job(render_job(phase, spec, self._render))
                await self._api.register_job(job)
                self._registered.add(job_id)
        return job_id

    async def _dispatch(self, parent: str, run: _Run, payload: dict, token: str, owner: str,
                        config: JobConfig) -> str:
        """Dispatch with retries: the idempotency token makes a retry of a dispatch that did reach Nomad return
        the same child. Network errors and 5xx are retried with backoff; a stopped or purged parent is
        registered again; Nomad's validation answers are final."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        if len(body) > MAX_PAYLOAD:
            raise BackendError(f"the {run.phase} payload is {len(body)} bytes; Nomad dispatches at most "
                               f"{MAX_PAYLOAD}: shorten test commands, test env or build args")
        meta = {"job_id": run.job_id, "owner": owner, NONCE_META: run.control.nonce}
        if run.phase != CLEANUP:
            meta["attempt"] = str(run.attempt)
        delay = self._retry_delay
        for attempt in range(1, self._dispatch_attempts + 1):
            try:
                return (await self._api.dispatch(parent, meta, body, token)).dispatched_job_id
            except NomadError as exc:
                if any(text in exc.text for text in _PARENT_GONE):
                    log.warning("parent job %s is gone or stopped (%s); registering it again", parent, exc.text)
                    await self._ensure_job(run.phase, config, again=True)
                    continue  # at once: the registration was the fix
                if exc.status < 500 or any(text in exc.text for text in _PERMANENT) \
                        or attempt == self._dispatch_attempts:
                    raise
            except BackendError:  # unreachable: the request may or may not have arrived
                if attempt == self._dispatch_attempts:
                    raise
            log.warning("dispatch of %s failed (attempt %d); retrying with the same token", parent, attempt)
            await asyncio.sleep(delay)  # retry backoff
            delay = min(delay * 2, 10.0)
        raise BackendError(f"nomad dispatch {parent}: still failing after {self._dispatch_attempts} attempts")

    async def _attach(self, run: _Run) -> None:
        """Follow the child from now on, and catch up on what happened before we listened (events that arrived
        while the dispatch reply was on its way, or while the server was down)."""
        self._by_child[run.child] = run
        await self._reconcile(run)

    async def _reconcile(self, run: _Run) -> None:
        """Bring one run up to date from Nomad's state, not from events: its allocation (ours if known, else
        the newest by CreateIndex/ModifyIndex) and, while nothing is placed, its evaluations."""
        if run.finished:
            return
        allocs = await self._api.job_allocations(run.child)
        if allocs:
            alloc = next((a for a in allocs if a.id == run.alloc_id), None) or max(allocs, key=lambda a: a.age)
            await self._on_alloc(alloc)
        if run.alloc_id is None and not run.finished:
            for evaluation in sorted(await self._api.job_evaluations(run.child), key=lambda e: e.age):
                self._on_eval(evaluation)

    async def _reconcile_runs(self, runs: list[_Run]) -> None:
        """Look the runs up a few at a time (side by side, not one round trip after another)."""
        limit = asyncio.Semaphore(_RECONCILE_AT_ONCE)

        async def one(run: _Run) -> None:
            async with limit:
                try:
                    await self._reconcile(run)
                except BackendError as exc:
                    log.warning("cannot reconcile %s with Nomad: %s", run.child, exc.message,
                                extra={"job_id": run.job_id})
        await asyncio.gather(*(one(run) for run in runs))

    async def _reconcile_all(self) -> None:
        """After a (re)subscription. Runs with no allocation yet are looked up before any replayed event is
        read (an old event must not make a replaced allocation the one followed); the others, whose allocation
        is known, while the stream is read on: at a thousand runs, reconciling them all first let the stream
        fall behind until Nomad dropped it again."""
        runs = list(self._by_child.values())
        await self._reconcile_runs([run for run in runs if run.alloc_id is None])
        if self._reconciling is not None:
            self._reconciling.cancel()  # this pass covers the previous one
        self._reconciling = self._spawn(self._reconcile_runs([run for run in runs if run.alloc_id is not None]))

    async def _expire(self, run: _Run, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))  # a deadline timer, not synchronisation
        if run.finished:
            return
        run.timed_out, run.finished = seconds, True
        await self._deregister(run)
        await self._finish(run, AllocState.FAILED, None)

    # ------------------------------------------------------------ following

    async def _watch(self) -> None:
        """Follow `Allocation` and `Evaluation` events for good; reconnect from the next index after any
        interruption, and reconcile every run once subscribed again: Nomad starts a subscriber whose index it
        no longer keeps at the oldest one it has, silently, so events inside a gap may be gone."""
        delay = 0.5
        while True:
            try:
                subscribed = False
                async for batch in self._api.events(_TOPICS, self._event_index,
                                                    idle_timeout=self._stream_timeout):
                    delay = 0.5
                    if not subscribed:  # Nomad's first line: from here on no event is missed
                        subscribed = True
                        await self._reconcile_all()
                    for event in batch.events:
                        if event.allocation is not None:
                            await self._on_alloc(event.allocation)
                        elif event.evaluation is not None:
                            self._on_eval(event.evaluation)
                    if batch.index is not None:
                        self._event_index = batch.index + 1
                log.warning("nomad event stream ended; resubscribing from index %d", self._event_index)
            except BackendError as exc:
                log.warning("nomad event stream interrupted (%s); reconnecting from index %d",
                            exc.message, self._event_index)
            except ValueError as exc:  # a non-JSON tail (`event dropped from buffer`): the server closed it
                log.warning("nomad event stream closed by the server (%s); resubscribing", exc)
            except Exception:  # noqa: BLE001 - the one follower of every phase must outlive a bug: log, resubscribe
                log.exception("nomad event stream handling failed; resubscribing from index %d", self._event_index)
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 10.0)

    def _on_eval(self, evaluation: Evaluation) -> None:
        """A placement failure of a child not placed yet: fail now if Nomad says it can never be placed, else
        when the placement timeout runs out (capacity may come back; the blocked eval would then place it)."""
        run = self._by_child.get(evaluation.job_id)
        if run is None or run.finished or run.alloc_id is not None:
            return
        failure = placement_failure(evaluation)
        if failure is None:
            return
        run.failure = f"{run.phase} phase cannot be placed: {failure.reason}"
        if failure.permanent:
            self._spawn(self._unplaceable(run, 0))
        elif run.placement is None:
            run.placement = self._spawn(self._unplaceable(run, self._placement_timeout))

    async def _unplaceable(self, run: _Run, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the placement deadline, not synchronisation
        if run.finished or run.alloc_id is not None:
            return
        run.finished = True
        await self._deregister(run)  # the blocked evaluation must not place it later
        await self._finish(run, AllocState.FAILED, None)

    async def _on_alloc(self, alloc: Allocation) -> None:
        run = self._by_child.get(alloc.job_id)
        if run is None or run.finished:
            return
        if self._on_event_lag is not None and alloc.modify_time:
            # How long after Nomad recorded the change we act on it: the event stream's lag for operators.
            self._on_event_lag(max(0.0, self._clock().timestamp() - alloc.modify_time / 1e9))
        if run.alloc_id not in (None, alloc.id):
            return  # a replacement Nomad placed (lost node, alloc stop): the allocation we follow decides
        run.alloc_id = alloc.id
        run.failure = None  # placed after all
        if run.placement is not None:
            run.placement.cancel()
        outcome = alloc_outcome(alloc, run.phase)
        if outcome.state is not AllocState.PENDING and not run.started:
            run.started = True
            if run.phase != CLEANUP:
                self._report(run, PhaseStarted)
                run.tally = UsageTally(since_ns=alloc.started_ns(run.phase))
                run.sampler = self._spawn(self._sample(run))
            for name, stream in _STREAMS:
                run.followers.append(self._spawn(self._follow(run, name, stream)))
        if outcome.terminal:
            run.finished = True  # later events for this child are ignored from here on
            self._spawn(self._finish(run, outcome.state, outcome.detail))

    async def _follow(self, run: _Run, name: str, stream: LogStream) -> None:
        """Follow one log from the last offset seen; resume after an interruption (the final read after the
        allocation ends catches up anyway)."""
        delay = 0.5
        while not run.finished:
            try:
                async for frame in self._api.logs(run.alloc_id, run.phase, name, follow=True,
                                                  offset=run.received[name], idle_timeout=self._stream_timeout):
                    self._take(run, name, stream, frame)
                    delay = 0.5
            except BackendError as exc:
                log.info("following %s of %s interrupted: %s", name, run.alloc_id, exc.message,
                         extra={"job_id": run.job_id})
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 10.0)

    def _take(self, run: _Run, name: str, stream: LogStream, frame: dict) -> None:
        data = frame_data(frame)
        if not data:
            return
        run.received[name] += len(data)
        splitter = run.splitters.get(name) or run.splitters.setdefault(name, LineSplitter(self._max_line_bytes))
        self._lines(run, stream, splitter.feed(data))

    def _lines(self, run: _Run, stream: LogStream, pieces: list[tuple[bytes, bool]]) -> None:
        now = self._clock()
        lines = []
        for raw, split in pieces:
            line = decode_piece(raw, split, self._max_line_bytes)
            if stream is LogStream.STDERR and not split:
                if run.control.take(line):
                    continue  # the script's report for the metrics, not part of the job's log
                if line.startswith(_ERROR_PREFIX):
                    run.last_error = line[len(_ERROR_PREFIX):]
            lines.append(LogLine(ts=now, stream=stream, line=line))
        if lines:
            self._queue.put_nowait(LogChunk(run.job_id, run.phase, lines))

    async def _sample(self, run: _Run) -> None:
        """Read the running task's stats every `stats_interval` until told to stop; a read under way completes
        (cancelling it could lose the only sample of a peak)."""
        while True:
            try:
                await asyncio.wait_for(run.stop_sampling.wait(), self._stats_interval)  # the sampling period
                return
            except TimeoutError:
                await self._read_stats(run)

    async def _last_stats(self, run: _Run) -> None:
        """After the allocation ended: the sampler's last read, then one more (the client keeps the task's last
        sample until it garbage-collects the allocation)."""
        run.stop_sampling.set()
        if run.sampler is not None:
            await run.sampler
        await self._read_stats(run)

    async def _read_stats(self, run: _Run) -> None:
        if run.alloc_id is None or run.tally is None:
            return

        async def read():
            async with self._stats_slots:
                return await self._api.alloc_stats(run.alloc_id, run.phase)
        try:
            stats = await asyncio.wait_for(read(), _STATS_WAIT)
        except (BackendError, TimeoutError) as exc:  # a missed sample; the next one (or none) follows
            log.debug("no stats for allocation %s: %s", run.alloc_id, getattr(exc, "message", "timed out"))
            return
        sample = stats.tasks.get(run.phase) if stats is not None else None
        if sample is not None and run.tally is not None:
            run.tally = run.tally.add(sample)

    async def _drain(self, run: _Run) -> None:
        """Stop following and read what the task wrote after the last frame we saw."""
        for follower in run.followers:
            follower.cancel()
        await asyncio.gather(*run.followers, return_exceptions=True)
        if run.alloc_id is not None:  # both logs at once: the phase's end waits for one round trip, not two
            await asyncio.gather(*(self._read_rest(run, name, stream) for name, stream in _STREAMS))

    async def _read_rest(self, run: _Run, name: str, stream: LogStream) -> None:
        try:
            async for frame in self._api.logs(run.alloc_id, run.phase, name, follow=False,
                                              offset=run.received[name], idle_timeout=self._stream_timeout,
                                              total=self._log_read_timeout):
                self._take(run, name, stream, frame)
        except BackendError as exc:  # e.g. no log file (the task never started), or a client gone silent
            log.info("no more %s for allocation %s: %s", name, run.alloc_id, exc.message, extra={"job_id": run.job_id})
        if name in run.splitters:
            self._lines(run, stream, run.splitters[name].flush())

    async def _finish(self, run: _Run, state: AllocState, detail: str | None) -> None:
        for timer in (run.deadline, run.placement):
            if timer is not None and timer is not asyncio.current_task():
                timer.cancel()
        await asyncio.gather(self._drain(run), self._last_stats(run))
        if run.done is not None:
            run.done.set_result(state is AllocState.SUCCEEDED)
        elif run.stopped:
            self._report(run, PhaseFailed, error=KILLED_BY_USER)
        elif run.timed_out is not None:
            self._report(run, PhaseFailed,
                         error=f"{run.phase} phase timed out after {format_duration(round(run.timed_out))}")
        elif run.failure is not None:
            self._report(run, PhaseFailed, error=run.failure)
        elif state is AllocState.SUCCEEDED:
            self._report(run, PhaseSucceeded)
        elif state is AllocState.STOPPED:
            # Nomad may place a replacement (alloc stop, drain): stop the child so it does not run again.
            await self._deregister(run)
            self._report(run, PhaseFailed, error=f"{run.phase} phase: stopped outside Job Forge ({detail})")
        elif state is AllocState.LOST:
            # The pipeline retries with a new dispatch; stop this child so Nomad's replacement does not run too.
            await self._deregister(run)
            self._report(run, PhaseFailed, error=f"{run.phase} phase: allocation lost", retryable=True)
        else:
            self._report(run, PhaseFailed, error=f"{run.phase} phase failed: {run.last_error or detail}")
        self._by_child.pop(run.child, None)
        self._by_key.pop(run.key, None)

    async def _deregister(self, run: _Run) -> None:
        """Stop the child on the way to reporting the phase's end: a failure here must not keep the end back."""
        try:
            await self._api.deregister(run.child)
        except BackendError as exc:
            log.warning("cannot stop nomad job %s: %s", run.child, exc.message, extra={"job_id": run.job_id})

    def _report(self, run: _Run, event_cls, **kw) -> None:
        if issubclass(event_cls, PhaseEnded):
            kw.update(usage=run.tally.usage if run.tally else None, cache=run.control.cache)
        event = event_cls(phase=Phase(run.phase), attempt=run.attempt, at=self._clock(), **kw)
        self._queue.put_nowait(JobEvent(run.job_id, event))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
