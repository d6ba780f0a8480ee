"""Replicas that share one Consul store: which replica drives which job, and how the others learn what it did.

Every replica holds one Consul session (TTL, renewed at each heartbeat, lock-delay `heartbeat` seconds) and
drives only the jobs whose lease it holds: `PUT <prefix>cluster/leases/<job>?acquire=<session>`. Consul lets
one session at a time hold a key, so a job has one driver; when the session ends (clean shutdown: destroyed;
crash: see below) Consul releases every lease of it at once and the others acquire them in their next scan.

Why a heartbeat key on top of the TTL: Consul invalidates a TTL session only 2 x TTL after its last renewal
(SessionTTLMultiplier) and refuses TTLs under 10 s (session_ttl_min), so a crash alone frees the leases after
17-20 s, past the 15 s budget. Each replica therefore also rewrites `cluster/replicas/<session>` every
`heartbeat` seconds (held by its session, so it never outlives it). Each scan notes, on the observer's own
monotonic clock, since when each such key has kept its ModifyIndex; one unchanged for `timeout` seconds is a
dead replica, and the observer destroys that session (any replica may: `PUT /v1/session/destroy/:id`). No
clock is compared across machines. The TTL stays the backstop when no replica is left to notice.

Key layout (under the store's prefix; `<job>` escaped like the store's keys):

    cluster/replicas/<session>   heartbeat of a live replica (value: its name and beat count)
    cluster/leases/<job>         held by the session of the job's driver (value: the replica's name)
    cluster/admission            held while a replica admits jobs: the running count stays below the limit
    cluster/kills/<job>          a kill asked of a replica that is not the job's driver; the driver acts on it

One `GET cluster/?recurse` per scan reads all of it. Watchers read the job's record and log keys with Consul
blocking queries (`wait_record`, `wait_logs`), so a watcher on any replica sees what the driver applied.

`Solo` is the single-replica (SQLite) stand-in: it owns every job, and its watchers are fed in process.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from jobforge.errors import StoreError
from jobforge.models import JobRecord
from jobforge.stores.base import Versioned, load_record
from jobforge.stores.consul import job_key, logs_prefix, segment, unsegment

__all__ = ["ConsulLeases", "Leases", "Solo", "log_changes", "record_changes", "replica_name"]

log = logging.getLogger("jobforge.cluster")

CLUSTER = "cluster/"
REPLICAS, LEASES, KILLS, ADMISSION = "replicas/", "leases/", "kills/", "admission"
_ADMISSION_TRIES = 20
_WATCH_CONNECTIONS = 1000  # blocking queries at once (two per watcher following logs)


def replica_name() -> str:
    """A human-readable replica name for logs and lease values: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Leases(Protocol):
    shared: bool
    """True when other replicas may drive jobs: watchers then read the store, not this process's changes."""
    scan_seconds: float

    async def start(self) -> None: ...

    async def aclose(self) -> None:
        """Give every lease up at once (a rolling restart hands the jobs over without waiting for a timeout)."""

    def holds(self, job_id: str) -> bool: ...

    async def acquire(self, job_id: str) -> bool: ...

    async def release(self, job_id: str) -> None:
        """The job is settled: drop its lease."""

    async def scan(self) -> Scan:
        """One read of the cluster's state; also ends dead replicas' sessions and renews this one's."""

    def admission(self) -> Any:
        """Async context manager yielding True while this replica alone may admit jobs."""

    async def request_kill(self, job_id: str) -> None: ...

    async def kill_done(self, job_id: str) -> None: ...

    async def wait_record(self, job_id: str, version: int, wait: float) -> Versioned | None: ...

    async def wait_logs(self, job_id: str, index: int, wait: float) -> int: ...


class Scan(BaseModel):
    """What one scan found: who holds which lease, leases nobody holds, kill requests."""

    held: dict[str, str] = Field(default_factory=dict)
    """job id -> session holding its lease."""
    free: list[str] = Field(default_factory=list)
    """Jobs with a lease key that no session holds: their driver is gone, take them over."""
    kills: list[str] = Field(default_factory=list)


