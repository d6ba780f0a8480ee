"""Log streams (WebSocket `/json/streamLogs`, SSE `/json/job/{id}/logs/stream`) and the watch WebSocket, in
process with the scripted backend: backlog then live lines then the final status, resume by event id, many
clients, and a client that stops reading is dropped with a reason while everyone else gets everything."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

import aiohttp
import pytest

from jobforge.backends.base import LogChunk
from jobforge.models import LogLine, LogStream, Phase
from jobforge.server.streaming import StreamLimits
from jobforge.stores.sqlite import SqliteStore
from jobforge.streams import Pulse, follow_logs
from tests.support.rawclient import StalledClient
from tests.test_server import running

FLOOD = 30_000  # lines: more than the kernel's socket buffers hold for a client that does not read
TIGHT = StreamLimits(client_buffer=20, stall_timeout=0.3, close_timeout=30, poll_interval=5)


def chunk(job_id: str, phase: str, texts) -> LogChunk:
    now = datetime.now(UTC)
    return LogChunk(job_id, phase, [LogLine(ts=now, stream=LogStream.STDOUT, line=t) for t in texts])


async def until_testing(env, job_id: str) -> None:
    """Follow the watch until the job is in its (held) test phase: an event, not a sleep."""
    async with env.client.ws_connect(f"/json/job/{job_id}/watch") as ws:
        async for msg in ws:
            if json.loads(msg.data)["job"]["status"] == "TESTING":
                return
    raise AssertionError("the job never reached TESTING")


async def held_in_test(env) -> str:
    env.backend.outcomes[Phase.TEST] = "hold"
    job_id = await env.submit()
    await until_testing(env, job_id)
    return job_id


def release(env) -> None:
    env.backend.outcomes.clear()
    env.backend.finish(env.backend.dispatched[1])


async def ws_messages(ws) -> tuple[list[dict], int | None]:
    messages = [json.loads(m.data) async for m in ws]
    return messages, ws.close_code


def sse_events(raw: str) -> list[dict]:
    events = []
    for block in raw.split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            events.append({"id": fields.get("id"), "event": fields.get("event"), "data": json.loads(fields["data"])})
    return events


class DropSeen(logging.Handler):
    """The server's own report that it dropped a slow client, as an event the test can await."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("dropping slow stream client"):
            self.event.set()


@pytest.fixture
def dropped():
    handler = DropSeen()
    logger = logging.getLogger("jobforge.streams")
    logger.addHandler(handler)
    yield handler.event
    logger.removeHandler(handler)


EXPECTED_BACKLOG = [("build", f"build line {i}") for i in range(3)] + [("test", f"test line {i}") for i in range(3)]


