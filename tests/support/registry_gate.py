"""A reverse proxy in front of a real registry that runs a hook when a chosen request arrives, so a test can
stop the registry at an exact moment (e.g. while one publish target's manifest is being pushed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from jobforge.devinfra import free_port

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class RegistryGate:
    """`RegistryGate(upstream_host)`; `.host` is the proxy's 127.0.0.1:port. `on(method, path_suffix, hook)` runs
    `hook()` (in a worker thread) before forwarding the first matching request; a refused upstream is a 502."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._hooks: list[tuple[str, str, Callable[[], None]]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def on(self, method: str, path_suffix: str, hook: Callable[[], None]) -> None:
        self._hooks.append((method, path_suffix, hook))

    def __enter__(self) -> "RegistryGate":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        for hook in [h for h in self._hooks if h[0] == request.method and request.path.endswith(h[1])]:
            self._hooks.remove(hook)
            await asyncio.to_thread(hook[2])
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        url = f"http://{self.upstream}{request.path_qs}"
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                async with session.request(request.method, url, headers=headers, data=body,
                                           allow_redirects=False) as resp:
                    payload = await resp.read()
                    out = CIMultiDict((k, v.replace(self.upstream, self.host) if k.lower() == "location" else v)
                                      for k, v in resp.headers.items() if k.lower() not in _HOP)
                    return web.Response(status=resp.status, headers=out, body=payload)
        except aiohttp.ClientConnectionError:
            return web.Response(status=502, text="registry unreachable")
