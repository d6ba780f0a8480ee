"""One exception tree for every transport.

    JobForgeError                 http 500, rpc -32603  (base; unexpected failures)
     ├── ConfigError              http 400, rpc -32602  invalid params: carries field errors
     ├── NotFound                 http 404, rpc -32004  no such job
     ├── Conflict                 http 409, rpc -32009  the job's state forbids the request
     │    └── IllegalTransition                         the pipeline refused an event
     ├── UnknownMethod            http 404, rpc -32601  no such API method
     ├── PayloadTooLarge          http 413, rpc -32600  request body over the limit
     ├── BackendError             http 502, rpc -32010  scheduler / runner failure
     ├── StoreError               http 503, rpc -32011  job store failure
     ├── ServiceUnavailable       http 503, rpc -32012  the client could not reach the service
     └── SlowConsumer             http 503, rpc -32013  a stream's client fell too far behind; it is dropped

Each class carries its HTTP status and JSON-RPC code, so the server maps errors from one table and the client
maps them back (`error_for_rpc_code`). Programming errors (TypeError, ...) stay outside the tree.
"""

from __future__ import annotations

from typing import Any


class JobForgeError(Exception):
    http_status = 500
    rpc_code = -32603

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


class BackendError(JobForgeError):
    http_status = 502
    rpc_code = -32010


class StoreError(JobForgeError):
    http_status = 503
    rpc_code = -32011


class ServiceUnavailable(JobForgeError):
    http_status = 503
    rpc_code = -32012


class SlowConsumer(JobForgeError):
    """A watcher's or stream client's bounded buffer was full: the server drops that client, nobody else."""

    http_status = 503
    rpc_code = -32013


_BY_RPC_CODE: dict[int, type[JobForgeError]] = {
    cls.rpc_code: cls
    for cls in (ConfigError, NotFound, Conflict, UnknownMethod, PayloadTooLarge, BackendError, StoreError,
                ServiceUnavailable, SlowConsumer)
}


def error_for_rpc_code(code: int, message: str, data: Any = None) -> JobForgeError:
    """Rebuild the most specific exception for a JSON-RPC error object (client side)."""
    cls = _BY_RPC_CODE.get(code, JobForgeError)
    if cls is ConfigError:
        return ConfigError(message, data if isinstance(data, list) else [])
    return cls(message, data)