class Solo:
    """One replica (SQLite): it drives every job; watchers are fed by the service's own changes."""

    shared = False
    scan_seconds = 0.0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def holds(self, job_id: str) -> bool:
        return True

    async def acquire(self, job_id: str) -> bool:
        return True

    async def release(self, job_id: str) -> None:
        return None

    async def scan(self) -> Scan:
        return Scan()

    @asynccontextmanager
    async def admission(self) -> AsyncIterator[bool]:
        yield True

    async def request_kill(self, job_id: str) -> None:
        return None

    async def kill_done(self, job_id: str) -> None:
        return None

    async def wait_record(self, job_id: str, version: int, wait: float) -> Versioned | None:
        raise NotImplementedError("a single replica feeds its watchers itself")

    async def wait_logs(self, job_id: str, index: int, wait: float) -> int:
        raise NotImplementedError("a single replica feeds its watchers itself")


async def record_changes(leases: Leases, job_id: str, version: int, wait: float) -> AsyncIterator[JobRecord]:
    """Each new version of a job's stored record after `version`, until it is settled (blocking queries; retried
    while the store is unreachable). Changes in quick succession may arrive as one: the newest."""
    while True:
        try:
            found = await leases.wait_record(job_id, version, wait)
        except StoreError as exc:
            log.warning("watch of job %s: %s; retrying", job_id, exc.message, extra={"job_id": job_id})
            await asyncio.sleep(1.0)  # retry backoff while the store is unreachable
            continue
        if found is None:  # jobs are never deleted; a vanished record ends the feed
            return
        if found.version == version:
            continue
        version = found.version
        yield found.record
        if found.record.settled:
            return


async def log_changes(leases: Leases, job_id: str, wait: float) -> AsyncIterator[None]:
    """One item each time the job's log keys change (blocking queries; retried while the store is unreachable)."""
    index = 0
    while True:
        try:
            found = await leases.wait_logs(job_id, index, wait)
        except StoreError as exc:
            log.warning("watch of job %s logs: %s; retrying", job_id, exc.message, extra={"job_id": job_id})
            await asyncio.sleep(1.0)  # retry backoff while the store is unreachable
            continue
        if found != index:
            index = found
            yield None


# ---------------------------------------------------------------- Consul wire objects

class SessionRequest(BaseModel):
    """Body of `PUT /v1/session/create` (structs.Session): every default the endpoint would pick is overridden."""

    Name: str
    TTL: str
    Behavior: str = "release"
    LockDelay: str
    NodeChecks: list[str] = Field(default_factory=list)
    """No serfHealth: a replica's liveness is its heartbeat, not its Consul agent's node."""


class Heartbeat(BaseModel):
    """Value of `cluster/replicas/<session>`: rewritten at every heartbeat so its ModifyIndex moves."""

    replica: str
    beat: int


class SessionCreated(BaseModel):
    """Answer of `PUT /v1/session/create`."""

    model_config = ConfigDict(extra="ignore")
    ID: str


class LockEntry(BaseModel):
    """One entry of `GET /v1/kv/<prefix>cluster/?recurse` (DirEntry): who holds it, and since which write."""

    model_config = ConfigDict(extra="ignore")
    Key: str
    Value: str | None = None
    Session: str | None = None
    ModifyIndex: int

    def text(self) -> str:
        return base64.b64decode(self.Value).decode(errors="replace") if self.Value else ""


class RecordEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    Value: str | None = None
    ModifyIndex: int


_LOCK_ENTRIES = TypeAdapter(list[LockEntry])
_RECORD_ENTRIES = TypeAdapter(list[RecordEntry])
_BOOL = TypeAdapter(bool)


class _SessionGone(Exception):
    """Consul no longer knows this replica's session (destroyed by a peer, or its TTL ran out)."""


# ---------------------------------------------------------------- the Consul implementation

