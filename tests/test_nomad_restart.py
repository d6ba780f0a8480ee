"""The service dies (no shutdown: its tasks and connections just vanish, as with SIGKILL) while a phase runs in
Nomad; the phase ends while it is down; a new service on the same data dir resumes every job to its true result.

The Nomad double's client plays the tasks with a runner the test holds at a gate per phase; the real task scripts
are exercised in tests/test_e2e_nomad.py."""

from __future__ import annotations

import asyncio
import signal

import pytest

from jobforge.models import GetLogsParams, JobIdParams, SubmitJobParams
from tests.doubles.nomad import FakeNomad
from tests.support.nomad_service import CONFIG, PHASES, Gates, running_in_nomad, service_on
from tests.support.service import ServiceProcess
from tests.test_e2e import watch


@pytest.mark.parametrize("exit_code", [0, 3], ids=["succeeds", "fails"])
@pytest.mark.parametrize("phase", PHASES)
async def test_a_phase_that_ends_while_the_service_is_down_is_resumed_to_its_result(tmp_path, phase, exit_code):
    gates = Gates()
    gates.exit_codes[phase] = exit_code
    nomad = FakeNomad(runner=gates.runner, event_heartbeat=0.2, log_heartbeat=0.2)
    await nomad.start()
    try:
        async with service_on(tmp_path / "jobs.db", nomad) as first:
            job_id = (await first.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id
            for earlier in PHASES[:PHASES.index(phase)]:
                gates.open[earlier].set()
            await nomad.wait_until(lambda: running_in_nomad(nomad, phase))
        gates.open[phase].set()  # the phase ends while no service is there to see it
        for later in (*PHASES, "cleanup"):
            gates.open[later].set()
        await nomad.wait_until(lambda: not running_in_nomad(nomad, phase))

        async with service_on(tmp_path / "jobs.db", nomad) as second:
            async with asyncio.timeout(30):
                await second.idle()
            status = await second.get_status(JobIdParams(job_id=job_id))
            logs = (await second.get_logs(GetLogsParams(job_id=job_id))).logs
    finally:
        await nomad.stop()
    if exit_code == 0:
        assert status.status.value == "SUCCEEDED", status.error
        assert f"{phase} done" in logs[phase]
    else:
        assert (status.status.value, status.failed_phase.value) == ("FAILED", phase)
        assert status.error == f"{phase} phase failed: {phase} went wrong"
    assert f"{phase} started" in logs[phase]
    assert status.temp_image_deleted is True  # the cleanup after the resumed job ran through Nomad too


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
async def test_the_real_service_sigkilled_during_a_phase_resumes_it_after_a_restart(tmp_path, phase):
    """The same through the entry point: `jobforge-service` (nomad backend, SQLite store) is SIGKILLed while
    the phase runs in Nomad, the phase ends while it is down, and the restarted process on the same data dir
    resumes the job to its true result and runs the cleanup. (SQLite store: one replica, no leases.)"""
    gates = Gates()
    nomad = FakeNomad(runner=gates.runner, event_heartbeat=0.2, log_heartbeat=0.2)
    await nomad.start()
    svc = ServiceProcess(tmp_path / "data", CONFIG["registry_url"], JOBFORGE_BACKEND="nomad", JOBFORGE_STORE="sqlite",
                         NOMAD_ADDR=nomad.url, JOBFORGE_NOMAD_STREAM_TIMEOUT="2s")
    try:
        await asyncio.to_thread(svc.start)
        status, body = await asyncio.to_thread(svc.post, "/json/submitJob", {"job_config": CONFIG})
        assert status == 200, body
        job_id = body["job_id"]
        for earlier in PHASES[:PHASES.index(phase)]:
            gates.open[earlier].set()
        await nomad.wait_until(lambda: running_in_nomad(nomad, phase), timeout=60)
        svc.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(svc.proc.wait)
        for gate in gates.open.values():  # the phase, and all after it, end while no service is there
            gate.set()
        await nomad.wait_until(lambda: not running_in_nomad(nomad, phase), timeout=60)
        await asyncio.to_thread(svc.start)
        final = await asyncio.to_thread(watch, svc.url, job_id)
        logs = (await asyncio.to_thread(svc.logs, job_id))
    finally:
        await asyncio.to_thread(svc.stop)
        await nomad.stop()
    assert final["status"] == "SUCCEEDED", final["error"]
    assert f"{phase} started" in logs[phase] and f"{phase} done" in logs[phase]
    assert final["temp_image_deleted"] is True
