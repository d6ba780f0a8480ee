"""Binds the method table (`models.METHODS`) to the service: one `call` used by every transport.

Every call carries the caller's `Principal`; the method's `access` decides which owner it is checked against
(`jobforge.auth.authorize`), so JSON-RPC, REST, WebSocket, SSE and MCP cannot disagree on who may do what.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from jobforge import auth, offload
from jobforge.config import validation_error
from jobforge.errors import ConfigError, UnknownMethod
from jobforge.models import METHODS, Access, MethodSpec
from jobforge.service import JobService

Handler = Callable[..., Awaitable[BaseModel]]  # (service, params[, visible=owners for HISTORY methods])

HANDLERS: dict[str, Handler] = {
    "submitJob": JobService.submit_job,
    "getStatus": JobService.get_status,
    "getLogs": JobService.get_logs,
    "killJob": JobService.kill_job,
    "cleanup": JobService.cleanup,
    "getHistory": JobService.get_history,
}
assert HANDLERS.keys() == METHODS.keys(), "every API method needs exactly one handler"


def spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise UnknownMethod(f"method {shown!r} not found; known methods: {', '.join(METHODS)}") from None


def parse_params(model: type[BaseModel], params: Any) -> BaseModel:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError("params must be a JSON object", [{"field": "params", "rule": "must be a JSON object"}])
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def authorize_job(service: JobService, principal: auth.Principal, job_id: str) -> None:
    """`NotFound` for an unknown job, `Forbidden` for another owner's; also used by the streams before they
    open."""
    auth.authorize(principal, await service.owner_of(job_id), job_id=job_id)


async def call(service: JobService, name: str, params: Any, principal: auth.Principal) -> dict:
    """Parse, authorise, run. `principal` is required: a transport that forgets it fails loudly."""
    method = spec(name)
    parsed: Any = parse_params(method.params, params)
    scope: dict[str, Any] = {}
    if method.access is Access.JOB:
        if principal.owners is not None:  # a caller for every owner needs no lookup: the handler's read 404s
            await authorize_job(service, principal, parsed.job_id)
    elif method.access is Access.SUBMIT:
        auth.authorize(principal, parsed.job_config.owner)
    elif method.access is Access.HISTORY:
        if parsed.owner is not None:
            auth.authorize(principal, parsed.owner)
        scope["visible"] = principal.owners
    result = await HANDLERS[name](service, parsed, **scope)
    long = {field for field in type(result).model_fields
            if isinstance(value := getattr(result, field), list) and len(value) > _LONG}
    return await offload.run(_jsonable, result, long) if long else result.model_dump(mode="json")


_LONG = 64


def _jsonable(result: BaseModel, long: set[str]) -> dict:
    """`model_dump(mode="json")`, with the long list fields (a history page) dumped item by item: run in a thread,
    it lets the event loop take the GIL between items instead of waiting for one long dump."""
    out = result.model_dump(mode="json", exclude=long)
    for field in long:
        out[field] = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item
                      for item in getattr(result, field)]
    return out
