"""Through the whole service: a job whose phase Nomad cannot place, whose allocation an operator stops, or whose
Vault template fails ends FAILED with Nomad's own reason within seconds (the phase timeouts are 15-30 minutes)."""

from __future__ import annotations

import asyncio

from jobforge.models import JobIdParams, SubmitJobParams
from tests.doubles.nomad import FakeNomad, Node
from tests.doubles.vault import FakeVault
from tests.support.nomad_service import CONFIG, PHASES, Gates, running_in_nomad, service_on


async def run_job(tmp_path, nomad: FakeNomad, config: dict, during=None):
    """Submit one job, optionally act on Nomad while it runs, and return its final status."""
    await nomad.start()
    try:
        async with service_on(tmp_path / "jobs.db", nomad) as svc:
            job_id = (await svc.submit_job(SubmitJobParams.model_validate({"job_config": config}))).job_id
            if during is not None:
                await during()
            async with asyncio.timeout(20):
                await svc.idle()
            return await svc.get_status(JobIdParams(job_id=job_id))
    finally:
        await nomad.stop()


async def test_a_phase_nomad_cannot_place_fails_with_nomads_reason(tmp_path):
    gates = Gates()
    nomad = FakeNomad(runner=gates.runner, node=Node(id="n1", name="n1", host_volumes=set()))
    status = await run_job(tmp_path, nomad, CONFIG)
    assert (status.status.value, status.failed_phase.value) == ("FAILED", "build")
    assert status.error == "build phase cannot be placed: constraint filtered missing compatible host volumes (1)"


async def test_an_allocation_stopped_by_an_operator_fails_the_job(tmp_path):
    gates = Gates()
    gates.open["build"].set()
    gates.open["cleanup"].set()
    nomad = FakeNomad(runner=gates.runner, kill_timeout=0.2, event_heartbeat=0.5, log_heartbeat=0.5)

    async def operator_stops_the_test_allocation():
        await nomad.wait_until(lambda: running_in_nomad(nomad, "test"))
        child = next(jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-test/dispatch-"))
        nomad.stop_alloc(nomad.alloc_ids(child)[0])  # `nomad alloc stop`: Nomad says `complete`

    status = await run_job(tmp_path, nomad, CONFIG, operator_stops_the_test_allocation)
    assert (status.status.value, status.failed_phase.value) == ("FAILED", "test")
    assert status.error == "test phase: stopped outside Job Forge (alloc is being migrated)"


async def test_a_vault_template_that_fails_names_the_secret(tmp_path):
    gates = Gates()
    for phase in (*PHASES, "cleanup"):
        gates.open[phase].set()
    nomad = FakeNomad(runner=gates.runner, vault=FakeVault())  # the secret does not exist
    status = await run_job(tmp_path, nomad, {**CONFIG, "git_credentials_path": "secret/ci/git"})
    assert (status.status.value, status.failed_phase.value) == ("FAILED", "build")
    assert status.error == ("build phase failed: Template failed: vault.read(secret/ci/git): "
                            "no secret exists at secret/data/ci/git")



async def test_the_event_stream_lag_is_measured_from_nomads_own_modify_time(tmp_path):
    """Nomad stamps each allocation change (ModifyTime, ns); the backend reports how long after it acted on it."""
    gates = Gates()
    for phase in gates.open:
        gates.open[phase].set()
    nomad = FakeNomad(runner=gates.runner)
    lags: list[float] = []
    await nomad.start()
    try:
        async with service_on(tmp_path / "jobs.db", nomad, on_event_lag=lags.append) as svc:
            await svc.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))
            async with asyncio.timeout(20):
                await svc.idle()
    finally:
        await nomad.stop()
    # One per allocation change of the three phases and the cleanup; each the age of a change just made.
    assert len(lags) >= 4 and all(0 <= lag < 30 for lag in lags), lags
