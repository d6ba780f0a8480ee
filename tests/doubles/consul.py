"""A fake Consul agent on 127.0.0.1, shaped from shared/reference/consul-kv.md and its samples.

Covers what Job Forge talks to: KV (`GET` with `recurse`/`keys`/`separator`/`raw` and blocking `index`/`wait`,
`PUT` with `cas`/`flags`, `DELETE` with `recurse`/`cas`), `PUT /v1/txn` (KV verbs), `GET /v1/status/leader`,
the catalog as service discovery reads it (`GET /v1/catalog/service/:name`, `GET /v1/catalog/services`,
`GET /v1/health/service/:name`, all blocking on `index`/`wait`), the agent's own service registration
(`PUT /v1/agent/service/register`, `PUT /v1/agent/service/deregister/:id`) and `GET /v1/agent/self` (which
Prometheus' Consul SD asks for the datacenter). Checks of agent-registered services are kept as registered and
start `critical`, as Consul's do until they first run; the double never runs them (`set_check_status`). One Raft-like index is bumped by every write; `X-Consul-Index` follows the
reference's §4 rules; errors are plain text with Consul's status codes. Key names are checked like the newest
Consul does (`strict_keys=False` accepts the older, anything-goes keys of the docs' samples).

Test knobs: `outage = (status, text)` answers every request with that error; `acl_token` turns on a default-deny
ACL (no token: 403 `Permission denied`, a txn rolls back; another token: 403 `ACL not found`); `seen` records
every request. Run it in the test's loop (`await start()` / `await stop()`) or, for a subprocess, in a thread
(`with fake.in_thread() as addr:`).

Sessions as agent/session_endpoint.go and the state store have them: `PUT /v1/session/create` (defaults: node
check, `LockDelay` 15s, behavior `release`, no TTL; a numeric or string LockDelay under 1000 is seconds; a TTL
must lie in [10s, 24h]), `PUT /v1/session/destroy/:id` (true even when unknown), `PUT /v1/session/renew/:id` (404
`Session id '<id>' not found`), `GET /v1/session/info/:id` and `/v1/session/list`. A TTL session is invalidated
2 x TTL after its creation or last renewal (Consul's SessionTTLMultiplier: never before the TTL, no promise
after). Destroying or invalidating a session releases (behavior `release`) or deletes (`delete`) every key it
holds and puts those keys under the session's lock-delay. KV `PUT ?acquire=<session>` takes a free lock (or
updates the value of one the session holds; LockIndex counts acquisitions) and answers false while another
session holds it or a lock-delay runs; an unknown session is HTTP 500 `invalid session "<id>"`.
`PUT ?release=<session>` frees a lock the session holds (false otherwise) and sets the value.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from urllib.parse import urlencode

from aiohttp import web

from tests.doubles._serve import serve_on_loopback, served_in_thread

KV_MAX_VALUE_SIZE = 512 * 1024
MAX_TXN_OPS = 64
DEFAULT_WAIT, MAX_WAIT = 300.0, 600.0
_SUSPICIOUS = (".js", ".css", ".html", ".htm", ".xml", ".json", ".txt", ".log", ".php", ".asp", ".jsp", ".cgi", ".pl",
               ".py", ".rb", ".sh", ".exe", ".dll", ".bat", ".cmd", ".com", ".scr", ".vbs", ".pdf", ".doc", ".docx",
               ".xls", ".xlsx", ".ppt", ".pptx", ".zip", ".rar", ".tar", ".gz", ".7z", ".bz2", ".jpg", ".jpeg", ".png",
               ".gif", ".svg", ".ico", ".bmp", ".mp3", ".mp4", ".avi", ".mov", ".wmv", ".flv", ".swf", ".woff",
               ".woff2", ".ttf", ".eot", ".otf")
_KEY_CHARS = re.compile(r"[A-Za-z0-9,\-_./]")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
SESSION_TTL_MIN, SESSION_TTL_MAX = 10.0, 86400.0
SESSION_TTL_MULTIPLIER = 2
_LOCK_DELAY_MIN_THRESHOLD = 1000  # ns: smaller numbers are taken as seconds (FixupLockDelay)
_WRITE_VERBS = {"set", "cas", "delete", "delete-cas", "delete-tree", "lock", "unlock"}


class Seen(NamedTuple):
    method: str
    path: str
    query: str
    token: str | None


class _Refused(Exception):
    """A request Consul refuses: plain-text body with this status."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


# ---------------------------------------------------------------- the KV table

