"""Webhooks are POSTed for real to a receiver on 127.0.0.1, signed, and never carry the secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from jobforge.models import Phase
from tests.test_server import running

SECRET = "hush-hush-secret"


async def receiver(status: int = 200):
    received: asyncio.Queue = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await received.put((dict(request.headers), await request.read()))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, received


async def test_success_webhook_is_signed_and_redacted(tmp_path):
    server, received = await receiver()
    try:
        async with running(tmp_path / "db") as env:
            job_id = await env.submit(webhook_url=str(server.make_url("/hook")))
            headers, body = await asyncio.wait_for(received.get(), 10)
    finally:
        await server.close()
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-JobForge-Signature"] == expected
    assert headers["X-JobForge-Event"] == "job.succeeded"
    assert headers["Authorization"] == "Bearer tok-123"  # custom headers are sent...
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job"]["job_id"] == job_id
    assert payload["job"]["status"] == "SUCCEEDED"
    assert SECRET not in body.decode() and "tok-123" not in body.decode()  # ...but never echoed in the body


async def test_failure_webhook_and_flags(tmp_path):
    server, received = await receiver()
    try:
        async with running(tmp_path / "db") as env:
            env.backend.outcomes[Phase.TEST] = "fail"
            url = str(server.make_url("/hook"))
            await env.submit(webhook_url=url, webhook_on_failure=False)
            await env.service.idle()
            assert received.empty()
            failing = await env.submit(webhook_url=url)
            headers, body = await asyncio.wait_for(received.get(), 10)
    finally:
        await server.close()
    payload = json.loads(body)
    assert (payload["event"], payload["job"]["job_id"], payload["job"]["failed_phase"]) == (
        "job.failed", failing, "test")


async def test_webhook_is_retried_until_accepted(tmp_path):
    attempts = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(await request.read())
        return web.Response(status=503 if len(attempts) < 2 else 204)

    app = web.Application()
    app.router.add_post("/hook", flaky)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with running(tmp_path / "db") as env:
            await env.submit(webhook_url=str(server.make_url("/hook")))
            await env.service.idle()
    finally:
        await server.close()
    assert len(attempts) == 2 and attempts[0] == attempts[1]
