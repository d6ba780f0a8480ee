"""The service dies (no shutdown: its tasks and connections just vanish, as with SIGKILL) while a phase runs in
Nomad; the phase ends while it is down; a new service on the same data dir resumes every job to its true result.

The Nomad double's client plays the tasks with a runner the test holds at a gate per phase; the real task scripts
are exercised in tests/test_e2e_nomad.py."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.models import GetLogsParams, JobIdParams, SubmitJobParams
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.doubles.nomad import FakeNomad, TaskRun

CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]}}
PHASES = ("build", "test", "publish")


class Gates:
    """Each phase's task prints a line and waits at its gate; `exit_codes` says how it ends."""

    def __init__(self) -> None:
        self.open = {phase: asyncio.Event() for phase in (*PHASES, "cleanup")}
        self.exit_codes = {phase: 0 for phase in self.open}

    async def runner(self, run: TaskRun, payload: bytes, env: dict) -> int:
        run.write(f"{run.name} started\n".encode())
        await self.open[run.name].wait()
        code = self.exit_codes[run.name]
        if code:
            run.write(f"ERROR: {run.name} went wrong\n".encode(), "stderr")
        else:
            run.write(f"{run.name} done\n".encode())
        return code


@asynccontextmanager
async def service_on(db, nomad: FakeNomad):
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url)), RenderParams(), stream_timeout=2.0, retry_delay=0.05)
    store = SqliteStore(db)
    svc = JobService(store, backend, policy=Policy(), max_concurrent_jobs=2,
                     registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False))
    await svc.start()
    try:
        yield svc
    finally:  # no graceful stop of anything in Nomad: the children run on, as after SIGKILL
        await svc.aclose()
        await backend.aclose()
        await store.aclose()


def running_in_nomad(nomad: FakeNomad, phase: str) -> bool:
    return any(jid.startswith(f"jobforge-{phase}/dispatch-") and any(
        a["ClientStatus"] == "running" for a in nomad.allocations(jid)) for (_, jid) in nomad.cluster.jobs)


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
