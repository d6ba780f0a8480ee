"""The aiohttp application: JSON-RPC, REST, MCP, WebSocket/SSE streams, health/readiness, metrics, OpenAPI.

Every route goes through `jobforge.api.call` (or `api.parse_params` for streams), so REST, JSON-RPC, MCP and the
streams share one parser, one handler, one authorisation rule and one error table. `guard.guard_middleware` runs
first on every route (Host, CORS, Content-Type, bearer token) and leaves the caller's principal on the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobforge import api
from jobforge.errors import ConfigError, JobForgeError, PayloadTooLarge, StoreError
from jobforge.logs import about_job
from jobforge.models import GetLogsParams, LogMessage, StreamLogsParams, WatchParams
from jobforge.server import jsonio, jsonrpc, mcp, streaming
from jobforge.server.guard import PRINCIPAL_KEY, Guard, guard_middleware
from jobforge.server.streaming import StreamLimits
from jobforge.server.openapi import openapi_document
from jobforge.server.responses import error_response
from jobforge.service import JobService

log = logging.getLogger("jobforge.server")

MAX_BODY = 1024 * 1024
SERVICE_KEY = web.AppKey("service", JobService)
LIMITS_KEY = web.AppKey("stream_limits", StreamLimits)
MCP_LOG_KEY = web.AppKey("mcp_log_level", int)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Every JSON reply: strict JSON (no NaN/Infinity)."""
    return web.json_response(data, status=status, headers=headers, dumps=jsonio.dumps)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except JobForgeError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge(f"request body over {MAX_BODY} bytes"))


@web.middleware
async def timing_middleware(request: web.Request, handler):
    """`http_request_duration_seconds` by route template (never ids), method and status code."""
    started = time.perf_counter()
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except web.HTTPException as exc:
        code = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[SERVICE_KEY].metrics.request(request.method, route, code, time.perf_counter() - started)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"request body over {MAX_BODY} bytes")
    return await request.read()


async def rpc(request: web.Request) -> web.Response:
    service, principal = request.app[SERVICE_KEY], request[PRINCIPAL_KEY]
    reply = await jsonrpc.handle(await _read_body(request), lambda m, p: api.call(service, m, p, principal))
    return web.Response(status=204) if reply is None else web.Response(text=reply, content_type="application/json")


async def rest_method(request: web.Request) -> web.Response:
    body = await _read_body(request)
    try:
        params = jsonio.loads(body) if body.strip() else {}
    except jsonio.BadJson as exc:
        return _json({"error": jsonrpc.parse_error(exc)["error"]}, status=400)
    if params is None:  # an empty body means {}, an explicit null is not an object
        raise ConfigError("params must be a JSON object", [{"field": "params", "rule": "must be a JSON object"}])
    return _json(await api.call(request.app[SERVICE_KEY], request.match_info["method"], params,
                                request[PRINCIPAL_KEY]))


async def rest_status(request: web.Request) -> web.Response:
    return _json(await api.call(request.app[SERVICE_KEY], "getStatus", {"job_id": request.match_info["job_id"]},
                                request[PRINCIPAL_KEY]))


