"""Who may call the API (issue 7): bearer tokens per owner on every transport, Host / CORS / Content-Type
checks against forged browser requests. The real app, service and SQLite store, with the in-memory backend;
the service refusing to start is in tests/test_service_exposure.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest

from jobforge.server.guard import OPEN_ROUTES, Guard
from jobforge.server.tokens import TokenFile
from tests.test_server import CONFIG, running

ALL = "token-for-every-owner-0001"
ANN = "token-for-ann-only-000001"
ANN_BOB = "token-for-ann-and-bob-001"


def write_tokens(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    write_tokens(path, f"# operators\n{ALL}\n{ANN} ann   # ann's CI\n{ANN_BOB} ann,bob\n")
    return path


@pytest.fixture
async def env(tmp_path, tokens_file):
    guard = Guard(tokens=TokenFile(tokens_file).load().entries)
    async with running(tmp_path / "jobs.db", guard=guard) as e:
        yield e


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(env, method: str, path: str, token: str | None = None, body=None, headers=None):
    hdrs = {"Content-Type": "application/json", **(bearer(token) if token else {}), **(headers or {})}
    data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
    resp = await env.client.request(method, path, data=data, headers=hdrs)
    text = await resp.text()
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return resp, parsed


async def submit(env, owner: str, token: str = ALL) -> str:
    resp, body = await call(env, "POST", "/json/submitJob", token, {"job_config": {**CONFIG, "owner": owner}})
    assert resp.status == 200, body
    return body["job_id"]


def rpc(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": 7}


# ---------------------------------------------------------------- 401 without (or with a wrong) token

@pytest.mark.parametrize("token", [None, "not-a-configured-token-xyz"], ids=["no token", "wrong token"])
async def test_every_api_route_needs_a_valid_token(env, token):
    job_id = await submit(env, "ann")
    requests = [
        ("POST", "/json/submitJob", {"job_config": CONFIG}),
        ("POST", "/json", rpc("submitJob", {"job_config": CONFIG})),
        ("POST", "/json/getStatus", {"job_id": job_id}),
        ("GET", f"/json/job/{job_id}/status", None),
        ("GET", f"/json/job/{job_id}/logs", None),
        ("POST", "/json/killJob", {"job_id": job_id}),
        ("POST", "/json", rpc("killJob", {"job_id": job_id})),
        ("POST", "/json/getHistory", {}),
        ("GET", "/mcp", None), ("POST", "/mcp", rpc("tools/list", {})), ("GET", "/mcp/sse", None),
        ("GET", f"/json/job/{job_id}/logs/stream", None),
        ("GET", "/no/such/route", None),
    ]
    for method, path, body in requests:
        resp, answer = await call(env, method, path, token, body)
        assert resp.status == 401, (method, path, answer)
        challenge = 'Bearer realm="jobforge"' + (', error="invalid_token"' if token else "")
        assert resp.headers["WWW-Authenticate"] == challenge
        assert answer["error"]["code"] == -32001
        assert answer["error"]["data"] == {"reason": "invalid_token" if token else "missing_token"}
    assert (await env.service.store.list(10, 0))[1] == 1  # only the authorised submission above
    await env.service.idle()
    assert (await env.service.store.get(job_id)).record.status.value == "SUCCEEDED"  # the kill never happened


@pytest.mark.parametrize("path", ["/json/job/{id}/watch", "/json/streamLogs?job_id={id}"])
async def test_websocket_upgrade_is_refused_without_a_token(env, path):
    job_id = await submit(env, "ann")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.client.ws_connect(path.format(id=job_id))
    assert info.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.client.ws_connect(path.format(id=job_id), headers=bearer("not-a-configured-token-xyz"))
    assert info.value.status == 401
    ws = await env.client.ws_connect(path.format(id=job_id), headers=bearer(ANN))
    await ws.close()


async def test_health_ready_metrics_and_openapi_stay_open(env):
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        resp, _ = await call(env, "GET", path)
        assert resp.status == 200, path


async def test_the_bearer_scheme_is_case_insensitive_and_other_schemes_are_not_tokens(env):
    resp, _ = await call(env, "POST", "/json/getHistory", body={}, headers={"Authorization": f"bearer {ALL}"})
    assert resp.status == 200
    resp, _ = await call(env, "POST", "/json/getHistory", body={}, headers={"Authorization": f"Basic {ALL}"})
    assert resp.status == 401


# ---------------------------------------------------------------- 403 for another owner's job

async def test_a_token_of_ann_cannot_touch_bobs_job_on_any_transport(env):
    bob_job = await submit(env, "bob")
    for method, path, body in [
        ("POST", "/json/getStatus", {"job_id": bob_job}),
        ("GET", f"/json/job/{bob_job}/status", None),
        ("POST", "/json/getLogs", {"job_id": bob_job}),
        ("GET", f"/json/job/{bob_job}/logs", None),
        ("GET", f"/json/job/{bob_job}/logs/stream", None),  # SSE: refused before any event is sent
        ("POST", "/json/killJob", {"job_id": bob_job}),
        ("POST", "/json/cleanup", {"job_id": bob_job}),
    ]:
        resp, answer = await call(env, method, path, ANN, body)
        assert resp.status == 403, (method, path, answer)
        assert answer["error"]["code"] == -32003 and answer["error"]["data"]["owner"] == "bob"
    for name in ("getStatus", "getLogs", "killJob", "cleanup"):
        resp, answer = await call(env, "POST", "/json", ANN, rpc(name, {"job_id": bob_job}))
        assert resp.status == 200 and answer["error"]["code"] == -32003, name
    for path in (f"/json/job/{bob_job}/watch", f"/json/streamLogs?job_id={bob_job}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await env.client.ws_connect(path, headers=bearer(ANN))
        assert info.value.status == 403
    await env.service.idle()
    assert (await env.service.store.get(bob_job)).record.status.value == "SUCCEEDED"  # not killed


async def test_an_mcp_tool_call_on_bobs_job_with_anns_token_is_a_forbidden_tool_error(env):
    """MCP reports job errors as tool results (`isError`), so the 403 is the result's text, with nothing of the job."""
    bob_job = await submit(env, "bob")
    call_status = rpc("tools/call", {"name": "getStatus", "arguments": {"job_id": bob_job}})
    mcp = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
    resp, answer = await call(env, "POST", "/mcp", ANN, call_status, mcp)
    assert resp.status == 200 and answer["result"]["isError"] is True, answer
    assert answer["result"]["content"][0]["text"] == (f"job {bob_job} belongs to owner 'bob'; "
                                                       "this token may act only for ann")
    assert "structuredContent" not in answer["result"]
    resp, answer = await call(env, "POST", "/mcp", ANN_BOB, call_status, mcp)
    assert answer["result"]["isError"] is False and answer["result"]["structuredContent"]["job_id"] == bob_job


