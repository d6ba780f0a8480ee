"""The blocking client over `requests`; watching runs the async client on a private thread.

Every method is one API method: build the call (`_base`), send it, parse the typed result. Only `_send` knows
about `requests`, so a test can hand in any session with the same `request()` method.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
from collections.abc import Iterator
from typing import Any

import requests

from jobforge.client import _base
from jobforge.client._async import AsyncClient
from jobforge.client._discovery import discover_token, endpoint
from jobforge.config import JobConfig
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

__all__ = ["Client"]


class Client:
    """Synchronous Job Forge client; pass `url` (else it is discovered), `token` (else ``JOBFORGE_TOKEN``) and
    optionally your own `session`."""

    def __init__(self, url: str | None = None, *, source: str | None = None, token: str | None = None,
                 session: requests.Session | None = None, timeout: float = 30.0) -> None:
        self.url, self.source = endpoint(url, source)
        self._token = discover_token(token)
        self._headers = _base.request_headers(self._token)
        self.timeout = timeout
        self._session = session or requests.Session()
        self._owns_session = session is None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        try:
            resp = self._session.request(method, self.url + path, json=body, headers=self._headers,
                                         timeout=self.timeout)
        except requests.RequestException as exc:
            raise _base.unreachable(self.url, self.source, exc) from exc
        return resp.status_code, resp.text

    def _call(self, name: str, params: dict[str, Any]) -> Any:
        call = _base.build_call(name, params)
        status, text = self._send(call.method, call.path, call.body)
        return _base.parse_result(call.result, status, text)

    def submit_job(self, config: JobConfig | dict[str, Any]) -> SubmitJobResult:
        return self._call("submitJob", _base.submit_params(config))

    def get_status(self, job_id: str) -> JobStatusResult:
        return self._call("getStatus", {"job_id": job_id})

    def get_logs(self, job_id: str, phase: Phase | str | None = None,
                 structured: bool = False) -> LogsResult:
        """Every line of the job (or phase): reads page after page, as the service bounds each reply."""
        result, offset = None, 0
        while offset is not None:
            page = self._call("getLogs", _base.logs_params(job_id, phase, structured, offset))
            result, offset = _base.merge_logs(result, page)
        return result

    def kill_job(self, job_id: str) -> KillJobResult:
        return self._call("killJob", {"job_id": job_id})

    def cleanup(self, job_id: str) -> CleanupResult:
        return self._call("cleanup", {"job_id": job_id})

    def get_history(self, limit: int = 10, offset: int = 0, owner: str | None = None,
                    status: JobStatus | str | None = None) -> HistoryResult:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        params |= {k: v for k, v in (("owner", owner), ("status", status)) if v is not None}
        return self._call("getHistory", params)

    def health(self) -> HealthResult:
        """Liveness (``GET /health``)."""
        return _base.parse_health(*self._send("GET", "/health"))

    def ready(self) -> HealthResult:
        """Readiness (``GET /ready``): ``unavailable`` with the failing checks when the service cannot work."""
        return _base.parse_health(*self._send("GET", "/ready"))

    def watch(self, job_id: str, logs: bool = False) -> Iterator[WatchUpdate]:
        """Yield pushed updates until the job ends; closing the iterator (or Ctrl-C) stops only the watching."""
        client = AsyncClient(self.url, source=self.source, token=self._token, timeout=self.timeout)
        pump = _WatchPump(client, job_id, logs)
        pump.start()
        try:
            while True:
                item = pump.updates.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pump.stop()


_END = object()


class _WatchPump(threading.Thread):
    """Runs `AsyncClient.watch` on its own event loop and hands updates over through a queue.

    The main thread blocks in `queue.get`, which a KeyboardInterrupt can interrupt; `stop` then cancels the task
    on its loop so the WebSocket and the session are closed properly.
    """

    def __init__(self, client: AsyncClient, job_id: str, logs: bool) -> None:
        super().__init__(name=f"jobforge-watch-{job_id}", daemon=True)
        self.client, self.job_id, self.logs = client, job_id, logs
        self.updates: queue.Queue[Any] = queue.Queue()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def run(self) -> None:
        # The kernel hands a process-wide signal to any thread that does not block it. A Ctrl-C taken by this
        # thread would leave the main thread asleep in `queue.get` until the next update (minutes, for a long
        # build): so this thread, and the resolver threads its loop starts, never take SIGINT or SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        self._started.set()
        try:
            async with self.client:
                async for update in self.client.watch(self.job_id, logs=self.logs):
                    self.updates.put(update)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # handed to the consumer thread, which re-raises it
            self.updates.put(exc)
        finally:
            self.updates.put(_END)

    def stop(self) -> None:
        self._started.wait()
        if self.is_alive() and self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop already finished
                pass
        self.join()
