"""The one place that talks HTTP to Nomad: address, token, namespace, region, and the error mapping.

Nomad answers errors as plain text (not JSON), mostly with HTTP 500 even for validation; `NomadError` keeps the
status and that text, and every transport failure becomes a `BackendError` naming the agent address.

Two connection pools that never share a connection: short requests (dispatch, reads, `/ready`'s leader check) go
through a bounded pool (`request_connections`), long-lived streams (the event stream, two followed logs per
running allocation) each hold a connection of their own from an unbounded pool. With one shared pool, a few
dozen running phases' log streams took every connection and every dispatch waited behind them; now streams
cannot starve requests, and a stream is bounded by its idle timeout (and its total time when given) instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from jobforge.errors import BackendError


class NomadError(BackendError):
    def __init__(self, status: int, text: str, what: str) -> None:
        super().__init__(f"nomad {what}: HTTP {status}: {text.strip()[:500]}", {"status": status})
        self.status = status
        self.text = text


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def segment(value: str) -> str:
    """Escape a path segment (dispatched job ids contain `/`); the agent routes on the decoded path."""
    return quote(value, safe="")


class NomadHTTP:
    def __init__(self, addr: str, *, token: str | None = None, namespace: str = "default",
                 region: str | None = None, timeout: float = 30.0, request_connections: int = 32) -> None:
        self.addr = addr.rstrip("/")
        self._headers = {"X-Nomad-Token": token} if token else {}
        self._params = {"namespace": namespace, **({"region": region} if region else {})}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._request_connections = request_connections
        self._requests: aiohttp.ClientSession | None = None
        self._streams: aiohttp.ClientSession | None = None

    def _url(self, path: str, params: dict[str, Any] | None) -> URL:
        """Query values: bools as Go parses them, lists as repeated parameters (`topic=A&topic=B`)."""
        query = {**self._params, **{k: [_text(x) for x in v] if isinstance(v, list | tuple) else _text(v)
                                    for k, v in (params or {}).items() if v is not None}}
        return URL(self.addr + path, encoded=True).with_query(query)

    def _request_session(self) -> aiohttp.ClientSession:
        """Keep-alive connections, at most `request_connections` at once (more requests wait their turn)."""
        if self._requests is None or self._requests.closed:
            self._requests = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(limit=self._request_connections))
        return self._requests

    def _stream_session(self) -> aiohttp.ClientSession:
        """No limit: each stream holds its connection for its whole life, so a ceiling would only make the
        (N+1)th stream wait for another to end."""
        if self._streams is None or self._streams.closed:
            self._streams = aiohttp.ClientSession(headers=self._headers,
                                                  connector=aiohttp.TCPConnector(limit=0))
        return self._streams

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      body: Any = None, what: str = "request") -> Any:
        """JSON in, JSON out; raises `NomadError` on a non-2xx answer, `BackendError` when unreachable."""
        try:
            async with self._request_session().request(method, self._url(path, params), json=body,
                                              timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise NomadError(resp.status, text, what)
                return await resp.json(content_type=None) if text else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(f"nomad {what}: cannot reach {self.addr}: {exc.__class__.__name__} {exc}") from exc

    async def stream(self, path: str, *, params: dict[str, Any] | None = None, what: str = "stream",
                     idle_timeout: float | None = None, total: float | None = None) -> AsyncIterator[bytes]:
        """Raw body chunks of a long-lived response (event stream, followed logs), as they arrive.

        `idle_timeout` bounds the silence between two reads: Nomad heartbeats its streams, so a longer silence is
        a connection that died without a FIN (half-open) and is reported as an error, never waited on forever."""
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=10, sock_read=idle_timeout)
        try:
            async with self._stream_session().get(self._url(path, params), timeout=timeout) as resp:
                if resp.status >= 300:
                    raise NomadError(resp.status, await resp.text(), what)
                async for chunk in resp.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(f"nomad {what}: cannot reach {self.addr}: {exc.__class__.__name__} {exc}") from exc

    async def aclose(self) -> None:
        for session in (self._requests, self._streams):
            if session is not None:
                await session.close()