async def test_a_token_submits_only_as_its_owners(env):
    resp, answer = await call(env, "POST", "/json/submitJob", ANN, {"job_config": {**CONFIG, "owner": "bob"}})
    assert resp.status == 403 and answer["error"]["code"] == -32003
    resp, answer = await call(env, "POST", "/json", ANN, rpc("submitJob", {"job_config": {**CONFIG, "owner": "bob"}}))
    assert answer["error"]["code"] == -32003
    assert env.backend.dispatched == []
    await submit(env, "ann", ANN)
    await submit(env, "bob", ANN_BOB)
    await submit(env, "carol", ALL)
    resp, _ = await call(env, "POST", "/json/submitJob", ANN_BOB, {"job_config": {**CONFIG, "owner": "carol"}})
    assert resp.status == 403


async def test_own_jobs_work_end_to_end_with_an_owner_token(env):
    job_id = await submit(env, "ann", ANN)
    await env.service.idle()
    resp, status = await call(env, "GET", f"/json/job/{job_id}/status", ANN)
    assert resp.status == 200 and status["status"] == "SUCCEEDED"
    resp, logs = await call(env, "POST", "/json/getLogs", ANN_BOB, {"job_id": job_id, "phase": "build"})
    assert resp.status == 200 and logs["logs"]["build"]
    resp, cleaned = await call(env, "POST", "/json/cleanup", ANN, {"job_id": job_id})
    assert resp.status == 200 and cleaned["job_id"] == job_id


