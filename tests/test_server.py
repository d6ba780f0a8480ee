"""The HTTP surface (JSON-RPC, REST, WebSocket, health) over the real service and SQLite store, with the
in-memory backend. Real builds are in tests/test_e2e.py."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jobforge.metrics import Metrics
from jobforge.models import METHODS, Phase
from jobforge.pipeline import Policy
from jobforge.server.app import create_app
from jobforge.server.guard import Guard
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from jobforge.delivery import DeliveryWorker
from jobforge.outbound import OutboundPolicy
from tests.support.fake_backend import FakeBackend
from tests.support.invalid_configs import INVALID

CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]},
          "webhook_secret": "hush-hush-secret", "webhook_headers": {"Authorization": "Bearer tok-123"}}
SECRETS = ("hush-hush-secret", "tok-123")


class Env:
    def __init__(self, service: JobService, backend: FakeBackend, client: TestClient) -> None:
        self.service, self.backend, self.client = service, backend, client

    async def post(self, path: str, body) -> tuple[int, object]:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        resp = await self.client.post(path, data=data, headers={"Content-Type": "application/json"})
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)

    async def get(self, path: str) -> tuple[int, object]:
        resp = await self.client.get(path)
        return resp.status, await resp.json()

    async def rpc(self, method: str, params=None, id_=1):
        status, body = await self.post("/json", {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": id_})
        assert status == 200
        return body

    async def submit(self, **changes) -> str:
        status, body = await self.post("/json/submitJob", {"job_config": {**CONFIG, **changes}})
        assert status == 200, body
        return body["job_id"]


@asynccontextmanager
async def running(db, max_jobs: int = 2, backend: FakeBackend | None = None, guard: Guard | None = None, *,
                  store=None, allow_hosts=("127.0.0.1",), start_webhooks: bool = True, watch_buffer: int = 1000,
                  stream_limits=None, mcp_log_level: int = 0, webhooks: DeliveryWorker | None = None,
                  metrics: Metrics | None = None, **webhook_options):
    """The service on SQLite at `db` (or on `store`, which it then closes) with the fake backend; its webhook
    worker (or `webhooks`, on the same store) may send to `allow_hosts`, retries after 10 ms (`webhook_options`
    override), and is not started with `start_webhooks=False`; `stream_limits` and `mcp_log_level` go to
    `create_app`."""
    backend = backend or FakeBackend()
    store = store or SqliteStore(db)
    worker = webhooks or DeliveryWorker(store, OutboundPolicy(allow_hosts),
                                        **{"backoff": 0.01, "backoff_max": 0.05, "timeout": 5.0, **webhook_options})
    service = JobService(store, backend, policy=Policy(), max_concurrent_jobs=max_jobs,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False),
                         webhooks=worker, watch_buffer=watch_buffer, metrics=metrics)
    if start_webhooks:
        await worker.start()
    await service.start()
    client = TestClient(TestServer(create_app(service, guard, stream_limits=stream_limits, mcp_log_level=mcp_log_level), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Env(service, backend, client)
    finally:
        await client.close()
        await service.aclose()
        await worker.aclose()
        await store.aclose()


@pytest.fixture
async def env(tmp_path):
    async with running(tmp_path / "jobs.db") as e:
        yield e


# ---------------------------------------------------------------- the happy path, through every transport

async def test_submit_runs_all_phases_and_status_has_the_reference_shape(env):
    job_id = await env.submit()
    await env.service.idle()
    status, body = await env.get(f"/json/job/{job_id}/status")
    assert status == 200
    assert {"job_id", "status", "current_phase", "failed_phase", "error", "config", "metrics", "image_tags"} <= set(body)
    assert body["status"] == "SUCCEEDED" and body["image_tags"] == [job_id, "latest"]
    assert [c.phase for c in env.backend.dispatched] == [Phase.BUILD, Phase.TEST, Phase.PUBLISH]
    assert env.backend.cleaned == [job_id]
    assert body["metrics"]["build_duration"] is not None and body["metrics"]["total_duration"] is not None
    assert env.backend.payloads[0]["temp_image"] == f"127.0.0.1:5000/temp-app:{job_id}"
    assert env.backend.payloads[2]["publish_targets"] == [f"127.0.0.1:5000/app:{job_id}", "127.0.0.1:5000/app:latest"]


async def test_rpc_and_rest_agree(env):
    job_id = await env.submit()
    await env.service.idle()
    rpc = await env.rpc("getStatus", {"job_id": job_id})
    _, rest_post = await env.post("/json/getStatus", {"job_id": job_id})
    _, rest_get = await env.get(f"/json/job/{job_id}/status")
    assert rpc["result"] == rest_post == rest_get


async def test_logs_are_complete_per_phase_and_filterable(env):
    job_id = await env.submit()
    await env.service.idle()
    _, body = await env.get(f"/json/job/{job_id}/logs")
    assert body["logs"]["build"] == ["build line 0", "build line 1", "build line 2"]
    assert set(body["logs"]) >= {"build", "test", "publish"}
    _, only = await env.get(f"/json/job/{job_id}/logs?phase=test")
    assert only["logs"] == {"test": ["test line 0", "test line 1", "test line 2"]}
    _, structured = await env.post("/json/getLogs", {"job_id": job_id, "phase": "build", "structured": True})
    assert [e["stream"] for e in structured["entries"]["build"]] == ["stdout"] * 3


async def test_secrets_never_appear_in_any_response(env):
    job_id = await env.submit()
    await env.service.idle()
    bodies = [await env.get(f"/json/job/{job_id}/status"), await env.get(f"/json/job/{job_id}/logs"),
              await env.post("/json/getHistory", {}), (0, await env.rpc("getStatus", {"job_id": job_id}))]
    text = json.dumps([b for _, b in bodies])
    assert not any(secret in text for secret in SECRETS)
    assert "***" in text


# ---------------------------------------------------------------- bad input: field-named errors, nothing dispatched

@pytest.mark.parametrize("data, field, fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_configs_are_rejected_by_rpc_and_rest_and_nothing_runs(env, data, field, fragment):
    rpc = await env.rpc("submitJob", {"job_config": data})
    assert rpc["error"]["code"] == -32602
    assert [e["field"] for e in rpc["error"]["data"]] == [f"job_config.{field}" if field else "job_config"]
    assert fragment in rpc["error"]["data"][0]["rule"]
    status, rest = await env.post("/json/submitJob", {"job_config": data})
    assert status == 400 and rest["error"]["data"] == rpc["error"]["data"]
    assert env.backend.dispatched == []
    _, history = await env.post("/json/getHistory", {})
    assert history["total"] == 0


async def test_json_rpc_framing_errors(env):
    assert (await env.post("/json", b"{not json"))[1]["error"]["code"] == -32700
    assert (await env.post("/json", {"method": "getStatus", "id": 1}))[1]["error"]["code"] == -32600
    assert (await env.post("/json", []))[1]["error"]["code"] == -32600
    assert (await env.rpc("noSuchMethod"))["error"]["code"] == -32601
    missing = await env.rpc("getStatus", {})
    assert missing["error"]["code"] == -32602 and missing["error"]["data"][0]["field"] == "job_id"
    positional = await env.post("/json", {"jsonrpc": "2.0", "method": "getStatus", "params": ["x"], "id": 3})
    assert positional[1]["error"]["code"] == -32602


async def test_batches_and_notifications(env):
    job_id = await env.submit()
    await env.service.idle()
    status, replies = await env.post("/json", [
        {"jsonrpc": "2.0", "method": "getStatus", "params": {"job_id": job_id}, "id": "a"},
        {"jsonrpc": "2.0", "method": "getStatus", "params": {"job_id": job_id}},  # notification: no reply
        {"jsonrpc": "2.0", "method": "nope", "id": 2},
        7,
    ])
    assert status == 200
    assert [r.get("id") for r in replies] == ["a", 2, None]
    assert replies[0]["result"]["status"] == "SUCCEEDED"
    assert [r["error"]["code"] for r in replies[1:]] == [-32601, -32600]
    status, body = await env.post("/json", {"jsonrpc": "2.0", "method": "getHistory", "params": {}})
    assert (status, body) == (204, None)


async def test_unknown_job_is_404_everywhere(env):
    assert (await env.get("/json/job/nope/status"))[0] == 404
    assert (await env.get("/json/job/nope/logs"))[0] == 404
    assert (await env.post("/json/getStatus", {"job_id": "nope"}))[0] == 404
    assert (await env.post("/json/killJob", {"job_id": "nope"}))[0] == 404
    assert (await env.rpc("getLogs", {"job_id": "nope"}))["error"]["code"] == -32004
    assert (await env.post("/json/noSuchMethod", {}))[0] == 404


async def test_oversized_body_is_413_and_nothing_is_stored(env):
    big = {"job_config": {**CONFIG, "build_args": {"PAD": "x" * (1024 * 1024)}}}
    status, body = await env.post("/json/submitJob", big)
    assert status == 413 and "1048576" in body["error"]["message"]
    assert (await env.post("/json", big))[0] == 413
    assert env.backend.dispatched == []


async def test_rest_body_must_be_json(env):
    status, body = await env.post("/json/getStatus", b"{oops")
    assert status == 400 and body["error"]["code"] == -32700


# ---------------------------------------------------------------- kill, concurrency, history

async def test_kill_running_job_stops_its_phase(env):
    env.backend.outcomes[Phase.BUILD] = "hold"
    job_id = await env.submit()
    status, body = await env.post("/json/killJob", {"job_id": job_id})
    assert status == 200 and body["status"] == "FAILED"
    _, state = await env.get(f"/json/job/{job_id}/status")
    assert state["error"] == "killed by user" and state["failed_phase"] == "build"
    assert [(s.job_id, s.phase) for s in env.backend.stopped] == [(job_id, Phase.BUILD)]
    status, body = await env.post("/json/killJob", {"job_id": job_id})
    assert status == 409 and body["error"]["code"] == -32009


async def test_concurrency_limit_keeps_excess_jobs_pending(tmp_path):
    async with running(tmp_path / "db", max_jobs=2) as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        ids = [await env.submit() for _ in range(3)]
        states = [(await env.get(f"/json/job/{i}/status"))[1]["status"] for i in ids]
        assert states == ["BUILDING", "BUILDING", "PENDING"]
        env.backend.outcomes.clear()
        env.backend.finish(env.backend.dispatched[0])
        await env.post("/json/killJob", {"job_id": ids[1]})
        await env.service.idle()
        assert (await env.get(f"/json/job/{ids[2]}/status"))[1]["status"] == "SUCCEEDED"


class CountingStore:
    """Counts `open_jobs` reads (each one an admission pass over every job not finished) and record reads."""

    def __init__(self, inner) -> None:
        self.inner, self.open_reads, self.gets = inner, 0, 0

    async def open_jobs(self):
        self.open_reads += 1
        return await self.inner.open_jobs()

    async def get(self, job_id):
        self.gets += 1
        return await self.inner.get(job_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_concurrent_submits_share_admission_passes(tmp_path):
    """20 submits at once: every job is admitted or queued correctly, by a few shared passes over the store
    rather than one pass per submit in a row."""
    store = CountingStore(SqliteStore(tmp_path / "db"))
    async with running(tmp_path / "db", max_jobs=2, store=store) as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        before = store.open_reads
        ids = await asyncio.gather(*(env.submit() for _ in range(20)))
        states = [(await env.get(f"/json/job/{i}/status"))[1]["status"] for i in ids]
        assert sorted(states) == ["BUILDING"] * 2 + ["PENDING"] * 18
        assert store.open_reads - before <= 5


async def test_get_status_reads_the_record_once_when_every_owner_may_see_it(tmp_path):
    """Without API tokens the caller may see every job: no owner lookup before the handler's own read, which
    still answers 404 for an unknown job."""
    store = CountingStore(SqliteStore(tmp_path / "db"))
    async with running(tmp_path / "db", store=store) as env:
        job_id = await env.submit()
        await env.service.idle()
        before = store.gets
        assert (await env.rpc("getStatus", {"job_id": job_id}))["result"]["status"] == "SUCCEEDED"
        assert store.gets - before == 1
        for method in ("getStatus", "getLogs", "killJob", "cleanup"):
            reply = await env.rpc(method, {"job_id": "no-such-job"})
            assert reply["error"]["code"] == -32004, (method, reply)


async def test_kill_pending_job(tmp_path):
    async with running(tmp_path / "db", max_jobs=1) as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        first, second = await env.submit(), await env.submit()
        _, body = await env.post("/json/killJob", {"job_id": second})
        assert body["status"] == "FAILED"
        assert [c.job_id for c in env.backend.dispatched] == [first]
        assert env.backend.stopped == [] and env.backend.cleaned == []


async def test_history_pages_newest_first_and_filters(env):
    ids = [await env.submit(owner=f"o{i % 2}") for i in range(5)]
    await env.service.idle()
    newest_first = list(reversed(ids))
    pages = [(await env.rpc("getHistory", {"limit": 2, "offset": off}))["result"] for off in (0, 2, 4)]
    assert [j["id"] for p in pages for j in p["jobs"]] == newest_first
    assert all(p["total"] == 5 for p in pages)
    only = (await env.rpc("getHistory", {"owner": "o1"}))["result"]
    assert only["total"] == 2 and {j["config"]["owner"] for j in only["jobs"]} == {"o1"}
    assert (await env.rpc("getHistory", {"status": "FAILED"}))["result"]["total"] == 0
    assert (await env.rpc("getHistory", {"limit": 0}))["error"]["data"][0]["field"] == "limit"


async def test_cleanup_needs_a_finished_job(env):
    env.backend.outcomes[Phase.BUILD] = "hold"
    job_id = await env.submit()
    assert (await env.post("/json/cleanup", {"job_id": job_id}))[0] == 409
    await env.post("/json/killJob", {"job_id": job_id})
    status, body = await env.post("/json/cleanup", {"job_id": job_id})
    assert status == 200 and body == {"job_id": job_id, "cleaned": ["temp_image"]}


# ---------------------------------------------------------------- restart

async def test_restart_keeps_jobs_and_logs_fails_running_and_resumes_pending(tmp_path):
    db = tmp_path / "jobs.db"
    async with running(db, max_jobs=1) as env:
        done = await env.submit()
        await env.service.idle()
        env.backend.outcomes[Phase.BUILD] = "hold"
        running_id, pending_id = await env.submit(), await env.submit()
        before = (await env.get(f"/json/job/{done}/logs"))[1]
    async with running(db, max_jobs=1) as env:
        assert (await env.get(f"/json/job/{done}/logs"))[1] == before
        await env.service.idle()
        _, crashed = await env.get(f"/json/job/{running_id}/status")
        assert crashed["status"] == "FAILED" and "restarted" in crashed["error"]
        assert crashed["failed_phase"] == "build"
        assert (await env.get(f"/json/job/{pending_id}/status"))[1]["status"] == "SUCCEEDED"
        assert (await env.rpc("getHistory", {}))["result"]["total"] == 3


# ---------------------------------------------------------------- push: WebSocket watch

async def test_watch_pushes_every_transition_then_ends(env):
    env.backend.outcomes[Phase.BUILD] = "hold"
    job_id = await env.submit()
    ws = await env.client.ws_connect(f"/json/job/{job_id}/watch?logs=true")
    first = await ws.receive_json()
    assert first["type"] == "status" and first["job"]["status"] == "BUILDING"
    env.backend.outcomes.clear()
    env.backend.finish(env.backend.dispatched[0])
    seen = []
    async for msg in ws:
        update = json.loads(msg.data)
        seen.append((update["type"], update["job"]["status"] if "job" in update else update["log"]["line"]))
    assert seen[-1] == ("end", "SUCCEEDED")
    statuses = [s for t, s in seen if t == "status"]
    changes = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert changes == ["TESTING", "PUBLISHING", "SUCCEEDED"], seen  # then "end" once the temp image is deleted
    assert ("log", "test line 0") in seen


async def test_watch_of_finished_job_ends_at_once_and_unknown_is_404(env):
    job_id = await env.submit()
    await env.service.idle()
    ws = await env.client.ws_connect(f"/json/job/{job_id}/watch")
    assert (await ws.receive_json())["type"] == "end"
    resp = await env.client.get("/json/job/missing/watch")
    assert resp.status == 404


async def test_stream_logs_reference_endpoint(env):
    env.backend.outcomes[Phase.BUILD] = "hold"
    job_id = await env.submit()
    ws = await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}")
    env.backend.outcomes.clear()
    env.backend.finish(env.backend.dispatched[0])
    messages = [json.loads(m.data) async for m in ws]
    assert {"type": "log", "job_id": job_id, "phase": "build", "message": "build line 0", "level": "info",
            "stream": "stdout"}.items() <= messages[0].items()
    assert messages[-1] == {"type": "status", "job_id": job_id, "status": "SUCCEEDED", "failed_phase": None,
                            "error": None}


# ---------------------------------------------------------------- health, readiness, metrics, OpenAPI

async def test_health_ready_metrics_openapi(env):
    assert await env.get("/health") == (200, {"status": "ok"})
    assert (await env.get("/ready"))[0] == 200
    env.backend.problems = {"registry": "127.0.0.1:5000 unreachable"}
    status, body = await env.get("/ready")
    assert status == 503 and body["checks"]["registry"] == "127.0.0.1:5000 unreachable"
    await env.submit()
    await env.service.idle()
    metrics = await (await env.client.get("/metrics")).text()
    assert 'build_duration_seconds_count{status="SUCCEEDED"} 1.0' in metrics
    assert 'jobs_total{failed_phase="none",status="SUCCEEDED"} 1.0' in metrics
    _, spec = await env.get("/openapi.json")
    # Every route of the app is described (the `{method}` routes once per method), and nothing else.
    routes = {r.canonical for r in env.client.app.router.resources()}
    expected = {p.replace("{method}", name) for p in routes for name in METHODS}
    assert set(spec["paths"]) == expected
    assert set(spec["paths"]["/mcp"]) == {"post"}  # GET and DELETE only answer 405
    assert spec["paths"]["/json/getHistory"]["post"]["requestBody"]["required"] is False
    assert spec["paths"]["/json/submitJob"]["post"]["requestBody"]["required"] is True
    assert spec["components"]["schemas"]["JobConfig"]["additionalProperties"] is False
