"""Who may reach the API, as one aiohttp middleware in front of every route (deny by default).

Per request, in this order:

1. ``Host`` must name the address the connection arrived on (for loopback also ``localhost``/``127.0.0.1``/
   ``[::1]``), with its port, or an entry of ``JOBFORGE_ALLOWED_HOSTS``: else 421. A page whose DNS name was
   re-bound to 127.0.0.1 sends its own name, so DNS rebinding cannot reach the API. This applies to every route,
   ``/health`` included (a health checker connects to the address, which is accepted).
2. ``OPTIONS`` is a CORS preflight: allowed only for an origin listed in ``CORS_ORIGIN``, else 403 without any
   ``Access-Control-Allow-*`` header. Nothing else runs for it.
3. Routes in `OPEN_ROUTES` (health, readiness, metrics, the OpenAPI document) are served as they are.
4. A request with a body must say ``Content-Type: application/json`` (415): a browser cannot send that
   cross-origin without a preflight, so a web page cannot forge a call.
5. A request carrying an ``Origin`` header (browsers add it) must come from a listed origin or the service's own
   (403): this stops what CORS does not cover, above all a page opening the WebSocket streams.
6. ``Authorization: Bearer <token>`` must match a token of the tokens file (401 with ``WWW-Authenticate``);
   the matched `Principal` is stored on the request (`PRINCIPAL_KEY`) for `jobforge.api.call` to authorise
   per owner. Without a tokens file the service only listens on loopback and every caller is `EVERYONE`.

Any route added later (``/mcp``, SSE streams, ...) is covered by all six without doing anything; its handler
takes ``request[PRINCIPAL_KEY]`` to `jobforge.api.call` / `jobforge.api.authorize_job`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from aiohttp import web

from jobforge import auth
from jobforge.errors import Forbidden, JobForgeError, MisdirectedRequest, UnsupportedMediaType
from jobforge.server.responses import error_response

log = logging.getLogger("jobforge.server.guard")

PRINCIPAL_KEY = web.RequestKey("principal", auth.Principal)

# (method, path) pairs served without a token: liveness, readiness, metrics and the API description.
OPEN_ROUTES: frozenset[tuple[str, str]] = frozenset(
    (method, path) for path in ("/health", "/ready", "/metrics", "/openapi.json") for method in ("GET", "HEAD"))
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Mcp-Session-Id, Last-Event-ID"
CORS_EXPOSE_HEADERS = "WWW-Authenticate, Mcp-Session-Id"

TokenSource = Callable[[], Sequence[auth.TokenEntry]]


@dataclass(frozen=True)
class Guard:
    """`tokens` None: no authentication (loopback only, or JOBFORGE_INSECURE_NO_AUTH)."""

    tokens: TokenSource | None = None
    cors_origins: frozenset[str] = frozenset()
    allowed_hosts: tuple[str, ...] = ()


# ---------------------------------------------------------------- pure decisions

def split_host(host: str) -> tuple[str, int | None]:
    """``name[:port]`` / ``[v6]:port`` -> (lower-case name without brackets or trailing dot, port or None).

    Raises ValueError for a malformed value."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(host)
        port = rest[1:] if rest else None
    elif host.count(":") == 1:
        name, port = host.split(":")
    elif ":" in host:
        raise ValueError(host)  # a bare IPv6 address must be bracketed
    else:
        name, port = host, None
    name = name.rstrip(".")
    if not name or (port is not None and not port.isdigit()):
        raise ValueError(host)
    return name, int(port) if port is not None else None


def _local_names(local_ip: str) -> set[str]:
    try:
        ip = ipaddress.ip_address(local_ip.split("%")[0])
    except ValueError:
        return {local_ip.lower()}
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return {str(ip), *LOOPBACK_NAMES} if ip.is_loopback else {str(ip)}


def host_allowed(host: str | None, local: tuple[str, int] | None, allowed_hosts: Collection[str]) -> bool:
    """Whether a ``Host`` header may reach this service (see the module docstring).

    A missing header is accepted: browsers always send one, so it is not a rebinding vector."""
    if host is None:
        return True
    try:
        name, port = split_host(host)
    except ValueError:
        return False
    for entry in allowed_hosts:
        try:
            allowed_name, allowed_port = split_host(entry)
        except ValueError:
            continue
        if name == allowed_name and (allowed_port is None or allowed_port == (port or 80)):
            return True
    if local is None:
        return False
    local_ip, local_port = local
    return name in _local_names(local_ip) and (port or 80) == local_port


