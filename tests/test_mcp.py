"""MCP at /mcp, driven by the official `mcp` SDK client (streamable HTTP) and by raw HTTP for the envelope
details the SDK does not exercise. The real build through MCP is in tests/test_e2e_streams.py."""

from __future__ import annotations

import json
import logging

import pytest
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

from jobforge.models import METHODS, SubmitJobParams
from jobforge.server.mcp import PROTOCOL_VERSIONS
from jobforge.server.guard import Guard
from tests.test_server import CONFIG, SECRETS, running

SDK_VERSION = "2025-11-25"  # what this SDK's ClientSession.initialize offers (mcp_types LATEST_HANDSHAKE_VERSION)


@pytest.fixture
async def env(tmp_path):
    async with running(tmp_path / "jobs.db") as e:
        yield e


def url(env, path: str = "/mcp") -> str:
    return str(env.client.make_url(path))


async def test_sdk_client_lists_six_tools_calls_them_and_gets_field_errors(env):
    async with streamable_http_client(url(env)) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.protocol_version == SDK_VERSION
        assert init.server_info.name == "jobforge"
        listed = (await session.list_tools()).tools
        assert sorted(t.name for t in listed) == sorted(
            ["submitJob", "getStatus", "getLogs", "killJob", "cleanup", "getHistory"])
        submit = next(t for t in listed if t.name == "submitJob")
        # The schema is the params model's own, not a hand-written copy.
        assert submit.input_schema == SubmitJobParams.model_json_schema()
        assert submit.input_schema["$defs"]["JobConfig"]["properties"]["image_name"]["pattern"]

        result = await session.call_tool("submitJob", {"job_config": CONFIG})
        assert not result.is_error, result
        job_id = result.structured_content["job_id"]
        await env.service.idle()
        status = await session.call_tool("getStatus", {"job_id": job_id})
        assert status.structured_content["status"] == "SUCCEEDED"
        assert json.loads(status.content[0].text)["status"] == "SUCCEEDED"
        logs = await session.call_tool("getLogs", {"job_id": job_id, "phase": "test"})
        assert logs.structured_content["logs"]["test"] == ["test line 0", "test line 1", "test line 2"]
        history = await session.call_tool("getHistory", {"limit": 5})
        assert history.structured_content["total"] == 1

        bad = await session.call_tool("submitJob", {"job_config": {**CONFIG, "image_name": "Bad Name!"}})
        assert bad.is_error
        assert "image_name" in bad.content[0].text
        missing = await session.call_tool("getStatus", {"job_id": "no-such-job"})
        assert missing.is_error and "not found" in missing.content[0].text
        extra = await session.call_tool("getHistory", {"limit": 5, "colour": "red"})
        assert extra.is_error and "colour" in extra.content[0].text

        with pytest.raises(MCPError) as err:
            await session.call_tool("rmJob", {})
        assert "unknown tool" in str(err.value)
        await session.send_ping()
    assert (await env.rpc("getHistory", {}))["result"]["total"] == 1  # the bad submit queued nothing


async def post(env, body, accept: str = "application/json, text/event-stream", **headers):
    resp = await env.client.post("/mcp", data=json.dumps(body),
                                 headers={"Content-Type": "application/json", "Accept": accept, **headers})
    return resp, await resp.text()


def rpc(method: str, params=None, id_=1) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": method, **({"params": params} if params is not None else {})}


async def test_version_negotiation_and_header_check(env):
    for offered, expected in [("2024-11-05", "2024-11-05"), ("2025-06-18", "2025-06-18"),
                              ("1999-01-01", PROTOCOL_VERSIONS[-1])]:
        resp, text = await post(env, rpc("initialize", {"protocolVersion": offered, "capabilities": {},
                                                        "clientInfo": {"name": "t", "version": "1"}}))
        assert resp.status == 200 and json.loads(text)["result"]["protocolVersion"] == expected
        assert "Mcp-Session-Id" not in resp.headers  # stateless: any replica answers
    resp, text = await post(env, rpc("tools/list"), **{"MCP-Protocol-Version": "1999-01-01"})
    assert resp.status == 400 and "MCP-Protocol-Version" in text
    # Before 2025-06-18 there is no structured output, so no outputSchema.
    _, text = await post(env, rpc("tools/list"), **{"MCP-Protocol-Version": "2025-03-26"})
    assert all("outputSchema" not in t for t in json.loads(text)["result"]["tools"])
    _, text = await post(env, rpc("tools/list"), **{"MCP-Protocol-Version": "2025-06-18"})
    assert all(t["outputSchema"]["type"] == "object" for t in json.loads(text)["result"]["tools"])


async def test_sse_when_preferred_notifications_202_and_no_sessions(env):
    resp, text = await post(env, rpc("ping", id_="p1"), accept="text/event-stream")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert text == 'event: message\ndata: {"jsonrpc": "2.0", "id": "p1", "result": {}}\n\n'
    resp, text = await post(env, rpc("ping"), accept="application/json;q=0.5, text/event-stream")
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    resp, text = await post(env, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert resp.status == 202 and text == ""
    resp, text = await post(env, rpc("resources/list"))
    assert json.loads(text)["error"]["code"] == -32601
    resp, text = await post(env, rpc("tools/call", {"name": "nope", "arguments": {}}))
    assert json.loads(text)["error"]["code"] == -32602 and "nope" in json.loads(text)["error"]["message"]
    for method in ("GET", "DELETE"):
        assert (await env.client.request(method, "/mcp")).status == 405
    resp, text = await post(env, rpc("ping"), Origin="http://evil.example")
    assert resp.status == 403  # no CORS_ORIGIN: a foreign browser origin is refused (the guard, on every route)
    resp = await env.client.post("/mcp", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == -32700


async def test_origin_is_checked_against_cors_origin(tmp_path):
    async with running(tmp_path / "jobs.db", guard=Guard(cors_origins=frozenset({"http://ui.example"}))) as env:
        resp, text = await post(env, rpc("ping"), Origin="http://evil.example")
        assert resp.status == 403
        resp, _ = await post(env, rpc("ping"), Origin="http://ui.example")
        assert resp.status == 200


async def test_rest_aliases_under_mcp(env):
    status, body = await env.post("/mcp/submitJob", {"job_config": CONFIG})
    assert status == 200
    await env.service.idle()
    status, body = await env.post("/mcp/getStatus", {"job_id": body["job_id"]})
    assert status == 200 and body["status"] == "SUCCEEDED"
    status, body = await env.post("/mcp/getHistory", {"limit": "many"})
    assert status == 400 and body["error"]["data"][0]["field"] == "limit"
    status, _ = await env.post("/mcp/noSuchMethod", {})
    assert status == 404


async def test_mcp_log_level_1_logs_messages_with_secrets_redacted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jobforge.mcp")
    async with running(tmp_path / "jobs.db", mcp_log_level=1) as env:
        cfg = {**CONFIG, "repo_url": "https://bob:pa55word@git.example.invalid/app.git"}
        resp, text = await post(env, rpc("tools/call", {"name": "submitJob", "arguments": {"job_config": cfg}}))
        assert not json.loads(text)["result"]["isError"]
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "jobforge.mcp")
    assert "MCP request" in logged and "MCP response" in logged and '"submitJob"' in logged
    for secret in (*SECRETS, "pa55word"):
        assert secret not in logged
    assert "git.example.invalid" in logged


def test_every_method_is_a_tool():
    from jobforge.server.mcp import tools
    assert [t["name"] for t in tools(PROTOCOL_VERSIONS[-1])] == list(METHODS)
