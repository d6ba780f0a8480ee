"""A fake Vault server (one KV v2 mount) on 127.0.0.1.

Shaped from shared/reference/vault-kv2.md and vault-samples/; where those are silent, from the sources named inline.

Server (`FakeVault`): `/v1/<mount>/data/<path>` (GET `?version=`, POST/PUT with `options.cas`, DELETE = soft delete),
`metadata/` (GET, LIST or `GET ?list=true`, POST `max_versions`/`cas_required`/`custom_metadata`, DELETE),
`delete/`, `undelete/`, `destroy/`, `config`; `sys/health` (unauthenticated, the API docs' shape) and
`sys/internal/ui/mounts/<path>` (consul-template's KV v2 preflight). KV semantics follow vault-plugin-secrets-kv
(path_data.go, path_metadata.go, path_delete.go, path_destroy.go): version numbers, `current_version`,
`oldest_version` and `max_versions` pruning, CAS with `cas_required` (engine or key), deleted/destroyed versions
answering 404 with a normal envelope, unknown paths and versions 404 `{"errors":[]}`, v1-style paths 404 with
the "Invalid path for a versioned K/V secrets engine" warning. Bodies are written like Go's encoding/json (the
envelope in struct order, map keys sorted, `<>&` escaped, a final newline) with `Content-Type: application/json`
exactly (hvac parses error bodies only then). Read data holds numbers as float64, as the plugin does.

Auth: `X-Vault-Token` or `Authorization: Bearer`. `root_token` may do anything; `add_token(token, *policies)`
gives a token ACL rules `{path: [capabilities]}` matched like Vault (exact path, else the longest `*` glob; `deny`
wins; POST/PUT needs `create` for a new key and `update` for an existing one; LIST is checked on the path with a
trailing `/`). Missing or unknown token: 403 `{"errors":["permission denied"]}` (Vault >= 1.16 adds a second
entry, "invalid token", for unknown tokens); denied by policy: 403 with Vault's go-multierror text.
Knobs: `sealed` (every request 503 "Vault is sealed", sys/health 503), `seen` (every request), `clock`
(ns since the epoch; the fake never lets time stand still). Run it in the test's loop (`await start()` /
`await stop()`) or, for blocking clients such as hvac, in a thread (`with fake.in_thread() as url:`).

Templates: consul_template.py renders consul-template's `secret` reads through `FakeVault.handle` (in-process,
no HTTP), for both the Vault tests and the fake Nomad's client.

Login and token lifetime (the shapes of Vault's api docs for AppRole and the token auth method): `add_approle`
registers a role; `POST auth/approle/login` issues a token with the role's policies, `ttl` and `renewable`;
`GET auth/token/lookup-self` answers its remaining `ttl`; `POST auth/token/renew-self` extends a renewable token
by its ttl. A token past its expiry is unknown (403). Root and `add_token` tokens never expire (ttl 0).

Not implemented: PATCH, non-zero delete_version_after, `+` in policy paths, namespaces, wrapping, leases, other
mounts and sys endpoints, max_ttl.
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from tests.doubles._serve import serve_on_loopback, served_in_thread

DEFAULT_MAX_VERSIONS = 10  # vault-plugin-secrets-kv: defaultMaxVersions
CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list", "sudo", "deny"})
PERMISSION_DENIED = "permission denied"  # no token, or one Vault does not know
POLICY_DENIED = "1 error occurred:\n\t* permission denied\n\n"  # ACL denial, wrapped by go-multierror
UNSUPPORTED_OPERATION = "1 error occurred:\n\t* unsupported operation\n\n"
INVALID_KV2_PATH = ("Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API "
                    "endpoints to use. If using the Vault CLI, use 'vault kv {}' for this operation.")
_CLI_VERB = {"read": "get", "list": "list", "create": "put", "update": "put", "delete": "delete"}
_OPERATION = {"GET": "read", "LIST": "list", "POST": "update", "PUT": "update", "DELETE": "delete"}
_GO_TRUE, _GO_FALSE = {"1", "t", "T", "TRUE", "true", "True"}, {"0", "f", "F", "FALSE", "false", "False"}


class Seen(NamedTuple):
    method: str
    path: str  # after /v1/
    query: str
    token: str | None


class _Refused(Exception):
    """An error reply: `{"errors": [...]}` with this status."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, *errors)
        self.status, self.errors = status, list(errors)


