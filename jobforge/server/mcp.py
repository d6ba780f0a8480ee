"""MCP (Model Context Protocol) over the streamable HTTP transport at `/mcp`, built on the method table.

Each API method (`jobforge.models.METHODS`) is one tool: its input schema is the params model's JSON schema,
its output schema the result model's, and a call goes through `jobforge.api.call` — the same parser and handler
as JSON-RPC and REST. Only the protocol envelope lives here:

- `POST /mcp` takes one JSON-RPC message (or a batch, as 2025-03-26 allowed). Requests get a JSON body, or one
  SSE `message` event when the client prefers `text/event-stream` in `Accept`; notifications and responses get
  202 with no body.
- Stateless: no `Mcp-Session-Id` is issued (any replica answers any request, like the rest of the API), so
  `GET /mcp` (a server-to-client stream) and `DELETE /mcp` (ending a session) answer 405, as the spec allows.
- `initialize` negotiates the protocol version: the client's if we speak it, else our newest. Later requests
  may carry `MCP-Protocol-Version`; an unknown one is refused with 400.
- Invalid tool arguments and job errors (unknown job, conflict) are tool results with `isError: true` and the
  field-named message; an unknown tool or method is a JSON-RPC error.

`MCP_LOG_LEVEL=1` logs every request and response with secret-bearing values replaced by "***".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import cache
from importlib.metadata import version
from typing import Any

from aiohttp import web

from jobforge.errors import JobForgeError
from jobforge.models import METHODS
from jobforge.server import jsonrpc

Call = Callable[[str, Any], Awaitable[Any]]
"""`api.call` bound to the service and the caller (the principal the guard found)."""

log = logging.getLogger("jobforge.mcp")

PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
"""Oldest to newest; structured tool output (`outputSchema`) exists from 2025-06-18 on."""
DEFAULT_VERSION = "2025-03-26"  # what the spec says to assume when a request carries no version header
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

_SECRET_KEYS = ("secret", "password", "token", "authorization", "webhook_headers", "credentials")


# ---------------------------------------------------------------- tools from the method table

@cache
def _tool(name: str, structured: bool) -> dict[str, Any]:
    method = METHODS[name]
    tool: dict[str, Any] = {
        "name": name,
        "description": method.summary,
        "inputSchema": method.params.model_json_schema(mode="validation"),
        "annotations": {"readOnlyHint": not method.mutates, "destructiveHint": name in ("killJob", "cleanup"),
                        "openWorldHint": name == "submitJob"},
    }
    if structured:
        tool["outputSchema"] = method.result.model_json_schema(mode="serialization")
    return tool


def tools(protocol: str) -> list[dict[str, Any]]:
    structured = PROTOCOL_VERSIONS.index(protocol) >= PROTOCOL_VERSIONS.index("2025-06-18")
    return [_tool(name, structured) for name in METHODS]


def _field_message(exc: JobForgeError) -> str:
    """The error as an agent reads it: the message, then one `field: rule` line per invalid field."""
    lines = [exc.message]
    if isinstance(exc.data, list):
        lines += [f"{e['field']}: {e['rule']}" for e in exc.data if isinstance(e, dict) and "field" in e]
    return "\n".join(lines)


async def call_tool(call: Call, params: Any, protocol: str) -> dict[str, Any]:
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        raise _ProtocolError(INVALID_PARAMS, 'tools/call needs params {"name": <tool>, "arguments": {...}}')
    name = params["name"]
    if name not in METHODS:
        raise _ProtocolError(INVALID_PARAMS, f"unknown tool {name!r}; tools: {', '.join(METHODS)}")
    try:
        result = await call(name, params.get("arguments") or {})
    except JobForgeError as exc:
        return {"content": [{"type": "text", "text": _field_message(exc)}], "isError": True}
    reply: dict[str, Any] = {"content": [{"type": "text", "text": json.dumps(result)}], "isError": False}
    if _structured(protocol):
        reply["structuredContent"] = result
    return reply


def _structured(protocol: str) -> bool:
    return PROTOCOL_VERSIONS.index(protocol) >= PROTOCOL_VERSIONS.index("2025-06-18")


# ---------------------------------------------------------------- the JSON-RPC envelope

class _ProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def negotiate(requested: Any) -> str:
    return requested if requested in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]


async def dispatch(call: Call, method: str, params: Any, protocol: str) -> Any:
    if method == "initialize":
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        return {"protocolVersion": negotiate(requested),
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "jobforge", "title": "Job Forge", "version": version("jobforge")},
                "instructions": "Container image builds (build -> test -> publish). submitJob returns a job_id; "
                                "poll getStatus until SUCCEEDED or FAILED; read getLogs."}
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": tools(protocol)}
    if method == "tools/call":
        return await call_tool(call, params, protocol)
    raise _ProtocolError(METHOD_NOT_FOUND, f"method {method!r} not found")


async def _message(call: Call, message: Any, protocol: str) -> dict | None:
    """One JSON-RPC message in, its response out (None for notifications and client responses)."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _error(None, jsonrpc.INVALID_REQUEST, 'invalid request: expected a JSON-RPC 2.0 object')
    if "method" not in message:  # a response to a server request: we send none, so nothing to match
        return None
    id_ = message.get("id")
    if "id" not in message:  # notification (notifications/initialized, notifications/cancelled, ...)
        return None
    if not isinstance(message["method"], str) or isinstance(id_, bool) or not isinstance(id_, (str, int)):
        return _error(id_ if isinstance(id_, (str, int)) else None, jsonrpc.INVALID_REQUEST,
                      'invalid request: needs a string "method" and a string or integer "id"')
    try:
        result = await dispatch(call, message["method"], message.get("params"), protocol)
    except _ProtocolError as exc:
        return _error(id_, exc.code, exc.message)
    except Exception:
        log.exception("internal error in MCP %s", message["method"])
        return _error(id_, jsonrpc.INTERNAL_ERROR, "internal error")
    return {"jsonrpc": "2.0", "id": id_, "result": result}


