"""Watches the service configuration in Consul KV (`JOBFORGE_CONSUL_CONFIG_PREFIX`, the reference's
`jobforge-service/config/`) with blocking queries and hands every change to a callback.

One `GET /v1/kv/<prefix>?recurse&index=<last>&wait=<bounded>` at a time: it returns when something under the
prefix changed or the wait ran out. The index is reset when it goes backwards (Consul's rule for a restored
snapshot) and a failed request is retried after a bounded, doubling pause; nothing here is fatal, the service
keeps its last good configuration. Parsing and precedence are `jobforge.runtime_config` (pure).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from jobforge.runtime_config import RuntimeConfig, parse_entries

log = logging.getLogger("jobforge.consul_config")

_RETRY_MIN, _RETRY_MAX = 1.0, 30.0


class KvEntry(BaseModel):
    """One entry of `GET /v1/kv/<prefix>?recurse`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    key: str = Field(alias="Key")
    value: str | None = Field(None, alias="Value")  # base64; null for an empty value
    modify_index: int = Field(0, alias="ModifyIndex")

    def text(self) -> str:
        return base64.b64decode(self.value).decode("utf-8", errors="replace") if self.value else ""


_ENTRIES = TypeAdapter(list[KvEntry])


class ConsulConfigWatcher:
    """`on_change(config, index)` runs after the first read and after every change under the prefix."""

    def __init__(self, addr: str, prefix: str, on_change: Callable[[RuntimeConfig, int], None], *,
                 token: str | None = None, datacenter: str | None = None, wait: float = 60.0) -> None:
        addr = addr.strip().rstrip("/")
        self._base = addr if "://" in addr else f"http://{addr}"
        self._prefix = prefix
        self._on_change = on_change
        self._headers = {"X-Consul-Token": token} if token else {}
        self._dc = datacenter
        self._wait = wait
        self.index = 0
        self.loaded = False
        self.config = RuntimeConfig()
        self._task: asyncio.Task | None = None
        self._loaded = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait (bounded) for the first successful read, so the service starts with Consul's values."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def poll(self) -> bool:
        """One blocking read; True when the prefix changed (or on the first read). Raises on failure."""
        if self._session is None:
            # Bounded: Consul adds up to wait/16 of jitter to a blocking query.
            self._session = aiohttp.ClientSession(headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=self._wait * 1.1 + 10))
        params = {"recurse": "", "index": str(self.index), "wait": f"{int(self._wait * 1000)}ms",
                  **({"dc": self._dc} if self._dc else {})}
        url = f"{self._base}/v1/kv/{quote(self._prefix)}"
        async with self._session.get(url, params=params) as resp:
            body = await resp.read()
            if resp.status not in (200, 404):
                raise RuntimeError(f"consul answered HTTP {resp.status}: {body[:200].decode(errors='replace')}")
            new_index = int(resp.headers.get("X-Consul-Index", "0"))
        entries = _ENTRIES.validate_json(body) if resp.status == 200 else []
        first = not self.loaded
        if new_index < self.index:  # a restored snapshot: start over
            new_index = 0
        changed = first or new_index != self.index
        self.index, self.loaded = new_index, True
        self._loaded.set()
        if not changed:
            return False
        values = {e.key[len(self._prefix):]: e.text() for e in entries if e.key.startswith(self._prefix)}
        config, problems = parse_entries(values, self.config)
        for problem in problems:
            log.warning("consul config %s%s", self._prefix, problem)
        if config != self.config or first:
            self.config = config
            self._on_change(config, self.index)
        return True

    async def _run(self) -> None:
        delay = _RETRY_MIN
        while True:
            try:
                await self.poll()
                delay = _RETRY_MIN
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError, ValidationError) as exc:
                log.warning("consul config: reading %s failed (%s); retrying in %.0fs", self._prefix,
                            exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
