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


class ThreadedReceiver:
    """The same, for synchronous tests: `http.server` in a thread, answering 204 to every POST."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[Received] = []
        self._arrived = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer._arrived:
                    outer.requests.append(Received(dict(self.headers.items()), body))
                    outer._arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ThreadedReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def wait_for_event(self, event: str, timeout: float = 120) -> list[Received]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: any(r.event == event for r in self.requests), timeout):
                raise AssertionError(f"no {event} webhook within {timeout:.0f} s; got {[r.event for r in self.requests]}")
            return list(self.requests)
