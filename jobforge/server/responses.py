"""The one HTTP rendering of a `JobForgeError`: its status and ``{"error": {code, message, data?}}``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jobforge.errors import JobForgeError, Unauthorized
from jobforge.server import jsonio


def error_response(exc: JobForgeError, headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": exc.rpc_code, "message": exc.message}
    if exc.data is not None:
        body["data"] = exc.data
    headers = dict(headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):  # RFC 6750: say which scheme, and whether the token was bad
        error = f', error="{exc.data["reason"]}"' if exc.data and exc.data.get("reason") == "invalid_token" else ""
        headers["WWW-Authenticate"] = f'Bearer realm="jobforge"{error}'
    return web.json_response({"error": body}, status=exc.http_status, headers=headers, dumps=jsonio.dumps)
