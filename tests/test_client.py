"""jobforge.client against a fake service that answers exactly as docs/api.md documents (tests/cli/fake_service).

The CLI subprocess tests in tests/cli/test_cli_e2e.py cover the same client against the real server.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import aiohttp
import pytest
import requests

from jobforge import errors
from jobforge.client import AsyncClient, Client, _base
from jobforge.config import JobConfig
from jobforge.models import (
    METHODS, CleanupResult, HistoryResult, JobStatus, JobStatusResult, KillJobResult, LogsResult, Phase,
    PhaseStatus, SubmitJobResult,
)
from tests.cli.fake_service import FakeService, error_doc, phase_doc, status_doc

CONFIG = {"owner": "team", "repo_url": "https://example.invalid/r.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["v1"], "webhook_secret": "hmac-key"}


@pytest.fixture
def fake():
    service = FakeService().start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def client(fake):
    with Client(fake.url, source="test") as c:
        yield c


def test_public_surface_is_pinned():
    import jobforge.client

    assert jobforge.client.__all__ == ["AsyncClient", "Client", "DEFAULT_URL", "SERVICE_NAME", "discover_token",
                                       "discover_url"]
    api_methods = {"submitJob": "submit_job", "getStatus": "get_status", "getLogs": "get_logs",
                   "killJob": "kill_job", "cleanup": "cleanup", "getHistory": "get_history"}
    assert set(api_methods) == set(METHODS)  # a new API method needs a client method (and a CLI command)
    for cls in (Client, AsyncClient):
        assert all(callable(getattr(cls, name)) for name in [*api_methods.values(), "health", "ready", "watch"])


def test_every_method_uses_rest_form_and_returns_typed_results(fake, client):
    submitted = client.submit_job(CONFIG)
    assert submitted == SubmitJobResult(job_id="job-1", status=JobStatus.PENDING)
    fake.logs["job-1"] = {"build": [{"ts": "2025-10-10T14:23:46Z", "stream": "stdout", "line": "STEP 1"}]}

    status = client.get_status("job-1")
    assert isinstance(status, JobStatusResult) and status.image_tags == ["job-1", "v1"]
    assert status.phases[Phase.BUILD].status is PhaseStatus.PENDING
    logs = client.get_logs("job-1", phase="build")
    assert isinstance(logs, LogsResult) and logs.logs == {"build": ["STEP 1"]} and logs.entries is None
    assert client.get_logs("job-1", structured=True).entries["build"][0].line == "STEP 1"
    assert client.kill_job("job-1") == KillJobResult(job_id="job-1", status=JobStatus.FAILED, message="killed by user")
    assert client.cleanup("job-1") == CleanupResult(job_id="job-1", cleaned=["temp image", "workdir"])
    history = client.get_history(5, 0, owner="team", status="PENDING")
    assert isinstance(history, HistoryResult) and history.total == 1 and history.jobs[0].id == "job-1"

    assert fake.requests == [
        ("POST", "/json/submitJob", {"job_config": CONFIG}),
        ("POST", "/json/getStatus", {"job_id": "job-1"}),
        ("POST", "/json/getLogs", {"job_id": "job-1", "phase": "build"}),
        ("POST", "/json/getLogs", {"job_id": "job-1", "structured": True}),
        ("POST", "/json/killJob", {"job_id": "job-1"}),
        ("POST", "/json/cleanup", {"job_id": "job-1"}),
        ("POST", "/json/getHistory", {"limit": 5, "offset": 0, "owner": "team", "status": "PENDING"}),
    ]


def test_submit_a_jobconfig_model_sends_the_real_secret_and_only_set_fields(fake, client):
    client.submit_job(JobConfig.model_validate(CONFIG))
    assert fake.requests[-1][2] == {"job_config": CONFIG}


def test_invalid_params_raise_config_error_before_sending(fake, client):
    with pytest.raises(errors.ConfigError) as info:
        client.submit_job(CONFIG | {"image_name": "../x", "colour": "red"})
    assert {e["field"] for e in info.value.errors} == {"image_name", "colour"}
    with pytest.raises(errors.ConfigError):
        client.get_status("../etc/passwd")
    with pytest.raises(errors.ConfigError):
        client.get_history(limit=0)
    assert fake.requests == []


@pytest.mark.parametrize("call, exc", [
    (lambda c: c.get_status("nope"), errors.NotFound),
    (lambda c: c.get_logs("nope"), errors.NotFound),
    (lambda c: c.cleanup("nope"), errors.NotFound),
])
def test_server_errors_map_back_to_exceptions(client, call, exc):
    with pytest.raises(exc, match="job nope not found"):
        call(client)


def test_conflict_and_server_side_validation(fake, client):
    fake.jobs["done"] = status_doc("done", "SUCCEEDED")
    with pytest.raises(errors.Conflict, match="already finished"):
        client.kill_job("done")
    fake.reject_submit = error_doc(-32602, "invalid params", [{"field": "job_config.owner", "rule": "required"}])
    with pytest.raises(errors.ConfigError) as info:
        client.submit_job(CONFIG)
    assert info.value.errors == [{"field": "job_config.owner", "rule": "required"}]


@pytest.mark.parametrize("cls", [errors.ConfigError, errors.NotFound, errors.Conflict, errors.BackendError,
                                 errors.StoreError, errors.ServiceUnavailable, errors.JobForgeError])
def test_every_error_class_round_trips_through_its_error_object(cls):
    exc = _base.error_from_response(cls.http_status, f'{{"error": {{"code": {cls.rpc_code}, "message": "m"}}}}')
    assert type(exc) is cls and exc.message == "m"


@pytest.mark.parametrize("status, cls", [(404, errors.NotFound), (409, errors.Conflict), (413, errors.PayloadTooLarge),
                                         (502, errors.BackendError), (500, errors.JobForgeError)])
def test_non_json_error_bodies_map_by_http_status(status, cls):
    exc = _base.error_from_response(status, "<html>oops</html>")
    assert type(exc) is cls and exc.message == f"HTTP {status}: <html>oops</html>"


def test_non_json_error_over_http(fake, client):
    status, text = client._send("POST", "/json/broken", {})
    with pytest.raises(errors.BackendError, match="HTTP 502: <html>bad gateway</html>"):
        _base.parse_result(SubmitJobResult, status, text)


def test_unreachable_service_names_url_and_source():
    with Client("http://127.0.0.1:9", source="JOB_SERVICE_URL") as c:
        with pytest.raises(errors.ServiceUnavailable) as info:
            c.get_status("abc")
    assert str(info.value) == ("cannot reach the Job Forge service at http://127.0.0.1:9 (URL from JOB_SERVICE_URL):"
                               " [Errno 111] Connection refused")
    assert info.value.data == {"url": "http://127.0.0.1:9", "source": "JOB_SERVICE_URL"}


def test_health_and_readiness(fake, client):
    assert client.health().status == "ok"
    assert client.ready().checks == {"store": "ok", "backend": "ok"}
    fake.ready_ok = False
    ready = client.ready()
    assert ready.status == "unavailable" and ready.checks["backend"] == "buildah missing"


def test_injected_requests_session_is_used_and_not_closed(fake):
    class CountingSession(requests.Session):
        calls = 0

        def request(self, *args, **kwargs):
            CountingSession.calls += 1
            return super().request(*args, **kwargs)

    session = CountingSession()
    with Client(fake.url, session=session) as c:
        c.health()
    assert CountingSession.calls == 1
    assert session.get(fake.url + "/health").status_code == 200  # still usable


def _script(fake: FakeService) -> None:
    fake.jobs["job-w"] = status_doc("job-w", "PENDING")
    fake.watch_scripts["job-w"] = [
        {"type": "status", "job": status_doc("job-w", "PENDING")},
        {"type": "status", "job": status_doc("job-w", "BUILDING",
                                             phases={"build": phase_doc("RUNNING", "2025-10-10T14:23:46Z")})},
        {"type": "log", "phase": "build", "log": {"ts": "2025-10-10T14:23:47Z", "stream": "stdout", "line": "hi"}},
        {"type": "end", "job": status_doc("job-w", "FAILED", failed_phase="build", error="exit 1",
                                          finished_at="2025-10-10T14:24:00Z", total=15.0)},
    ]


def test_sync_watch_yields_pushed_updates_until_end(fake, client):
    _script(fake)
    updates = list(client.watch("job-w", logs=True))
    assert [u.type for u in updates] == ["status", "status", "log", "end"]
    assert updates[2].log.line == "hi" and updates[-1].job.failed_phase is Phase.BUILD
    assert ("GET", "/json/job/job-w/watch?logs=true", None) in fake.requests


def test_sync_watch_stopped_early_closes_cleanly(fake, client):
    _script(fake)
    stream = client.watch("job-w")
    assert next(stream).type == "status"
    stream.close()  # what Ctrl-C does: only the watching stops


def _blocked_signals(native_id: int) -> set[int]:
    mask = int(next(line for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines()
                    if line.startswith("SigBlk:")).split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_ctrl_c_always_reaches_the_thread_waiting_for_updates(fake, client):
    """The kernel gives a process-wide SIGINT to any thread not blocking it; taken by the watch's I/O thread it
    would leave the main thread asleep until the next update (a build's next phase: minutes)."""
    fake.jobs["job-w"] = status_doc("job-w", "BUILDING")
    fake.watch_scripts["job-w"] = [{"type": "status", "job": status_doc("job-w", "BUILDING")}]
    fake.hold_open.add("job-w")  # the pump thread stays alive, waiting for the next update
    stream = client.watch("job-w")
    assert next(stream).type == "status"
    try:
        pumps = [t for t in threading.enumerate() if t.name == "jobforge-watch-job-w"]
        assert pumps and all({signal.SIGINT, signal.SIGTERM} <= _blocked_signals(t.native_id) for t in pumps)
        assert signal.SIGINT not in _blocked_signals(threading.main_thread().native_id)
    finally:
        stream.close()


def test_watch_of_unknown_job_is_not_found(client):
    with pytest.raises(errors.NotFound, match="job nope not found"):
        list(client.watch("nope"))


def test_watch_stream_closed_before_the_end_is_service_unavailable(fake, client):
    fake.jobs["job-x"] = status_doc("job-x", "BUILDING")
    fake.watch_scripts["job-x"] = [{"type": "status", "job": status_doc("job-x", "BUILDING")}]
    with pytest.raises(errors.ServiceUnavailable, match="resume with: jobforge watch job-x"):
        list(client.watch("job-x"))


async def test_async_client_twin(fake):
    _script(fake)
    async with AsyncClient(fake.url, source="test") as c:
        submitted = await c.submit_job(CONFIG)
        assert (await c.get_status(submitted.job_id)).job_id == submitted.job_id
        assert (await c.get_logs(submitted.job_id)).logs == {"build": [], "test": [], "publish": []}
        assert (await c.cleanup(submitted.job_id)).cleaned
        assert (await c.kill_job(submitted.job_id)).message == "killed by user"
        assert (await c.get_history(limit=1)).limit == 1
        assert (await c.health()).status == "ok" and (await c.ready()).status == "ok"
        with pytest.raises(errors.NotFound):
            await c.get_status("nope")
        types = [u.type async for u in c.watch("job-w")]
    assert types == ["status", "status", "end"]  # log lines only when asked for


async def test_async_injected_session_is_not_closed(fake):
    async with aiohttp.ClientSession() as session:
        async with AsyncClient(fake.url, session=session) as c:
            assert (await c.health()).status == "ok"
        assert not session.closed


async def test_async_unreachable():
    async with AsyncClient("http://127.0.0.1:9", source="--url") as c:
        with pytest.raises(errors.ServiceUnavailable, match=r"at http://127.0.0.1:9 \(URL from --url\)"):
            await c.health()
        with pytest.raises(errors.ServiceUnavailable, match=r"URL from --url"):
            [u async for u in c.watch("abc")]


def test_watch_url_escapes_and_switches_scheme():
    assert _base.watch_url("https://h:1", "a.b-c_d", False) == "wss://h:1/json/job/a.b-c_d/watch"
    with pytest.raises(errors.ConfigError):
        _base.watch_url("http://h", "a/b", False)


# ---------------------------------------------------------------- the API token

def test_the_token_travels_on_every_request_and_the_watch(fake, monkeypatch):
    monkeypatch.delenv("JOBFORGE_TOKEN", raising=False)
    _script(fake)
    with Client(fake.url, token="tok-0123456789abcdef") as c:
        c.get_history()
        list(c.watch("job-w"))
    assert [h.get("Authorization") for h in fake.headers] == ["Bearer tok-0123456789abcdef"] * 2
    assert fake.headers[0]["Content-Type"] == "application/json"


async def test_the_async_client_takes_the_token_from_jobforge_token(fake, monkeypatch):
    monkeypatch.setenv("JOBFORGE_TOKEN", "env-token-0123456789")
    async with AsyncClient(fake.url) as c:
        await c.get_history()
    async with AsyncClient(fake.url, token="explicit-token-0123") as c:  # an explicit token wins
        await c.get_history()
    monkeypatch.delenv("JOBFORGE_TOKEN")
    async with AsyncClient(fake.url) as c:
        await c.get_history()
    assert [h.get("Authorization") for h in fake.headers] == [
        "Bearer env-token-0123456789", "Bearer explicit-token-0123", None]


@pytest.mark.parametrize("token", ["two words", "line\nbreak", "tab\there", "ünïcode"])
def test_a_token_that_cannot_be_a_header_value_is_refused_before_sending(fake, token):
    with pytest.raises(errors.ConfigError, match="invalid API token"):
        Client(fake.url, token=token)
    assert fake.requests == []


@pytest.mark.parametrize("status, cls", [(401, errors.Unauthorized), (403, errors.Forbidden),
                                         (415, errors.UnsupportedMediaType), (421, errors.MisdirectedRequest)])
def test_access_refusals_map_back_by_code_and_by_status(status, cls):
    assert type(_base.error_from_response(status, "<html>no</html>")) is cls
    exc = _base.error_from_response(status, f'{{"error": {{"code": {cls.rpc_code}, "message": "m"}}}}')
    assert type(exc) is cls and exc.message == "m"
