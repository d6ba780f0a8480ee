"""The service's own log lines: one JSON object per line (`LOG_FORMAT=json`) or `key=value` text.

Fields every line has: `ts` (UTC, RFC 3339), `level`, `logger`, `msg`; then whatever the call passed in `extra`
(`job_id` on every line about a job, `phase`, `owner`, ...). URL passwords are masked in the whole line
(messages, fields, tracebacks). Messages keep the reference's wording where one
exists ("Job submitted successfully"), so operators' existing searches still match.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from jobforge.rules import mask_url_passwords

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": "WARNING"}.get(level, level.upper()))
