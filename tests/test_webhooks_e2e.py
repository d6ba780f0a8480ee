"""Webhooks through the real `jobforge-service` (settings, wiring, worker): a job that fails fast at clone time
(no build tools involved) notifies a receiver on 127.0.0.1, which JOBFORGE_WEBHOOK_ALLOW_HOSTS allows. The
refusals without it are tested in-process (tests/test_webhooks.py); the successful real build with webhooks
is in tests/test_e2e.py."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from jobforge.devinfra import free_port
from tests.support.receiver import ThreadedReceiver
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.e2e

SECRET = "e2e-webhook-secret"


def failing_job(receiver: ThreadedReceiver) -> dict:
    return {"owner": "e2e", "repo_url": f"http://127.0.0.1:{free_port()}/missing.git", "image_name": "nothing",
            "registry_url": f"127.0.0.1:{free_port()}", "webhook_url": receiver.url(), "webhook_secret": SECRET}


def test_the_real_service_signs_and_sends_a_failed_jobs_events_in_order(tmp_path):
    with ThreadedReceiver() as receiver, \
            ServiceProcess(tmp_path / "svc", f"127.0.0.1:{free_port()}", JOBFORGE_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
                           JOBFORGE_WEBHOOK_BACKOFF="100ms") as service:
        status, body = service.post("/json/submitJob", {"job_config": failing_job(receiver)})
        assert status == 200, body
        got = receiver.wait_for_event("job.failed")
        log = service.log_tail(500)
    assert [r.event for r in got] == ["build.started", "build.failed", "job.failed"]
    for r in got:
        expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert r.headers["X-Webhook-Signature"] == expected and r.payload["job_id"] == body["job_id"]
        assert SECRET.encode() not in r.body
    assert got[-1].payload["error"] and got[-1].payload["phase"] == "build"
    assert SECRET not in log
