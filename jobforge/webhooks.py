"""Webhook delivery: JSON POST signed with HMAC-SHA256, retried with backoff.

The payload carries the redacted status only; the secret signs the body (`X-JobForge-Signature: sha256=<hex>`)
and never travels in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging

import aiohttp

from jobforge.models import JobRecord, JobStatusResult

log = logging.getLogger("jobforge.webhooks")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(self, attempts: int = 3, backoff: float = 1.0, timeout: float = 10.0) -> None:
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def send(self, event: str, record: JobRecord) -> bool:
        cfg = record.config
        body = json.dumps({"event": event, "job": JobStatusResult.from_record(record).model_dump(mode="json")},
                          separators=(",", ":")).encode()
        headers = {**cfg.webhook_headers, "Content-Type": "application/json", "X-JobForge-Event": event}
        if cfg.webhook_secret is not None:
            headers["X-JobForge-Signature"] = sign(cfg.webhook_secret.get_secret_value(), body)
        for attempt in range(1, self._attempts + 1):
            try:
                async with aiohttp.ClientSession(timeout=self._timeout) as session:
                    async with session.post(cfg.webhook_url, data=body, headers=headers) as resp:
                        if resp.status < 300:
                            return True
                        log.warning("webhook for job %s: HTTP %s (attempt %d)", record.job_id, resp.status, attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("webhook for job %s failed (attempt %d): %s", record.job_id, attempt, exc)
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        return False
