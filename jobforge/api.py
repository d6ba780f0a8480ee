"""Binds the method table (`models.METHODS`) to the service: one `call` used by every transport."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from jobforge.config import validation_error
from jobforge.errors import ConfigError, UnknownMethod
from jobforge.models import METHODS, MethodSpec
from jobforge.service import JobService

Handler = Callable[[JobService, Any], Awaitable[BaseModel]]

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


async def call(service: JobService, name: str, params: Any) -> dict:
    method = spec(name)
    result = await HANDLERS[name](service, parse_params(method.params, params))
    return result.model_dump(mode="json")