class ConsulLeases:
    """Leases in Consul for replicas sharing one Consul store (see the module docstring)."""

    shared = True

    def __init__(self, addr: str, *, prefix: str, token: str | None = None, datacenter: str | None = None,
                 name: str | None = None, ttl: float = 10.0, heartbeat: float = 2.0, timeout: float = 8.0,
                 request_timeout: float = 30.0) -> None:
        addr = addr.strip().rstrip("/")
        self._base = addr if "://" in addr else f"http://{addr}"
        self._root = f"{prefix}{CLUSTER}"
        self._headers = {"X-Consul-Token": token} if token else {}
        self._dc = datacenter
        self.name = name or replica_name()
        self._ttl, self._heartbeat, self._timeout = ttl, heartbeat, timeout
        self.scan_seconds = min(1.0, heartbeat)
        self._request_timeout = request_timeout
        self._prefix = prefix
        self._http: aiohttp.ClientSession | None = None
        self.session: str | None = None
        self._held: set[str] = set()
        self._beats = 0
        self._seen: dict[str, tuple[int, float]] = {}  # peer session -> (ModifyIndex, first seen at)
        self._last_scan: float | None = None
        self._lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task] = set()
        self._beater: asyncio.Task | None = None
        self._watch_http: aiohttp.ClientSession | None = None  # blocking queries never starve the heartbeat

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._new_session()
        self._beater = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        """Its own task: however long the service's own work takes, the session is renewed on time."""
        while True:
            await asyncio.sleep(self._heartbeat)  # the heartbeat period
            try:
                async with self._lock:
                    await self._beat()
            except StoreError as exc:
                log.warning("replica %s: heartbeat failed (%s)", self.name, exc.message)

    async def aclose(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
            await asyncio.gather(self._beater, return_exceptions=True)
        session, self.session = self.session, None
        self._held.clear()
        try:
            if session is not None:  # releases every lease at once: peers take over at their next scan
                await self._request("PUT", f"/v1/session/destroy/{session}")
        except StoreError as exc:
            log.warning("could not end session %s (%s); Consul ends it after its TTL", session, exc.message)
        finally:
            for http in (self._http, self._watch_http):
                if http is not None:
                    await http.close()
            self._http = self._watch_http = None

    # ------------------------------------------------------------ leases

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    async def acquire(self, job_id: str) -> bool:
        if job_id in self._held:
            return True
        if await self._lock_key(self._key(LEASES, job_id), self.name):
            self._held.add(job_id)
            return True
        return False

    async def release(self, job_id: str) -> None:
        """Delete the lease key of a settled job (a deleted key frees its lock: nothing is left to drive)."""
        self._held.discard(job_id)
        try:
            await self._request("DELETE", f"/v1/kv/{self._key(LEASES, job_id)}")
        except StoreError as exc:
            log.warning("job %s: lease not removed (%s); it ends with this replica's session", job_id, exc.message,
                        extra={"job_id": job_id})

    async def scan(self) -> Scan:
        async with self._lock:
            before = set(self._held)  # leases acquired while the read is on its way are not judged by it
            entries = await self._entries()
            self._watch_peers(entries)
        scan = Scan()
        leases, kills = self._root + LEASES, self._root + KILLS
        for entry in entries:
            if entry.Key.startswith(leases):
                job = unsegment(entry.Key[len(leases):])
                if entry.Session:
                    scan.held[job] = entry.Session
                else:
                    scan.free.append(job)
            elif entry.Key.startswith(kills):
                scan.kills.append(unsegment(entry.Key[len(kills):]))
        lost = {job for job in before if scan.held.get(job) != self.session} & self._held
        if lost:
            log.warning("replica %s: lost the lease of %d jobs (%s)", self.name, len(lost), ", ".join(sorted(lost)),
                        extra={"job_ids": sorted(lost)})
            self._held -= lost
        return scan

    @asynccontextmanager
    async def admission(self) -> AsyncIterator[bool]:
        """Hold the admission lock while admitting; another replica admitting means a short wait, then False."""
        key = self._root + ADMISSION
        got = False
        for _ in range(_ADMISSION_TRIES):
            got = await self._lock_key(key, self.name)
            if got:
                break
            await asyncio.sleep(0.05)  # retry backoff: the other replica holds it for a few store writes
        try:
            yield got
        finally:
            if got and self.session is not None:
                try:
                    await self._request("PUT", f"/v1/kv/{key}", params={"release": self.session}, data=b"")
                except StoreError as exc:
                    log.warning("admission lock not released (%s); it ends with this session", exc.message)

    async def request_kill(self, job_id: str) -> None:
        await self._request("PUT", f"/v1/kv/{self._key(KILLS, job_id)}", data=self.name.encode())

    async def kill_done(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/kv/{self._key(KILLS, job_id)}")

    # ------------------------------------------------------------ watching the store

    async def wait_record(self, job_id: str, version: int, wait: float) -> Versioned | None:
        """The job's record once its version passes `version` (or after `wait` seconds); None if it is gone."""
        status, body, _ = await self._request("GET", f"/v1/kv/{job_key(self._prefix, job_id)}", ok=(200, 404),
                                              params={"index": version, "wait": f"{max(1, round(wait))}s"},
                                              blocking=True)
        if status == 404:
            return None
        try:
            entry = _RECORD_ENTRIES.validate_json(body)[0]
            return Versioned(load_record(base64.b64decode(entry.Value or "")), entry.ModifyIndex)
        except (ValidationError, ValueError, IndexError) as exc:
            raise StoreError(f"unexpected data from consul for job {job_id}: {exc}") from exc

    async def wait_logs(self, job_id: str, index: int, wait: float) -> int:
        """Consul's index of the job's log keys once it passes `index` (or after `wait` seconds)."""
        _, _, found = await self._request("GET", f"/v1/kv/{logs_prefix(self._prefix, job_id)}", "keys",
                                          ok=(200, 404), params={"index": index, "wait": f"{max(1, round(wait))}s"},
                                          blocking=True)
        return found if found >= index else 0  # an index going backwards (snapshot restore) starts over

    # ------------------------------------------------------------ internals

    def _key(self, kind: str, job_id: str) -> str:
        return f"{self._root}{kind}{segment(job_id)}"

    async def _new_session(self) -> None:
        body = SessionRequest(Name=f"jobforge-service {self.name}", TTL=f"{self._ttl:g}s",
                              LockDelay=f"{self._heartbeat:g}s")
        _, answer, _ = await self._request("PUT", "/v1/session/create", data=body.model_dump_json(),
                                           headers={"Content-Type": "application/json"})
        try:
            self.session = SessionCreated.model_validate_json(answer).ID
        except ValidationError as exc:
            raise StoreError(f"unexpected answer from consul to session create: {exc}") from exc
        self._held.clear()
        await self._beat()
        log.info("replica %s: consul session %s (ttl %gs, heartbeat %gs, peers dead after %gs)", self.name,
                 self.session, self._ttl, self._heartbeat, self._timeout)

    async def _beat(self) -> None:
        """Renew the session and move the heartbeat key; a session Consul no longer knows is replaced (every
        lease of the old one is gone: other replicas drive those jobs now)."""
        if self.session is None:
            await self._new_session()
            return
        self._beats += 1
        try:
            status, _, _ = await self._request("PUT", f"/v1/session/renew/{self.session}", ok=(200, 404))
            if status == 404:
                raise _SessionGone
            value = Heartbeat(replica=self.name, beat=self._beats).model_dump_json()
            if not await self._lock_key(f"{self._root}{REPLICAS}{self.session}", value):
                raise _SessionGone
        except _SessionGone:
            log.warning("replica %s: session %s ended (declared dead or expired); its %d jobs are left to the "
                        "others", self.name, self.session, len(self._held))
            self.session = None
            await self._new_session()

    def _watch_peers(self, entries: Iterable[LockEntry]) -> None:
        now = time.monotonic()
        if self._last_scan is not None and now - self._last_scan > self._timeout / 2:
            self._seen.clear()  # this replica was stalled: judge nobody on what it saw before
        self._last_scan = now
        base, seen = self._root + REPLICAS, {}
        for entry in entries:
            if not entry.Key.startswith(base):
                continue
            peer = entry.Key[len(base):]
            if peer == self.session:
                continue
            if entry.Session is None:  # its session ended: the key is litter
                self._spawn_cleanup(entry.Key)
                continue
            index, since = self._seen.get(peer, (entry.ModifyIndex, now))
            if index != entry.ModifyIndex:
                since = now
            seen[peer] = (entry.ModifyIndex, since)
            if now - since >= self._timeout:
                log.warning("replica session %s sent no heartbeat for %.1fs: ending it, its jobs are taken over",
                            peer, now - since)
                self._spawn_cleanup(entry.Key, session=peer)
        self._seen = seen

    def _spawn_cleanup(self, key: str, session: str | None = None) -> None:
        async def clean() -> None:
            try:
                if session is not None:
                    await self._request("PUT", f"/v1/session/destroy/{session}")
                await self._request("DELETE", f"/v1/kv/{key}")
            except StoreError as exc:
                log.warning("cluster cleanup of %s failed: %s", key, exc.message)
        task = asyncio.get_running_loop().create_task(clean())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _entries(self) -> list[LockEntry]:
        status, body, _ = await self._request("GET", f"/v1/kv/{self._root}", "recurse", ok=(200, 404))
        if status == 404:
            return []
        try:
            return _LOCK_ENTRIES.validate_json(body)
        except ValidationError as exc:
            raise StoreError(f"unexpected data from consul under {self._root}: {exc}") from exc

    async def _lock_key(self, key: str, value: str) -> bool:
        if self.session is None:
            return False
        status, body, _ = await self._request("PUT", f"/v1/kv/{key}", ok=(200, 500),
                                              params={"acquire": self.session}, data=value.encode())
        if status == 500:
            if b"invalid session" in body:
                return False  # the next heartbeat replaces the session
            raise StoreError(f"consul answered HTTP 500 to acquire {key}: {body[:200].decode(errors='replace')}")
        try:
            return _BOOL.validate_json(body)
        except ValidationError as exc:
            raise StoreError(f"unexpected answer from consul to acquire {key}: {exc}") from exc

    async def _request(self, method: str, path: str, *flags: str, ok: tuple[int, ...] = (200,),
                       params: dict[str, Any] | None = None, blocking: bool = False,
                       **kwargs: Any) -> tuple[int, bytes, int]:
        """One call; returns status, body and X-Consul-Index. Transport errors and other statuses: StoreError.
        Blocking queries (watchers) use their own connection pool, so many watchers never delay a heartbeat."""
        params = {**(params or {}), **({"dc": self._dc} if self._dc else {})}
        query = [*flags, *(f"{k}={quote(str(v), safe='')}" for k, v in params.items())]
        url = f"{self._base}{path}" + (f"?{'&'.join(query)}" if query else "")
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers,
                                               timeout=aiohttp.ClientTimeout(total=self._request_timeout))
            self._watch_http = aiohttp.ClientSession(headers=self._headers, connector=aiohttp.TCPConnector(
                limit=_WATCH_CONNECTIONS), timeout=aiohttp.ClientTimeout(total=self._request_timeout))
        http = self._watch_http if blocking else self._http
        try:
            async with http.request(method, url, **kwargs) as resp:
                status, body = resp.status, await resp.read()
                index = resp.headers.get("X-Consul-Index", "0")
        except (aiohttp.ClientError, OSError) as exc:
            raise StoreError(f"consul at {self._base} unreachable: {exc!r}") from exc
        if status not in ok:
            raise StoreError(f"consul answered HTTP {status} to {method} {path}: "
                             f"{body[:300].decode(errors='replace').strip()}")
        return status, body, int(index) if index.isdigit() else 0
