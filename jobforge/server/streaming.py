"""Push streams to clients (WebSocket and Server-Sent Events) with a bounded buffer per client.

`pump` moves messages from a source (a log follower or a watch) to one client through a queue of at most
`StreamLimits.client_buffer` messages. The source never waits on the socket: when the queue stays full for
`stall_timeout` (or a watch source reports `SlowConsumer`), the client is dropped with a reason — WebSocket close
code 1013 (try again later), SSE a final `error` event — and its connection is aborted if it does not take that
within `close_timeout`. So a stalled client holds a bounded amount of memory and never slows the pipeline or
other clients. A WebSocket is read concurrently, so a client that goes away is noticed at once; every open
stream is closed (1001) when the server shuts down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from aiohttp import WSCloseCode, web
from pydantic import BaseModel

from jobforge.errors import JobForgeError, SlowConsumer

log = logging.getLogger("jobforge.streams")


@dataclass(frozen=True)
class StreamLimits:
    client_buffer: int = 1000
    """Messages queued for one client at most."""
    stall_timeout: float = 30.0
    """How long a client's buffer may stay full before the client is dropped."""
    close_timeout: float = 5.0
    """How long a dropped or finished client gets to take its close message before the connection is cut."""
    poll_interval: float = 1.0
    """How often log followers re-read the store for lines written by other replicas."""
    keepalive: float = 15.0
    """SSE comment interval while idle: keeps proxies open and notices clients that went away."""


class Outcome(Enum):
    DONE = "done"  # the source ended and the client got everything
    GONE = "gone"  # the client went away
    SLOW = "slow"  # the client fell behind and is dropped
    SHUTDOWN = "shutdown"  # the server is stopping
    FAILED = "failed"  # the source failed (e.g. the store is unreachable)


_END = object()
_YIELD_EVERY = 100  # items a producer or consumer handles before it lets other tasks (health checks) run


async def pump(source: AsyncIterator[Any], send: Callable[[Any], Awaitable[None]], limits: StreamLimits,
               stop: Awaitable[Outcome], idle: Callable[[], Awaitable[None]] | None = None) -> tuple[Outcome, str]:
    """Run until the source is exhausted and sent, the client is gone, too slow, or `stop` resolves."""
    buffer: asyncio.Queue[Any] = asyncio.Queue(limits.client_buffer)

    async def put(item: Any) -> None:
        try:
            buffer.put_nowait(item)
        except asyncio.QueueFull:
            try:
                async with asyncio.timeout(limits.stall_timeout):
                    await buffer.put(item)
            except TimeoutError:
                raise SlowConsumer(f"client too slow: {limits.client_buffer} messages unsent for "
                                   f"{limits.stall_timeout:g}s") from None

    async def produce() -> None:
        try:
            count = 0
            async for item in source:
                await put(item)
                count += 1
                if count % _YIELD_EVERY == 0:  # neither side suspends while items are at hand: let others in
                    await asyncio.sleep(0)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
        await put(_END)

    async def consume() -> None:
        sent = 0
        while True:
            if idle is None:
                item = await buffer.get()
            else:
                try:
                    async with asyncio.timeout(limits.keepalive):
                        item = await buffer.get()
                except TimeoutError:
                    await idle()
                    continue
            if item is _END:
                return
            await send(item)
            sent += 1
            if sent % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    producer, consumer = asyncio.ensure_future(produce()), asyncio.ensure_future(consume())
    stopper = asyncio.ensure_future(stop)
    pending = {producer, consumer, stopper}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                outcome = stopper.result()
                return outcome, "server shutting down" if outcome is Outcome.SHUTDOWN else "client went away"
            if producer in done and producer.exception() is not None:
                exc = producer.exception()
                if isinstance(exc, SlowConsumer):
                    return Outcome.SLOW, exc.message
                if isinstance(exc, JobForgeError):
                    return Outcome.FAILED, exc.message
                raise exc
            if consumer in done:
                exc = consumer.exception()
                if exc is None:
                    return Outcome.DONE, "end of stream"
                if isinstance(exc, (ConnectionError, RuntimeError)):  # a write to a closed connection
                    return Outcome.GONE, "client went away"
                raise exc
    finally:
        for task in (producer, consumer, stopper):
            task.cancel()
        await asyncio.gather(producer, consumer, stopper, return_exceptions=True)


# ---------------------------------------------------------------- shutdown registry