def _error(id_: Any, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


# ---------------------------------------------------------------- logging with secrets redacted

def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" if any(s in str(k).lower() for s in _SECRET_KEYS) and v is not None else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:  # credentials in a URL
        scheme, _, rest = value.partition("://")
        auth, at, host = rest.partition("@")
        return f"{scheme}://***@{host}" if at and "/" not in auth else value
    return value


def _log(level: int, direction: str, doc: Any) -> None:
    if level >= 1:
        log.info("MCP %s %s", direction, json.dumps(redact(doc), default=str)[:65536])
    else:
        docs = doc if isinstance(doc, list) else [doc]
        for d in docs:
            if isinstance(d, dict) and direction == "request":
                tool = d.get("params", {}).get("name") if isinstance(d.get("params"), dict) else None
                log.debug("MCP request %s id=%s%s", d.get("method"), d.get("id"), f" tool={tool}" if tool else "")


# ---------------------------------------------------------------- HTTP

def _prefers_sse(accept: str) -> bool:
    """True when `text/event-stream` is acceptable and ranked above `application/json` (q, then order)."""
    ranks: dict[str, tuple[float, int]] = {}
    for position, part in enumerate(accept.split(",")):
        kind, *options = (p.strip() for p in part.split(";"))
        q = 1.0
        for opt in options:
            if opt.startswith("q="):
                try:
                    q = float(opt[2:])
                except ValueError:
                    q = 0.0
        ranks.setdefault(kind.lower(), (q, -position))
    sse = ranks.get("text/event-stream", (0.0, 0))
    as_json = max(ranks.get("application/json", (0.0, 0)), ranks.get("*/*", (0.0, -99)))
    return sse[0] > 0 and sse > as_json


def _json_response(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status)


async def handle(request: web.Request, call: Call, body: bytes, log_level: int) -> web.StreamResponse:
    protocol = request.headers.get("MCP-Protocol-Version", DEFAULT_VERSION)
    if protocol not in PROTOCOL_VERSIONS:
        return _json_response(_error(None, jsonrpc.INVALID_REQUEST, f"unsupported MCP-Protocol-Version "
                                     f"{protocol!r}; supported: {', '.join(PROTOCOL_VERSIONS)}"), 400)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _json_response(_error(None, jsonrpc.PARSE_ERROR, f"parse error: {exc}"), 400)
    _log(log_level, "request", doc)
    if isinstance(doc, list):
        if not doc:
            return _json_response(_error(None, jsonrpc.INVALID_REQUEST, "invalid request: empty batch"), 400)
        replies = [r for r in [await _message(call, m, protocol) for m in doc] if r is not None]
        reply: Any = replies or None
    else:
        if isinstance(doc, dict) and doc.get("method") == "initialize":
            protocol = negotiate((doc.get("params") or {}).get("protocolVersion")
                                 if isinstance(doc.get("params"), dict) else None)
        reply = await _message(call, doc, protocol)
    if reply is None:
        return web.Response(status=202)
    _log(log_level, "response", reply)
    if not _prefers_sse(request.headers.get("Accept", "")):
        return _json_response(reply)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for one in reply if isinstance(reply, list) else [reply]:
        await response.write(f"event: message\ndata: {json.dumps(one)}\n\n".encode())
    await response.write_eof()
    return response


def not_allowed(request: web.Request) -> web.Response:
    """No server-initiated stream and no sessions: the spec's answer is 405."""
    return web.Response(status=405, headers={"Allow": "POST"},
                        text="this MCP server is stateless: POST JSON-RPC messages to /mcp")
