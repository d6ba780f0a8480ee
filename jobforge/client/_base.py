"""The I/O-free half of the client: request building, response parsing and error mapping.

As in httpx's ``BaseClient``, nothing here touches the network, so `Client` and `AsyncClient` differ only in how
they send bytes, and every rule about paths, bodies and error objects lives once, driven by `models.METHODS`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from jobforge.config import SECRETS_CONTEXT, JobConfig, validation_error
from jobforge.errors import (
    BackendError,
    ConfigError,
    Conflict,
    Forbidden,
    JobForgeError,
    MisdirectedRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    error_for_rpc_code,
)
from jobforge.models import METHODS, HealthResult, JobIdParams, LogsResult, WatchUpdate

__all__ = ["Call", "request_headers", "ws_headers", "build_call", "submit_params", "parse_result", "parse_health",
           "error_from_response", "unreachable", "watch_url", "parse_watch_message", "handshake_error", "logs_params",
           "merge_logs"]

# Used only when an error body is not a JSON error object (a proxy's HTML page, an empty 404, ...).
_BY_HTTP_STATUS: dict[int, type[JobForgeError]] = {
    400: ConfigError, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 421: MisdirectedRequest, 429: QueueFull, 502: BackendError, 503: ServiceUnavailable,
}
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: a header value that cannot be split or folded


def request_headers(token: str | None) -> dict[str, str]:
    """Headers of every request: JSON in and out, and the bearer token when there is one."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token is None:
        return headers
    if not _TOKEN.match(token):
        raise ConfigError("invalid API token: expected visible ASCII characters only (no spaces or newlines)",
                          [{"field": "token", "rule": "visible ASCII, no whitespace"}])
    return headers | {"Authorization": f"Bearer {token}"}


def ws_headers(token: str | None) -> dict[str, str]:
    """The WebSocket upgrade carries only the token (it has no body)."""
    return {k: v for k, v in request_headers(token).items() if k == "Authorization"}


@dataclass(frozen=True)
class Call:
    """One HTTP request to make: the verb, the path below the service URL and the JSON body."""

    method: str
    path: str
    body: dict[str, Any] | None
    result: type[BaseModel]


def submit_params(config: JobConfig | dict[str, Any]) -> dict[str, Any]:
    """Validate a job config locally (nothing is sent when it is invalid) and return the submitJob params.

    A dict is sent as given after validation, so the server applies its own defaults and secrets travel exactly
    as the user wrote them; a `JobConfig` is dumped with only the fields that were set.
    """
    if isinstance(config, JobConfig):
        return {"job_config": config.model_dump(mode="json", exclude_unset=True, context=dict(SECRETS_CONTEXT))}
    try:
        JobConfig.model_validate(config)
    except ValidationError as exc:
        raise validation_error(exc, "invalid params for submitJob") from None
    return {"job_config": config}


def build_call(name: str, params: dict[str, Any]) -> Call:
    """The REST form of one API method: ``POST /json/<method>`` with the params as the body."""
    spec = METHODS[name]
    if name == "submitJob":
        body = params  # validated by submit_params; the config is passed through untouched
    else:
        try:
            body = spec.params.model_validate(params).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            raise validation_error(exc, f"invalid params for {name}") from None
    return Call("POST", f"/json/{name}", body, spec.result)


def logs_params(job_id: str, phase: Any, structured: bool, offset: int) -> dict[str, Any]:
    """getLogs params for the page at `offset` (the service bounds every reply; `get_logs` reads all pages)."""
    params: dict[str, Any] = {"job_id": job_id} | ({"phase": phase} if phase else {})
    return params | ({"structured": True} if structured else {}) | ({"offset": offset} if offset else {})


def merge_logs(done: LogsResult | None, page: LogsResult) -> tuple[LogsResult, int | None]:
    """Append a page to the pages read so far; returns the merged result and the next offset to ask for (None
    when this was the last page, including from a service that does not page)."""
    if done is None:
        merged = page
    else:
        logs = {name: [*lines] for name, lines in done.logs.items()}
        for name, lines in page.logs.items():
            logs.setdefault(name, []).extend(lines)
        entries = None
        if done.entries is not None or page.entries is not None:
            entries = {name: [*lines] for name, lines in (done.entries or {}).items()}
            for name, lines in (page.entries or {}).items():
                entries.setdefault(name, []).extend(lines)
        merged = page.model_copy(update={"logs": logs, "entries": entries, "offset": done.offset})
    nxt = page.next_offset
    if nxt is not None and nxt <= page.offset:  # a server that does not move forward: stop, never loop
        nxt = None
    return merged.model_copy(update={"next_offset": None}) if nxt is None else merged, nxt


def error_from_response(status: int, text: str) -> JobForgeError:
    """Rebuild the server's exception from a ``{"error": {code, message, data}}`` body (or its HTTP status)."""
    try:
        err = json.loads(text)["error"]
        return error_for_rpc_code(int(err["code"]), str(err.get("message", "")), err.get("data"))
    except (ValueError, KeyError, TypeError):
        cls = _BY_HTTP_STATUS.get(status, JobForgeError)
        message = f"HTTP {status}: {text.strip()[:200] or 'no body'}"
        return ConfigError(message) if cls is ConfigError else cls(message)


def parse_result(result: type[BaseModel], status: int, text: str) -> BaseModel:
    if not 200 <= status < 300:
        raise error_from_response(status, text)
    try:
        return result.model_validate_json(text)
    except ValidationError as exc:
        raise JobForgeError(f"unexpected {result.__name__} from the service: {exc.errors()[:3]}") from None


def parse_health(status: int, text: str) -> HealthResult:
    """`/health` and `/ready` answer 503 with the failing checks; that is a result, not an error."""
    if status in (200, 503):
        try:
            return HealthResult.model_validate_json(text)
        except ValidationError:
            pass
    raise error_from_response(status, text)


def unreachable(url: str, source: str, reason: BaseException) -> ServiceUnavailable:
    text = str(reason)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)  # requests/urllib3 bury the cause in nested reprs
    why = errno.group(0) if errno else text or type(reason).__name__
    return ServiceUnavailable(f"cannot reach the Job Forge service at {url} (URL from {source}): {why}",
                              {"url": url, "source": source})


def watch_url(base_url: str, job_id: str, logs: bool) -> str:
    """``ws(s)://…/json/job/{id}/watch``; the id is validated and escaped before it becomes a path segment."""
    try:
        JobIdParams(job_id=job_id)
    except ValidationError as exc:
        raise validation_error(exc, "invalid params for watch") from None
    scheme, rest = base_url.split("://", 1)
    ws = "wss" if scheme == "https" else "ws"
    return f"{ws}://{rest}/json/job/{quote(job_id, safe='')}/watch" + ("?logs=true" if logs else "")


def handshake_error(status: int, job_id: str) -> JobForgeError:
    if status == 404:
        return NotFound(f"job {job_id} not found")
    if status == 401:
        return Unauthorized(f"watch of job {job_id} refused: missing or invalid API token (HTTP 401)")
    if status == 403:
        return Forbidden(f"watch of job {job_id} refused: this token may not see that job's owner (HTTP 403)")
    cls = _BY_HTTP_STATUS.get(status, JobForgeError)
    message = f"watch of job {job_id} refused: HTTP {status}"
    return ConfigError(message) if cls is ConfigError else cls(message)


def parse_watch_message(text: str) -> WatchUpdate:
    try:
        return WatchUpdate.model_validate_json(text)
    except ValidationError as exc:
        raise JobForgeError(f"unexpected watch message from the service: {exc.errors()[:3]}") from None