def cors_headers(origin: str | None, origins: Collection[str]) -> dict[str, str]:
    """Headers that let a listed origin read the answer; nothing for any other origin."""
    if origin is None or not (origin in origins or "*" in origins):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS}


def origin_allowed(origin: str | None, host: str | None, origins: Collection[str]) -> bool:
    """No ``Origin`` (not a browser, or a same-origin GET), a listed one, or the service's own address."""
    if origin is None or origin in origins or "*" in origins:
        return True
    return host is not None and origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}")


def preflight_headers(origin: str | None, origins: Collection[str]) -> dict[str, str]:
    allow = cors_headers(origin, origins)
    if allow:
        allow |= {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                  "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS, "Access-Control-Max-Age": "600"}
    return allow


def is_json(content_type: str | None) -> bool:
    """``application/json`` with any parameters (``; charset=utf-8``), case-insensitive."""
    return content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the service to this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, tokens_configured: bool, insecure_no_auth: bool,
                     cors_origins: Collection[str]) -> str | None:
    """Why the service must not start with these settings, or None."""
    if tokens_configured or insecure_no_auth:
        return None
    if not is_loopback(host):
        return (f"refusing to serve {host or 'every address'} without authentication: set "
                "JOBFORGE_API_TOKENS_FILE (see docs/security.md), bind SERVER_HOST=127.0.0.1, or set "
                "JOBFORGE_INSECURE_NO_AUTH=true to let anyone who can connect run builds")
    if "*" in cors_origins:
        return ("CORS_ORIGIN=* without JOBFORGE_API_TOKENS_FILE would let every web page drive the API: "
                "list the origins, or configure tokens")
    return None


# ---------------------------------------------------------------- the middleware

def _local_address(request: web.Request) -> tuple[str, int] | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return None


def guard_middleware(guard: Guard):
    @web.middleware
    async def middleware(request: web.Request, handler):
        origin = request.headers.get("Origin")
        cors = cors_headers(origin, guard.cors_origins)
        try:
            if not host_allowed(request.headers.get("Host"), _local_address(request), guard.allowed_hosts):
                raise MisdirectedRequest(f"Host {request.headers.get('Host')!r} is not an address of this service; "
                                         "add it to JOBFORGE_ALLOWED_HOSTS if it is")
            if request.method == "OPTIONS":
                allow = preflight_headers(origin, guard.cors_origins)
                if not allow:
                    raise Forbidden(f"cross-origin requests from {origin or 'an unnamed origin'} are not allowed "
                                    "(CORS_ORIGIN)")
                return web.Response(status=204, headers=allow)
            if (request.method, request.path) not in OPEN_ROUTES:
                # Only a body needs its type: a bodiless POST carries no params (getHistory with its defaults,
                # or a 400 naming the missing field), so it cannot be a forged call with content.
                has_body = request.can_read_body
                if request.method in BODY_METHODS and has_body and not is_json(request.headers.get("Content-Type")):
                    raise UnsupportedMediaType(
                        f"{request.method} {request.path} needs 'Content-Type: application/json', "
                        f"got {request.headers.get('Content-Type') or 'none'}")
                if not origin_allowed(origin, request.headers.get("Host"), guard.cors_origins):
                    raise Forbidden(f"cross-origin request from {origin} refused; list the origin in CORS_ORIGIN "
                                    "to allow it")
                principal = (auth.EVERYONE if guard.tokens is None
                             else auth.authenticate(guard.tokens(), request.headers.get("Authorization")))
                request[PRINCIPAL_KEY] = principal
                log.debug("%s %s by %s", request.method, request.path, principal.label)
        except JobForgeError as exc:
            log.info("refused %s %s from %s: %s", request.method, request.path, request.remote, exc.message)
            return error_response(exc, cors)
        response = await handler(request)
        if cors and not response.prepared:
            response.headers.update(cors)
        return response
    return middleware