def _typed_query(model: type[BaseModel], query: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    """A query string's values as `model` wants them: its integer fields from digits, its boolean fields from
    true/false/1/0/yes/no (anything else stays a string, which the model refuses naming the field)."""
    params: dict[str, Any] = dict(query)
    for name, value in query.items():
        field = model.model_fields.get(name)
        kind = field.annotation if field is not None else None
        if kind is int and value.isascii() and value.isdigit() and len(value) <= 20:
            params[name] = int(value)
        elif kind is bool and value.lower() in _BOOLEANS:
            params[name] = _BOOLEANS[value.lower()]
    return {**params, **extra}


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


async def rest_logs(request: web.Request) -> web.Response:
    params = _typed_query(GetLogsParams, request.query, job_id=request.match_info["job_id"])
    return _json(await api.call(request.app[SERVICE_KEY], "getLogs", params, request[PRINCIPAL_KEY]))


async def watch(request: web.Request) -> web.StreamResponse:
    query = _typed_query(WatchParams, request.query, job_id=request.match_info["job_id"])
    params = api.parse_params(WatchParams, query)
    service = request.app[SERVICE_KEY]
    await api.authorize_job(service, request[PRINCIPAL_KEY], params.job_id)  # 404/403 before the upgrade
    # Drop absent members of the envelope only: `job` keeps the exact getStatus shape, nulls included.
    with about_job(params.job_id):
        return await streaming.serve_websocket(
            request, service.watch(params.job_id, logs=params.logs), request.app[LIMITS_KEY],
            lambda u: {k: v for k, v in u.model_dump(mode="json").items() if v is not None})


async def _log_stream(request: web.Request, query: dict[str, Any]):
    """Parse the stream's params and check the job exists (404 before any upgrade); returns the job id and the
    follower."""
    params = api.parse_params(StreamLogsParams, query)
    service = request.app[SERVICE_KEY]
    await api.authorize_job(service, request[PRINCIPAL_KEY], params.job_id)  # 404/403 before any upgrade
    return params.job_id, service.follow_logs(params.job_id, params.phase, params.after,
                                              request.app[LIMITS_KEY].poll_interval)


async def stream_logs(request: web.Request) -> web.StreamResponse:
    """The reference's WebSocket log stream: `LogMessage` per line, then one `StreamStatus`, then close 1000."""
    job_id, source = await _log_stream(request, _typed_query(StreamLogsParams, request.query))
    with about_job(job_id):
        return await streaming.serve_websocket(request, source, request.app[LIMITS_KEY])


async def stream_logs_sse(request: web.Request) -> web.StreamResponse:
    """The same stream as Server-Sent Events; `id:` is the line's `seq`, so `Last-Event-ID` resumes."""
    query = _typed_query(StreamLogsParams, request.query, job_id=request.match_info["job_id"])
    if "Last-Event-ID" in request.headers:
        query.update(_typed_query(StreamLogsParams, {"after": request.headers["Last-Event-ID"].strip() or "0"}))
    job_id, source = await _log_stream(request, query)

    def frame(message) -> bytes:
        if isinstance(message, LogMessage):
            return streaming.sse_event("log", message, message.seq)
        return streaming.sse_event("status", message)
    with about_job(job_id):
        return await streaming.serve_sse(request, source, request.app[LIMITS_KEY], frame)


async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
    # Origin, Host and the bearer token were checked by the guard, as for every route.
    service, principal = request.app[SERVICE_KEY], request[PRINCIPAL_KEY]
    return await mcp.handle(request, lambda m, p: api.call(service, m, p, principal), await _read_body(request),
                            request.app[MCP_LOG_KEY])


async def mcp_not_allowed(request: web.Request) -> web.Response:
    return mcp.not_allowed(request)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    checks: dict[str, str] = {}
    try:
        await service.store.ping()
        checks["store"] = "ok"
    except StoreError as exc:
        checks["store"] = exc.message
    problems = await service.backend.check()
    checks.update(problems or {"backend": "ok"})
    ok = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ok" if ok else "unavailable", "checks": checks}
    if (index := getattr(service, "config_index", None)) is not None:
        body["config_index"] = index  # the Consul KV index of the configuration in force
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        await service.refresh_metrics()
    except StoreError as exc:  # serve what is counted in process; the store's gauges keep their last values
        log.warning("metrics: fleet gauges not refreshed: %s", exc.message)
    registry = service.metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_app(service: JobService, guard: Guard | None = None, *, stream_limits: StreamLimits | None = None,
               mcp_log_level: int = 0) -> web.Application:
    """`guard` defaults to no tokens and no CORS: right for loopback only (`main.serve` builds it from settings
    and refuses any other address without tokens)."""
    app = web.Application(middlewares=[timing_middleware, guard_middleware(guard or Guard()), errors_middleware],
                          client_max_size=MAX_BODY)
    app[SERVICE_KEY] = service
    app[LIMITS_KEY] = stream_limits or StreamLimits()
    app[MCP_LOG_KEY] = mcp_log_level
    streaming.setup(app)
    job = "{job_id}"  # any segment: the params model names a bad job_id (400), the router would say 404
    app.add_routes([
        web.post("/json", rpc),
        web.get(f"/json/job/{job}/status", rest_status),
        web.get(f"/json/job/{job}/logs", rest_logs),
        web.get(f"/json/job/{job}/watch", watch),
        web.get(f"/json/job/{job}/logs/stream", stream_logs_sse),
        web.get("/json/streamLogs", stream_logs),
        web.post("/json/{method}", rest_method),
        web.post("/mcp", mcp_endpoint),
        web.get("/mcp", mcp_not_allowed),
        web.delete("/mcp", mcp_not_allowed),
        web.post("/mcp/{method}", rest_method),
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics),
        web.get("/openapi.json", openapi),
    ])
    return app


def create_metrics_app(service: JobService) -> web.Application:
    app = web.Application()
    app[SERVICE_KEY] = service
    app.add_routes([web.get("/metrics", metrics)])
    return app