class _OpenStreams:
    """Every open stream's shutdown future; once the app shuts down, new ones resolve at once."""

    def __init__(self) -> None:
        self.futures: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()
        self.closing = False

    def register(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.closing:
            future.set_result(Outcome.SHUTDOWN)
        else:
            self.futures.add(future)
        return future

    def close_all(self) -> None:
        self.closing = True
        for future in list(self.futures):
            if not future.done():
                future.set_result(Outcome.SHUTDOWN)


STREAMS_KEY = web.AppKey("streams", _OpenStreams)


async def on_shutdown(app: web.Application) -> None:
    app[STREAMS_KEY].close_all()


def setup(app: web.Application) -> None:
    app[STREAMS_KEY] = _OpenStreams()
    app.on_shutdown.append(on_shutdown)


def _hang_up(request: web.Request, outcome: Outcome, close_timeout: float) -> None:
    """Flush what is buffered (the close reason included), but never wait for a stalled peer forever."""
    transport = request.transport
    if transport is None:
        return
    if outcome is Outcome.GONE:
        transport.abort()
        return
    transport.close()
    asyncio.get_running_loop().call_later(close_timeout, transport.abort)


def _close_reason(reason: str) -> bytes:
    """A WebSocket close reason is at most 123 bytes of valid UTF-8."""
    return reason.encode()[:120].decode(errors="ignore").encode()


def _json(message: Any) -> str:
    if isinstance(message, BaseModel):
        return message.model_dump_json()
    return json.dumps(message)


# ---------------------------------------------------------------- WebSocket

async def serve_websocket(request: web.Request, source: AsyncIterator[Any], limits: StreamLimits,
                          render: Callable[[Any], Any] = lambda m: m) -> web.WebSocketResponse:
    """Stream `source` over a WebSocket; the caller has already checked that the job exists."""
    shutdown = request.app[STREAMS_KEY].register()  # before the first await: no shutdown slips past it
    ws = web.WebSocketResponse(heartbeat=20, timeout=limits.close_timeout, max_msg_size=64 * 1024)
    await ws.prepare(request)

    async def client_gone() -> Outcome:
        async for _ in ws:  # client messages are ignored; reading notices its close at once
            pass
        return Outcome.GONE

    async def stop() -> Outcome:
        gone = asyncio.ensure_future(client_gone())
        try:
            done, _ = await asyncio.wait({gone, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)

    async def send(message: Any) -> None:
        rendered = render(message)
        if rendered is not None:
            await ws.send_str(_json(rendered))

    outcome, reason = await pump(source, send, limits, stop())
    code = {Outcome.DONE: WSCloseCode.OK, Outcome.SLOW: WSCloseCode.TRY_AGAIN_LATER,
            Outcome.SHUTDOWN: WSCloseCode.GOING_AWAY, Outcome.FAILED: WSCloseCode.INTERNAL_ERROR}.get(outcome)
    if outcome is Outcome.SLOW:
        log.warning("dropping slow stream client %s %s: %s", request.remote, request.path, reason)
    if code is not None and not ws.closed:
        try:
            async with asyncio.timeout(limits.close_timeout):
                await ws.close(code=code, message=_close_reason(reason), drain=False)
        except (TimeoutError, ConnectionError):
            pass
    _hang_up(request, outcome, limits.close_timeout)
    return ws


# ---------------------------------------------------------------- Server-Sent Events

def sse_event(event: str, data: Any, id_: int | None = None) -> bytes:
    head = f"id: {id_}\n" if id_ is not None else ""
    return f"{head}event: {event}\ndata: {_json(data)}\n\n".encode()


async def serve_sse(request: web.Request, source: AsyncIterator[Any], limits: StreamLimits,
                    frame: Callable[[Any], bytes]) -> web.StreamResponse:
    """Stream `source` as `text/event-stream`; a dropped client gets a last `error` event."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    shutdown = request.app[STREAMS_KEY].register()
    await response.prepare(request)

    async def idle() -> None:
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away")
        await response.write(b": keepalive\n\n")

    outcome, reason = await pump(source, lambda m: response.write(frame(m)), limits, shutdown, idle)
    if outcome is Outcome.SLOW:
        log.warning("dropping slow stream client %s %s: %s", request.remote, request.path, reason)
    if outcome in (Outcome.SLOW, Outcome.SHUTDOWN, Outcome.FAILED):
        try:
            async with asyncio.timeout(limits.close_timeout):
                await response.write(sse_event("error", {"type": "error", "reason": reason}))
                await response.write_eof()
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        _hang_up(request, outcome, limits.close_timeout)
    elif outcome is Outcome.GONE:
        _hang_up(request, outcome, limits.close_timeout)
    else:
        await response.write_eof()
    return response