async def test_an_unknown_job_is_404_for_every_token(env):
    resp, _ = await call(env, "POST", "/json/getStatus", ANN, {"job_id": "no-such-job"})
    assert resp.status == 404


async def test_history_shows_only_the_tokens_owners(env):
    jobs = {owner: await submit(env, owner) for owner in ("ann", "bob", "carol")}

    async def history(token, **params):
        resp, body = await call(env, "POST", "/json/getHistory", token, params)
        return resp.status, body

    status, body = await history(ANN)
    assert status == 200 and [j["job_id"] for j in body["jobs"]] == [jobs["ann"]] and body["total"] == 1
    status, body = await history(ANN_BOB)
    assert sorted(j["job_id"] for j in body["jobs"]) == sorted([jobs["ann"], jobs["bob"]]) and body["total"] == 2
    status, body = await history(ANN_BOB, owner="bob")
    assert [j["job_id"] for j in body["jobs"]] == [jobs["bob"]]
    status, body = await history(ALL)
    assert body["total"] == 3
    status, body = await history(ANN, owner="bob")
    assert status == 403 and body["error"]["code"] == -32003
    resp, answer = await call(env, "POST", "/json", ANN, rpc("getHistory", {}))
    assert [j["job_id"] for j in answer["result"]["jobs"]] == [jobs["ann"]]


# ---------------------------------------------------------------- the tokens file follows its changes

async def test_the_tokens_file_is_reread_when_it_changes(env, tokens_file):
    async def status_with(token):
        resp, _ = await call(env, "POST", "/json/getHistory", token, {})
        return resp.status

    assert await status_with(ANN) == 200
    new = "a-brand-new-token-for-ann-2"
    write_tokens(tokens_file, f"{new} ann\n")
    assert (await status_with(ANN), await status_with(new), await status_with(ALL)) == (401, 200, 401)

    replacement = tokens_file.with_name("tokens.new")  # atomic replacement, as editors and config tools do
    write_tokens(replacement, f"{ALL}\n")
    os.replace(replacement, tokens_file)
    assert (await status_with(new), await status_with(ALL)) == (401, 200)

    tokens_file.unlink()  # fails closed
    assert await status_with(ALL) == 401
    write_tokens(tokens_file, f"{ALL}\n")
    assert await status_with(ALL) == 200


# ---------------------------------------------------------------- forged browser requests

async def test_a_cross_origin_text_plain_post_gets_415_and_runs_nothing(tmp_path):
    async with running(tmp_path / "jobs.db") as env:  # no tokens: a developer's loopback service
        for path, body in (("/json", rpc("submitJob", {"job_config": CONFIG})),
                           ("/json/submitJob", {"job_config": CONFIG})):
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
                headers = {"Origin": "http://evil.example"} | ({"Content-Type": content_type} if content_type else {})
                resp = await env.client.post(path, data=json.dumps(body), headers=headers,
                                             skip_auto_headers=["Content-Type"])
                assert resp.status == 415, (path, content_type)
                assert "Access-Control-Allow-Origin" not in resp.headers
        assert env.backend.dispatched == []
        assert (await env.service.store.list(10, 0))[1] == 0
        resp = await env.client.post("/json/getHistory", data="{}",
                                     headers={"Content-Type": "application/json; charset=utf-8"})
        assert resp.status == 200


