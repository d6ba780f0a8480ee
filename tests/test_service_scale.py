"""Scale mechanisms of the service: work per backend event does not grow with the number of jobs."""

from __future__ import annotations

import asyncio

from jobforge.models import JobIdParams, JobStatus, Phase, SubmitJobParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.support.fake_backend import FakeBackend
from tests.support.faulty_store import FaultyStore

CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]}}


class ScanCountingStore(FaultyStore):
    """Counts reads of every unfinished job (the admission pass), the one store call that grows with the jobs."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.scans = 0

    async def unfinished(self):
        self.scans += 1
        return await self.inner.unfinished()


async def test_job_ends_with_nothing_waiting_do_not_scan_every_unfinished_job(tmp_path):
    """An admission pass reads every unfinished job; run after each job's end it made N jobs cost N^2. With no
    job waiting for a slot, a job's end starts no pass, and the jobs still end and free their slots."""
    backend = FakeBackend()
    backend.outcomes[Phase.BUILD] = "hold"
    store = ScanCountingStore(SqliteStore(tmp_path / "jobs.db"))
    service = JobService(store, backend, policy=Policy(), max_concurrent_jobs=30, tick_seconds=3600,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False))
    await service.start()
    try:
        jobs = [(await service.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id
                for _ in range(30)]
        assert len(backend.dispatched) == 30  # every build is running, nothing waits
        scans = store.scans
        backend.outcomes.clear()
        for command in list(backend.dispatched):
            backend.finish(command)
        async with asyncio.timeout(60):
            await service.idle(cleanups=True)
        statuses = {(await service.get_status(JobIdParams(job_id=job))).status for job in jobs}
        assert statuses == {JobStatus.SUCCEEDED}
        assert store.scans == scans  # 30 job ends (and 90 phase transitions), no pass over every job
    finally:
        await service.aclose()
        await store.inner.aclose()


async def test_a_job_end_admits_a_waiting_job(tmp_path):
    """The counterpart: with a job waiting, a job's end does run the pass that admits it."""
    backend = FakeBackend()
    backend.outcomes[Phase.BUILD] = "hold"
    store = ScanCountingStore(SqliteStore(tmp_path / "jobs.db"))
    service = JobService(store, backend, policy=Policy(), max_concurrent_jobs=1, tick_seconds=3600,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False))
    await service.start()
    try:
        first, second = [(await service.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id
                         for _ in range(2)]
        assert (await service.get_status(JobIdParams(job_id=second))).status is JobStatus.PENDING
        backend.outcomes.clear()
        backend.finish(backend.dispatched[0])
        async with asyncio.timeout(60):
            await service.idle(cleanups=True)
        for job in (first, second):
            assert (await service.get_status(JobIdParams(job_id=job))).status is JobStatus.SUCCEEDED
    finally:
        await service.aclose()
        await store.inner.aclose()
