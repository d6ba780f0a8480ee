"""The service's own log lines as an operator greps them (`LOG_FORMAT=json`): every line about a job has the
job's `job_id` field, whichever part of the service wrote it and whether or not its message names the job.

The service runs in process (in-memory backend, real SQLite, a real webhook receiver) with `jobforge.logs`
configured as `jobforge-service` configures it.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict

from aiohttp import web

from jobforge import logs
from jobforge.errors import BackendError
from jobforge.models import Phase
from tests.support.receiver import Receiver
from tests.test_server import running


async def test_every_line_about_a_job_carries_its_job_id(tmp_path):
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    try:
        first_refused = lambda n: web.Response(status=500 if n == 0 else 204)  # noqa: E731 - one retry
        async with Receiver(first_refused) as receiver, running(tmp_path / "db") as env:
            service = env.service
            service._policy = service.policy.model_copy(update={"cleanup_backoff": 0.001})
            env.backend.cleanup_failures = [BackendError("registry 127.0.0.1:5000 unreachable")]
            succeeded = await env.submit(webhook_url=receiver.url())  # a webhook retried, a cleanup retried
            await service.idle(cleanups=True)
            await service.webhooks.drain()
            env.backend.outcomes[Phase.TEST] = "fail"
            failed = await env.submit(webhook_url=receiver.url())
            await service.idle(cleanups=True)
            await service.webhooks.drain()
            env.backend.outcomes = {Phase.BUILD: "hold"}
            env.backend.stop_error = BackendError("nomad unreachable")  # the kill's stop fails: an exception line
            killed = await env.submit()
            assert (await env.rpc("killJob", {"job_id": killed}))["result"]["status"] == "FAILED"
            await service.idle(cleanups=True)
    finally:
        logging.getLogger().handlers.clear()

    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    ours = [line for line in lines if line["logger"].startswith("jobforge")]
    jobs = (succeeded, failed, killed)
    by_job: defaultdict[str, list[dict]] = defaultdict(list)
    for line in ours:
        named = [job for job in jobs if job in line["msg"] or job in line.get("exc", "")]
        assert len(named) <= 1, line
        if named:
            assert line.get("job_id") == named[0], line
        if "job_id" in line:
            by_job[line["job_id"]].append(line)
    assert set(by_job) == set(jobs)
    for job in jobs:  # the reference's messages, with the field
        assert [line["msg"] for line in by_job[job]].count("Job submitted successfully") == 1
        assert f"job {job}: PENDING -> BUILDING" in [line["msg"] for line in by_job[job]]
    # What makes this more than the lines that pass the id themselves: warnings and errors from the delivery
    # worker, the cleanup and the command boundary, found by the context the service ran them in.
    seen = {(line["logger"], line["level"], line["job_id"]) for line in ours if "job_id" in line}
    assert ("jobforge.webhooks", "warning", succeeded) in seen  # the HTTP 500, retried
    assert ("jobforge.webhooks", "info", failed) in seen  # delivered
    assert ("jobforge.service", "warning", succeeded) in seen  # the cleanup that failed once
    assert ("jobforge.service", "error", killed) in seen  # StopPhase failed (with its traceback)
    assert any("StopPhase failed" in line["msg"] and "exc" in line for line in by_job[killed])
