"""The service's own log lines: one JSON object per line (`LOG_FORMAT=json`) or `key=value` text.

Fields every line has: `ts` (UTC, RFC 3339), `level`, `logger`, `msg`; then whatever the call passed in `extra`
(`phase`, `owner`, ...). URL passwords are masked in the whole line (messages, fields, tracebacks). Messages keep
the reference's wording where one exists ("Job submitted successfully"), so operators' existing searches still
match.

`job_id` is on every line about a job. The service runs each job's work (an event applied, a backend message
handled, a cleanup, a webhook delivery) inside `about_job(job_id)`, a context variable that asyncio copies into
the tasks started there; `JobContext`, a filter on the handler, adds it to each line that did not pass a
`job_id` itself. Work about several jobs or none (an admission pass, the tick) runs in `about_job(None)` so it
never inherits one, and the few lines written outside any job's context pass `extra={"job_id": ...}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

from jobforge.rules import mask_url_passwords

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


_JOB: ContextVar[str | None] = ContextVar("jobforge_log_job", default=None)


@contextmanager
def about_job(job_id: str | None) -> Iterator[None]:
    """Lines logged inside, and in tasks started inside, are about `job_id` (None: about no single job)."""
    token = _JOB.set(job_id)
    try:
        yield
    finally:
        _JOB.reset(token)


class JobContext(logging.Filter):
    """Adds the `job_id` of the job being worked on to a line that carries none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None and (job_id := _JOB.get()) is not None:
            record.job_id = job_id
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_url_passwords(json.dumps(_fields(record), default=str, ensure_ascii=False))


class KeyValueFormatter(logging.Formatter):
    """`ts=… level=info logger=jobforge.service msg="Job submitted successfully" job_id=…`"""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' "=\n\t'):
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        return mask_url_passwords(" ".join(parts))


def configure(level: str, fmt: str, stream) -> None:
    """Install one handler on the root logger (the entry point calls this once)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(JobContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": "WARNING"}.get(level, level.upper()))