@pytest.mark.parametrize("cors_origins", [frozenset(), frozenset({"https://ui.example"})])
async def test_a_preflight_from_an_unlisted_origin_gets_no_allow_origin(tmp_path, cors_origins):
    async with running(tmp_path / "jobs.db", guard=Guard(cors_origins=cors_origins)) as env:
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        for path in ("/json", "/json/submitJob", "/health"):
            resp = await env.client.options(path, headers=preflight)
            assert resp.status == 403
            assert not any(h.lower().startswith("access-control-allow") for h in resp.headers)
        resp = await env.client.get("/health", headers={"Origin": "http://evil.example"})
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_a_listed_origin_gets_cors_headers(tmp_path):
    async with running(tmp_path / "jobs.db", guard=Guard(cors_origins=frozenset({"https://ui.example"}))) as env:
        resp = await env.client.options("/json/getHistory", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        resp = await env.client.post("/json/getHistory", data="{}", headers={
            "Origin": "https://ui.example", "Content-Type": "application/json"})
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert resp.headers["Vary"] == "Origin"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1:1", "localhost", "[::2]:{port}", "bad host", "a:b:c"])
async def test_a_foreign_host_header_is_refused_on_every_route(tmp_path, host):
    async with running(tmp_path / "jobs.db") as env:
        for method, path in (("GET", "/health"), ("POST", "/json/getHistory"), ("GET", "/json/job/x/status"),
                             ("OPTIONS", "/json")):
            resp = await env.client.request(method, path, data="{}", headers={
                "Host": host.format(port=env.client.port), "Content-Type": "application/json"})
            assert resp.status == 421, (method, path)
            assert (await resp.json())["error"]["code"] == -32021


async def test_loopback_names_and_allowed_hosts_are_accepted(tmp_path):
    guard = Guard(allowed_hosts=("jobforge.example", "proxy.example:8443"))
    async with running(tmp_path / "jobs.db", guard=guard) as env:
        port = env.client.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", "jobforge.example",
                     "jobforge.example:9999", "proxy.example:8443"):
            resp = await env.client.get("/health", headers={"Host": host})
            assert resp.status == 200, host
        resp = await env.client.get("/health", headers={"Host": "proxy.example:8444"})
        assert resp.status == 421


async def test_a_page_of_another_origin_cannot_open_the_streams_or_call(tmp_path):
    """WebSockets are not covered by CORS: the Origin header browsers add is checked instead."""
    async with running(tmp_path / "jobs.db", guard=Guard(cors_origins=frozenset({"https://ui.example"}))) as env:
        job_id = await env.submit()
        for path in (f"/json/job/{job_id}/watch?logs=true", f"/json/streamLogs?job_id={job_id}"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await env.client.ws_connect(path, headers={"Origin": "http://evil.example"})
            assert info.value.status == 403
            for origin in ("https://ui.example", f"http://127.0.0.1:{env.client.port}"):
                ws = await env.client.ws_connect(path, headers={"Origin": origin})
                await ws.close()
        resp = await env.client.post("/json/getHistory", data="{}", headers={
            "Origin": "null", "Content-Type": "application/json"})
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers


async def test_every_registered_route_but_the_open_ones_needs_a_token(env):
    """Deny by default: walks the router, so a route added later is checked without editing this test."""
    job_id = await submit(env, "ann")
    closed = opened = 0
    for route in env.client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{job_id}", job_id).replace("{method}", "getHistory")
        if route.method == "HEAD":
            continue
        resp, _ = await call(env, route.method, path, body={} if route.method == "POST" else None)
        if (route.method, path) in OPEN_ROUTES:
            assert resp.status == 200, path
            opened += 1
        else:
            assert resp.status == 401, (route.method, path)
            closed += 1
    assert closed >= 6 and opened == 4  # JSON-RPC, REST x3, watch, streamLogs; health, ready, metrics, openapi
