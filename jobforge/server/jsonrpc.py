"""JSON-RPC 2.0 framing (single, batch, notifications) over one `invoke(method, params)` callable.

Bounded: a batch holds at most `MAX_BATCH` calls (beyond it one -32600 error and nothing runs), and a batch's
reply at most `MAX_REPLY_BYTES` (once reached, the calls not yet run are answered with a -32600 error saying so
and are not executed). Replies are serialised here, one call at a time, with `jsonio.dumps`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jobforge import offload
from jobforge.errors import JobForgeError
from jobforge.server import jsonio

log = logging.getLogger("jobforge.jsonrpc")

Invoke = Callable[[str, Any], Awaitable[Any]]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603

MAX_BATCH = 100
MAX_REPLY_BYTES = 8 * 1024 * 1024
_INLINE_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop (well under a millisecond)


def _error(id_: Any, code: int, message: str, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


def parse_error(exc: Exception) -> dict:
    return _error(None, PARSE_ERROR, f"parse error: {exc}")


async def handle(body: bytes, invoke: Invoke, *, max_batch: int = MAX_BATCH,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> str | None:
    """The serialised response, or None when nothing must be sent (only notifications)."""
    try:  # a large body is parsed and checked in a thread: /health goes on meanwhile
        doc = await offload.run(jsonio.loads, body) if len(body) > _INLINE_BYTES else jsonio.loads(body)
    except jsonio.BadJson as exc:
        return jsonio.dumps(parse_error(exc))
    if not isinstance(doc, list):
        reply = await _one(doc, invoke)
        return None if reply is None else await offload.run(_dump, reply)
    if not doc:
        return jsonio.dumps(_error(None, INVALID_REQUEST, "invalid request: empty batch"))
    if len(doc) > max_batch:
        return jsonio.dumps(_error(None, INVALID_REQUEST,
                                   f"invalid request: batch of {len(doc)} calls; at most {max_batch} per batch "
                                   "(nothing was executed)"))
    parts: list[str] = []
    size = 0
    for item in doc:
        if size > max_reply_bytes:
            reply = _skipped(item, max_reply_bytes)
        else:
            reply = await _one(item, invoke)
            await asyncio.sleep(0)  # let other requests (health checks) in between the calls of a batch
        if reply is not None:
            parts.append(await offload.run(_dump, reply))  # a reply can be MBs: encoded off the loop
            size += len(parts[-1])
    return "[" + ",".join(parts) + "]" if parts else None


def _skipped(item: Any, max_reply_bytes: int) -> dict | None:
    if isinstance(item, dict) and "id" not in item:
        return None  # a notification never gets a reply
    id_ = item.get("id") if isinstance(item, dict) else None
    return _error(id_ if _valid_id(id_) else None, INVALID_REQUEST,
                  f"invalid request: the batch reply reached its limit of {max_reply_bytes} bytes; "
                  "this call was not executed (send it again, alone or in a smaller batch)")


def _dump(reply: dict) -> str:
    try:
        return jsonio.dumps(reply)
    except (ValueError, TypeError):
        log.exception("reply could not be written as JSON")
        return jsonio.dumps(_error(reply.get("id") if _valid_id(reply.get("id")) else None, INTERNAL_ERROR,
                                   "internal error: the result could not be written as JSON"))


def _valid_id(id_: Any) -> bool:
    return id_ is None or isinstance(id_, str) or jsonio.finite_number(id_)


async def _one(request: Any, invoke: Invoke) -> dict | None:
    if not isinstance(request, dict):
        return _error(None, INVALID_REQUEST, "invalid request: expected an object")
    id_ = request.get("id")
    valid_id = _valid_id(id_)
    if request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str) or not valid_id:
        return _error(id_ if valid_id else None, INVALID_REQUEST,
                      'invalid request: needs "jsonrpc": "2.0", a string "method" and a string/finite number "id"')
    extra = set(request) - {"jsonrpc", "method", "params", "id"}
    if extra:
        shown = sorted(extra)[:5]
        return _error(id_, INVALID_REQUEST, f"invalid request: unknown members {[k[:40] for k in shown]}")
    notification = "id" not in request
    try:
        result = await invoke(request["method"], request.get("params"))
    except JobForgeError as exc:
        return None if notification else _error(id_, exc.rpc_code, exc.message, exc.data)
    except Exception:
        log.exception("internal error in %s", request["method"][:100])
        return None if notification else _error(id_, INTERNAL_ERROR, "internal error")
    return None if notification else {"jsonrpc": "2.0", "result": result, "id": id_}
