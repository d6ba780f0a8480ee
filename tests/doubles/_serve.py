"""Serving a double on 127.0.0.1: a free port, and a thread with its own loop for blocking clients."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from aiohttp import web


async def serve_on_loopback(runner: web.BaseRunner) -> int:
    """Set the runner up on a free 127.0.0.1 port; returns the port."""
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return sock.getsockname()[1]


@contextmanager
def served_in_thread(start: Callable[[], Awaitable[str]], stop: Callable[[], Awaitable[None]],
                     name: str) -> Iterator[str]:
    """Run `start()` on a loop in its own thread (for a service subprocess or a blocking client); yields what
    it returns (the address), and stops it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
