"""Replicas in one process (JobService + ConsulStore + ConsulLeases) on the Consul and Nomad doubles: a replica
that starts leaves a live replica's jobs alone, and a clean shutdown hands the jobs over at once (rolling
restart), long before a dead replica's timeout would."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from jobforge.admission import SubmitPolicy
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.cluster import ConsulLeases
from jobforge.models import JobIdParams, SubmitJobParams
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.stores.consul import ConsulStore
from jobforge.tasks import RegistryTarget
from tests.doubles.consul import FakeConsul
from tests.doubles.nomad import FakeNomad
from tests.support.nomad_service import CONFIG, PHASES, Gates, running_in_nomad

NEVER = 3600.0  # a lease timeout no test outlives: only a clean handover can move a job


@asynccontextmanager
async def replica(consul: FakeConsul, nomad: FakeNomad, name: str):
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url)), RenderParams(), stream_timeout=2.0, retry_delay=0.05)
    store = ConsulStore(consul.addr)
    leases = ConsulLeases(consul.addr, prefix="jobforge/", name=name, timeout=NEVER)
    svc = JobService(store, backend, policy=Policy(), max_concurrent_jobs=2, admission=SubmitPolicy.permissive(),
                     registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False), leases=leases)
    await svc.start()
    try:
        yield svc
    finally:  # a clean shutdown: the Nomad children run on, the session is destroyed
        await svc.aclose()
        await backend.aclose()
        await store.aclose()


async def finished(svc: JobService, job_id: str):
    """The job's final status, read through the store's blocking queries (no polling)."""
    async for update in svc.watch(job_id):
        if update.type == "end":
            return update.job
    raise AssertionError("watch ended without an end")


def dispatches(nomad: FakeNomad, job_id: str) -> list[tuple[str, str]]:
    return [(d.parent, d.meta["attempt"]) for d in nomad.cluster.dispatch_log if d.meta.get("job_id") == job_id
            and "attempt" in d.meta]


async def test_a_starting_replica_leaves_a_live_replicas_jobs_alone():
    gates = Gates()
    nomad, consul = FakeNomad(runner=gates.runner, event_heartbeat=0.2, log_heartbeat=0.2), FakeConsul()
    await nomad.start()
    await consul.start()
    try:
        async with replica(consul, nomad, "a") as a:
            job_id = (await a.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id
            await nomad.wait_until(lambda: running_in_nomad(nomad, "build"))
            async with replica(consul, nomad, "b") as b:
                assert a.leases.holds(job_id) and not b.leases.holds(job_id)
                for phase in (*PHASES, "cleanup"):
                    gates.open[phase].set()
                async with asyncio.timeout(30):
                    result = await finished(b, job_id)  # b follows a's job through the store
                status = await b.get_status(JobIdParams(job_id=job_id))
    finally:
        await consul.stop()
        await nomad.stop()
    assert result.status.value == status.status.value == "SUCCEEDED", status.error
    assert status.temp_image_deleted is True
    assert sorted(dispatches(nomad, job_id)) == [("jobforge-build", "1"), ("jobforge-publish", "1"),
                                                 ("jobforge-test", "1")]


async def test_a_clean_shutdown_hands_the_jobs_over_at_once():
    gates = Gates()
    nomad, consul = FakeNomad(runner=gates.runner, event_heartbeat=0.2, log_heartbeat=0.2), FakeConsul()
    await nomad.start()
    await consul.start()
    try:
        async with replica(consul, nomad, "b") as b:
            async with replica(consul, nomad, "a") as a:
                job_id = (await a.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id
                await nomad.wait_until(lambda: running_in_nomad(nomad, "build"))
                assert a.leases.holds(job_id)
            # a is gone (rolling restart); its session was destroyed, so b's next scan takes the job over
            for phase in (*PHASES, "cleanup"):
                gates.open[phase].set()
            async with asyncio.timeout(30):
                result = await finished(b, job_id)
            assert b.leases.holds(job_id) is False  # settled: the lease is gone with it
    finally:
        await consul.stop()
        await nomad.stop()
    assert result.status.value == "SUCCEEDED", result.error
    assert sorted(dispatches(nomad, job_id)) == [("jobforge-build", "1"), ("jobforge-publish", "1"),
                                                 ("jobforge-test", "1")]
