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
from datetime import datetime, timedelta

from jobforge import pipeline
from jobforge.admission import SubmitPolicy
from jobforge.backends.base import Backend, JobEvent, LogChunk
from jobforge.delivery import DeliveryWorker
from jobforge.errors import BackendError, Conflict, NotFound, QueueFull
from jobforge.logcaps import LogBudgets, LogLimits
from jobforge.metrics import WINDOWS, Metrics, fleet_snapshot, parse_usage_line
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
    LogsResult,
    LogStream,
    Phase,
    SubmitJobParams,
    SubmitJobResult,
    WatchUpdate,
    masked_line,
    utcnow,
)
from jobforge.stores.base import Store
from jobforge.tasks import RegistryTarget, build_payload

log = logging.getLogger("jobforge.service")

DEFAULT_MAX_QUEUED_JOBS = 1000
MAX_LOG_PAGE_CHARS = 4 * 1024 * 1024
"""A getLogs page ends once its lines hold this many characters (at least one line is always returned)."""



class JobService:
    def __init__(self, store: Store, backend: Backend, *, policy: pipeline.Policy, registry: RegistryTarget,
                 max_concurrent_jobs: int, metrics: Metrics | None = None, webhooks: DeliveryWorker | None = None,
                 admission: SubmitPolicy = SubmitPolicy(),
                 clock: Callable[[], datetime] = utcnow, new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
                 max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS, log_limits: LogLimits = LogLimits()):
        self.store = store
        self._admission = admission
        self.backend = backend
        self._policy = policy
        self._registry = registry
        self._max = max_concurrent_jobs
        self._max_queued = max_queued_jobs
        self._log_budgets = LogBudgets(log_limits)
        self.metrics = metrics or Metrics()
        self.webhooks = webhooks
        self._clock = clock
        self._new_id = new_id
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pending: deque[str] = deque()
        self._active: set[str] = set()
        self._watchers: defaultdict[str, set[asyncio.Queue]] = defaultdict(set)
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
        self._admission.check(params.job_config)  # ConfigError (400) before anything is stored or dispatched
        if self.webhooks is not None:
            self.webhooks.check_config(params.job_config)
        if len(self._pending) >= self._max_queued:
            raise QueueFull(f"{len(self._pending)} jobs are already waiting for a slot (MAX_QUEUED_JOBS="
                            f"{self._max_queued}); the job was not accepted, submit it again later")
        record = pipeline.new_job(self._new_id(), params.job_config, self._clock())
        await self.store.put(record, 0)
        self.metrics.submitted()
        log.info("Job submitted successfully", extra={"job_id": record.job_id, "owner": record.config.owner})
        self._pending.append(record.job_id)
        await self._admit()
        return SubmitJobResult(job_id=record.job_id, status=(await self.store.get(record.job_id)).record.status)

    async def owner_of(self, job_id: str) -> str:
        """The job's owner, for authorisation (`NotFound` for an unknown job)."""
        return (await self.store.get(job_id)).record.config.owner

    async def get_status(self, params: JobIdParams) -> JobStatusResult:
        return JobStatusResult.from_record((await self.store.get(params.job_id)).record)

    async def get_logs(self, params: GetLogsParams) -> LogsResult:
        """One page of a job's logs (all of them when they fit): phases in order, lines in write order."""
        await self.store.get(params.job_id)  # NotFound for unknown jobs
        phase = params.phase.value if params.phase else None
        page = await self.store.log_page(params.job_id, phase, params.offset, params.limit, MAX_LOG_PAGE_CHARS)
        entries: dict[str, list] = {name: [] for name in ([phase] if phase else [p.value for p in Phase])}
        for name, line in page.lines:
            entries.setdefault(name, []).append(line)
        logs = {name: [ln.line for ln in lines] for name, lines in entries.items()}
        end = params.offset + len(page.lines)
        return LogsResult(job_id=params.job_id, logs=logs, entries=entries if params.structured else None,
                          offset=params.offset, total=page.total, next_offset=end if end < page.total else None)

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

    async def refresh_metrics(self) -> None:
        """Recompute the fleet gauges from the store (at scrape time: restarts and other replicas agree)."""
        now = self._clock()
        horizon = now - max(WINDOWS.values())
        finished: list[JobRecord] = []
        offset, page = 0, 500
        while True:  # newest first; a job finishing inside the window was submitted less than a day before it
            records, total = await self.store.list(page, offset)
            finished += [r for r in records if r.finished_at is not None and r.finished_at >= horizon]
            offset += len(records)
            if not records or offset >= total or records[-1].submitted_at < horizon - timedelta(days=1):
                break
        self.metrics.fleet(fleet_snapshot(await self.store.unfinished(), finished, now))

    async def get_history(self, params: HistoryParams, visible: frozenset[str] | None = None) -> HistoryResult:
        """`visible`: the owners the caller may see (None: every owner); `params.owner` narrows further."""
        owners = visible
        if params.owner is not None:
            owners = frozenset({params.owner}) if visible is None else frozenset({params.owner}) & visible
        records, total = await self.store.list(params.limit, params.offset, owners, params.status)
        jobs = [HistoryItem(id=r.job_id, **JobStatusResult.from_record(r).model_dump()) for r in records]
        return HistoryResult(jobs=jobs, total=total, limit=params.limit, offset=params.offset)

    async def watch(self, job_id: str, logs: bool = False) -> AsyncIterator[WatchUpdate]:
        """Current state first, then every change (and log line when asked), until the job ends."""
        queue: asyncio.Queue[WatchUpdate] = asyncio.Queue()
        self._watchers[job_id].add(queue)
        try:
            record = (await self.store.get(job_id)).record
            current = JobStatusResult.from_record(record)
            if record.settled:
                yield WatchUpdate(type="end", job=current)
                return
            yield WatchUpdate(type="status", job=current)
            while True:
                update = await queue.get()
                if update.type == "log" and not logs:
                    continue
                yield update
                if update.type == "end":
                    return
        finally:
            self._watchers[job_id].discard(queue)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    # ------------------------------------------------------------ the shell

    async def apply(self, job_id: str, event: pipeline.Event) -> JobRecord:
        """Decide (pure), commit once (CAS), then act on the commands."""
        async with self._locks[job_id]:
            record, version = await self.store.get(job_id)
            new, commands = pipeline.step(record, event, self._policy)
            if new != record:
                await self.store.put(new, version)
                self._on_change(record, new)
                hooks = [c for c in commands if isinstance(c, pipeline.FireWebhook)]
                if hooks and self.webhooks is not None:  # queued under the lock: a job's events stay in order
                    await self.webhooks.enqueue(hooks, new)
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
            log.info("job %s: %s -> %s", new.job_id, old.status.value, new.status.value,
                     extra={"job_id": new.job_id, "status": new.status.value})
        update = WatchUpdate(type="end" if new.settled else "status", job=JobStatusResult.from_record(new))
        for queue in self._watchers.get(new.job_id, ()):
            queue.put_nowait(update)

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

    async def _delete_temp_image(self, record: JobRecord) -> bool:
        ok = await self.backend.cleanup(record.job_id, build_payload(record, "cleanup", self._registry), record.config)
        if not ok:
            log.warning("job %s: temp image could not be deleted (see its cleanup logs)", record.job_id,
                        extra={"job_id": record.job_id})
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
                log.warning("backend reported on unknown job %s", message.job_id, extra={"job_id": message.job_id})
            except Exception:  # one bad message must not stop the pipeline for every other job
                log.exception("failed to handle backend message for job %s", message.job_id,
                              extra={"job_id": message.job_id})

    async def _store_logs(self, chunk: LogChunk) -> None:
        lines = []
        for line in chunk.lines:  # the task script's usage report is a metric, not part of the job's log
            usage = parse_usage_line(line.line) if line.stream is LogStream.STDERR else None
            if usage is None:
                lines.append(masked_line(line))
            else:
                self.metrics.usage(chunk.phase, usage)
        lines = self._log_budgets.admit(chunk.job_id, lines, self._clock)  # per-line and per-job caps
        if not lines:
            return
        await self.store.append_logs(chunk.job_id, chunk.phase, lines)
        queues = self._watchers.get(chunk.job_id, ())
        phase = Phase(chunk.phase) if chunk.phase in Phase._value2member_map_ else None
        for line in lines:
            for queue in queues:
                queue.put_nowait(WatchUpdate(type="log", phase=phase, log=line))

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

