"""One exception tree for every transport.

    JobForgeError                 http 500, rpc -32603  (base; unexpected failures)
     ├── ConfigError              http 400, rpc -32602  invalid params: carries field errors
     ├── Unauthorized             http 401, rpc -32001  no or unknown bearer token
     ├── Forbidden                http 403, rpc -32003  the token may not act for that owner
     ├── NotFound                 http 404, rpc -32004  no such job
     ├── Conflict                 http 409, rpc -32009  the job's state forbids the request
     │    └── IllegalTransition                         the pipeline refused an event
     ├── UnknownMethod            http 404, rpc -32601  no such API method
     ├── PayloadTooLarge          http 413, rpc -32600  request body over the limit
     ├── UnsupportedMediaType     http 415, rpc -32015  a JSON endpoint got another Content-Type
     ├── MisdirectedRequest       http 421, rpc -32021  the Host header names no address of this service
     ├── BackendError             http 502, rpc -32010  scheduler / runner failure
     │    └── SecretReadError                           Vault refused or failed a job's secret (names the path)
     ├── StoreError               http 503, rpc -32011  job store failure (Retry-After: 2)
     ├── QueueFull                http 429, rpc -32029  MAX_QUEUED_JOBS jobs already wait (Retry-After: 10)
     ├── ServiceUnavailable       http 503, rpc -32012  the client could not reach the service
     └── SlowConsumer             http 503, rpc -32013  a stream's client fell too far behind; it is dropped

Each class carries its HTTP status and JSON-RPC code, so the server maps errors from one table and the client
maps them back (`error_for_rpc_code`); `retry_after` (seconds) becomes a `Retry-After` header for errors that
pass by themselves. Programming errors (TypeError, ...) stay outside the tree.
"""

from __future__ import annotations

from typing import Any


class JobForgeError(Exception):
    http_status = 500
    rpc_code = -32603
    retry_after: int | None = None

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ConfigError(JobForgeError):
    """Bad input; `data` is a list of ``{"field": ..., "rule": ...}``."""

    http_status = 400
    rpc_code = -32602

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message, errors or [])

    @property
    def errors(self) -> list[dict[str, str]]:
        return self.data


class Unauthorized(JobForgeError):
    """No bearer token, or one the service does not know (HTTP answers carry ``WWW-Authenticate: Bearer``)."""

    http_status = 401
    rpc_code = -32001


class Forbidden(JobForgeError):
    """A valid token acting on (or submitting as) an owner it was not issued for."""

    http_status = 403
    rpc_code = -32003


class NotFound(JobForgeError):
    http_status = 404
    rpc_code = -32004


class Conflict(JobForgeError):
    http_status = 409
    rpc_code = -32009


class IllegalTransition(Conflict):
    def __init__(self, status: str, event: str) -> None:
        super().__init__(f"event {event} is not allowed while the job is {status}", {"status": status, "event": event})


class UnknownMethod(JobForgeError):
    http_status = 404
    rpc_code = -32601


class PayloadTooLarge(JobForgeError):
    http_status = 413
    rpc_code = -32600


class UnsupportedMediaType(JobForgeError):
    """JSON endpoints accept only ``Content-Type: application/json``: browsers cannot send that cross-origin
    without a CORS preflight, so a web page cannot forge a call."""

    http_status = 415
    rpc_code = -32015


class MisdirectedRequest(JobForgeError):
    """The ``Host`` header names neither an address the service is bound to nor an allowed host (DNS
    rebinding)."""

    http_status = 421
    rpc_code = -32021


class BackendError(JobForgeError):
    http_status = 502
    rpc_code = -32010


class SecretReadError(BackendError):
    """A job's Vault secret could not be read; the message names the path, never a value."""


class StoreError(JobForgeError):
    """The job store failed (busy, unreachable, disk full): nothing of the request was committed; retry later."""

    http_status = 503
    rpc_code = -32011
    retry_after = 2


class QueueFull(JobForgeError):
    """Too many jobs already wait for a slot; nothing was stored."""

    http_status = 429
    rpc_code = -32029
    retry_after = 10


class ServiceUnavailable(JobForgeError):
    http_status = 503
    rpc_code = -32012


class SlowConsumer(JobForgeError):
    """A watcher's or stream client's bounded buffer was full: the server drops that client, nobody else."""

    http_status = 503
    rpc_code = -32013


_BY_RPC_CODE: dict[int, type[JobForgeError]] = {
    cls.rpc_code: cls
    for cls in (ConfigError, Unauthorized, Forbidden, NotFound, Conflict, UnknownMethod, PayloadTooLarge,
                UnsupportedMediaType, MisdirectedRequest, BackendError, StoreError, QueueFull, ServiceUnavailable,
                SlowConsumer)
}


def error_for_rpc_code(code: int, message: str, data: Any = None) -> JobForgeError:
    """Rebuild the most specific exception for a JSON-RPC error object (client side)."""
    cls = _BY_RPC_CODE.get(code, JobForgeError)
    if cls is ConfigError:
        return ConfigError(message, data if isinstance(data, list) else [])
    return cls(message, data)