# ---------------------------------------------------------------- JSON as Go writes it

class Struct(dict):
    """A JSON object written in insertion order (a Go struct); a plain dict is a Go map: keys sorted."""


class Number(str):
    """A JSON number kept as its text, like Go's json.Number (what Vault's client hands to templates)."""


_GO_ESCAPES = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _go_string(text: str) -> str:
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if "\ud800" <= char <= "\udfff":
            return "\ufffd"  # Go's decoder already turned a lone surrogate into U+FFFD
        return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"
    return '"' + _GO_ESCAPES.sub(escape, text) + '"'


def go_float(value: float) -> str:
    """strconv.FormatFloat as encoding/json uses it: shortest digits, 'e' form below 1e-6 and from 1e21."""
    if not math.isfinite(value):
        raise ValueError(f"json: unsupported value: {value}")
    if value == 0:
        return "-0" if str(value).startswith("-") else "0"
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(repr(value)).normalize(), "f")
    mantissa, _, exponent = repr(value).partition("e")
    exp = int(exponent)
    return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}".replace("e-0", "e-")


def go_json(value: Any) -> str:
    """encoding/json.Marshal of `value` (HTML-safe escaping, sorted map keys, no spaces)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Number):
        return str(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, dict):
        keys = list(value) if isinstance(value, Struct) else sorted(value)
        return "{" + ",".join(f"{_go_string(k)}:{go_json(value[k])}" for k in keys) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _as_float64(value: Any) -> Any:
    """What the kv plugin's json.Unmarshal into interface{} makes of stored data: every number a float64."""
    if isinstance(value, dict):
        return {k: _as_float64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_float64(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Number(go_float(float(value)))
    return value


def _check_float64(value: Any) -> None:
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            _check_float64(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            go_float(float(value))
        except (OverflowError, ValueError):
            raise _Refused(400, "fake vault: numbers must fit a float64 (Vault would fail reading them)") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON literal {name}")


def _json_object(body: bytes) -> dict[str, Any]:
    """A request body as Vault's handler parses it (empty means no fields)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body.decode("utf-8", "replace"), parse_constant=_reject_constant)
    except ValueError:
        raise _Refused(400, "error parsing JSON") from None
    if not isinstance(value, dict):
        raise _Refused(400, "error parsing JSON")
    return value


def _rfc3339(ns: int | None) -> str:
    """time.RFC3339Nano (what ptypes.TimestampString writes): trailing zeros of the fraction dropped."""
    if ns is None:
        return ""
    seconds, fraction = divmod(ns, 10**9)
    digits = f"{fraction:09d}".rstrip("0")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (f".{digits}" if digits else "") + "Z"


# ---------------------------------------------------------------- KV state

@dataclass
class _Version:
    created: int
    data: dict[str, Any] | None  # None once destroyed
    deleted: int | None = None
    destroyed: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"created_time": _rfc3339(self.created), "deletion_time": _rfc3339(self.deleted),
                "destroyed": self.destroyed}


@dataclass
class _Key:
    created: int
    updated: int
    versions: dict[int, _Version] = field(default_factory=dict)
    current: int = 0
    oldest: int = 0
    max_versions: int = 0
    cas_required: bool = False
    custom_metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None  # a JSON value, or None for an empty body (204, HEAD)

    def encoded(self) -> bytes:
        return b"" if self.body is None else (go_json(self.body) + "\n").encode()


def _weak_int(value: Any, error: str) -> int:
    """mapstructure.WeakDecode of a JSON value (Vault decodes numbers as json.Number) into an int."""
    if value is None or isinstance(value, bool):
        return int(bool(value))
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value or "0", 0)
        except ValueError:
            pass
    raise _Refused(400, error)


def _versions(raw: Any) -> list[int]:
    """framework.TypeCommaIntSlice: a list, a number or "1,2"."""
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else [] if raw is None else [raw]
    return [_weak_int(item, "fake vault: versions must be integers") for item in items if item != ""]


def _zero_duration(value: Any) -> bool:
    return value in (None, 0, "", "0") or (isinstance(value, str) and re.fullmatch(r"(0+[smh])+", value) is not None)


# ---------------------------------------------------------------- the server

class FakeVault:
    def __init__(self, *, mount: str = "secret", root_token: str = "root", clock: Callable[[], int] | None = None,
                 version: str = "1.17.0") -> None:
        self.mount, self.root_token, self.version = mount.strip("/"), root_token, version
        self.keys: dict[str, _Key] = {}
        self.config: dict[str, Any] = {"cas_required": False, "max_versions": 0}
        self.policies: dict[str, dict[str, frozenset[str]]] = {}
        self.approles: dict[str, tuple[str, tuple[Mapping[str, Iterable[str]], ...], int, bool]] = {}
        self.leases: dict[str, tuple[int, int, bool]] = {}  # token -> (expires ns, ttl s, renewable)
        self.sealed = False
        self.seen: list[Seen] = []
        self.port: int | None = None
        self._clock, self._last = clock or time.time_ns, 0
        self._lock = threading.RLock()
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        """VAULT_ADDR (with its scheme)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._runner = web.ServerRunner(_AnyMethodServer(self._serve), access_log=None)
        self.port = await serve_on_loopback(self._runner)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def in_thread(self) -> AbstractContextManager[str]:
        """Serve from a thread with its own loop (for blocking clients); yields the URL."""
        return served_in_thread(self.start, self.stop, "fake-vault")

    # ------------------------------------------------------------ test helpers

    def add_token(self, token: str, *policies: Mapping[str, Iterable[str]]) -> str:
        """A token holding these ACL policies (`{"secret/data/app/*": ["read"]}`); their rules are merged."""
        rules: dict[str, frozenset[str]] = {}
        for policy in policies:
            for raw, capabilities in policy.items():
                path, caps = raw.lstrip("/"), frozenset(capabilities)
                if caps - CAPABILITIES:
                    raise ValueError(f"unknown capabilities {sorted(caps - CAPABILITIES)} for {raw!r}")
                if "+" in path or "*" in path[:-1]:
                    raise ValueError(f"fake vault: only exact paths and a trailing '*' are modelled, not {raw!r}")
                rules[path] = rules.get(path, frozenset()) | caps
        self.policies[token] = rules
        return token

    def add_approle(self, role_id: str, secret_id: str, *policies: Mapping[str, Iterable[str]], ttl: int = 3600,
                    renewable: bool = True) -> None:
        """An AppRole whose logins get tokens with these ACL policies and this TTL (seconds)."""
        self.approles[role_id] = (secret_id, policies, ttl, renewable)

    def put(self, path: str, data: Mapping[str, Any]) -> int:
        """Write a new version of `path` (below the mount's `data/`) as root; returns its version number."""
        reply = self.handle("POST", f"{self.mount}/data/{path}", token=self.root_token,
                            body=json.dumps({"data": data}).encode())
        if reply.status != 200:
            raise RuntimeError(f"fake vault refused the write: {reply.status} {reply.body}")
        return reply.body["data"]["version"]

    # ------------------------------------------------------------ the core: one request in, one reply out

    def handle(self, method: str, path: str, *, token: str | None = None, query: Mapping[str, str] | None = None,
               body: bytes = b"") -> Reply:
        """Answer one request for `/v1/<path>`; the HTTP handler and the template evaluator both call this."""
        query = dict(query or {})
        with self._lock:
            self.seen.append(Seen(method, path, "&".join(f"{k}={v}" for k, v in query.items()), token or None))
            try:
                return self._route(method.upper(), path, token or None, query, body)
            except _Refused as refused:
                return Reply(refused.status, {"errors": refused.errors})

    def _now(self) -> int:
        self._last = max(self._clock(), self._last + 1)
        return self._last

    def _envelope(self, data: Any, warnings: list[str] | None = None, mount_type: str = "kv") -> Struct:
        """logical.HTTPResponse, field by field."""
        return Struct(request_id=str(uuid.uuid4()), lease_id="", renewable=False, lease_duration=0, data=data,
                      wrap_info=None, warnings=warnings, auth=None, mount_type=mount_type)

    def _route(self, method: str, path: str, token: str | None, query: dict[str, str], body: bytes) -> Reply:
        if path == "sys/health":
            return self._health(method, query)
        if self.sealed:
            raise _Refused(503, "Vault is sealed")
        if method == "GET" and query.get("list", "") not in _GO_TRUE | _GO_FALSE | {""}:
            raise _Refused(400)
        op = "list" if method == "GET" and query.get("list") in _GO_TRUE else _OPERATION.get(method)
        if op is None:
            raise _Refused(405, *([f"fake vault: {method} is not implemented"] if method == "PATCH" else []))
        if op == "list" and not path.endswith("/"):
            path += "/"  # Vault's HTTP layer does this for every LIST
        if path.startswith("auth/"):
            return self._auth(op, token, path, body)
        if path.startswith("sys/internal/ui/mounts/"):
            return self._ui_mount(op, token, path.removeprefix("sys/internal/ui/mounts/"))
        if path.startswith(self.mount + "/"):
            return self._kv(op, token, path, query, body)
        self._authorize(token, op, path)
        if path.startswith("sys/"):
            raise _Refused(404, f"fake vault: {path} is not implemented")
        raise _Refused(404, f'no handler for route "{path}". route entry not found.')

    # ------------------------------------------------------------ ACL

    def _authorize(self, token: str | None, capability: str, path: str) -> None:
        if token == self.root_token and token is not None:
            return
        self._expire(token)
        if token is None or token not in self.policies:
            raise _Refused(403, PERMISSION_DENIED)
        caps = self._capabilities(token, path)
        if "deny" in caps or capability not in caps:
            raise _Refused(403, POLICY_DENIED)

    def _capabilities(self, token: str, path: str) -> frozenset[str]:
        rules = self.policies[token]
        if path in rules and not path.endswith("*"):
            return rules[path]
        globs = [p for p in rules if p.endswith("*") and path.startswith(p[:-1])]
        return rules[max(globs, key=len)] if globs else frozenset()

    def _has_mount_access(self, token: str) -> bool:
        if token == self.root_token:
            return True
        prefix = self.mount + "/"
        return any(caps - {"deny"} and (p.startswith(prefix) or (p.endswith("*") and prefix.startswith(p[:-1])))
                   for p, caps in self.policies[token].items())

    # ------------------------------------------------------------ auth

    def _expire(self, token: str | None) -> None:
        if token in self.leases and self.leases[token][0] <= self._now():
            del self.leases[token]
            self.policies.pop(token, None)

    def _auth_block(self, token: str) -> Struct:
        _, ttl, renewable = self.leases[token]
        return Struct(client_token=token, accessor=uuid.uuid4().hex, policies=["default"],
                      token_policies=["default"], metadata=None, lease_duration=ttl, renewable=renewable,
                      entity_id="", token_type="service", orphan=True, mfa_requirement=None, num_uses=0)

    def _auth(self, op: str, token: str | None, path: str, body: bytes) -> Reply:
        if path == "auth/approle/login" and op == "update":
            payload = _json_object(body)
            role = self.approles.get(str(payload.get("role_id", "")))
            if role is None or role[0] != payload.get("secret_id"):
                raise _Refused(400, "invalid role or secret ID")
            secret_id, policies, ttl, renewable = role
            issued = self.add_token(f"hvs.{uuid.uuid4().hex}", *policies)
            self.leases[issued] = (self._now() + ttl * 10**9, ttl, renewable)
            envelope = self._envelope(None, mount_type="")
            envelope["auth"] = self._auth_block(issued)
            return Reply(200, envelope)
        self._expire(token)
        if token is None or (token != self.root_token and token not in self.policies):
            raise _Refused(403, PERMISSION_DENIED)
        if path == "auth/token/lookup-self" and op == "read":
            expires, ttl, renewable = self.leases.get(token, (0, 0, False))
            left = max(0, (expires - self._now()) // 10**9) if expires else 0
            return Reply(200, self._envelope({"id": token, "ttl": left, "creation_ttl": ttl, "renewable": renewable,
                                              "policies": ["root" if token == self.root_token else "default"]},
                                             mount_type="token"))
        if path == "auth/token/renew-self" and op == "update":
            if token not in self.leases or not self.leases[token][2]:
                raise _Refused(400, "lease is not renewable")
            _, ttl, renewable = self.leases[token]
            self.leases[token] = (self._now() + ttl * 10**9, ttl, renewable)
            envelope = self._envelope(None, mount_type="token")
            envelope["auth"] = self._auth_block(token)
            return Reply(200, envelope)
        raise _Refused(404, f"fake vault: {path} is not implemented")

    # ------------------------------------------------------------ sys

    def _health(self, method: str, query: dict[str, str]) -> Reply:
        if method not in ("GET", "HEAD"):
            raise _Refused(405)
        code = query.get("sealedcode" if self.sealed else "activecode", "")
        status = int(code) if code.isdigit() else 503 if self.sealed else 200
        body = Struct(initialized=True, sealed=self.sealed, standby=False, performance_standby=False,
                      replication_performance_mode="disabled", replication_dr_mode="disabled",
                      server_time_utc=self._now() // 10**9, version=self.version)
        if not self.sealed:
            body.update(cluster_name="vault-cluster-fake", cluster_id="00000000-0000-0000-0000-000000000000")
        return Reply(status, None if method == "HEAD" else body)

    def _ui_mount(self, op: str, token: str | None, path: str) -> Reply:
        """What consul-template's isKVv2 preflight reads: the mount's type, options and path."""
        if token is None or (token != self.root_token and token not in self.policies):
            raise _Refused(403, PERMISSION_DENIED)
        if op != "read":
            raise _Refused(405, UNSUPPORTED_OPERATION)
        sanitized = path.strip("/") + "/"
        if not sanitized.startswith(self.mount + "/") or not self._has_mount_access(token):
            raise _Refused(403, "preflight capability check returned 403, please ensure client's policies grant "
                                f'access to path "{sanitized}"')
        return Reply(200, self._envelope({
            "accessor": "kv_f00dfeed", "config": {"default_lease_ttl": 0, "force_no_cache": False,
                                                  "max_lease_ttl": 0},
            "description": "key/value secret storage", "external_entropy_access": False, "local": False,
            "options": {"version": "2"}, "path": self.mount + "/", "seal_wrap": False, "type": "kv",
            "uuid": "8074a73f-6921-c0cd-589a-016405dc46ec"}, mount_type="system"))

    # ------------------------------------------------------------ the KV v2 mount

    def _kv(self, op: str, token: str | None, path: str, query: dict[str, str], body: bytes) -> Reply:
        section, _, key = path[len(self.mount) + 1:].partition("/")
        routed = key and (section == "metadata" or not key.endswith("/"))
        if section in ("data", "metadata") and op == "update" and routed and key not in self.keys:
            op = "create"  # Vault's existence check (only paths the plugin routes have one)
        self._authorize(token, op, path)
        if section == "data" and key and not key.endswith("/") and op != "list":
            handler = {"read": self._read, "create": self._write, "update": self._write,
                       "delete": self._soft_delete}[op]
            return handler(key, query, body)
        if section == "metadata":
            handler = {"read": self._metadata, "list": self._list, "create": self._set_metadata,
                       "update": self._set_metadata, "delete": self._forget}[op]
            return handler(key, query, body)
        if section in ("delete", "undelete", "destroy") and key:
            if op not in ("create", "update"):
                raise _Refused(405, UNSUPPORTED_OPERATION)
            return self._change_versions(section, key, body)
        if section == "config" and not key:
            if op not in ("read", "update"):
                raise _Refused(405, UNSUPPORTED_OPERATION)
            return self._config(op, body)
        return Reply(404, self._envelope(None, [INVALID_KV2_PATH.format(_CLI_VERB[op])]))

    def _read(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        meta = self.keys.get(key)
        if meta is None:
            raise _Refused(404)
        number, raw = meta.current, query.get("version", "")
        if raw:
            if not re.fullmatch(r"[+-]?\d+", raw):
                raise _Refused(400, "fake vault: version must be an integer")
            number = int(raw) if int(raw) > 0 else number
        version = meta.versions.get(number)
        if version is None:
            raise _Refused(404)
        data = {"data": None, "metadata": {**version.metadata(), "custom_metadata": meta.custom_metadata,
                                           "version": number}}
        if self._gone(version):
            return Reply(404, self._envelope(data))
        data["data"] = _as_float64(version.data)
        return Reply(200, self._envelope(data))

    def _gone(self, version: _Version) -> bool:
        return version.destroyed or (version.deleted is not None and version.deleted < self._now())

    def _write(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        payload = _json_object(body)
        data, options = payload.get("data"), payload.get("options")
        if data is None:
            raise _Refused(400, "no data provided")
        if not isinstance(data, dict) or not isinstance(options, dict | None):
            raise _Refused(400, "fake vault: data and options must be JSON objects")
        meta = self.keys.get(key)
        current = meta.current if meta else 0
        if options and "cas" in options:
            if isinstance(options["cas"], float):  # a json.Number like "1.0" fails Int64()
                raise _Refused(400, "error parsing check-and-set parameter")
            if _weak_int(options["cas"], "error parsing check-and-set parameter") != current:
                raise _Refused(400, "check-and-set parameter did not match the current version")
        elif self.config["cas_required"] or (meta and meta.cas_required):
            raise _Refused(400, "check-and-set parameter required for this call")
        _check_float64(data)
        now = self._now()
        meta = meta or self.keys.setdefault(key, _Key(created=now, updated=now))
        meta.current += 1
        version = meta.versions[meta.current] = _Version(created=now, data=copy.deepcopy(data))
        meta.updated = now
        limit = max(meta.max_versions, self.config["max_versions"]) or DEFAULT_MAX_VERSIONS
        if meta.current - meta.oldest >= limit:  # KeyMetadata.AddVersion's sliding window
            drop = meta.current - limit
            for number in range(meta.oldest, drop + 1):
                meta.versions.pop(number, None)
            meta.oldest = drop + 1
        return Reply(200, self._envelope({**version.metadata(), "custom_metadata": meta.custom_metadata,
                                          "version": meta.current}))

    def _soft_delete(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        meta = self.keys.get(key)
        latest = meta.versions.get(meta.current) if meta else None
        if latest is not None and not self._gone(latest):
            latest.deleted = self._now()
        return Reply(204)

    def _metadata(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        meta = self.keys.get(key)
        if meta is None:
            raise _Refused(404)
        return Reply(200, self._envelope({
            "cas_required": meta.cas_required, "created_time": _rfc3339(meta.created),
            "current_version": meta.current, "custom_metadata": meta.custom_metadata, "delete_version_after": "0s",
            "max_versions": meta.max_versions, "oldest_version": meta.oldest, "updated_time": _rfc3339(meta.updated),
            "versions": {str(n): v.metadata() for n, v in meta.versions.items()}}))

    def _list(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        children = set()
        for name in self.keys:
            if name.startswith(key):
                head, slash, _ = name[len(key):].partition("/")
                if head:
                    children.add(head + slash)
        if not children:
            raise _Refused(404)
        return Reply(200, self._envelope({"keys": sorted(children)}))

    def _set_metadata(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        payload = _json_object(body)
        if not key:
            raise _Refused(400, "missing path")
        if not _zero_duration(payload.get("delete_version_after")):
            raise _Refused(400, "fake vault: a non-zero delete_version_after is not implemented")
        if not {"max_versions", "cas_required", "custom_metadata"} & payload.keys():
            return Reply(204)
        max_versions, cas_required = payload.get("max_versions", 0), payload.get("cas_required", False)
        custom = payload.get("custom_metadata") or {}
        if not (isinstance(max_versions, int) and isinstance(cas_required, bool) and isinstance(custom, dict)
                and all(isinstance(v, str) for v in custom.values())):
            raise _Refused(400, "fake vault: max_versions, cas_required or custom_metadata has the wrong type")
        now = self._now()
        meta = self.keys.setdefault(key, _Key(created=now, updated=now))
        if "max_versions" in payload:
            meta.max_versions = max_versions
        if "cas_required" in payload:
            meta.cas_required = cas_required
        if "custom_metadata" in payload:
            meta.custom_metadata = dict(custom)
        if "cas_required" in payload and self.config["cas_required"] and not cas_required:
            warning = '"cas_required" set to false, but is mandated by backend config. This value will be ignored.'
            return Reply(200, self._envelope(None, [warning]))
        return Reply(204)

    def _forget(self, key: str, query: dict[str, str], body: bytes) -> Reply:
        self.keys.pop(key, None)
        return Reply(204)

    def _change_versions(self, action: str, key: str, body: bytes) -> Reply:
        numbers = _versions(_json_object(body).get("versions"))
        if not numbers:
            raise _Refused(400, "no version number provided" if action == "destroy" else "No version number provided")
        meta = self.keys.get(key)
        for number in numbers if meta else []:
            version = meta.versions.get(number)
            if version is None or version.destroyed:
                continue
            if action == "delete" and not self._gone(version):
                version.deleted = self._now()
            elif action == "undelete":
                version.deleted = None
            elif action == "destroy":
                version.destroyed, version.data = True, None
        return Reply(204)

    def _config(self, op: str, body: bytes) -> Reply:
        if op == "read":
            return Reply(200, self._envelope({**self.config, "delete_version_after": "0s"}))
        payload = _json_object(body)
        if not _zero_duration(payload.get("delete_version_after")):
            raise _Refused(400, "fake vault: a non-zero delete_version_after is not implemented")
        if not isinstance(payload.get("max_versions", 0), int) or not isinstance(payload.get("cas_required", False),
                                                                                 bool):
            raise _Refused(400, "fake vault: max_versions or cas_required has the wrong type")
        self.config.update({k: payload[k] for k in ("max_versions", "cas_required") if k in payload})
        return Reply(204)

    # ------------------------------------------------------------ HTTP

    async def _serve(self, request: web.BaseRequest) -> web.Response:
        if not request.path.startswith("/v1/"):
            return web.Response(status=404)
        reply = self.handle(request.method, request.path.removeprefix("/v1/"), token=_token(request),
                            query=dict(request.query), body=await request.read())
        headers = {"Cache-Control": "no-store"}
        if reply.body is None or request.method == "HEAD":
            return web.Response(status=reply.status, headers=headers)
        return web.Response(status=reply.status, body=reply.encoded(),
                            headers={**headers, "Content-Type": "application/json"})


class _AnyMethodServer(web.Server):
    """aiohttp's C parser (llhttp) refuses methods it does not know, Vault's LIST among them; its pure-Python
    parser (the AIOHTTP_NO_EXTENSIONS fallback) takes any token, so connections of this server use that one."""

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler._parser = HttpRequestParserPy(
            handler, self._loop, handler._read_bufsize, max_line_size=handler.max_line_size,
            max_field_size=handler.max_field_size, max_headers=handler.max_headers,
            payload_exception=RequestPayloadError, max_msg_queue_size=handler._max_msg_queue_size)
        return handler


def _token(request: web.BaseRequest) -> str | None:
    auth = request.headers.get("Authorization", "")
    return request.headers.get("X-Vault-Token") or (auth[len("Bearer "):] if auth.startswith("Bearer ") else None)
