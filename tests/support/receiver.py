"""A real HTTP webhook receiver on 127.0.0.1 that records every request and answers as scripted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict:
        return json.loads(self.body)

    @property
    def event(self) -> str:
        return self.headers["X-Webhook-Event"]


class Receiver:
    """`answer(n)` gives the response to the n-th request (0-based); default 204. `hold` makes every request
    wait until it is set."""

    def __init__(self, answer: Callable[[int], web.StreamResponse] | None = None,
                 hold: asyncio.Event | None = None) -> None:
        self.requests: list[Received] = []
        self.arrived = asyncio.Condition()
        self._answer = answer or (lambda n: web.Response(status=204))
        self._hold = hold
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1")

    async def __aenter__(self) -> "Receiver":
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._server.close()

    @property
    def port(self) -> int:
        return self._server.port

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(dict(request.headers), await request.read())
        n = len(self.requests)
        self.requests.append(received)
        async with self.arrived:
            self.arrived.notify_all()
        if self._hold is not None:
            await self._hold.wait()
        return self._answer(n)

    async def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.requests) >= count)
        await asyncio.wait_for(enough(), timeout)
        return self.requests

    @property
    def events(self) -> list[str]:
        return [r.event for r in self.requests]
