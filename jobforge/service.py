"""The imperative shell around the pipeline: store, backend, admission, watchers.

Every change goes the same way: load the record, `pipeline.step` it, compare-and-set it back, tell watchers,
then execute the returned commands. Backend messages are consumed by one loop; each job's events are applied
under a per-job lock so one process never races itself, and the store's CAS protects against other processes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from jobforge import pipeline
from jobforge.backends.base import Backend, JobEvent, LogChunk
from jobforge.errors import BackendError, Conflict, NotFound, SlowConsumer
from jobforge.metrics import Metrics
from jobforge.models import (
    CleanupResult,
    GetLogsParams,
    HistoryItem,
    HistoryParams,
    HistoryResult,
    JobIdParams,
    JobRecord,
    JobStatus,
    JobStatusResult,
    KillJobResult,
    LogMessage,
    LogsResult,
    Phase,
    StreamStatus,
    SubmitJobParams,
    SubmitJobResult,
    WatchUpdate,
    utcnow,
)
from jobforge.stores.base import Store
from jobforge.streams import BATCH, Pulse, follow_logs
from jobforge.tasks import RegistryTarget, build_payload
from jobforge.webhooks import WebhookSender

log = logging.getLogger("jobforge.service")


class _Watcher:
    """One watcher's bounded queue: status updates, and for each stored log chunk only its line count — the
    lines themselves are read back from the store when the watcher gets to them. When `limit` entries are
    waiting, the watcher is dropped (its stream ends with `SlowConsumer`): a stalled client holds a few
    thousand small objects at most, however much the job prints."""

    def __init__(self, limit: int, logs: bool) -> None:
        self.limit = limit
        self.logs = logs
        self.queue: asyncio.Queue[WatchUpdate | int | None] = asyncio.Queue()  # bounded by `offer`
        self.dropped = False

    def offer(self, item: WatchUpdate | int) -> None:
        if self.dropped:
            return
        if self.queue.qsize() >= self.limit:
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)  # the drop marker
            return
        self.queue.put_nowait(item)


class JobService:
    def __init__(self, store: Store, backend: Backend, *, policy: pipeline.Policy, registry: RegistryTarget,
                 max_concurrent_jobs: int, metrics: Metrics | None = None, webhooks: WebhookSender | None = None,
                 clock: Callable[[], datetime] = utcnow, new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
                 watch_buffer: int = 1000):
        self.store = store
        self.backend = backend
        self._policy = policy
        self._registry = registry
        self._max = max_concurrent_jobs
        self.metrics = metrics or Metrics()
        self._webhooks = webhooks
        self._clock = clock
        self._new_id = new_id
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pending: deque[str] = deque()
        self._active: set[str] = set()
        self._watchers: defaultdict[str, set[_Watcher]] = defaultdict(set)
        self._watch_buffer = watch_buffer
        self.pulse = Pulse()
        self._tasks: set[asyncio.Task] = set()
        self._consumer: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover unfinished jobs, then start consuming backend events and admitting jobs."""
        self._consumer = asyncio.create_task(self._consume())
        resumed = []
        for record in await self.store.unfinished():
            if record.status is JobStatus.PENDING:
                self._pending.append(record.job_id)
            elif self.backend.resumable:
                self._active.add(record.job_id)
                resumed.append((pipeline.current_dispatch(record, self._policy), record))
            else:
                phase = record.current_phase
                await self.apply(record.job_id, pipeline.PhaseFailed(
                    at=self._clock(), phase=phase, attempt=record.phases[phase].attempt,
                    error=f"the server restarted while the {phase.value} phase was running; "
                          "the local backend cannot resume it"))
        if resumed:
            await self.backend.resume(resumed)
        await self._admit()

    async def aclose(self) -> None:
        if self._consumer:
            self._consumer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *( [self._consumer] if self._consumer else []), return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no job is pending or running and no side task is in flight (tests, benchmarks, shutdown)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._pending and not self._active and not self._tasks)

    # ------------------------------------------------------------ API methods

    async def submit_job(self, params: SubmitJobParams) -> SubmitJobResult:
        record = pipeline.new_job(self._new_id(), params.job_config, self._clock())
        await self.store.put(record, 0)
        self.metrics.submitted()
        log.info("job submitted", extra={"job_id": record.job_id, "owner": record.config.owner})
        self._pending.append(record.job_id)
        await self._admit()
        return SubmitJobResult(job_id=record.job_id, status=(await self.store.get(record.job_id)).record.status)

    async def get_status(self, params: JobIdParams) -> JobStatusResult:
        return JobStatusResult.from_record((await self.store.get(params.job_id)).record)

    async def get_logs(self, params: GetLogsParams) -> LogsResult:
        await self.store.get(params.job_id)  # NotFound for unknown jobs
        phase = params.phase.value if params.phase else None
        entries = await self.store.get_logs(params.job_id, phase)
        names = [phase] if phase else [*(p.value for p in Phase), *(n for n in entries if n not in Phase._value2member_map_)]
        logs = {name: [ln.line for ln in entries.get(name, [])] for name in names}
        structured = {name: entries.get(name, []) for name in names} if params.structured else None
        return LogsResult(job_id=params.job_id, logs=logs, entries=structured)

    async def kill_job(self, params: JobIdParams) -> KillJobResult:
        record = await self.apply(params.job_id, pipeline.KillRequested(at=self._clock()))
        return KillJobResult(job_id=record.job_id, status=record.status, message=pipeline.KILLED_BY_USER)

    async def cleanup(self, params: JobIdParams) -> CleanupResult:
        record = (await self.store.get(params.job_id)).record
        if not record.status.terminal:
            raise Conflict(f"job {record.job_id} is {record.status.value}; kill it or wait before cleanup")
        cleaned = []
        if record.phases[Phase.BUILD].attempt > 0 and await self._delete_temp_image(record):
            cleaned.append("temp_image")
        return CleanupResult(job_id=record.job_id, cleaned=cleaned)

    async def get_history(self, params: HistoryParams) -> HistoryResult:
        records, total = await self.store.list(params.limit, params.offset, params.owner, params.status)
        jobs = [HistoryItem(id=r.job_id, **JobStatusResult.from_record(r).model_dump()) for r in records]
        return HistoryResult(jobs=jobs, total=total, limit=params.limit, offset=params.offset)

    async def watch(self, job_id: str, logs: bool = False) -> AsyncIterator[WatchUpdate]:
        """Current state first, then every change (and, with `logs`, every log line — those already stored
        first), until the job ends. Raises `SlowConsumer` when the consumer fell `watch_buffer` entries behind."""
        watcher = _Watcher(self._watch_buffer, logs)
        self._watchers[job_id].add(watcher)
        cursor = 0

        async def lines(count: int | None) -> AsyncIterator[WatchUpdate]:
            """The next `count` stored lines (None: all there are), read in batches."""
            nonlocal cursor
            while count is None or count > 0:
                batch = await self.store.read_logs(job_id, after=cursor, limit=min(count or BATCH, BATCH))
                if not batch:
                    return
                for item in batch:
                    cursor = item.seq
                    phase = Phase(item.phase) if item.phase in Phase._value2member_map_ else None
                    yield WatchUpdate(type="log", phase=phase, log=item.line)
                if count is not None:
                    count -= len(batch)

        try:
            record = (await self.store.get(job_id)).record
            current = JobStatusResult.from_record(record)
            if record.settled:
                yield WatchUpdate(type="end", job=current)
                return
            yield WatchUpdate(type="status", job=current)
            if logs:
                async for update in lines(None):
                    yield update
            while True:
                item = await watcher.queue.get()
                if item is None:
                    raise SlowConsumer(f"client too slow: {watcher.limit} updates unsent")
                if isinstance(item, int):
                    async for update in lines(item):
                        yield update
                    continue
                yield item
                if item.type == "end":
                    return
        finally:
            self._watchers[job_id].discard(watcher)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    def follow_logs(self, job_id: str, phase: Phase | None = None, after: int = 0,
                    poll_interval: float = 1.0) -> AsyncIterator[LogMessage | StreamStatus]:
        """The log stream of a job, read from the store (see `jobforge.streams`)."""
        return follow_logs(self.store, self.pulse, job_id, phase=phase, after=after, poll_interval=poll_interval)

    # ------------------------------------------------------------ the shell

    async def apply(self, job_id: str, event: pipeline.Event) -> JobRecord:
        """Decide (pure), commit once (CAS), then act on the commands."""
        async with self._locks[job_id]:
            record, version = await self.store.get(job_id)
            new, commands = pipeline.step(record, event, self._policy)
            if new != record:
                await self.store.put(new, version)
                self._on_change(record, new)
        for command in commands:
            await self._execute(command, new)
        if new.status.terminal and job_id in self._pending:
            self._pending.remove(job_id)
        if new.status.terminal and job_id in self._active:
            self._active.discard(job_id)
            await self._admit()
        await self._notify()
        return new

    def _on_change(self, old: JobRecord, new: JobRecord) -> None:
        self.metrics.transition(old, new)
        if old.status is not new.status:
            log.info("job %s: %s -> %s", new.job_id, old.status.value, new.status.value)
        update = WatchUpdate(type="end" if new.settled else "status", job=JobStatusResult.from_record(new))
        for watcher in self._watchers.get(new.job_id, ()):
            watcher.offer(update)
        self.pulse.fire(new.job_id)

    async def _execute(self, command: pipeline.Command, record: JobRecord) -> None:
        if isinstance(command, pipeline.DispatchPhase):
            try:
                await self.backend.dispatch(command, build_payload(record, command.phase.value, self._registry),
                                            record.config)
            except BackendError as exc:
                self._spawn(self.apply(record.job_id, pipeline.PhaseFailed(
                    at=self._clock(), phase=command.phase, attempt=command.attempt,
                    error=f"{command.phase.value} phase could not be dispatched: {exc.message}")))
        elif isinstance(command, pipeline.StopPhase):
            await self.backend.stop(command)
        elif isinstance(command, pipeline.DeleteTempImage):
            self._spawn(self._delete_temp_image(record))
        elif isinstance(command, pipeline.FireWebhook) and self._webhooks is not None:
            self._spawn(self._webhooks.send(command.event, record))

    async def _delete_temp_image(self, record: JobRecord) -> bool:
        ok = await self.backend.cleanup(record.job_id, build_payload(record, "cleanup", self._registry), record.config)
        if not ok:
            log.warning("job %s: temp image could not be deleted (see its cleanup logs)", record.job_id)
        await self.apply(record.job_id, pipeline.TempImageDeleted(at=self._clock(), ok=ok))
        return ok

    async def _admit(self) -> None:
        while self._pending and len(self._active) < self._max:
            job_id = self._pending.popleft()
            self._active.add(job_id)
            await self.apply(job_id, pipeline.Admitted(at=self._clock()))

    async def _consume(self) -> None:
        async for message in self.backend.events():
            try:
                if isinstance(message, LogChunk):
                    await self._store_logs(message)
                elif isinstance(message, JobEvent):
                    await self.apply(message.job_id, message.event)
            except NotFound:
                log.warning("backend reported on unknown job %s", message.job_id)
            except Exception:  # one bad message must not stop the pipeline for every other job
                log.exception("failed to handle backend message for job %s", message.job_id)

    async def _store_logs(self, chunk: LogChunk) -> None:
        await self.store.append_logs(chunk.job_id, chunk.phase, chunk.lines)
        self.pulse.fire(chunk.job_id)
        for watcher in self._watchers.get(chunk.job_id, ()):
            if watcher.logs:
                watcher.offer(len(chunk.lines))  # a count: the watcher reads the lines back from the store

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            asyncio.get_running_loop().create_task(self._notify())
        task.add_done_callback(done)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

