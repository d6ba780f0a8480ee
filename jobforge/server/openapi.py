"""OpenAPI 3.1 document derived from the method table and the models: nothing here is written by hand per method.

Every route of `jobforge.server.app` is described: the REST methods (`/json/<method>`, and the same under
`/mcp/<method>`), the JSON-RPC envelope at `/json`, the GET aliases, the streams (WebSocket upgrades and
`text/event-stream`), MCP, health, readiness, metrics and this document. Schemas come from the pydantic models
(`jobforge.config` carries the job config's rules as patterns and lengths), errors from `jobforge.errors`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jobforge.models import (
    JOB_ID_PATTERN,
    METHODS,
    GetLogsParams,
    HealthResult,
    LogMessage,
    StreamLogsParams,
    StreamStatus,
    WatchParams,
    WatchUpdate,
)
from jobforge.server.jsonrpc import MAX_BATCH

_ERRORS = {
    400: "invalid params: the error's `data.errors` names each field and rule",
    401: "missing or unknown bearer token",
    403: "the token may not act for that owner, or a cross-origin request from an unlisted origin",
    404: "unknown job or method",
    409: "the job is in a state that does not allow this",
    413: "request body over 1 MiB",
    415: "a body without Content-Type: application/json",
    421: "the Host header names no address of this service",
    429: "the queue is full (Retry-After says when to try again)",
    502: "the scheduler (Nomad) or the registry failed",
    503: "the store is unavailable",
}
_GUARD_ERRORS = (401, 403, 413, 415, 421)
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}}}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for code in sorted(codes)}


def _json(schema: dict, description: str = "result") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _has_required(model: type[BaseModel]) -> bool:
    return any(field.is_required() for field in model.model_fields.values())


def _query_parameters(model: type[BaseModel], refs_schema: dict, skip: tuple[str, ...] = ("job_id",)) -> list[dict]:
    """Query parameters from a params model (the GET aliases and streams parse their query with it)."""
    props = refs_schema["properties"]
    return [{"name": name, "in": "query", "required": False, "schema": props[name]}
            for name in model.model_fields if name not in skip]


_JOB_ID = {"name": "job_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}


@cache
def openapi_document() -> dict:
    params = [(m.params, "validation") for m in METHODS.values()]
    extra = [(GetLogsParams, "validation"), (StreamLogsParams, "validation"), (WatchParams, "validation")]
    results = [(m, "serialization") for m in
               [*(s.result for s in METHODS.values()), HealthResult, LogMessage, StreamStatus, WatchUpdate]]
    keys = list(dict.fromkeys(params + extra + results))
    refs, schema = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    defs = schema.get("$defs", {})
    inline = {key: defs[refs[key]["$ref"].rsplit("/", 1)[1]] for key in extra}
    paths: dict[str, Any] = {}

    for prefix in ("/json", "/mcp"):
        for name, method in METHODS.items():
            # A body is optional when every param has a default: an empty body means `{}`.
            paths[f"{prefix}/{name}"] = {"post": {
                "operationId": name if prefix == "/json" else f"mcp_{name}",
                "summary": method.summary,
                "tags": ["REST" if prefix == "/json" else "MCP REST aliases"],
                "requestBody": {"required": _has_required(method.params), "content": {"application/json": {
                    "schema": refs[(method.params, "validation")]}}},
                "responses": {"200": _json(refs[(method.result, "serialization")]),
                              **_errors(400, 404, 409, 429, 502, 503, *_GUARD_ERRORS)},
            }}

    calls = [{"type": "object", "additionalProperties": False,
              "required": ["jsonrpc", "method", "params"] if _has_required(m.params) else ["jsonrpc", "method"],
              "properties": {"jsonrpc": {"const": "2.0"}, "method": {"const": name},
                             "params": refs[(m.params, "validation")],
                             "id": {"anyOf": [{"type": "string", "maxLength": 256}, {"type": "integer"}]}}}
             for name, m in METHODS.items()]
    request = {"oneOf": calls}
    reply = {"type": "object", "required": ["jsonrpc", "id"], "properties": {
        "jsonrpc": {"const": "2.0"}, "id": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
        "result": {"anyOf": [refs[(m.result, "serialization")] for m in METHODS.values()]},
        "error": _ERROR_SCHEMA["properties"]["error"]}}
    paths["/json"] = {"post": {
        "operationId": "jsonrpc", "tags": ["JSON-RPC"],
        "summary": "JSON-RPC 2.0: one call or a batch (at most %d); a call without `id` is a notification. Errors "
                   "of a call (invalid params, unknown job, ...) come back in the reply's `error` with HTTP 200."
                   % MAX_BATCH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
            request, {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": request}]}}}},
        "responses": {"200": _json({"anyOf": [reply, {"type": "array", "items": reply}]}, "the reply or replies"),
                      "204": {"description": "only notifications were sent: no reply"},
                      **_errors(*_GUARD_ERRORS)},
    }}

    job_errors = _errors(400, 404, 503, 401, 403, 421)
    paths["/json/job/{job_id}/status"] = {"get": {
        "operationId": "getStatusByPath", "tags": ["REST"], "summary": METHODS["getStatus"].summary,
        "parameters": [_JOB_ID], "responses": {"200": _json(refs[(METHODS["getStatus"].result, "serialization")]),
                                               **job_errors}}}
    paths["/json/job/{job_id}/logs"] = {"get": {
        "operationId": "getLogsByPath", "tags": ["REST"], "summary": METHODS["getLogs"].summary,
        "parameters": [_JOB_ID, *_query_parameters(GetLogsParams, inline[(GetLogsParams, "validation")])],
        "responses": {"200": _json(refs[(METHODS["getLogs"].result, "serialization")]), **job_errors}}}
    upgrade = {"description": "WebSocket upgrade; then one JSON text message per item, closed normally (1000) at "
                              "the end or with a reason (slow consumer, shutdown)"}
    paths["/json/job/{job_id}/watch"] = {"get": {
        "operationId": "watchJob", "tags": ["Streams"],
        "summary": "WebSocket: the job's status changes (and log lines with logs=true) until it is settled. "
                   "Messages: WatchUpdate.",
        "parameters": [_JOB_ID, *_query_parameters(WatchParams, inline[(WatchParams, "validation")])],
        "responses": {"101": {**upgrade, "content": {"application/json": {
            "schema": refs[(WatchUpdate, "serialization")]}}}, **job_errors}}}
    stream_params = _query_parameters(StreamLogsParams, inline[(StreamLogsParams, "validation")])
    messages = {"oneOf": [refs[(LogMessage, "serialization")], refs[(StreamStatus, "serialization")]]}
    paths["/json/streamLogs"] = {"get": {
        "operationId": "streamLogs", "tags": ["Streams"],
        "summary": "WebSocket: the job's log lines (backlog, then live), then one status message, then close 1000.",
        "parameters": [{**_JOB_ID, "in": "query"}, *stream_params],
        "responses": {"101": {**upgrade, "content": {"application/json": {"schema": messages}}}, **job_errors}}}
    paths["/json/job/{job_id}/logs/stream"] = {"get": {
        "operationId": "streamLogsSse", "tags": ["Streams"],
        "summary": "Server-Sent Events: `event: log` (id = the line's seq; Last-Event-ID resumes) then one "
                   "`event: status`; each `data:` is one JSON message.",
        "parameters": [_JOB_ID, *stream_params,
                       {"name": "Last-Event-ID", "in": "header", "required": False,
                        "schema": {"type": "string", "pattern": r"^[0-9]{1,18}$"}}],
        "responses": {"200": {"description": "the event stream", "content": {"text/event-stream": {
            "schema": {"type": "string"}, "itemSchema": messages}}}, **job_errors}}}
    paths["/mcp"] = {
        "post": {"operationId": "mcp", "tags": ["MCP"],
                 "summary": "MCP streamable HTTP transport (JSON-RPC 2.0: initialize, tools/list, tools/call, "
                            "ping); the tools are the methods above, with the same input schemas.",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "anyOf": [{"type": "object"}, {"type": "array", "minItems": 1}]}}}},
                 "responses": {"200": {"description": "a JSON-RPC reply, as JSON or as an SSE stream (Accept)",
                                       "content": {"application/json": {"schema": {}},
                                                   "text/event-stream": {"schema": {"type": "string"}}}},
                               "202": {"description": "notifications or responses only: accepted"},
                               **_errors(400, *_GUARD_ERRORS)}},
    }
    open_route = {"security": [], "tags": ["Operations"]}
    paths["/health"] = {"get": {"operationId": "health", **open_route, "summary": "the process is up",
                                "responses": {"200": _json(refs[(HealthResult, "serialization")]),
                                              **_errors(421)}}}
    paths["/ready"] = {"get": {"operationId": "ready", **open_route,
                               "summary": "store and backend reachable",
                               "responses": {"200": _json(refs[(HealthResult, "serialization")]),
                                             "503": _json(refs[(HealthResult, "serialization")], "not ready"),
                                             **_errors(421)}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", **open_route, "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}, **_errors(421)}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", **open_route, "summary": "this document",
                                      "responses": {"200": _json({"type": "object"}), **_errors(421)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Job Forge", "version": "1"},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {"schemas": {**defs, "Error": _ERROR_SCHEMA},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a token of JOBFORGE_API_TOKENS_FILE"}}},
    }
