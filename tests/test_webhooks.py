"""Webhooks POSTed for real to receivers on 127.0.0.1: the reference's events and headers, signed, in order,
retried only when worth it, queued in the store across a restart, and sent only where the outbound policy allows.

The service runs with the in-memory backend (tests/support/fake_backend.py) and SQLite; the signature is
checked with the standard library's HMAC, the way docs/webhooks.md tells receivers to.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from jobforge.config import JobConfig
from jobforge.metrics import Metrics
from jobforge.models import DeliveryState, JobStatus, Phase, WebhookDelivery, WebhookEvent, utcnow
from jobforge.pipeline import new_job
from jobforge.server.wiring import build_webhooks
from jobforge.settings import Settings
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from jobforge.webhooks import backoff, headers, strip_credentials
from tests.doubles.consul import FakeConsul
from tests.support.receiver import Receiver
from tests.test_server import CONFIG, running

SECRET = "hush-hush-secret"
HEADER_TOKEN = "tok-123"
REPO_PASSWORD = "pw-789"
SUCCESS = ["build.started", "build.completed", "test.started", "test.completed", "publish.started",
           "publish.completed", "job.completed"]
TEST_FAILS = ["build.started", "build.completed", "test.started", "test.failed", "job.failed"]


def verify(headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Webhook-Signature"], expected)


async def finished(env) -> None:
    await env.service.idle()
    await env.service.webhooks.drain()


async def deliveries(env, job_id):
    return await env.service.store.job_deliveries(job_id)


# ---------------------------------------------------------------- events, payload, headers

async def test_a_successful_job_sends_every_event_once_in_order_signed(tmp_path):
    async with Receiver() as receiver, running(tmp_path / "db") as env:
        job_id = await env.submit(webhook_url=receiver.url(),
                                  repo_url=f"https://ci:{REPO_PASSWORD}@git.example.invalid/app.git")
        await finished(env)
    assert receiver.events == SUCCESS
    for got in receiver.requests:
        assert verify(got.headers, got.body)
        assert got.payload["event"] == got.event
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"].startswith("jobforge/")
        assert got.headers["Authorization"] == f"Bearer {HEADER_TOKEN}"  # webhook_headers are sent
        raw = got.body.decode() + repr(got.headers)
        assert SECRET not in raw and REPO_PASSWORD not in raw and HEADER_TOKEN not in got.body.decode()
    assert len({r.headers["X-Webhook-Delivery"] for r in receiver.requests}) == len(SUCCESS)
    first, last = receiver.requests[0].payload, receiver.requests[-1].payload
    assert set(first) == {"event", "job_id", "status", "phase", "timestamp", "duration", "owner", "repo_url",
                          "git_ref", "image_name", "image_tags", "error"}
    assert (first["job_id"], first["status"], first["phase"], first["owner"]) == (job_id, "BUILDING", "build", "team")
    assert first["repo_url"] == "https://git.example.invalid/app.git"  # credentials stripped
    assert (first["git_ref"], first["image_name"], first["image_tags"]) == ("main", "app", [job_id, "latest"])
    assert (last["status"], last["phase"], last["error"]) == ("SUCCEEDED", None, None)
    stamps = [datetime.fromisoformat(r.payload["timestamp"]) for r in receiver.requests]
    assert all(r.payload["timestamp"].endswith("Z") for r in receiver.requests) and stamps == sorted(stamps)
    assert all(isinstance(r.payload["duration"], int | float) and r.payload["duration"] >= 0
               for r in receiver.requests)


async def test_a_failed_job_sends_its_failure_events_once_in_order(tmp_path):
    async with Receiver() as receiver, running(tmp_path / "db") as env:
        env.backend.outcomes[Phase.TEST] = "fail"
        job_id = await env.submit(webhook_url=receiver.url())
        await finished(env)
    assert receiver.events == TEST_FAILS
    assert all(verify(r.headers, r.body) for r in receiver.requests)
    failed, job_failed = receiver.requests[-2].payload, receiver.requests[-1].payload
    assert (failed["job_id"], failed["phase"], failed["status"]) == (job_id, "test", "FAILED")
    assert failed["error"] == job_failed["error"] == "test phase failed: scripted failure"
    assert job_failed["phase"] == "test"


async def test_on_success_and_on_failure_flags(tmp_path):
    async with Receiver() as receiver, running(tmp_path / "db") as env:
        env.backend.outcomes[Phase.TEST] = "fail"
        await env.submit(webhook_url=receiver.url(), webhook_on_failure=False)
        await finished(env)
        assert receiver.events == ["build.started", "build.completed", "test.started"]
        receiver.requests.clear()
        await env.submit(webhook_url=receiver.url(), webhook_on_success=False)
        await finished(env)
        assert receiver.events == ["build.started", "test.started", "test.failed", "job.failed"]


async def test_a_stalled_receiver_never_holds_the_pipeline(tmp_path):
    release = asyncio.Event()
    async with Receiver(hold=release) as receiver, running(tmp_path / "db") as env:
        job_id = await env.submit(webhook_url=receiver.url())
        await env.service.idle()  # the job ends while the first delivery is still waiting for an answer
        assert (await env.service.store.get(job_id)).record.status.value == "SUCCEEDED"
        assert [r.event for r in await receiver.wait_for(1)] == ["build.started"]
        assert (await env.service.store.get(job_id)).record.status.value == "SUCCEEDED"  # still only one
        assert receiver.events == ["build.started"]
        release.set()
        await env.service.webhooks.drain()
    assert receiver.events == SUCCESS


# ---------------------------------------------------------------- retries

@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_retryable_answers_are_retried_with_the_same_body_and_delivery_id(tmp_path, status):
    def answer(n: int) -> web.Response:
        return web.Response(status=status if n < 2 else 204)

    async with Receiver(answer) as receiver, running(tmp_path / "db") as env:
        await env.submit(webhook_url=receiver.url())
        await finished(env)
    assert receiver.events == ["build.started"] * 3 + SUCCESS[1:]  # the later events waited, in order
    first_three = receiver.requests[:3]
    assert len({(r.body, r.headers["X-Webhook-Delivery"], r.headers["X-Webhook-Signature"]) for r in first_three}) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_other_4xx_answers_are_not_retried(tmp_path, status):
    async with Receiver(lambda n: web.Response(status=status)) as receiver, running(tmp_path / "db") as env:
        job_id = await env.submit(webhook_url=receiver.url())
        await finished(env)
        outbox = await deliveries(env, job_id)
    assert receiver.events == SUCCESS  # one attempt each
    assert {(d.state, d.attempts, d.last_status) for d in outbox} == {(DeliveryState.FAILED, 1, status)}


async def test_attempts_are_bounded(tmp_path):
    async with Receiver(lambda n: web.Response(status=500)) as receiver, \
            running(tmp_path / "db", max_attempts=3) as env:
        env.backend.outcomes[Phase.BUILD] = "fail"
        job_id = await env.submit(webhook_url=receiver.url())
        await finished(env)
        outbox = await deliveries(env, job_id)
    assert receiver.events == ["build.started"] * 3 + ["build.failed"] * 3 + ["job.failed"] * 3
    assert all(d.state is DeliveryState.FAILED and d.attempts == 3 and "gave up after 3" in d.outcome
               for d in outbox)


# ---------------------------------------------------------------- webhook_deliveries_total

def outcomes_scraped(text: str) -> dict[str, float]:
    """`webhook_deliveries_total` samples of a Prometheus scrape, by outcome."""
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "webhook_deliveries"]
    return {s.labels["outcome"]: s.value for s in family.samples if s.name == "webhook_deliveries_total"}


@pytest.mark.parametrize("statuses, counted", [
    ([500, 204], {"retry": 1.0, "delivered": float(len(SUCCESS))}),  # the first attempt of the first event
    ([400], {"failed": float(len(SUCCESS))}),  # every event once, none retried
])
async def test_every_attempt_is_counted_by_outcome_on_the_scrape(tmp_path, monkeypatch, statuses, counted):
    """The worker as the service wires it (`build_webhooks`, the service's `Metrics`), read back from /metrics."""
    monkeypatch.setenv("JOBFORGE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    monkeypatch.setenv("JOBFORGE_WEBHOOK_BACKOFF", "10ms")
    metrics, store = Metrics(), SqliteStore(tmp_path / "db")
    answer = lambda n: web.Response(status=statuses[min(n, len(statuses) - 1)])  # noqa: E731
    async with Receiver(answer) as receiver, running(tmp_path / "db", store=store, metrics=metrics,
                                                     webhooks=build_webhooks(Settings(), store, metrics)) as env:
        await env.submit(webhook_url=receiver.url())
        await finished(env)
        resp = await env.client.get("/metrics")
        scrape = await resp.text()
    assert len(receiver.requests) == len(SUCCESS) + counted.get("retry", 0)
    assert outcomes_scraped(scrape) == counted


# ---------------------------------------------------------------- many jobs stuck on a dead receiver

async def test_jobs_stuck_on_a_dead_receiver_do_not_hold_up_a_new_jobs_webhooks(tmp_path):
    """More stuck deliveries than the worker reads in one round (500): 80 finished jobs, 7 queued events each,
    all for a receiver that refuses connections. Each job's first delivery is tried once and waits out its
    (hour-long) backoff; the new job's events to a healthy receiver arrive meanwhile, all of them."""
    stuck_jobs, per_job = 80, len(SUCCESS)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and the port stays ours
    tried, all_tried = [], asyncio.Event()

    def outcome(name: str) -> None:
        tried.append(name)
        if tried.count("retry") == stuck_jobs:
            all_tried.set()

    try:
        async with Receiver() as receiver, running(tmp_path / "db", start_webhooks=False, backoff=3600,
                                                   backoff_max=3600, on_outcome=outcome) as env:
            store, queued_at = env.service.store, utcnow() - timedelta(minutes=1)
            dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/hook"
            for n in range(stuck_jobs):
                config = JobConfig.model_validate({**CONFIG, "webhook_url": dead_url})
                record = new_job(f"stuck-{n:03d}", config, queued_at).model_copy(
                    update={"status": JobStatus.SUCCEEDED, "finished_at": queued_at})
                await store.put(record, 0)
                for event in SUCCESS:
                    await store.put_delivery(WebhookDelivery(
                        delivery_id=f"{record.job_id}/{event}", job_id=record.job_id, event=WebhookEvent(event),
                        body="{}", created_at=queued_at, next_attempt_at=queued_at), 0)
            assert len(await store.pending_deliveries(10_000)) == stuck_jobs * per_job > 500
            await env.service.webhooks.start()
            job_id = await env.submit(webhook_url=receiver.url())
            started = time.monotonic()
            await asyncio.wait_for(all_tried.wait(), 20)
            await receiver.wait_for(len(SUCCESS), timeout=20)
            took = time.monotonic() - started
            stuck = await store.pending_deliveries(10_000)
            assert (await deliveries(env, job_id))[-1].state is DeliveryState.DELIVERED
    finally:
        dead.close()
    assert receiver.events == SUCCESS and {r.payload["job_id"] for r in receiver.requests} == {job_id}
    assert took < 10, f"the healthy receiver waited {took:.1f} s"
    assert tried.count("retry") == stuck_jobs  # each stuck job's first event tried once, then in backoff
    assert len(stuck) == stuck_jobs * per_job  # all still queued: the dead receiver held back only its jobs
    assert {d.delivery.attempts for d in stuck if d.delivery.event is WebhookEvent.BUILD_STARTED} == {1}
    assert {d.delivery.attempts for d in stuck if d.delivery.event is not WebhookEvent.BUILD_STARTED} == {0}


# ---------------------------------------------------------------- the outbox survives a restart

@pytest.fixture(params=["sqlite", "consul"])
async def store_factory(request, tmp_path):
    """Makes stores that share one place: a SQLite file, or a Consul (fake agent) prefix."""
    if request.param == "sqlite":
        yield lambda: SqliteStore(tmp_path / "jobs.db")
        return
    fake = FakeConsul()
    addr = await fake.start()
    yield lambda: ConsulStore(addr, prefix="webhooks-test/")
    await fake.stop()


async def test_deliveries_queued_before_a_restart_arrive_after_it(tmp_path, store_factory):
    db = tmp_path / "unused"
    async with Receiver() as receiver:
        async with running(db, store=store_factory(), start_webhooks=False) as env:  # no worker: all stay queued
            job_id = await env.submit(webhook_url=receiver.url())
            await env.service.idle()
            assert len(await env.service.store.pending_deliveries(100)) == len(SUCCESS)
        assert receiver.requests == []
        async with running(db, store=store_factory()) as env:
            await env.service.webhooks.drain()
            outbox = await deliveries(env, job_id)
    assert receiver.events == SUCCESS
    assert all(verify(r.headers, r.body) for r in receiver.requests)
    assert {d.state for d in outbox} == {DeliveryState.DELIVERED}


# ---------------------------------------------------------------- outbound policy

@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://10.1.2.3/hook"])
async def test_a_refused_ip_literal_is_a_field_error_at_submit(tmp_path, url):
    async with running(tmp_path / "db", allow_hosts=()) as env:
        rpc = await env.rpc("submitJob", {"job_config": {**CONFIG, "webhook_url": url}})
        assert rpc["error"]["code"] == -32602
        [error] = rpc["error"]["data"]
        assert error["field"] == "job_config.webhook_url" and "refused by the outbound policy" in error["rule"]
        assert "JOBFORGE_WEBHOOK_ALLOW_HOSTS" in error["rule"]
        assert (await env.service.store.list(10, 0))[1] == 0  # nothing stored, nothing runs


async def test_a_name_resolving_to_loopback_is_refused_unless_allow_listed(tmp_path):
    async with Receiver() as receiver:
        async with running(tmp_path / "refused", allow_hosts=()) as env:
            job_id = await env.submit(webhook_url=receiver.url(host="localhost"))
            await finished(env)
            refused = await deliveries(env, job_id)
        assert receiver.requests == []
        assert {(d.state, d.attempts) for d in refused} == {(DeliveryState.REFUSED, 1)}
        assert all("localhost -> " in d.outcome and "is loopback" in d.outcome for d in refused)
        async with running(tmp_path / "allowed", allow_hosts=("localhost",)) as env:
            await env.submit(webhook_url=receiver.url(host="localhost"))
            await finished(env)
        assert receiver.events == SUCCESS


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/hook", "http://169.254.169.254/latest/meta-data/"])
async def test_queued_deliveries_meet_the_policy_in_force_when_sent(tmp_path, url):
    """Allowed when submitted, no longer when the service restarts with a narrower allow-list: refused, unsent."""
    async with Receiver() as receiver:
        url = url.format(port=receiver.port)
        async with running(tmp_path / "db", allow_hosts=("127.0.0.1", "169.254.169.254"), start_webhooks=False) as env:
            job_id = await env.submit(webhook_url=url)
            await env.service.idle()
        async with running(tmp_path / "db", allow_hosts=()) as env:
            await env.service.webhooks.drain()
            outbox = await deliveries(env, job_id)
    assert receiver.requests == []
    assert len(outbox) == len(SUCCESS) and {d.state for d in outbox} == {DeliveryState.REFUSED}
    assert all(" is l" in d.outcome for d in outbox)  # loopback / link-local, named in the outcome


async def test_a_redirect_is_not_followed(tmp_path):
    async with Receiver() as elsewhere:
        def redirect(n: int) -> web.Response:
            return web.Response(status=302, headers={"Location": elsewhere.url("/stolen")})

        async with Receiver(redirect) as receiver, running(tmp_path / "db") as env:
            job_id = await env.submit(webhook_url=receiver.url())
            await finished(env)
            outbox = await deliveries(env, job_id)
    assert elsewhere.requests == []
    assert receiver.events == SUCCESS  # one attempt each, never retried
    assert all(d.state is DeliveryState.FAILED and d.last_status == 302 and "redirects are not followed" in d.outcome
               for d in outbox)


async def test_the_verification_snippet_in_the_docs_accepts_real_deliveries_and_rejects_forgeries(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "webhooks.md").read_text()
    snippet = doc.split("## Verifying a delivery (Python)", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet.replace("the job's webhook_secret", SECRET), namespace)  # noqa: S102 - our own docs
    async with Receiver() as receiver, running(tmp_path / "db") as env:
        await env.submit(webhook_url=receiver.url())
        await finished(env)
    for got in receiver.requests:
        assert namespace["verify"](got.headers, got.body)["event"] == got.event
    forged = receiver.requests[0].body.replace(b"BUILDING", b"SUCCEEDED")
    with pytest.raises(ValueError, match="bad signature"):
        namespace["verify"](receiver.requests[0].headers, forged)


# ---------------------------------------------------------------- wire format details

def test_our_headers_win_over_a_stored_configs_reserved_ones():
    config = JobConfig.model_validate({"owner": "t", "repo_url": "https://git.example.invalid/a.git",
                                       "image_name": "a", "registry_url": "127.0.0.1:5000",
                                       "webhook_url": "http://127.0.0.1:9/", "webhook_secret": SECRET})
    legacy = config.model_copy(update={"webhook_headers": {"Host": "evil", "x-webhook-event": "job.completed",
                                                           "X-Team": "ai"}})
    now = datetime(2026, 1, 1).astimezone()
    delivery = WebhookDelivery(delivery_id="d-1", job_id="j", event=WebhookEvent.BUILD_STARTED, body="{}",
                               created_at=now, next_attempt_at=now)
    sent = headers(delivery, legacy)
    assert "Host" not in sent and sent["X-Webhook-Event"] == "build.started" and sent["X-Team"] == "ai"
    assert "x-webhook-event" not in sent and verify(sent, b"{}")


@pytest.mark.parametrize("url, stripped", [
    ("https://ci:pw-1@git.example.invalid/app.git", "https://git.example.invalid/app.git"),
    ("https://token@git.example.invalid:8443/app.git?x=1", "https://git.example.invalid:8443/app.git?x=1"),
    ("ssh://git@git.example.invalid/app.git", "ssh://git.example.invalid/app.git"),
    ("git@git.example.invalid:team/app.git", "git@git.example.invalid:team/app.git"),
    ("/srv/repos/app", "/srv/repos/app"),
])
def test_repo_url_loses_its_credentials(url, stripped):
    assert strip_credentials(url) == stripped


def test_backoff_doubles_is_capped_and_honours_retry_after():
    assert [backoff(n, 2, 30).total_seconds() for n in range(1, 6)] == [2, 4, 8, 16, 30]
    assert backoff(1, 2, 30, "10").total_seconds() == 10
    assert backoff(1, 2, 30, "3600").total_seconds() == 30
    assert backoff(1, 2, 30, "Wed, 21 Oct 2015 07:28:00 GMT").total_seconds() == 2