async def test_websocket_backlog_then_live_then_status_for_several_clients(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        job_id = await held_in_test(env)
        early = await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}")
        mid = await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}&phase=test")
        env.backend.queue.put_nowait(chunk(job_id, "test", [f"live {i}" for i in range(50)]))
        late_task = asyncio.ensure_future(ws_messages(await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}")))
        release(env)
        (all_early, code_early), (only_test, code_mid), (all_late, code_late) = await asyncio.gather(
            ws_messages(early), ws_messages(mid), late_task)
    expected = EXPECTED_BACKLOG + [("test", f"live {i}") for i in range(50)] + [
        ("publish", f"publish line {i}") for i in range(3)]
    for messages, code in ((all_early, code_early), (all_late, code_late)):
        assert [(m["phase"], m["message"]) for m in messages[:-1]] == expected  # no gap, no duplicate
        seqs = [m["seq"] for m in messages[:-1]]
        assert seqs == sorted(set(seqs))
        assert messages[-1] == {"type": "status", "job_id": job_id, "status": "SUCCEEDED", "failed_phase": None,
                                "error": None}
        assert code == aiohttp.WSCloseCode.OK
    first = all_early[0]
    assert set(first) == {"type", "job_id", "seq", "phase", "timestamp", "level", "message", "stream"}
    assert (first["level"], first["stream"]) == ("info", "stdout")
    assert [m["message"] for m in only_test[:-1]] == [t for p, t in expected if p == "test"]
    assert only_test[-1]["type"] == "status" and code_mid == aiohttp.WSCloseCode.OK


async def test_sse_stream_resumes_from_last_event_id(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        job_id = await env.submit()
        await env.service.idle()
        resp = await env.client.get(f"/json/job/{job_id}/logs/stream")
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = sse_events(await resp.text())
        assert [(e["event"], e["data"].get("message")) for e in events] == [
            ("log", f"{p} line {i}") for p in ("build", "test", "publish") for i in range(3)] + [("status", None)]
        assert all(e["id"] == str(e["data"]["seq"]) for e in events[:-1])
        assert events[-1]["data"]["status"] == "SUCCEEDED" and events[-1]["id"] is None
        resp = await env.client.get(f"/json/job/{job_id}/logs/stream", headers={"Last-Event-ID": events[4]["id"]})
        resumed = sse_events(await resp.text())
        assert [e["data"].get("message") for e in resumed] == [e["data"].get("message") for e in events[5:]]
        resp = await env.client.get(f"/json/job/{job_id}/logs/stream", headers={"Last-Event-ID": "yesterday"})
        assert resp.status == 400 and (await resp.json())["error"]["data"][0]["field"] == "after"


async def test_unknown_job_is_404_before_any_upgrade(env_db):
    async with running(env_db) as env:
        for path in ("/json/streamLogs?job_id=nope", "/json/job/nope/logs/stream", "/json/job/nope/watch"):
            resp = await env.client.get(path)
            assert resp.status == 404, path
            assert "nope" in (await resp.json())["error"]["message"]
        resp = await env.client.get("/json/streamLogs")
        assert resp.status == 400 and (await resp.json())["error"]["data"][0]["field"] == "job_id"


@pytest.fixture
def env_db(tmp_path):
    return tmp_path / "jobs.db"


@pytest.mark.parametrize("path", ["/json/streamLogs?job_id={id}", "/json/job/{id}/watch?logs=true"])
async def test_a_stalled_websocket_client_is_dropped_and_nobody_waits_for_it(tmp_path, path, dropped):
    async with running(tmp_path / "jobs.db", stream_limits=TIGHT, watch_buffer=TIGHT.client_buffer) as env:
        job_id = await held_in_test(env)
        host, port = env.client.host, env.client.port
        stalled = await StalledClient.open(host, port, path.format(id=job_id))
        assert b" 101 " in await stalled.head()
        reader = await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}")
        env.backend.queue.put_nowait(chunk(job_id, "test", [f"flood {i:06d} " + "x" * 100 for i in range(FLOOD)]))
        release(env)
        await env.service.idle()  # the pipeline finished while the stalled client read nothing
        messages, code = await ws_messages(reader)
        assert len(messages) == 6 + FLOOD + 3 + 1 and messages[-1]["status"] == "SUCCEEDED"
        assert code == aiohttp.WSCloseCode.OK
        await dropped.wait()
        close_code, reason, received = await stalled.websocket_close()
        stalled.close()
    assert close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    assert "too slow" in reason or "behind" in reason
    assert received < FLOOD  # it was dropped, not served to the end


async def test_a_stalled_sse_client_gets_an_error_event_and_is_dropped(tmp_path, dropped):
    async with running(tmp_path / "jobs.db", stream_limits=TIGHT) as env:
        job_id = await held_in_test(env)
        stalled = await StalledClient.open(env.client.host, env.client.port, f"/json/job/{job_id}/logs/stream",
                                           websocket=False)
        assert b" 200 " in await stalled.head()
        env.backend.queue.put_nowait(chunk(job_id, "test", [f"flood {i:06d} " + "x" * 100 for i in range(FLOOD)]))
        release(env)
        await env.service.idle()
        await dropped.wait()
        raw = (await stalled.read_to_end()).decode(errors="replace")
    assert 'event: error\ndata: {"type": "error", "reason": "client too slow' in raw
    assert "event: status" not in raw


async def test_shutdown_closes_open_streams_at_once(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        job_id = await held_in_test(env)
        streams = [await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}"),
                   await env.client.ws_connect(f"/json/job/{job_id}/watch")]
        sse = await env.client.get(f"/json/job/{job_id}/logs/stream")
        await env.client.server.runner.shutdown()  # what SIGTERM runs first (on_shutdown), before handlers drain
        for ws in streams:
            async for _ in ws:
                pass
            assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        assert "server shutting down" in await sse.text()


async def test_a_client_that_goes_away_unregisters_its_watcher(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        job_id = await held_in_test(env)
        ws = await env.client.ws_connect(f"/json/job/{job_id}/watch")
        await ws.receive_json()
        await ws.close()
        # The handler reads the socket, so it ends with the client; then the next update finds no watcher.
        reconnect = await env.client.ws_connect(f"/json/job/{job_id}/watch")
        await reconnect.receive_json()
        assert len(env.service._watchers[job_id]) == 1
        await reconnect.close()


async def test_followers_read_the_store_not_this_process(tmp_path):
    """A second 'replica' (own store connection, own Pulse, nobody firing it) sees lines written by the first:
    polling the store is the cross-replica path."""
    writer, reader = SqliteStore(tmp_path / "jobs.db"), SqliteStore(tmp_path / "jobs.db")
    async with running(tmp_path / "jobs.db") as env:
        job_id = await held_in_test(env)
        got = []
        async def follow():
            async for message in follow_logs(reader, Pulse(), job_id, poll_interval=0.05):
                got.append(message)
        task = asyncio.ensure_future(follow())
        env.backend.queue.put_nowait(chunk(job_id, "test", ["from the other replica"]))
        release(env)
        await asyncio.wait_for(task, 30)
    await writer.aclose()
    await reader.aclose()
    assert [m.message for m in got[:-1]] == [t for _, t in EXPECTED_BACKLOG] + ["from the other replica"] + [
        f"publish line {i}" for i in range(3)]
    assert got[-1].status.value == "SUCCEEDED"


async def test_a_store_failure_ends_the_stream_with_its_reason(tmp_path, monkeypatch):
    from jobforge.errors import StoreError

    async with running(tmp_path / "jobs.db") as env:
        job_id = await held_in_test(env)

        async def unreachable(*args, **kwargs):
            raise StoreError("consul at 127.0.0.1:8500 unreachable")
        monkeypatch.setattr(env.service.store, "read_logs", unreachable)  # fault injection at the store seam
        ws = await env.client.ws_connect(f"/json/streamLogs?job_id={job_id}")
        assert [m async for m in ws] == []
        assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR
        resp = await env.client.get(f"/json/job/{job_id}/logs/stream")
        assert sse_events(await resp.text()) == [
            {"id": None, "event": "error", "data": {"type": "error", "reason": "consul at 127.0.0.1:8500 unreachable"}}]


async def test_a_watch_that_keeps_up_gets_a_burst_larger_than_its_buffer(tmp_path):
    async with running(tmp_path / "jobs.db", stream_limits=TIGHT, watch_buffer=TIGHT.client_buffer) as env:
        job_id = await held_in_test(env)
        ws = await env.client.ws_connect(f"/json/job/{job_id}/watch?logs=true")
        assert (await ws.receive_json())["type"] == "status"
        env.backend.queue.put_nowait(chunk(job_id, "test", [f"burst {i}" for i in range(50 * TIGHT.client_buffer)]))
        release(env)
        messages, code = await ws_messages(ws)
    lines = [m["log"]["line"] for m in messages if m["type"] == "log"]
    assert [ln for ln in lines if ln.startswith("burst")] == [f"burst {i}" for i in range(50 * TIGHT.client_buffer)]
    assert messages[-1]["type"] == "end" and code == aiohttp.WSCloseCode.OK
