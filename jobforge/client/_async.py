"""The asyncio client over `aiohttp`, twin of `Client`, plus the WebSocket watch.

The session is created lazily (aiohttp sessions belong to a running loop) unless one is injected; an injected
session is never closed here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from jobforge.client import _base
from jobforge.client._discovery import discover_token, endpoint
from jobforge.config import JobConfig
from jobforge.errors import ServiceUnavailable
from jobforge.models import (
    CleanupResult,
    HealthResult,
    HistoryResult,
    JobStatus,
    JobStatusResult,
    KillJobResult,
    LogsResult,
    Phase,
    SubmitJobResult,
    WatchUpdate,
)

__all__ = ["AsyncClient"]


class AsyncClient:
    """Asynchronous Job Forge client; use as ``async with AsyncClient(url, token=...) as client`` (the token
    defaults to ``JOBFORGE_TOKEN``)."""

    def __init__(self, url: str | None = None, *, source: str | None = None, token: str | None = None,
                 session: aiohttp.ClientSession | None = None, timeout: float = 30.0) -> None:
        self.url, self.source = endpoint(url, source)
        self._token = discover_token(token)
        self._headers = _base.request_headers(self._token)
        self.timeout = timeout
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        try:
            async with self._get_session().request(method, self.url + path, json=body,
                                                  headers=self._headers) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _base.unreachable(self.url, self.source, exc) from exc

    async def _call(self, name: str, params: dict[str, Any]) -> Any:
        call = _base.build_call(name, params)
        status, text = await self._send(call.method, call.path, call.body)
        return _base.parse_result(call.result, status, text)

    async def submit_job(self, config: JobConfig | dict[str, Any]) -> SubmitJobResult:
        return await self._call("submitJob", _base.submit_params(config))

    async def get_status(self, job_id: str) -> JobStatusResult:
        return await self._call("getStatus", {"job_id": job_id})

    async def get_logs(self, job_id: str, phase: Phase | str | None = None,
                       structured: bool = False) -> LogsResult:
        """Every line of the job (or phase): reads page after page, as the service bounds each reply."""
        result, offset = None, 0
        while offset is not None:
            page = await self._call("getLogs", _base.logs_params(job_id, phase, structured, offset))
            result, offset = _base.merge_logs(result, page)
        return result

    async def kill_job(self, job_id: str) -> KillJobResult:
        return await self._call("killJob", {"job_id": job_id})

    async def cleanup(self, job_id: str) -> CleanupResult:
        return await self._call("cleanup", {"job_id": job_id})

    async def get_history(self, limit: int = 10, offset: int = 0, owner: str | None = None,
                          status: JobStatus | str | None = None) -> HistoryResult:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        params |= {k: v for k, v in (("owner", owner), ("status", status)) if v is not None}
        return await self._call("getHistory", params)

    async def health(self) -> HealthResult:
        return _base.parse_health(*await self._send("GET", "/health"))

    async def ready(self) -> HealthResult:
        return _base.parse_health(*await self._send("GET", "/ready"))

    async def watch(self, job_id: str, logs: bool = False) -> AsyncIterator[WatchUpdate]:
        """Yield the updates the server pushes (current state first) until the ``end`` message."""
        url = _base.watch_url(self.url, job_id, logs)
        try:
            ws = await self._get_session().ws_connect(url, heartbeat=30, headers=_base.ws_headers(self._token),
                                                      timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):  # the handshake loses the error body: ask REST for the precise reason
                await self.get_status(job_id)
            raise _base.handshake_error(exc.status, job_id) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _base.unreachable(self.url, self.source, exc) from exc
        async with ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    update = _base.parse_watch_message(msg.data)
                    yield update
                    if update.type == "end":
                        return
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        raise ServiceUnavailable(f"the service at {self.url} closed the watch of job {job_id} before it ended; "
                                 f"resume with: jobforge watch {job_id}", {"url": self.url, "source": self.source})
