"""A password in `repo_url` never leaves the service: whatever a phase prints or reports (here a backend that
echoes the URL, as a leaky tool would), logs, errors, status, history, watch updates and webhook payloads carry
`***` in its place. The real pipeline's side is in tests/test_e2e_credentials.py."""

from __future__ import annotations

import asyncio
import json
import logging

from jobforge.backends.base import LogChunk
from jobforge.models import LogLine, LogStream, Phase
from jobforge.pipeline import DispatchPhase, PhaseFailed
from jobforge import logs
from tests.support.fake_backend import FakeBackend, now
from tests.test_server import running
from tests.support.receiver import Receiver

PASSWORD = "hunter2-url-secret"
URL = f"https://ci:{PASSWORD}@git.example.invalid/app.git"


class LeakyBackend(FakeBackend):
    """Prints the repo URL in a log line and fails the build with it in the error."""

    async def dispatch(self, command: DispatchPhase, payload: dict, config) -> None:
        self.dispatched.append(command)
        self.queue.put_nowait(LogChunk(command.job_id, command.phase.value, [
            LogLine(ts=now(), stream=LogStream.STDOUT, line=f"==> fetching {payload['repo_url']} at main")]))
        self._emit(command, PhaseFailed, error=f"build phase failed: git fetch of {payload['repo_url']} failed")


async def test_url_password_is_masked_in_logs_status_history_watch_and_webhooks(tmp_path):
    async with Receiver() as receiver, running(tmp_path / "db", backend=LeakyBackend()) as env:
        job_id = await env.submit(repo_url=URL, webhook_url=receiver.url())
        updates = []

        async def watch() -> None:
            async for update in env.service.watch(job_id, logs=True):
                updates.append(update.model_dump(mode="json"))
        await asyncio.wait_for(watch(), 10)
        await receiver.wait_for(3)  # build.started, build.failed, job.failed
        seen = {
            "logs": await (await env.client.get(f"/json/job/{job_id}/logs")).json(),
            "status": await (await env.client.get(f"/json/job/{job_id}/status")).json(),
            "history": await (await env.client.post("/json/getHistory", json={})).json(),
            "watch": updates,
            "webhooks": [r.payload for r in receiver.requests],
        }
    text = json.dumps(seen)
    assert PASSWORD not in text
    assert seen["status"]["status"] == "FAILED"
    assert "https://ci:***@git.example.invalid/app.git" in seen["status"]["error"]
    assert seen["status"]["config"]["repo_url"] == "https://ci:***@git.example.invalid/app.git"
    assert "==> fetching https://ci:***@git.example.invalid/app.git at main" in seen["logs"]["logs"]["build"]
    failed = next(p for p in seen["webhooks"] if p["event"] == "build.failed")
    assert "git.example.invalid" in failed["error"] and "ci:" not in failed["repo_url"]


def test_the_service_log_masks_url_passwords():
    record = logging.LogRecord("jobforge", logging.WARNING, __file__, 1, "cloning %s", (URL,), None)
    for formatter in (logs.KeyValueFormatter(), logs.JsonFormatter()):
        line = formatter.format(record)
        assert PASSWORD not in line and "https://ci:***@git.example.invalid/app.git" in line
