"""The imperative shell around the pipeline: store, backend, admission, watchers.

Every change goes the same way: load the record, `pipeline.step` it, compare-and-set it back, tell watchers,
then execute the returned commands. Backend messages are consumed by one loop; each job's events are applied
under a per-job lock so one process never races itself, and the store's CAS protects against other processes.

Failure rules (the numbers come from `pipeline.Policy`):
- a store conflict or `StoreError` while applying an event is retried with backoff; when the store stays
  unusable the job is failed (`JobFailed`) in the background, so no event ends silently dropped;
- each command runs on its own: a failing `stop` or cleanup is logged and recorded, the rest still run;
- a dispatch runs under the job's lock, so a kill that arrives meanwhile waits until the phase exists;
- concurrency slots are counted from the stored records at every admission, never from a counter;
- a periodic `Tick` fails phases past their deadline and re-admits; failed temp image deletions are retried
  and, being recorded in the store, resumed after a restart;
- log lines that cannot be stored are counted, the job fails, and its log gets a marker saying so.

Replicas (`jobforge.cluster`): a replica drives only the jobs whose lease it holds — it admits (under the
cluster's admission lock, so the limit holds across replicas), applies their backend events and ticks, runs
their cleanups — and takes over those whose lease nobody holds (at start, and at every scan). Anything else
reads the store: a kill for a job another replica drives is recorded for that replica to act on, and watchers
follow the store with blocking queries. A single replica (`Solo`) drives every job.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter

from jobforge import offload, pipeline
from jobforge.admission import SubmitPolicy
from jobforge.backends.base import Backend, BackendMessage, JobEvent, LogChunk
from jobforge.cluster import Leases, Solo, log_changes, record_changes
from jobforge.delivery import DeliveryWorker
from jobforge.errors import Conflict, IllegalTransition, NotFound, QueueFull, SlowConsumer, StoreError
from jobforge.logcaps import LogBudgets, LogLimits
from jobforge.logs import about_job
from jobforge.metrics import WINDOWS, Metrics, fleet_snapshot
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
    LogLine,
    LogMessage,
    LogsResult,
    LogStream,
    Phase,
    StreamStatus,
    SubmitJobParams,
    SubmitJobResult,
    WatchUpdate,
    masked_line,
    utcnow,
)
from jobforge.runtime_config import JobDefaults
from jobforge.stores.base import Store
from jobforge.streams import BATCH, Pulse, follow_logs
from jobforge.tasks import RegistryTarget, build_payload, temp_image

_LANE_DEPTH = 4  # messages one job may have waiting before the consumer stops reading the backend
log = logging.getLogger("jobforge.service")

DEFAULT_MAX_QUEUED_JOBS = 1000
MAX_LOG_PAGE_CHARS = 4 * 1024 * 1024
"""A getLogs page ends once its lines hold this many characters (at least one line is always returned)."""

_ALL_NEW_LINES = 1 << 30  # a watcher fed from the store reads every line past its cursor
KILL_WAIT = 30.0
"""Seconds `killJob` on a replica that does not drive the job waits for the driver to record the kill."""
WATCH_WAIT = 10.0
"""Seconds of one blocking query of a watcher fed from the store."""

_FAIL_LATER_ATTEMPTS = 20
_FAIL_LATER_MAX_DELAY = 30.0


def disk_full(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is the data disk being full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        text = str(seen).lower()
        if "disk is full" in text or "no space left" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _store_failure(exc: Exception, what: str) -> str:
    if disk_full(exc):
        return f"no space left on device: {what} could not be stored"
    return f"{what} could not be stored: {getattr(exc, 'message', None) or exc}"


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
                 max_concurrent_jobs: int, metrics: Metrics | None = None, webhooks: DeliveryWorker | None = None,
                 admission: SubmitPolicy = SubmitPolicy(),
                 clock: Callable[[], datetime] = utcnow, new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
                 max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS, log_limits: LogLimits = LogLimits(),
                 tick_seconds: float = 5.0, shutdown_grace: float = 10.0, watch_buffer: int = 1000,
                 leases: Leases | None = None):
        self.store = store
        self.leases: Leases = leases or Solo()
        self.backend = backend
        self._policy = policy
        self._registry = registry
        self._max = max_concurrent_jobs
        self.metrics = metrics or Metrics()
        self.webhooks = webhooks
        self._submit_policy = admission
        self._max_queued = max_queued_jobs
        self._log_budgets = LogBudgets(log_limits)
        self._clock = clock
        self._new_id = new_id
        self._tick_seconds = tick_seconds
        self._shutdown_grace = shutdown_grace
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._admission = asyncio.Lock()
        self._admit_requests = self._admit_served = 0  # admission passes asked for / covered by a pass run
        self._pending: list[str] = []  # snapshots of the store, refreshed at every admission (idle(), metrics)
        self._active: set[str] = set()
        self._watchers: defaultdict[str, set[_Watcher]] = defaultdict(set)
        self._watch_buffer = watch_buffer
        self._job_defaults = JobDefaults()
        self.config_index: int | None = None  # Consul index of the runtime configuration, when it is watched
        self.pulse = Pulse()
        self._tasks: set[asyncio.Task] = set()
        self._cleanups: dict[str, asyncio.Task] = {}  # at most one temp image deletion per job
        self._waiting: set[asyncio.Task] = set()  # cleanups sleeping before a retry (recorded in the store)
        self._lost_lines: dict[tuple[str, str], tuple[int, str]] = {}  # (job, phase) -> (count, reason)
        self._doomed: dict[str, str] = {}  # job -> why it must fail (its logs are incomplete), until it has
        self._consumer: asyncio.Task | None = None
        self._lanes: dict[str, deque[BackendMessage]] = {}  # job -> its backend messages not handled yet
        self._lane_room = asyncio.Event()  # set whenever a lane takes its next message
        self._ticker: asyncio.Task | None = None
        self._scanner: asyncio.Task | None = None
        self._taken: dict[str, str] = {}  # job -> the session driving it, as of the last scan (replicas)
        self._replay: dict[tuple[str, str], dict[LogStream, int]] = {}  # (job, phase) -> stored lines to skip
        self._changed = asyncio.Condition()

    def reconfigure(self, *, policy: pipeline.Policy, max_concurrent_jobs: int, job_defaults: JobDefaults,
                    index: int | None = None) -> None:
        """New defaults for jobs admitted from now on (Consul KV config): each is replaced whole, in one step of
        the loop, so a job sees either the old or the new value, never a mix. `job_defaults` are pinned into
        each job at submit, so jobs already submitted keep theirs; a larger limit admits waiting jobs at the next
        admission (tick or submit)."""
        self._policy = policy
        self._max = max_concurrent_jobs
        self._job_defaults = job_defaults
        self.config_index = index

    @property
    def policy(self) -> pipeline.Policy:
        return self._policy

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reap what a previous run left, recover unfinished jobs and cleanups nobody drives, then consume and
        admit. With replicas, jobs another live replica drives are left to it."""
        await self.leases.start()
        reap = getattr(self.backend, "reap", None)  # non-resumable backends: kill leftovers of a previous run
        if reap is not None:
            await reap()
        self._consumer = asyncio.create_task(self._consume())
        self._taken = (await self.leases.scan()).held
        unfinished = await self.store.unfinished()
        # Kept up to date from here on by admissions and job ends (an admission pass only runs while jobs wait).
        self._active = {r.job_id for r in unfinished if r.status.running}
        await self._take_over(unfinished)
        await self._admit()
        self._ticker = asyncio.create_task(self._tick_loop())
        if self.leases.shared:
            self._scanner = asyncio.create_task(self._scan_loop())

    async def _take_over(self, records: list[JobRecord]) -> None:
        """Drive the unfinished jobs whose lease nobody holds: resume running phases, retry cleanups."""
        resumed = []
        for seen in records:
            if seen.status is JobStatus.PENDING or seen.job_id in self._taken:
                continue
            if self.leases.shared and self.leases.holds(seen.job_id):
                continue
            if not seen.outstanding:  # settled, but its driver died before dropping the lease
                await self.leases.release(seen.job_id)
                continue
            if not await self.leases.acquire(seen.job_id):
                continue
            record = (await self.store.get(seen.job_id)).record if self.leases.shared else seen
            if record.status is not seen.status:  # its last driver moved it on meanwhile
                log.info("job %s: taking it over at %s", record.job_id, record.status.value,
                         extra={"job_id": record.job_id})
            if not record.outstanding:
                await self.leases.release(record.job_id)
            elif record.status.terminal:
                self._schedule_cleanup(record.job_id)
            elif record.status is JobStatus.PENDING:
                await self.leases.release(record.job_id)
            elif self.backend.resumable:
                resumed.append((pipeline.current_dispatch(record, self._policy), record))
            else:
                phase = record.current_phase
                await self._apply_or_fail(record.job_id, pipeline.PhaseFailed(
                    at=self._clock(), phase=phase, attempt=record.phases[phase].attempt,
                    error=f"the server restarted while the {phase.value} phase was running; "
                          "the local backend cannot resume it"))
        if resumed:
            if self.leases.shared:
                log.info("taking over %d running jobs: %s", len(resumed), ", ".join(r.job_id for _, r in resumed),
                         extra={"job_ids": [r.job_id for _, r in resumed]})
            for _, record in resumed:
                await self._expect_replay(record)
            await self.backend.resume(resumed)

    async def _expect_replay(self, record: JobRecord) -> None:
        """A resumed phase's logs are read from their start again: count, per stream, the lines of this attempt
        already stored (by the previous driver), so `_store_logs` skips them instead of storing them twice."""
        with about_job(record.job_id):
            phase = record.current_phase
            if phase is None:
                return
            since = record.phases[phase].dispatched_at
            try:
                stored = (await self.store.get_logs(record.job_id, phase.value)).get(phase.value, [])
            except (StoreError, OSError) as exc:
                log.warning("job %s: stored %s log not read (%s); lines may repeat", record.job_id, phase.value, exc)
                return
            counts = Counter(line.stream for line in stored
                             if line.stream is not LogStream.SYSTEM and (since is None or line.ts >= since))
            if counts:
                self._replay[(record.job_id, phase.value)] = dict(counts)

    async def aclose(self) -> None:
        """Stop consuming; let running cleanups finish (bounded), leave the rest recorded for the next start;
        then give the leases up, so other replicas take the jobs over at once."""
        for task in (self._consumer, self._ticker, self._scanner):
            if task:
                task.cancel()
        for task in list(self._waiting):
            task.cancel()
        busy = [t for t in self._tasks if not t.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=self._shutdown_grace)
            for task in late:
                task.cancel()
        background = [t for t in (self._consumer, self._ticker, self._scanner) if t]
        await asyncio.gather(*self._tasks, *background, return_exceptions=True)
        await self.leases.aclose()

    async def idle(self, cleanups: bool = False) -> None:
        """Wait until no job is pending or running and no side task is in flight (tests, benchmarks, shutdown);
        with `cleanups`, also until no temp image deletion waits for a retry."""
        def quiet() -> bool:
            busy = self._tasks if cleanups else self._tasks - self._waiting
            return not self._pending and not self._active and not busy
        async with self._changed:
            await self._changed.wait_for(quiet)

    # ------------------------------------------------------------ API methods

    async def submit_job(self, params: SubmitJobParams) -> SubmitJobResult:
        self._submit_policy.check(params.job_config)  # ConfigError (400) before anything is stored or dispatched
        if self.webhooks is not None:
            self.webhooks.check_config(params.job_config)
        if len(self._pending) >= self._max_queued:
            raise QueueFull(f"{len(self._pending)} jobs are already waiting for a slot (MAX_QUEUED_JOBS="
                            f"{self._max_queued}); the job was not accepted, submit it again later")
        config = self._job_defaults.apply(params.job_config)
        record = pipeline.new_job(self._new_id(), config, self._clock())
        await self._create(record)
        self._pending.append(record.job_id)  # counted against MAX_QUEUED_JOBS until the next admission
        self.metrics.submitted()
        log.info("Job submitted successfully", extra={"job_id": record.job_id, "owner": record.config.owner})
        await self._admit()
        return SubmitJobResult(job_id=record.job_id, status=(await self.store.get(record.job_id)).record.status)

    async def get_status(self, params: JobIdParams) -> JobStatusResult:
        return JobStatusResult.from_record((await self.store.get(params.job_id)).record)

    async def owner_of(self, job_id: str) -> str:
        """The job's owner, for authorisation (`NotFound` for an unknown job)."""
        return (await self.store.get(job_id)).record.config.owner

    async def get_status(self, params: JobIdParams) -> JobStatusResult:
        return JobStatusResult.from_record((await self.store.get(params.job_id)).record)

    async def get_logs(self, params: GetLogsParams) -> LogsResult:
        """One page of a job's logs (all of them when they fit): phases in order, lines in write order."""
        await self.store.get(params.job_id)  # NotFound for unknown jobs
        phase = params.phase.value if params.phase else None
        page = await self.store.log_page(params.job_id, phase, params.offset, params.limit, MAX_LOG_PAGE_CHARS,
                                         text_only=not params.structured)  # timestamps only when asked for
        names = [phase] if phase else [p.value for p in Phase]
        logs: dict[str, list[str]] = {name: [] for name in names}
        entries: dict[str, list[LogLine]] | None = None
        if page.texts is not None:
            for name, group in groupby(page.texts, key=itemgetter(0)):  # a page holds its phases one by one
                logs.setdefault(name, []).extend(text for _, text in group)
        else:
            entries = {name: [] for name in names}
            for name, group in groupby(page.lines, key=itemgetter(0)):
                entries.setdefault(name, []).extend(line for _, line in group)
            logs = {name: [ln.line for ln in lines] for name, lines in entries.items()}
        end = params.offset + len(page.texts if page.texts is not None else page.lines)
        return LogsResult(job_id=params.job_id, logs=logs, entries=entries, offset=params.offset, total=page.total,
                          next_offset=end if end < page.total else None)

    async def kill_job(self, params: JobIdParams) -> KillJobResult:
        """Kill here when this replica drives the job (or may: nobody else does); else record the request for
        the replica that drives it and wait (bounded) until it has recorded the kill."""
        if await self._drive(params.job_id):
            record = await self.apply(params.job_id, pipeline.KillRequested(at=self._clock()))
        else:
            await self.leases.request_kill(params.job_id)
            record = await self._until_finished(params.job_id, KILL_WAIT)
        return KillJobResult(job_id=record.job_id, status=record.status, message=pipeline.KILLED_BY_USER)

    async def _drive(self, job_id: str) -> bool:
        """True when this replica drives the job now, taking it over if nobody does (NotFound when unknown)."""
        if self.leases.holds(job_id):
            return True
        record = (await self.store.get(job_id)).record
        if record.status.terminal:
            return True  # nothing to drive: the kill is refused by the pipeline as it is everywhere
        if not await self.leases.acquire(job_id):
            return False
        record = (await self.store.get(job_id)).record
        if record.status.running:
            await self._take_over_one(record)
        return True

    async def _take_over_one(self, record: JobRecord) -> None:
        with about_job(record.job_id):
            self._taken.pop(record.job_id, None)
            await self._expect_replay(record)
            await self.backend.resume([(pipeline.current_dispatch(record, self._policy), record)])

    async def _until_finished(self, job_id: str, seconds: float) -> JobRecord:
        versioned = await self.store.get(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not versioned.record.status.terminal and loop.time() < deadline:
            found = await self.leases.wait_record(job_id, versioned.version, min(WATCH_WAIT, seconds))
            if found is None:
                break
            versioned = found
        return versioned.record

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
        def items() -> list[HistoryItem]:  # ~0.2 ms a record: in a thread, so /health is not kept waiting
            return [HistoryItem(id=r.job_id, **JobStatusResult.from_record(r).model_dump()) for r in records]
        jobs = await offload.run(items) if len(records) > 20 else items()
        return HistoryResult(jobs=jobs, total=total, limit=params.limit, offset=params.offset)

    async def watch(self, job_id: str, logs: bool = False) -> AsyncIterator[WatchUpdate]:
        """Current state first, then every change (and, with `logs`, every log line — those already stored
        first), until the job ends. Raises `SlowConsumer` when the consumer fell `watch_buffer` entries behind."""
        watcher = _Watcher(self._watch_buffer, logs)
        shared = self.leases.shared  # another replica may drive the job: follow the store, not this process
        if not shared:
            self._watchers[job_id].add(watcher)
        feeders: list[asyncio.Task] = []
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
            versioned = await self.store.get(job_id)
            record = versioned.record
            current = JobStatusResult.from_record(record)
            if record.settled:
                yield WatchUpdate(type="end", job=current)
                return
            if shared:
                feeders.append(asyncio.create_task(self._feed_record(watcher, job_id, versioned.version)))
                if logs:
                    feeders.append(asyncio.create_task(self._feed_logs(watcher, job_id)))
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
                if item.type == "end" and logs and shared:  # its driver stored every line before the end
                    async for update in lines(None):
                        yield update
                yield item
                if item.type == "end":
                    return
        finally:
            for feeder in feeders:
                feeder.cancel()
            if not shared:
                self._watchers[job_id].discard(watcher)
                if not self._watchers[job_id]:
                    del self._watchers[job_id]

    async def _feed_record(self, watcher: _Watcher, job_id: str, version: int) -> None:
        async for record in record_changes(self.leases, job_id, version, WATCH_WAIT):
            watcher.offer(WatchUpdate(type="end" if record.settled else "status",
                                      job=JobStatusResult.from_record(record)))

    async def _feed_logs(self, watcher: _Watcher, job_id: str) -> None:
        async for _ in log_changes(self.leases, job_id, WATCH_WAIT):
            watcher.offer(_ALL_NEW_LINES)  # the watcher reads every line past its cursor

    def follow_logs(self, job_id: str, phase: Phase | None = None, after: int = 0,
                    poll_interval: float = 1.0) -> AsyncIterator[LogMessage | StreamStatus]:
        """The log stream of a job, read from the store (see `jobforge.streams`)."""
        return follow_logs(self.store, self.pulse, job_id, phase=phase, after=after, poll_interval=poll_interval)

    # ------------------------------------------------------------ the shell

    async def apply(self, job_id: str, event: pipeline.Event) -> JobRecord:
        """Decide (pure), commit once (CAS, retried), then act on the commands.

        Raises `StoreError` when the store stays unusable, `IllegalTransition` for an event the job refuses."""
        with about_job(job_id):
            async with self._locks[job_id]:
                old, new, commands = await self._commit(job_id, event)
                for command in commands:  # a kill waits for the lock: it never slips between commit and dispatch
                    if isinstance(command, pipeline.DispatchPhase):
                        await self._execute(command, new)
            for command in commands:
                if not isinstance(command, pipeline.DispatchPhase):
                    await self._execute(command, new)
            if new.status.terminal and not old.status.terminal:
                self._active.discard(job_id)
                await self._admit()
            if not new.outstanding and self.leases.shared and self.leases.holds(job_id):
                await self.leases.release(job_id)
            if new.settled and not self._locks[job_id].locked():
                del self._locks[job_id]
            await self._notify()
            return new

    async def _commit(self, job_id: str, event: pipeline.Event) -> tuple[JobRecord, JobRecord, list]:
        attempt = 0
        while True:
            attempt += 1
            try:
                record, version = await self.store.get(job_id)
                new, commands = pipeline.step(record, event, self._policy)
                if new != record:
                    await self.store.put(new, version)
                    self._on_change(record, new)
                    hooks = [c for c in commands if isinstance(c, pipeline.FireWebhook)]
                    if hooks and self.webhooks is not None:  # queued under the lock: a job's events stay in order
                        await self.webhooks.enqueue(hooks, new)
                return record, new, commands
            except IllegalTransition:
                raise
            except (Conflict, StoreError, OSError) as exc:
                delay = pipeline.store_retry_delay(attempt, self._policy)
                if delay is None:
                    if isinstance(exc, StoreError):
                        raise
                    raise StoreError(str(getattr(exc, "message", exc))) from exc
                log.warning("job %s: applying %s failed (%s); retry %d in %.2fs", job_id, type(event).__name__,
                            exc, attempt, delay)
                await asyncio.sleep(delay)

    async def _create(self, record: JobRecord) -> None:
        """Store a new job, retrying like `_commit`; a conflict after a failed try means that try landed."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.store.put(record, 0)
                return
            except Conflict:
                if attempt > 1 and (await self.store.get(record.job_id)).record == record:
                    return
                raise
            except (StoreError, OSError) as exc:
                delay = pipeline.store_retry_delay(attempt, self._policy)
                if delay is None:
                    raise StoreError(_store_failure(exc, "the job")) from exc
                await asyncio.sleep(delay)

    async def _apply_or_fail(self, job_id: str, event: pipeline.Event) -> None:
        """Apply a backend event; if the store stays unusable, fail the job in the background instead."""
        with about_job(job_id):
            try:
                await self.apply(job_id, event)
            except StoreError as exc:
                log.error("job %s: %s could not be applied: %s", job_id, type(event).__name__, exc.message)
                await self._fail(job_id, _store_failure(exc, "the job's state"))

    async def _fail(self, job_id: str, error: str) -> None:
        """Fail the job now (so its later events are stale), or in the background while the store is down."""
        await self._flush_lost_lines(job_id)  # its log says lines were lost before its watchers learn it failed
        try:
            await self.apply(job_id, pipeline.JobFailed(at=self._clock(), error=error))
        except (StoreError, OSError):
            self._fail_later(job_id, error)
        except (NotFound, IllegalTransition):
            pass
        else:
            await self._flush_lost_lines(job_id)

    def _fail_later(self, job_id: str, error: str) -> None:
        async def fail() -> None:
            with about_job(job_id):
                for attempt in range(1, _FAIL_LATER_ATTEMPTS + 1):
                    try:
                        await self.apply(job_id, pipeline.JobFailed(at=self._clock(), error=error))
                        await self._flush_lost_lines(job_id)
                        return
                    except (StoreError, OSError) as exc:
                        delay = min(self._policy.store_backoff * 2 ** attempt, _FAIL_LATER_MAX_DELAY)
                        log.warning("job %s: could not record its failure (%s); retry in %.1fs", job_id, exc, delay)
                        await asyncio.sleep(delay)
                    except (NotFound, IllegalTransition):
                        return
                log.error("job %s: its failure could not be recorded (%s); the phase deadline will end it",
                          job_id, error)
        self._spawn(fail())

    def _on_change(self, old: JobRecord, new: JobRecord) -> None:
        self.metrics.transition(old, new)
        if old.status is not new.status:
            log.info("job %s: %s -> %s", new.job_id, old.status.value, new.status.value,
                     extra={"job_id": new.job_id, "status": new.status.value})
        update = WatchUpdate(type="end" if new.settled else "status", job=JobStatusResult.from_record(new))
        for watcher in self._watchers.get(new.job_id, ()):
            watcher.offer(update)
        self.pulse.fire(new.job_id)

    async def _execute(self, command: pipeline.Command, record: JobRecord) -> None:
        """Run one command; its failure is logged and recorded on the job, never skips the other commands."""
        try:
            if isinstance(command, pipeline.DispatchPhase):
                await self._dispatch(command, record)
            elif isinstance(command, pipeline.StopPhase):
                await self.backend.stop(command)
            elif isinstance(command, pipeline.DeleteTempImage):
                self._schedule_cleanup(record.job_id, command.delay_seconds)
        except Exception as exc:  # noqa: BLE001 - the command boundary: record and go on
            what = type(command).__name__
            log.exception("job %s: %s failed", record.job_id, what)
            phase = getattr(command, "phase", None)
            await self._system_log(record.job_id, phase.value if phase else "cleanup",
                                   f"{what} failed: {type(exc).__name__}: {exc}")

    async def _dispatch(self, command: pipeline.DispatchPhase, record: JobRecord) -> None:
        try:
            await self.backend.dispatch(command, build_payload(record, command.phase.value, self._registry),
                                        record.config)
        except Exception as exc:  # noqa: BLE001 - any dispatch failure fails the phase, with its reason
            reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self._spawn(self._apply_or_fail(record.job_id, pipeline.PhaseFailed(
                at=self._clock(), phase=command.phase, attempt=command.attempt,
                error=f"{command.phase.value} phase could not be dispatched: {reason}")))

    # ------------------------------------------------------------ temp image cleanup

    def _schedule_cleanup(self, job_id: str, delay: float = 0.0) -> None:
        running = self._cleanups.get(job_id)
        if running is not None and not running.done() and running is not asyncio.current_task():
            return  # one at a time; a failing deletion schedules its own retry from inside its task

        async def clean() -> None:
            with about_job(job_id):
                if delay > 0:
                    me = asyncio.current_task()
                    self._waiting.add(me)
                    try:
                        await asyncio.sleep(delay)
                    finally:
                        self._waiting.discard(me)
                try:
                    record = (await self.store.get(job_id)).record
                    if not record.temp_image_deleted:
                        await self._delete_temp_image(record)
                except Exception:  # noqa: BLE001 - recorded in the store: the tick or the next start retries it
                    log.exception("job %s: temp image cleanup could not be completed", job_id)
                finally:
                    if self._cleanups.get(job_id) is asyncio.current_task():
                        del self._cleanups[job_id]
        self._cleanups[job_id] = self._spawn(clean())

    async def _delete_temp_image(self, record: JobRecord) -> bool:
        with about_job(record.job_id):
            image = temp_image(record, self._registry)
            try:
                ok = await self.backend.cleanup(record.job_id, build_payload(record, "cleanup", self._registry),
                                                record.config)
                error = None if ok else f"temp image {image} could not be deleted (see the cleanup log); retrying"
            except Exception as exc:  # noqa: BLE001 - a cleanup failure is recorded on the job, not raised
                reason = getattr(exc, "message", None) or exc
                ok, error = False, f"deleting temp image {image} failed: {reason}; retrying"
            if not ok:
                log.warning("job %s: %s", record.job_id, error)
            await self.apply(record.job_id, pipeline.TempImageDeleted(at=self._clock(), ok=ok, error=error))
            return ok

    # ------------------------------------------------------------ admission and the clock

    async def _admit(self) -> None:
        """Start pending jobs while fewer than the limit are running, counted from the store (with replicas:
        under the cluster's admission lock, so the count is the cluster's).

        Passes are coalesced: a caller whose request came in while a pass was running waits for the next pass,
        and that one pass serves every caller queued meanwhile (a thousand submits or job ends at once cost two
        passes over the store, not a thousand)."""
        with about_job(None):
            self._admit_requests += 1
            wanted = self._admit_requests
            async with self._admission:
                if self._admit_served >= wanted:
                    return  # a pass that started after our request has run
                self._admit_served = self._admit_requests
                try:
                    async with self.leases.admission() as allowed:
                        if allowed:
                            await self._admit_now()
                        else:
                            log.info("another replica is admitting jobs; admission retried at the next tick")
                except (StoreError, OSError) as exc:
                    log.warning("admission postponed: the store is unusable (%s)", exc)
            await self._notify()

    async def _admit_now(self) -> None:
        if not (await self.store.list(1, 0, status=JobStatus.PENDING))[1]:
            self._pending = []  # nothing waits: no pass over every unfinished job (one per job's end was N^2)
            return
        jobs = await self.store.open_jobs()  # ids and statuses only: no record is parsed
        running = {job_id for job_id, status in jobs if status.running}
        self._pending = [job_id for job_id, status in jobs if status is JobStatus.PENDING]
        self._active = running
        # Side by side: each admission dispatches the job's build, a round trip to the backend.
        await asyncio.gather(*(self._admit_one(job_id)
                               for job_id in self._pending[:max(0, self._max - len(running))]))

    async def _admit_one(self, job_id: str) -> None:
        with about_job(job_id):
            if not await self.leases.acquire(job_id):
                return  # being killed by another replica
            try:
                new = await self.apply(job_id, pipeline.Admitted(at=self._clock()))
            except IllegalTransition:  # killed meanwhile
                new = None
                if self.leases.shared:
                    await self.leases.release(job_id)
            except (StoreError, NotFound) as exc:
                log.warning("job %s: admission failed (%s); retried at the next tick", job_id, exc)
                if self.leases.shared:
                    await self.leases.release(job_id)
                return
            self._pending.remove(job_id)
            if new is not None and new.status.running:
                self._active.add(job_id)

    async def tick(self) -> None:
        """One pass of the clock: fail phases past their deadline, resume lost cleanups, re-admit."""
        try:
            records = await self.store.unfinished()
        except (StoreError, OSError) as exc:
            log.warning("tick skipped: the store is unusable (%s)", exc)
            return
        for job_id in {job for job, _ in self._lost_lines}:
            await self._flush_lost_lines(job_id)
        for record in records:
            if not self.leases.holds(record.job_id):
                continue  # another replica drives it (or nobody: the scan takes it over)
            if record.status.terminal:
                if record.job_id not in self._cleanups:
                    self._schedule_cleanup(record.job_id)
            elif record.current_phase is not None:
                await self._apply_or_fail(record.job_id, pipeline.Tick(at=self._clock()))
        if self.leases.shared:  # jobs without a lease key at all (e.g. recorded by an older version)
            await self._take_over(records)
        await self._admit()

    async def scan(self) -> None:
        """Replicas (every second): end dead replicas' sessions, take over the jobs whose lease nobody holds,
        and act on kill requests for the jobs this replica drives (or may take: nobody drives them)."""
        scan = await self.leases.scan()
        self._taken = scan.held
        if scan.free:
            records = []
            for job_id in scan.free:
                try:
                    records.append((await self.store.get(job_id)).record)
                except NotFound:
                    continue
            await self._take_over(records)
        for job_id in scan.kills:
            if self.leases.holds(job_id) or job_id not in scan.held:  # else its driver acts on it
                await self._kill_requested(job_id)

    async def _kill_requested(self, job_id: str) -> None:
        with about_job(job_id):
            try:
                record = (await self.store.get(job_id)).record
                if not record.status.terminal:
                    if not await self._drive(job_id):
                        return
                    await self.apply(job_id, pipeline.KillRequested(at=self._clock()))
                    log.info("job %s killed at the request of another replica", job_id)
            except (NotFound, IllegalTransition):
                pass
            await self.leases.kill_done(job_id)

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.leases.scan_seconds)
            try:
                await self.scan()
            except Exception:  # noqa: BLE001 - the lease must keep being renewed
                log.exception("cluster scan failed")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_seconds)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the clock must keep going
                log.exception("tick failed")

    # ------------------------------------------------------------ backend messages and logs

    async def _consume(self) -> None:
        """Backend messages in order within a job, jobs side by side: each job with messages has one lane task
        working through them, so one job's store round-trips and dispatch never hold up another's (one loop for
        all made every transition wait behind every other job's work)."""
        lanes = self._lanes
        async for message in self.backend.events():
            lane = lanes.get(message.job_id)
            if lane is None:
                lanes[message.job_id] = deque([message])
                self._spawn(self._lane(message.job_id, lanes))
                continue
            lane.append(message)
            # Backpressure: a job whose lane is this far behind (a log flood) is not read further until it
            # catches up, so what the backend holds back (its in-flight bound) is never piled up here instead.
            while len(lane) >= _LANE_DEPTH:
                self._lane_room.clear()
                await self._lane_room.wait()

    async def handled(self) -> None:
        """Wait until every backend message received so far is handled (tests drain with it, never sleep)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._lanes)

    async def _lane(self, job_id: str, lanes: dict[str, deque[BackendMessage]]) -> None:
        lane = lanes[job_id]
        try:
            while lane:
                message = lane.popleft()
                self._lane_room.set()
                await self._handle(message)
        finally:
            del lanes[job_id]

    async def _handle(self, message: BackendMessage) -> None:
        with about_job(message.job_id):
            if self.leases.shared and not self.leases.holds(message.job_id) \
                    and not (isinstance(message, LogChunk) and message.phase == "cleanup"):
                log.debug("job %s: driven by another replica now; its backend report is left to it", message.job_id)
                return
            try:
                if isinstance(message, LogChunk):
                    await self._store_logs(message)
                elif isinstance(message, JobEvent):
                    if isinstance(message.event, pipeline.PhaseEnded):
                        self._replay.pop((message.job_id, message.event.phase.value), None)
                        self.metrics.phase_ended(message.event)
                    await self._flush_lost_lines(message.job_id)  # a phase's end may have freed the space
                    await self._apply_or_fail(message.job_id, self._doom(message.job_id, message.event))
            except NotFound:
                log.warning("backend reported on unknown job %s", message.job_id, extra={"job_id": message.job_id})
            except IllegalTransition as exc:
                log.warning("job %s: %s", message.job_id, exc.message)
            except Exception:  # one bad message must not stop the pipeline for every other job
                log.exception("failed to handle backend message for job %s", message.job_id)

    async def _append(self, job_id: str, phase: str, lines) -> None:
        """Append with retries; raises the last error when the store stays unusable."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.store.append_logs(job_id, phase, lines)
                return
            except (StoreError, OSError) as exc:
                delay = pipeline.store_retry_delay(attempt, self._policy)
                if delay is None or disk_full(exc):
                    raise
                await asyncio.sleep(delay)

    async def _store_logs(self, chunk: LogChunk) -> None:
        lines = [masked_line(line) for line in chunk.lines]
        lines = self._skip_replayed(chunk.job_id, chunk.phase, lines)
        lines = self._log_budgets.admit(chunk.job_id, lines, self._clock)  # per-line and per-job caps
        if not lines:
            return
        chunk = LogChunk(chunk.job_id, chunk.phase, lines)
        key = (chunk.job_id, chunk.phase)
        lost = self._lost_lines.get(key)
        try:  # the marker of earlier lost lines goes in with the next lines that fit, in one transaction
            await self._append(chunk.job_id, chunk.phase, [*([self._lost_marker(*lost)] if lost else []), *lines])
            self._lost_lines.pop(key, None)
        except (StoreError, OSError) as exc:
            count, _ = self._lost_lines.get(key, (0, ""))
            reason = "no space left on device" if disk_full(exc) else str(getattr(exc, "message", exc))
            self._lost_lines[key] = (count + len(chunk.lines), reason)
            if count == 0:
                log.error("job %s: log lines of %s lost: %s", chunk.job_id, chunk.phase, reason)
                error = _store_failure(exc, f"log lines of the {chunk.phase} phase")
                self._doomed[chunk.job_id] = error
                while len(self._doomed) > 10_000:  # bounded: the oldest entries are long finished
                    self._doomed.pop(next(iter(self._doomed)))
                if disk_full(exc):
                    self._spawn(self._stop_current_phase(chunk.job_id))  # it holds the space we need
                await self._fail(chunk.job_id, error)
        self.pulse.fire(chunk.job_id)
        for watcher in self._watchers.get(chunk.job_id, ()):
            if watcher.logs:
                watcher.offer(len(chunk.lines))  # a count: the watcher reads the lines back from the store

    def _skip_replayed(self, job_id: str, phase: str, lines: list[LogLine]) -> list[LogLine]:
        """Drop the lines a resumed phase reads again that its previous driver had stored already."""
        skip = self._replay.get((job_id, phase))
        if not skip:
            return lines
        kept = []
        for line in lines:
            if skip.get(line.stream, 0) > 0:
                skip[line.stream] -= 1
            else:
                kept.append(line)
        if not any(skip.values()):
            del self._replay[(job_id, phase)]
        return kept

    async def _stop_current_phase(self, job_id: str) -> None:
        """Stop a job's running phase before its failure is recorded (a full disk may not take the record yet)."""
        with about_job(job_id):
            try:
                record = (await self.store.get(job_id)).record
                if record.current_phase is not None:
                    await self.backend.stop(pipeline.StopPhase(job_id=job_id, phase=record.current_phase,
                                                               attempt=record.phases[record.current_phase].attempt))
            except Exception:  # noqa: BLE001 - best effort; the recorded failure stops it too
                log.exception("job %s: could not stop its phase", job_id)

    def _doom(self, job_id: str, event: pipeline.Event) -> pipeline.Event:
        """A phase of a job whose log lines were lost cannot end well: its end becomes the job's failure (the
        failure recorded when the lines were lost may itself not have been storable on a full disk)."""
        reason = self._doomed.get(job_id)
        if reason is None or not isinstance(event, (pipeline.PhaseSucceeded, pipeline.PhaseFailed)):
            return event
        del self._doomed[job_id]
        failed = isinstance(event, pipeline.PhaseFailed) and event.error != pipeline.KILLED_BY_USER  # we stopped it
        error = f"{reason}; {event.error}" if failed else reason
        return pipeline.JobFailed(at=event.at, error=error)

    async def _flush_lost_lines(self, job_id: str) -> None:
        """Write the marker for lines that could not be stored, once the store takes writes again."""
        for key in [k for k in self._lost_lines if k[0] == job_id]:
            try:
                await self.store.append_logs(job_id, key[1], [self._lost_marker(*self._lost_lines[key])])
            except (StoreError, OSError):
                return
            del self._lost_lines[key]

    def _lost_marker(self, count: int, reason: str) -> LogLine:
        return LogLine(ts=self._clock(), stream=LogStream.SYSTEM,
                       line=f"[log lines lost: {count} lines could not be stored ({reason})]")

    async def _system_log(self, job_id: str, phase: str, text: str) -> None:
        """Best effort: a line in the job's log about something the service did (or could not do)."""
        try:
            await self.store.append_logs(job_id, phase, [LogLine(ts=self._clock(), stream=LogStream.SYSTEM, line=text)])
        except (StoreError, OSError):
            log.warning("job %s: could not log %r", job_id, text, extra={"job_id": job_id})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            asyncio.get_running_loop().create_task(self._notify())
        task.add_done_callback(done)
        return task

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
