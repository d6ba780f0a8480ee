"""The webhook delivery worker: sends the store's outbox, per job in order, with bounded retries.

The service queues deliveries in the store (`enqueue`, inside the job's lock, right after the record is
written), so the pipeline never waits on a receiver and a queued delivery survives a restart: any worker on
the same store picks it up. One loop asks the store for each job's first pending delivery that is due
(`Store.due_deliveries`): only that one may be sent, and only one at a time, so a job's events arrive in order
(a delivery being retried holds back the later ones of its job, not other jobs'). Heads waiting out their
backoff are not part of the answer, so however many jobs are stuck on a dead receiver, a new job's delivery is
in the next round. Before sending, the worker claims the delivery with a lease written by compare-and-set, so
two replicas never send it at once.

What happens to an answer (`jobforge.webhooks.retryable_status`): 2xx delivered; network errors, 5xx, 408 and
429 retried with exponential backoff until `max_attempts`; any other 4xx and every 3xx (redirects are never
followed) fail at once; a destination the outbound policy refuses (`jobforge.outbound`) is recorded as
REFUSED and never contacted. The outcome stays in the outbox entry (`store.job_deliveries`). Logs name the job,
event, delivery id and host - never the URL's path or query, the headers, or the secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import aiohttp

from jobforge import webhooks
from jobforge.config import JobConfig
from jobforge.errors import ConfigError, Conflict, NotFound, StoreError
from jobforge.logs import about_job
from jobforge.models import DeliveryState, JobRecord, WebhookDelivery, utcnow
from jobforge.outbound import OutboundPolicy, OutboundRefused
from jobforge.pipeline import FireWebhook
from jobforge.stores.base import Store, VersionedDelivery

log = logging.getLogger("jobforge.webhooks")

_BATCH = 500


def _refusal(exc: BaseException) -> OutboundRefused | None:
    """The policy refusal behind an aiohttp connection error, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, OutboundRefused):
            return seen
        os_error = getattr(seen, "os_error", None)
        if isinstance(os_error, OutboundRefused):
            return os_error
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException, timeout: float) -> str:
    """A network failure in words that carry no part of the URL but the host (paths and queries may hold tokens)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__


class DeliveryWorker:
    def __init__(self, store: Store, policy: OutboundPolicy, *, max_attempts: int = 6, backoff: float = 2.0,
                 backoff_max: float = 300.0, timeout: float = 10.0, poll_interval: float = 5.0,
                 concurrency: int = 8, clock: Callable[[], datetime] = utcnow,
                 on_outcome: Callable[[str], None] | None = None) -> None:
        self._store = store
        self._policy = policy
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._timeout = timeout
        self._poll = poll_interval
        self._concurrency = concurrency
        self._clock = clock
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._busy: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ the service's side

    async def enqueue(self, commands: Sequence[FireWebhook], record: JobRecord) -> None:
        """Queue the deliveries of one transition. Never raises: a store failure is logged, the job goes on."""
        for command in commands:
            delivery = webhooks.new_delivery(command, record, self._clock())
            try:
                await self._store.put_delivery(delivery, 0)
            except Conflict:
                continue  # already queued (the event was applied twice)
            except StoreError as exc:
                log.error("job %s: could not queue webhook %s: %s", record.job_id, command.event.value, exc.message,
                          extra={"job_id": record.job_id})
        self._wake.set()

    def check_config(self, config: JobConfig) -> None:
        """At submit time, refuse what delivery would certainly refuse: an IP-literal `webhook_url` the policy
        forbids (a name is judged by the addresses it resolves to when sending)."""
        if config.webhook_url is None:
            return
        try:
            self._policy.check_url(config.webhook_url)
        except OutboundRefused as exc:
            rule = str(exc)
            raise ConfigError(f"invalid params: job_config.webhook_url: {rule}",
                              [{"field": "job_config.webhook_url", "rule": rule}]) from None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        tasks = [t for t in (self._loop_task, *self._busy.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        """Wait until no delivery is pending (tests, demo). Deliveries in backoff count as pending."""
        async with self._changed:
            while self._busy or await self._store.pending_deliveries(1):
                await self._changed.wait()

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._round()
            except StoreError as exc:
                log.warning("webhook outbox unavailable, retrying in %.0f s: %s", self._poll, exc.message)
                delay = self._poll
            except Exception:  # e.g. an unreadable outbox entry: keep the worker alive for every other job
                log.exception("webhook delivery round failed; retrying in %.0f s", self._poll)
                delay = self._poll
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _round(self) -> float:
        """Start every job's first pending delivery that is due; return how long to sleep."""
        now = self._clock()
        found = await self._store.due_deliveries(now, _BATCH)
        delay = self._poll
        if found.next_due is not None:
            delay = min(delay, (found.next_due - now).total_seconds())
        for entry in found.due:
            if len(self._busy) >= self._concurrency:
                break  # a finishing delivery wakes the loop for the rest
            job_id = entry.delivery.job_id
            if job_id not in self._busy:
                self._busy[job_id] = asyncio.create_task(self._deliver(entry))
        async with self._changed:
            self._changed.notify_all()
        return max(delay, 0.0)

    async def _deliver(self, entry: VersionedDelivery) -> None:
        with about_job(entry.delivery.job_id):
            delivery = entry.delivery
            try:
                await self._attempt(entry)
            except StoreError as exc:
                log.warning("job %s: webhook %s: outbox write failed: %s", delivery.job_id, delivery.event.value,
                            exc.message)
            except Exception:  # a bug here must not stop the other jobs' deliveries
                log.exception("job %s: webhook %s: delivery failed unexpectedly", delivery.job_id, delivery.event.value)
            finally:
                self._busy.pop(delivery.job_id, None)
                self._wake.set()
                async with self._changed:
                    self._changed.notify_all()

    async def _attempt(self, entry: VersionedDelivery) -> None:
        delivery, now = entry.delivery, self._clock()
        lease = timedelta(seconds=self._timeout + 30)
        try:
            version = await self._store.put_delivery(delivery.model_copy(update={"lease_until": now + lease}),
                                                     entry.version)
        except Conflict:
            return  # another worker claimed it
        try:
            record = (await self._store.get(delivery.job_id)).record
        except NotFound:
            record = None
        attempt = delivery.attempts + 1
        status, retry_after, problem = None, None, None
        host = ""
        if record is None or record.config.webhook_url is None:
            state, outcome = DeliveryState.FAILED, "the job or its webhook_url no longer exists"
        else:
            url = record.config.webhook_url
            host = urlsplit(url).hostname or ""
            state, outcome, status, retry_after = await self._send(url, delivery, record)
        if state is DeliveryState.PENDING:  # retryable
            if attempt >= self._max_attempts:
                state, outcome = DeliveryState.FAILED, f"gave up after {attempt} attempts: {outcome}"
            else:
                problem = outcome
        finished = None if state is DeliveryState.PENDING else self._clock()
        next_at = self._clock() + webhooks.backoff(attempt, self._backoff, self._backoff_max, retry_after)
        done = delivery.model_copy(update={
            "state": state, "attempts": attempt, "last_status": status, "outcome": outcome,
            "lease_until": None, "finished_at": finished,
            "next_attempt_at": next_at if state is DeliveryState.PENDING else delivery.next_attempt_at})
        await self._store.put_delivery(done, version)
        self._on_outcome("retry" if problem else state.value)
        level = logging.INFO if state is DeliveryState.DELIVERED else logging.WARNING
        result = (f"{outcome}; retrying in {(next_at - self._clock()).total_seconds():.1f} s" if problem
                  else f"{state.value}: {outcome}")
        log.log(level, "job %s: webhook %s (delivery %s) to %s, attempt %d: %s", delivery.job_id,
                delivery.event.value, delivery.delivery_id, host or "?", attempt, result)

    async def _send(self, url: str, delivery: WebhookDelivery,
                    record: JobRecord) -> tuple[DeliveryState, str, int | None, str | None]:
        try:
            self._policy.check_url(url)
            async with self._client().post(url, data=delivery.body.encode(),
                                           headers=webhooks.headers(delivery, record.config),
                                           allow_redirects=False) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            refused = _refusal(exc)
            if refused is not None:
                return DeliveryState.REFUSED, str(refused), None, None
            return DeliveryState.PENDING, _describe(exc, self._timeout), None, None
        if 200 <= status < 300:
            return DeliveryState.DELIVERED, f"HTTP {status}", status, None
        if 300 <= status < 400:
            return DeliveryState.FAILED, f"HTTP {status}: redirects are not followed", status, None
        if webhooks.retryable_status(status):
            return DeliveryState.PENDING, f"HTTP {status}", status, retry_after
        return DeliveryState.FAILED, f"HTTP {status} (not retried)", status, None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self._policy.resolver(), limit=self._concurrency)
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=self._timeout),
                                                  trust_env=False)
        return self._session