@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None

    def to_json(self, with_value: bool = True) -> dict[str, Any]:
        """Field names and order of Consul's DirEntry; `Session` only while a lock is held."""
        out: dict[str, Any] = {"LockIndex": self.lock_index, "Key": self.key, "Flags": self.flags,
                               "Value": base64.b64encode(self.value).decode() if with_value and self.value else None}
        if self.session:
            out["Session"] = self.session
        return {**out, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


@dataclass
class Table:
    entries: dict[str, Entry] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Table:
        return Table(dict(self.entries), dict(self.tombstones))

    def under(self, prefix: str) -> list[Entry]:
        return [self.entries[k] for k in sorted(self.entries) if k.startswith(prefix)]

    def set(self, key: str, value: bytes, flags: int, idx: int) -> Entry:
        old = self.entries.get(key)
        entry = (replace(old, value=value or None, flags=flags, modify_index=idx) if old
                 else Entry(key, value or None, flags, create_index=idx, modify_index=idx))
        self.entries[key] = entry
        return entry

    def cas(self, key: str, value: bytes, flags: int, expected: int, idx: int) -> Entry | None:
        old = self.entries.get(key)
        if (old is None) != (expected == 0) or (old is not None and old.modify_index != expected):
            return None
        return self.set(key, value, flags, idx)

    def delete(self, key: str, idx: int) -> None:
        if self.entries.pop(key, None) is not None:
            self.tombstones[key] = idx

    def delete_cas(self, key: str, expected: int, idx: int) -> bool:
        old = self.entries.get(key)
        if old is None or old.modify_index != expected:
            return old is None
        self.delete(key, idx)
        return True

    def delete_tree(self, prefix: str, idx: int) -> None:
        for entry in self.under(prefix):
            self.delete(entry.key, idx)

    def index_of(self, key: str, prefix: bool) -> int:
        """X-Consul-Index per the reference's §4 (before the final "at least 1")."""
        table = max([e.modify_index for e in self.entries.values()] + [*self.tombstones.values(), 0])
        if not prefix:
            return self.entries[key].modify_index if key in self.entries else table
        if key == "":
            return table
        sub = max([e.modify_index for e in self.under(key)] +
                  [i for k, i in self.tombstones.items() if k.startswith(key)] + [0])
        return sub or table


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay: float
    behavior: str
    ttl: str
    node_checks: list[str]
    create_index: int
    modify_index: int
    timer: asyncio.TimerHandle | None = None

    def to_json(self) -> dict[str, Any]:
        """Field names of structs.Session as the session endpoints return it (LockDelay in nanoseconds)."""
        return {"ID": self.id, "Name": self.name, "Node": self.node, "LockDelay": int(self.lock_delay * 1e9),
                "Behavior": self.behavior, "TTL": self.ttl, "NodeChecks": self.node_checks, "ServiceChecks": None,
                "Namespace": "default", "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


def _go_duration(text: str) -> float:
    """time.ParseDuration, in seconds; `_Refused` text as Go's error for the caller to wrap."""
    parts = _DURATION.findall(text)
    if text in ("0",):
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f'time: invalid duration "{text}"')
    return sum(float(n) * _UNITS[u] for n, u in parts)


def check_key(key: str) -> None:
    """The newest upstream key check (reference §2)."""
    if key.startswith("/"):
        raise _Refused(400, "key must not begin with a '/'")
    for pos, char in enumerate(key):
        if not _KEY_CHARS.fullmatch(char):
            raise _Refused(400, f"key contains invalid character '{char}' at position {pos}. "
                                "Only alphanumeric characters and ,-_./ are allowed")
    if "../" in key:
        raise _Refused(400, "key contains path traversal sequence")
    for ext in _SUSPICIOUS:
        if key.lower().endswith(ext):
            raise _Refused(400, f"key contains suspicious file extension '{ext}' that may be cached by proxies")


def parse_wait(text: str | None) -> float:
    if text is None:
        return DEFAULT_WAIT
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise _Refused(400, "Invalid wait time")
    return min(sum(float(n) * _UNITS[u] for n, u in parts), MAX_WAIT)


def _uint(params, name: str) -> int:
    raw = params.get(name, "")
    if not raw.isdigit():
        raise _Refused(500, f'strconv.ParseUint: parsing "{raw}": invalid syntax')
    return int(raw)


# ---------------------------------------------------------------- agent services, catalog and health

_HEALTH = {"passing", "warning", "critical"}


def _field(body: dict[str, Any], name: str) -> Any:
    """A JSON field matched case-insensitively, as Consul's decoder does."""
    for key, value in body.items():
        if key.lower() == name.lower():
            return value
    return None


def _agent_check(raw: Any, number: int, service_id: str, service_name: str, node: str) -> dict[str, Any]:
    """An agent check definition -> the HealthCheck the catalog shows; refused like CheckType.Validate."""
    if not isinstance(raw, dict):
        raise _Refused(400, "Request decode failed: checks must be objects")
    kinds = [k for k in ("HTTP", "TCP", "GRPC", "TTL", "Args", "DockerContainerID", "H2PING", "UDP")
             if _field(raw, k)]
    if not kinds:
        raise _Refused(400, "Invalid check: Must provide TTL or Script/DockerContainerID/HTTP/TCP/UDP/H2PING/"
                            "GRPC/AliasNode/AliasService interval")
    interval = _field(raw, "Interval")
    if kinds[0] != "TTL" and (not interval or parse_wait(str(interval)) <= 0):
        raise _Refused(400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks")
    status = _field(raw, "Status") or "critical"
    if status not in _HEALTH:
        raise _Refused(400, "Status for checks must 'passing', 'warning', 'critical'")
    check_id = _field(raw, "CheckID") or _field(raw, "ID") or f"service:{service_id}" + (f":{number}" if number else "")
    definition = {"Interval": interval or "", "Timeout": _field(raw, "Timeout") or ""}
    for kind in ("HTTP", "TCP"):
        if _field(raw, kind):
            definition[kind] = _field(raw, kind)
    return {"Node": node, "CheckID": check_id, "Name": _field(raw, "Name") or f"Service '{service_name}' check",
            "Status": status, "Notes": _field(raw, "Notes") or "", "Output": "", "ServiceID": service_id,
            "ServiceName": service_name, "ServiceTags": [], "Type": kinds[0].lower(), "Definition": definition}


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as exc:
        raise _Refused(400, f"Request decode failed: {exc}") from None
    if not isinstance(body, dict):
        raise _Refused(400, "Request decode failed: json: cannot unmarshal into Go value of type "
                            "structs.ServiceDefinition")
    return body


class _AgentMixin:
    """The agent's service endpoints and the catalog/health reads that service discovery makes."""

    async def _agent_register(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        body = await _json_body(request)
        name = _field(body, "Name")
        if not isinstance(name, str) or not name:
            raise _Refused(400, "Missing service name")
        port = _field(body, "Port") or 0
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise _Refused(400, "Request decode failed: invalid port")
        service_id = _field(body, "ID") or name
        meta = _field(body, "Meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _Refused(400, "Invalid Service Meta: values must be strings")
        raw_checks = list(_field(body, "Checks") or []) + ([_field(body, "Check")] if _field(body, "Check") else [])
        checks = [_agent_check(raw, i + 1 if len(raw_checks) > 1 else 0, service_id, name, "node-1")
                  for i, raw in enumerate(raw_checks)]
        self.register_service(name, port, address=_field(body, "Address") or "", service_id=service_id,
                              tags=list(_field(body, "Tags") or []), meta=meta)
        self.checks[service_id] = checks
        return web.Response(status=200)

    async def _agent_deregister(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        service_id = request.match_info["service_id"]
        if not self.deregister_service(service_id):
            raise _Refused(404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                                "not the service name.")
        return web.Response(status=200)

    async def _agent_self(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        return web.json_response({"Config": {"Datacenter": self.datacenter, "NodeName": "node-1",
                                             "NodeID": "40e4a748-2192-161a-0510-9bf59fe950b5",
                                             "Server": True, "Version": "1.16.0"},
                                  "Member": {"Name": "node-1", "Addr": "127.0.0.1", "Port": 8301}})

    async def _catalog_services(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        index = await self._block(request, lambda: self.catalog_index)
        names: dict[str, list[str]] = {"consul": []}
        for entry in self.services:
            tags = names.setdefault(entry["ServiceName"], [])
            tags.extend(t for t in entry["ServiceTags"] if t not in tags)
        return web.json_response(dict(sorted(names.items())), headers=self._read_headers(index))

    async def _health_service(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        name = request.match_info["name"]
        if not name:
            raise _Refused(400, "Missing service name")
        index = await self._block(request, lambda: self.catalog_index)
        wanted_tags = request.query.getall("tag", [])
        passing_only = "passing" in request.query
        out = []
        for entry in self.services:
            if entry["ServiceName"] != name or not set(wanted_tags) <= set(entry["ServiceTags"]):
                continue
            checks = [dict(c, ServiceTags=list(entry["ServiceTags"])) for c in self.checks.get(entry["ServiceID"], [])]
            if passing_only and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({
                "Node": {"ID": entry["ID"], "Node": entry["Node"], "Address": entry["Address"],
                         "Datacenter": entry["Datacenter"], "TaggedAddresses": entry["TaggedAddresses"],
                         "Meta": entry["NodeMeta"], "CreateIndex": entry["CreateIndex"],
                         "ModifyIndex": entry["ModifyIndex"]},
                "Service": {"ID": entry["ServiceID"], "Service": name, "Tags": entry["ServiceTags"],
                            "Address": entry["ServiceAddress"], "TaggedAddresses": entry["ServiceTaggedAddresses"],
                            "Meta": entry["ServiceMeta"], "Port": entry["ServicePort"], "Weights":
                            {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "Proxy": entry["ServiceProxy"],
                            "Connect": {}, "Namespace": "default", "Datacenter": entry["Datacenter"],
                            "CreateIndex": entry["CreateIndex"], "ModifyIndex": entry["ModifyIndex"]},
                "Checks": checks,
            })
        return web.json_response(out, headers=self._read_headers(index))


# ---------------------------------------------------------------- the agent

class FakeConsul(_AgentMixin):
    def __init__(self, *, datacenter: str = "dc1", leader: str = "127.0.0.1:8300", acl_token: str | None = None,
                 strict_keys: bool = True, kv_max_value_size: int = KV_MAX_VALUE_SIZE) -> None:
        self.datacenter, self.leader, self.acl_token = datacenter, leader, acl_token
        self.strict_keys, self.kv_max_value_size = strict_keys, kv_max_value_size
        self.table = Table()
        self.index = 0
        self.services: list[dict[str, Any]] = []
        self.checks: dict[str, list[dict[str, Any]]] = {}  # service ID -> health checks (HealthCheck JSON)
        self.catalog_index = 0
        self.outage: tuple[int, str] | None = None
        self.seen: list[Seen] = []
        self.sessions: dict[str, Session] = {}
        self.lock_delays: dict[str, float] = {}  # key -> loop time until which it cannot be acquired
        self.port: int | None = None
        self._changed: asyncio.Event | None = None
        self._closing = False
        self._runner: web.AppRunner | None = None

    @property
    def addr(self) -> str:
        """`host:port` without a scheme, as CONSUL_HTTP_ADDR usually is."""
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._changed, self._closing = asyncio.Event(), False
        app = web.Application(middlewares=[self._agent], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/v1/kv/{key:.*}", self._kv)
        app.router.add_route("*", "/v1/txn", self._txn)
        app.router.add_route("*", "/v1/status/leader", self._leader)
        app.router.add_route("*", "/v1/catalog/service/{name:.*}", self._catalog)
        app.router.add_route("*", "/v1/catalog/services", self._catalog_services)
        app.router.add_route("*", "/v1/health/service/{name:.*}", self._health_service)
        app.router.add_route("*", "/v1/agent/service/register", self._agent_register)
        app.router.add_route("*", "/v1/agent/service/deregister/{service_id:.*}", self._agent_deregister)
        app.router.add_route("*", "/v1/agent/self", self._agent_self)
        app.router.add_route("*", "/v1/session/create", self._session_create)
        app.router.add_route("*", "/v1/session/destroy/{id:.*}", self._session_destroy)
        app.router.add_route("*", "/v1/session/renew/{id:.*}", self._session_renew)
        app.router.add_route("*", "/v1/session/info/{id:.*}", self._session_info)
        app.router.add_route("*", "/v1/session/list", self._session_list)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = await serve_on_loopback(self._runner)
        return self.addr

    async def stop(self) -> None:
        for session in self.sessions.values():
            if session.timer is not None:
                session.timer.cancel()
        if self._runner is not None:
            self._closing = True
            self._wake()  # blocked queries return at once
            await self._runner.cleanup()
            self._runner = None

    def in_thread(self) -> AbstractContextManager[str]:
        """Serve from a thread with its own loop (for a service subprocess); yields the address."""
        return served_in_thread(self.start, self.stop, "fake-consul")

    # ------------------------------------------------------------ test helpers

    def register_service(self, name: str, port: int, *, address: str = "", service_id: str | None = None,
                         tags: list[str] | None = None, meta: dict[str, str] | None = None,
                         node: str = "node-1", node_address: str = "127.0.0.1") -> dict[str, Any]:
        """Add a catalog entry with exactly the fields of catalog-service-response.json."""
        self.index += 1
        self.catalog_index = self.index
        self.services = [e for e in self.services if e["ServiceID"] != (service_id or name)]
        effective = address or node_address
        entry = {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": node, "Address": node_address,
            "Datacenter": self.datacenter, "TaggedAddresses": {"lan": node_address, "wan": node_address},
            "NodeMeta": {}, "CreateIndex": self.index, "ModifyIndex": self.index,
            "ServiceAddress": address, "ServiceEnableTagOverride": False, "ServiceID": service_id or name,
            "ServiceName": name, "ServicePort": port, "ServiceMeta": meta or {},
            "ServiceTaggedAddresses": {"lan": {"address": effective, "port": port},
                                       "wan": {"address": effective, "port": port}},
            "ServiceTags": tags or [],
            "ServiceProxy": {"DestinationServiceName": "", "DestinationServiceID": "", "LocalServiceAddress": "",
                             "LocalServicePort": 0, "Config": None, "Upstreams": None},
            "ServiceConnect": {"Native": False, "Proxy": None}, "Namespace": "default",
        }
        self.services.append(entry)
        self._wake()
        return entry

    def deregister_service(self, service_id: str) -> bool:
        """Remove a service instance (and its checks); False if there was none."""
        before = len(self.services)
        self.services = [e for e in self.services if e["ServiceID"] != service_id]
        self.checks.pop(service_id, None)
        if len(self.services) == before:
            return False
        self.index += 1
        self.catalog_index = self.index
        self._wake()
        return True

    def set_check_status(self, service_id: str, status: str) -> None:
        """What a check run would do: every check of `service_id` becomes `status` (passing/warning/critical)."""
        for check in self.checks.get(service_id, []):
            check["Status"] = status
        self.index += 1
        self.catalog_index = self.index
        self._wake()

    def hold_lock(self, key: str, session: str) -> None:
        """Mark an existing key as locked by `session` (what `?acquire=` would do), to show the `Session` field."""
        old = self.table.entries[key]
        self.table.entries[key] = replace(old, session=session, lock_index=old.lock_index + 1)

    def expire_session(self, session_id: str) -> None:
        """What the TTL timer does when it fires (tests: no waiting for 2 x TTL)."""
        self._invalidate(session_id)

    # ------------------------------------------------------------ /v1/session

    async def _session_create(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        raw = await request.read()
        body: dict[str, Any] = {}
        if raw:
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("json: cannot unmarshal into Go value of type structs.Session")
                delay = _field(body, "LockDelay")
                lock_delay = 15.0
                if isinstance(delay, str):
                    lock_delay = _go_duration(delay)
                    lock_delay = lock_delay if lock_delay * 1e9 >= _LOCK_DELAY_MIN_THRESHOLD else lock_delay * 1e9
                elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
                    lock_delay = delay / 1e9 if delay >= _LOCK_DELAY_MIN_THRESHOLD else float(delay)
                elif delay is not None:
                    raise ValueError("LockDelay: expected a duration")
            except ValueError as exc:
                raise _Refused(400, f"Request decode failed: {exc}") from None
        else:
            lock_delay = 15.0
        checked = [k for k in body if k.lower() in ("checks", "nodechecks")]
        checks = list(body[checked[0]] or []) if checked else ["serfHealth"]
        behavior = _field(body, "Behavior") or "release"
        if behavior not in ("release", "delete"):
            raise _Refused(500, f"Invalid Behavior setting '{behavior}'")
        ttl = _field(body, "TTL") or ""
        if ttl:
            try:
                seconds = _go_duration(str(ttl))
            except ValueError as exc:
                raise _Refused(500, f"Session TTL '{ttl}' invalid: {exc}") from None
            if seconds != 0 and not SESSION_TTL_MIN <= seconds <= SESSION_TTL_MAX:
                raise _Refused(500, f"Invalid Session TTL '{int(seconds * 1e9)}', must be between [10s=24h0m0s]")
        self.index += 1
        session = Session(str(uuid.uuid4()), str(_field(body, "Name") or ""), str(_field(body, "Node") or "node-1"),
                          lock_delay, behavior, str(ttl), checks, self.index, self.index)
        self.sessions[session.id] = session
        self._arm(session)
        self._wake()
        return web.json_response({"ID": session.id})

    async def _session_destroy(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        if not request.match_info["id"]:
            raise _Refused(400, "Missing session")
        self._invalidate(request.match_info["id"])
        return web.json_response(True)

    async def _session_renew(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        session_id = request.match_info["id"]
        if not session_id:
            raise _Refused(400, "Missing session")
        session = self.sessions.get(session_id)
        if session is None:
            raise _Refused(404, f"Session id '{session_id}' not found")
        self._arm(session)
        return web.json_response([session.to_json()])

    async def _session_info(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        session = self.sessions.get(request.match_info["id"])
        return web.json_response([session.to_json()] if session else [], headers=self._read_headers(self.index))

    async def _session_list(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        return web.json_response([s.to_json() for s in self.sessions.values()],
                                 headers=self._read_headers(self.index))

    def _arm(self, session: Session) -> None:
        """(Re)start the TTL timer: invalidation at 2 x TTL, as the Consul leader's session timers do."""
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        seconds = _go_duration(session.ttl) if session.ttl else 0.0
        if seconds:
            loop = asyncio.get_running_loop()
            session.timer = loop.call_later(seconds * SESSION_TTL_MULTIPLIER, self._invalidate, session.id)

    def _invalidate(self, session_id: str) -> None:
        """Destroy a session: its keys are released (or deleted) and put under its lock-delay."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session.timer is not None:
            session.timer.cancel()
        now = asyncio.get_running_loop().time()
        table, idx = self.table.copy(), self.index + 1
        for entry in [e for e in table.entries.values() if e.session == session_id]:
            if session.behavior == "delete":
                table.delete(entry.key, idx)
            else:
                table.entries[entry.key] = replace(entry, session=None, modify_index=idx)
            if session.lock_delay > 0:
                self.lock_delays[entry.key] = now + session.lock_delay
        self.table, self.index = table, idx  # the session's deletion is a write even when it held no key
        self._wake()

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _agent(self, request: web.Request, handler) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, request.query_string, _token(request)))
        try:
            if self.outage is not None:
                raise _Refused(*self.outage)
            if request.query.get("dc", self.datacenter) not in ("", self.datacenter):
                raise _Refused(500, "No path to datacenter")
            response = await handler(request)
        except _Refused as refused:
            response = web.Response(status=refused.status, text=refused.text, headers=refused.headers)
        response.headers["X-Consul-Default-ACL-Policy"] = "deny" if self.acl_token else "allow"
        return response

    def _authorize(self, request: web.Request) -> bool:
        """True if allowed; False for the anonymous token under default deny; raises for an unknown token."""
        if self.acl_token is None:
            return True
        token = _token(request)
        if token and token != self.acl_token:
            raise _Refused(403, "ACL not found")
        return token == self.acl_token

    def _commit(self, change: Callable[[Table, int], Any]) -> Any:
        """Apply `change` to a copy at the next index; keep it (and bump the index) only if something changed."""
        table, idx = self.table.copy(), self.index + 1
        result = change(table, idx)
        self._keep(table, idx)
        return result

    def _keep(self, table: Table, idx: int) -> None:
        if table != self.table:
            self.table, self.index = table, idx
            self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _block(self, request: web.Request, current: Callable[[], int]) -> int:
        """A blocking query: wait until `current()` passes `?index=` or `?wait=` runs out."""
        if "index" not in request.query:
            return max(current(), 1)
        raw = request.query["index"]
        if not raw.isdigit():
            raise _Refused(400, "Invalid index")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + parse_wait(request.query.get("wait"))
        while current() <= int(raw) and not self._closing and self._changed is not None:
            try:
                await asyncio.wait_for(self._changed.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                break
        return max(current(), 1)

    @staticmethod
    def _read_headers(index: int) -> dict[str, str]:
        return {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}

    # ------------------------------------------------------------ /v1/kv

    async def _kv(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if key and self.strict_keys:
            check_key(key)
        handler = {"GET": self._kv_get, "PUT": self._kv_put, "DELETE": self._kv_delete}.get(request.method)
        if handler is None:
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET,PUT,DELETE"})
        return await handler(request, key)

    async def _kv_get(self, request: web.Request, key: str) -> web.StreamResponse:
        query = request.query
        listing = "keys" in query or "recurse" in query
        if not listing and not key:
            raise _Refused(400, "Missing key name")
        allowed = self._authorize(request)
        if not allowed and not listing:
            raise _Refused(403, "Permission denied")
        index = await self._block(request, lambda: self.table.index_of(key, listing))
        headers = self._read_headers(index)
        visible = self.table.under(key) if listing else [e for e in [self.table.entries.get(key)] if e]
        visible = visible if allowed else []  # default deny filters listings rather than refusing them
        if "keys" in query:
            return self._keys(key, visible, query, headers)
        if not visible:
            return web.Response(status=404, headers=headers)
        if "raw" in query and not listing:
            return web.Response(body=visible[0].value or b"", headers={
                **headers, "Content-Type": "text/plain", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "sandbox"})
        return web.json_response([e.to_json() for e in visible], headers=headers)

    @staticmethod
    def _keys(prefix: str, entries: list[Entry], query, headers: dict[str, str]) -> web.Response:
        sep = query.get("separator", query.get("seperator", ""))
        keys: list[str] = []
        for entry in entries:
            rest = entry.key[len(prefix):]
            name = prefix + rest[:rest.index(sep) + len(sep)] if sep and sep in rest else entry.key
            if not keys or keys[-1] != name:
                keys.append(name)
        if not keys and prefix:
            return web.Response(status=404, headers=headers)
        return web.json_response(keys, headers=headers)

    async def _kv_put(self, request: web.Request, key: str) -> web.Response:
        query = request.query
        if not key:
            raise _Refused(400, "Missing key name")
        _conflicting(request, "cas", "acquire", "release")
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        flags = _uint(query, "flags") if "flags" in query else 0
        cas = _uint(query, "cas") if "cas" in query else None
        value = await request.read()
        if len(value) > self.kv_max_value_size:
            raise _Refused(413, f"Request body({len(value)} bytes) too large, max size: "
                                f"{self.kv_max_value_size} bytes. See https://developer.hashicorp.com/docs/agent/"
                                "config/config-files#kv_max_value_size.")
        if "acquire" in query:
            return web.json_response(self._acquire(key, value, flags, query["acquire"]))
        if "release" in query:
            return web.json_response(self._release(key, value, flags, query["release"]))
        if cas is None:
            self._commit(lambda t, idx: t.set(key, value, flags, idx))
            return web.json_response(True)
        return web.json_response(self._commit(lambda t, idx: t.cas(key, value, flags, cas, idx)) is not None)

    def _acquire(self, key: str, value: bytes, flags: int, session_id: str) -> bool:
        """kvsLockTxn, after the KVS endpoint's lock-delay check."""
        if not session_id:
            raise _Refused(500, "missing session")
        if session_id not in self.sessions:
            raise _Refused(500, f'invalid session "{session_id}"')
        if self.lock_delays.get(key, 0.0) > asyncio.get_running_loop().time():
            return False

        def lock(table: Table, idx: int) -> bool:
            old = table.entries.get(key)
            if old is not None and old.session not in (None, session_id):
                return False
            if old is None:
                table.entries[key] = Entry(key, value or None, flags, idx, idx, lock_index=1, session=session_id)
            else:
                lock_index = old.lock_index + (0 if old.session == session_id else 1)
                table.entries[key] = replace(old, value=value or None, flags=flags, modify_index=idx,
                                             lock_index=lock_index, session=session_id)
            return True
        return self._commit(lock)

    def _release(self, key: str, value: bytes, flags: int, session_id: str) -> bool:
        """kvsUnlockTxn: only the holder releases; the value is set as with a plain PUT."""
        if not session_id:
            raise _Refused(500, "missing session")

        def unlock(table: Table, idx: int) -> bool:
            old = table.entries.get(key)
            if old is None or old.session != session_id:
                return False
            table.entries[key] = replace(old, value=value or None, flags=flags, modify_index=idx, session=None)
            return True
        return self._commit(unlock)

    async def _kv_delete(self, request: web.Request, key: str) -> web.Response:
        query = request.query
        _conflicting(request, "recurse", "cas")
        if "recurse" not in query and not key:
            raise _Refused(400, "Missing key name")
        if not self._authorize(request):
            raise _Refused(403, "Permission denied")
        if "recurse" in query:
            self._commit(lambda t, idx: t.delete_tree(key, idx))
            return web.json_response(True)
        if "cas" in query:
            cas = _uint(query, "cas")
            return web.json_response(self._commit(lambda t, idx: t.delete_cas(key, cas, idx)))
        self._commit(lambda t, idx: t.delete(key, idx))
        return web.json_response(True)

    # ------------------------------------------------------------ /v1/txn

    async def _txn(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "PUT"})
        body = await request.read()
        if len(body) > self.kv_max_value_size:
            raise _Refused(413, f"Request body too large, max size: {self.kv_max_value_size} bytes")
        ops = _parse_txn(body)
        if len(ops) > MAX_TXN_OPS:
            raise _Refused(413, f"Transaction contains too many operations ({len(ops)} > {MAX_TXN_OPS})")
        for op in ops:
            if len(op["Value"]) > self.kv_max_value_size:
                raise _Refused(413, f'Value for key "{op["Key"]}" is too large '
                                    f'({len(op["Value"])} > {self.kv_max_value_size} bytes)')
        writes = any(op["Verb"] in _WRITE_VERBS for op in ops)
        if not self._authorize(request):
            errors = [{"OpIndex": i, "What": "Permission denied"} for i in range(len(ops))]
            return web.json_response({"Results": None, "Errors": errors}, status=409)
        table, idx = self.table.copy(), self.index + 1  # all-or-nothing: work on a copy
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            try:
                results.extend({"KV": kv} for kv in _txn_op(table, idx, op))
            except _Refused as failed:
                errors.append({"OpIndex": i, "What": failed.text})
        if errors:
            return web.json_response({"Results": None, "Errors": errors}, status=409)
        if writes:
            self._keep(table, idx)
        headers = {} if writes else {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
        return web.json_response({"Results": results, "Errors": None}, headers=headers)

    # ------------------------------------------------------------ status and catalog

    async def _leader(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        return web.json_response(self.leader)

    async def _catalog(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise _Refused(405, f"method {request.method} not allowed", {"Allow": "GET"})
        name = request.match_info["name"]
        if not name:
            raise _Refused(400, "Missing service name")
        index = await self._block(request, lambda: self.catalog_index)
        entries = [e for e in self.services if e["ServiceName"] == name]
        return web.json_response(entries, headers=self._read_headers(index))


def _token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    bearer = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
    return request.headers.get("X-Consul-Token") or bearer or request.query.get("token")


def _conflicting(request: web.Request, *flags: str) -> None:
    if sum(flag in request.query for flag in flags) > 1:
        raise _Refused(400, f"Conflicting flags: {urlencode(sorted(request.query.items()))}\n")


def _parse_txn(body: bytes) -> list[dict[str, Any]]:
    """The KV ops of a txn body, Value decoded; JSON keys match case-insensitively, as with Go's decoder."""
    def lower(obj: dict[str, Any]) -> dict[str, Any]:
        return {k.lower(): v for k, v in obj.items()}

    try:
        raw = json.loads(body)
        if not isinstance(raw, list):
            raise TypeError("json: cannot unmarshal object into Go value of type api.TxnOps")
        ops = []
        for item in raw:
            if "kv" not in lower(item):
                raise _Refused(400, "fake consul: only KV operations are implemented")
            kv = lower(lower(item)["kv"])
            try:
                value = base64.b64decode(kv.get("value") or "", validate=True)
            except ValueError as exc:
                raise ValueError(f"failed to decode value: {exc}") from None
            ops.append({"Verb": kv.get("verb", ""), "Key": kv.get("key", ""), "Flags": int(kv.get("flags") or 0),
                        "Index": int(kv.get("index") or 0), "Value": value})
        return ops
    except (ValueError, TypeError, AttributeError) as exc:
        raise _Refused(400, f"Failed to parse body: {exc}") from None


def _txn_op(table: Table, idx: int, op: dict[str, Any]) -> list[dict[str, Any]]:
    """One KV op inside a txn (verbs per the Consul state store); raises `_Refused` with Consul's error text."""
    verb, key = op["Verb"], op["Key"]
    if verb == "set":
        return [table.set(key, op["Value"], op["Flags"], idx).to_json(with_value=False)]
    if verb == "cas":
        entry = table.cas(key, op["Value"], op["Flags"], op["Index"], idx)
        if entry is None:
            raise _Refused(409, f'failed to set key "{key}", index is stale')
        return [entry.to_json(with_value=False)]
    if verb in ("get", "get-or-empty"):
        entry = table.entries.get(key)
        if entry is None and verb == "get":
            raise _Refused(409, f'key "{key}" doesn\'t exist')
        return [(entry or Entry(key, None, 0, 0, 0)).to_json()]
    if verb == "get-tree":
        return [e.to_json() for e in table.under(key)]
    if verb == "check-index":
        entry = table.entries.get(key)
        if entry is None:
            raise _Refused(409, f'failed to check index, key "{key}" doesn\'t exist')
        if entry.modify_index != op["Index"]:
            raise _Refused(409, f'failed index check for key "{key}", current modify index '
                                f'{entry.modify_index} != {op["Index"]}')
        return [entry.to_json(with_value=False)]
    if verb == "check-not-exists":
        if key in table.entries:
            raise _Refused(409, f'key "{key}" exists')
        return []
    if verb == "delete":
        table.delete(key, idx)
        return []
    if verb == "delete-cas":
        if not table.delete_cas(key, op["Index"], idx):
            raise _Refused(409, f'failed to delete key "{key}", index is stale')
        return []
    if verb == "delete-tree":
        table.delete_tree(key, idx)
        return []
    raise _Refused(409, f'unknown KV verb "{verb}"')
