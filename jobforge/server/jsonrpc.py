"""JSON-RPC 2.0 framing (single, batch, notifications) over one `invoke(method, params)` callable."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jobforge.errors import JobForgeError

log = logging.getLogger("jobforge.jsonrpc")

Invoke = Callable[[str, Any], Awaitable[Any]]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603


def _error(id_: Any, code: int, message: str, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


async def handle(body: bytes, invoke: Invoke) -> Any | None:
    """Returns the response document, or None when nothing must be sent (only notifications)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(None, PARSE_ERROR, f"parse error: {exc}")
    if isinstance(doc, list):
        if not doc:
            return _error(None, INVALID_REQUEST, "invalid request: empty batch")
        replies = [r for r in [await _one(item, invoke) for item in doc] if r is not None]
        return replies or None
    return await _one(doc, invoke)


async def _one(request: Any, invoke: Invoke) -> dict | None:
    if not isinstance(request, dict):
        return _error(None, INVALID_REQUEST, "invalid request: expected an object")
    id_ = request.get("id")
    valid_id = id_ is None or (isinstance(id_, (str, int, float)) and not isinstance(id_, bool))
    if request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str) or not valid_id:
        return _error(id_ if valid_id else None, INVALID_REQUEST,
                      'invalid request: needs "jsonrpc": "2.0", a string "method" and a string/number "id"')
    extra = set(request) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return _error(id_, INVALID_REQUEST, f"invalid request: unknown members {sorted(extra)}")
    notification = "id" not in request
    try:
        result = await invoke(request["method"], request.get("params"))
    except JobForgeError as exc:
        return None if notification else _error(id_, exc.rpc_code, exc.message, exc.data)
    except Exception:
        log.exception("internal error in %s", request["method"])
        return None if notification else _error(id_, INTERNAL_ERROR, "internal error")
    return None if notification else {"jsonrpc": "2.0", "result": result, "id": id_}
