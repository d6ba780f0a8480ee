"""Webhook wire format, decided without I/O: the payload, the headers, the signature and what an answer means.

Receivers written for the reference service check `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the exact
body>` keyed with the job's `webhook_secret`. The body is built once, when the delivery is queued, and stored;
retries send the same bytes with the same `X-Webhook-Delivery` id. The body never holds a secret: `repo_url`
loses its userinfo, and the key, URL and custom headers stay in the job's stored config.
docs/webhooks.md describes the events and their fields for receivers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit, urlunsplit

from jobforge.config import JobConfig
from jobforge.models import JobRecord, WebhookDelivery
from jobforge.pipeline import FireWebhook
from jobforge.rules import is_reserved_webhook_header, mask_url_passwords

SIGNATURE_HEADER = "X-Webhook-Signature"
EVENT_HEADER = "X-Webhook-Event"
DELIVERY_HEADER = "X-Webhook-Delivery"
_DELIVERY_NAMESPACE = uuid.UUID("6f1b7c1e-4a3c-5d2e-9b8a-0c5f2e7d9a41")
RETRYABLE_STATUSES = frozenset({408, 429})


def user_agent() -> str:
    try:
        return f"jobforge/{version('jobforge')}"
    except PackageNotFoundError:  # running from a source tree without the installed wheel
        return "jobforge/0"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def strip_credentials(url: str) -> str:
    """The URL without its userinfo (`https://user:pw@host/x` -> `https://host/x`). scp-like addresses
    (`git@host:path`) and local paths carry no password and are returned unchanged."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host_port = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host_port))


def delivery_id(job_id: str, command: FireWebhook) -> str:
    """Unique per (job, event) and deterministic: queuing the same event twice is a no-op, retries keep it."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{job_id}\n{command.event.value}"))


def payload(command: FireWebhook, record: JobRecord) -> dict:
    cfg = record.config
    return {
        "event": command.event.value,
        "job_id": record.job_id,
        "status": command.status.value,
        "phase": command.phase.value if command.phase else None,
        "timestamp": rfc3339(command.at),
        "duration": round(command.duration, 3),
        "owner": cfg.owner,
        "repo_url": strip_credentials(cfg.repo_url),
        "git_ref": cfg.git_ref,
        "image_name": cfg.image_name,
        "image_tags": record.image_tags,
        "error": mask_url_passwords(command.error) if command.error else None,
    }


def new_delivery(command: FireWebhook, record: JobRecord, now: datetime) -> WebhookDelivery:
    body = json.dumps(payload(command, record), separators=(",", ":"), ensure_ascii=False)
    return WebhookDelivery(delivery_id=delivery_id(record.job_id, command), job_id=record.job_id,
                           event=command.event, body=body, created_at=now, next_attempt_at=now)


def headers(delivery: WebhookDelivery, config: JobConfig) -> dict[str, str]:
    """The job's `webhook_headers` first, then ours: config validation forbids naming ours, and this order
    makes sure they win even for a record stored before that rule existed."""
    out = {name: value for name, value in config.webhook_headers.items() if not is_reserved_webhook_header(name)}
    out.update({"Content-Type": "application/json", "User-Agent": user_agent(),
                EVENT_HEADER: delivery.event.value, DELIVERY_HEADER: delivery.delivery_id})
    if config.webhook_secret is not None:
        out[SIGNATURE_HEADER] = sign(config.webhook_secret.get_secret_value(), delivery.body.encode())
    return out


def retryable_status(status: int) -> bool:
    """5xx, 408 and 429 are worth another try; any other 4xx will not change, and a 3xx is never followed."""
    return status >= 500 or status in RETRYABLE_STATUSES


def backoff(attempt: int, base: float, cap: float, retry_after: str | None = None) -> timedelta:
    """Delay before attempt `attempt + 1`: base * 2^(attempt-1), capped; a receiver's numeric Retry-After
    (seconds) is honoured up to the cap."""
    delay = min(cap, base * 2 ** (attempt - 1))
    if retry_after is not None and retry_after.strip().isdigit():
        delay = min(cap, max(delay, float(retry_after.strip())))
    return timedelta(seconds=delay)
