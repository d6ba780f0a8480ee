"""Fault injection at the store and the backend (in-memory backend, real SQLite): every job reaches a final
state with a specific error, no concurrency slot leaks, cleanups settle and are retried, watchers get `end`.
Real-process faults (kills, SIGKILL of the service, registry outages) are in tests/test_e2e_reliability.py."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from datetime import timedelta

from aiohttp.test_utils import TestClient, TestServer

from jobforge.errors import BackendError
from jobforge.models import GetLogsParams, JobIdParams, JobStatus, Phase, SubmitJobParams, utcnow
from jobforge.pipeline import Policy
from jobforge.server.app import create_app
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.support.fake_backend import FakeBackend
from tests.support.faulty_store import FaultyStore

CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "test": {"commands": ["true"]}}
POLICY = Policy(store_attempts=3, store_backoff=0.001, cleanup_attempts=3, cleanup_backoff=0.001)


class Clock:
    """Injected time: tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Env:
    def __init__(self, service: JobService, backend: FakeBackend, store: FaultyStore, clock: Clock) -> None:
        self.service, self.backend, self.store, self.clock = service, backend, store, clock

    async def submit(self) -> str:
        return (await self.service.submit_job(SubmitJobParams.model_validate({"job_config": CONFIG}))).job_id

    async def status(self, job_id: str):
        return await self.service.get_status(JobIdParams(job_id=job_id))

    async def drained(self) -> None:
        """Until the service has consumed every message the backend sent (no clock involved)."""
        while not self.backend.queue.empty():
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        await self.service.handled()

    async def watch_to_end(self, job_id: str):
        updates = [u async for u in self.service.watch(job_id)]
        assert updates[-1].type == "end"
        return updates[-1].job


@asynccontextmanager
async def running(db, max_jobs: int = 1, backend: FakeBackend | None = None, shutdown_grace: float = 10.0):
    backend = backend or FakeBackend()
    store = FaultyStore(SqliteStore(db))
    clock = Clock()
    service = JobService(store, backend, policy=POLICY, max_concurrent_jobs=max_jobs, clock=clock,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False),
                         tick_seconds=3600, shutdown_grace=shutdown_grace)
    await service.start()
    try:
        yield Env(service, backend, store, clock)
    finally:
        await service.aclose()
        await store.inner.aclose()


# ---------------------------------------------------------------- store faults

async def test_a_transient_store_error_on_any_write_is_retried_and_the_job_succeeds(tmp_path):
    for nth in range(1, 9):  # every write of a job's life: admit, started, succeeded x3, ..., temp deleted
        async with running(tmp_path / f"{nth}.db") as env:
            env.store.fail_puts(nth=nth)
            job_id = await env.submit()
            final = await env.watch_to_end(job_id)
            assert final.status is JobStatus.SUCCEEDED, (nth, final.error)
            assert env.store.failures == 1
            assert final.temp_image_deleted is True


async def test_a_store_that_stays_down_fails_the_job_specifically_and_frees_its_slot(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        first, second = await env.submit(), await env.submit()
        assert (await env.status(second)).status is JobStatus.PENDING
        await env.drained()
        env.store.fail_puts(nth=1, times=POLICY.store_attempts)  # the build's end cannot be stored at all
        env.backend.outcomes.clear()
        env.backend.finish(env.backend.dispatched[0])
        final = await env.watch_to_end(first)
        assert final.status is JobStatus.FAILED
        assert final.error == "the job's state could not be stored: consul: 500 leader election"
        assert final.failed_phase is Phase.BUILD
        assert (await env.watch_to_end(second)).status is JobStatus.SUCCEEDED  # no slot leaked


async def test_a_full_disk_fails_the_job_marks_its_log_and_keeps_earlier_jobs(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        earlier = await env.submit()
        await env.watch_to_end(earlier)
        logs_before = await env.service.get_logs(GetLogsParams(job_id=earlier))
        env.backend.outcomes[Phase.BUILD] = "hold"
        job_id = await env.submit()
        await env.drained()
        env.store.fail_appends(nth=1, times=1)  # the test phase's log lines hit a full disk
        env.backend.outcomes.clear()
        env.backend.finish(env.backend.dispatched[-1])
        final = await env.watch_to_end(job_id)
        assert final.status is JobStatus.FAILED and final.failed_phase is Phase.TEST
        assert final.error == "no space left on device: log lines of the test phase could not be stored"
        logs = (await env.service.get_logs(GetLogsParams(job_id=job_id))).logs
        assert logs["test"] == ["[log lines lost: 3 lines could not be stored (no space left on device)]"]
        assert logs["build"] == ["build line 0", "build line 1", "build line 2"]
        assert await env.service.get_logs(GetLogsParams(job_id=earlier)) == logs_before
        assert (await env.watch_to_end(await env.submit())).status is JobStatus.SUCCEEDED


async def test_when_even_the_failure_cannot_be_stored_the_phase_end_fails_the_job(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        env.backend.outcomes.update({Phase.BUILD: "hold", Phase.TEST: "hold"})
        job_id = await env.submit()
        await env.drained()
        env.store.fail_appends(nth=1, times=1)  # the test phase's first lines
        # puts: 1 build end + test dispatch, 2 test started, 3-5 the failure after the lost lines
        env.store.fail_puts(nth=3, times=POLICY.store_attempts, message="sqlite: database or disk is full")
        env.backend.finish(env.backend.dispatched[-1])
        await env.drained()
        env.backend.outcomes.clear()
        env.backend.finish(env.backend.dispatched[-1])  # the test phase ends "well"
        final = await env.watch_to_end(job_id)
        assert (final.status, final.failed_phase) == (JobStatus.FAILED, Phase.TEST)
        assert final.error == "no space left on device: log lines of the test phase could not be stored"


# ---------------------------------------------------------------- backend faults

async def test_kill_answers_200_when_stop_raises_and_the_queue_goes_on(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        client = TestClient(TestServer(create_app(env.service)))
        await client.start_server()
        try:
            env.backend.outcomes[Phase.BUILD] = "hold"
            env.backend.stop_error = BackendError("nomad unreachable")
            first, second = await env.submit(), await env.submit()
            resp = await client.post("/json/killJob", json={"job_id": first})
            assert resp.status == 200 and (await resp.json())["status"] == "FAILED"
        finally:
            await client.close()
        final = await env.watch_to_end(first)
        assert (final.status, final.error) == (JobStatus.FAILED, "killed by user")
        assert env.backend.cleaned[0] == first and final.temp_image_deleted is True
        build_log = (await env.service.get_logs(GetLogsParams(job_id=first))).logs["build"]
        assert "StopPhase failed: BackendError: nomad unreachable" in build_log
        env.backend.outcomes.clear()
        env.backend.finish(env.backend.dispatched[-1])
        assert (await env.watch_to_end(second)).status is JobStatus.SUCCEEDED


async def test_a_failing_cleanup_settles_the_job_records_the_error_and_is_retried(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        env.backend.cleanup_failures = [BackendError("registry 127.0.0.1:5000 unreachable"), False]
        job_id = await env.submit()
        final = await env.watch_to_end(job_id)  # settles after the first attempt
        assert final.status is JobStatus.SUCCEEDED and final.temp_image_deleted is False
        assert "registry 127.0.0.1:5000 unreachable" in final.cleanup_error
        await env.service.idle(cleanups=True)
        after = await env.status(job_id)
        assert after.temp_image_deleted is True and after.cleanup_error is None
        assert env.backend.cleaned == [job_id] * 3


async def test_a_cleanup_that_keeps_failing_is_given_up_after_its_attempts_and_not_owed_at_restart(tmp_path):
    db = tmp_path / "jobs.db"
    async with running(db) as env:
        env.backend.cleanup_failures = [False] * POLICY.cleanup_attempts
        job_id = await env.submit()
        await env.service.idle(cleanups=True)
        final = await env.status(job_id)
        assert final.temp_image_deleted is False and "could not be deleted" in final.cleanup_error
        assert env.backend.cleaned == [job_id] * POLICY.cleanup_attempts
    async with running(db) as env:
        assert await env.service.store.unfinished() == []
        assert env.backend.cleaned == []


async def test_a_cleanup_interrupted_by_shutdown_is_resumed_at_the_next_start(tmp_path):
    db = tmp_path / "jobs.db"
    async with running(db) as env:
        env.backend.cleanup_failures = [False]
        env.service._policy = POLICY.model_copy(update={"cleanup_backoff": 3600})  # the retry waits past shutdown
        job_id = await env.submit()
        await env.watch_to_end(job_id)
        assert [r.job_id for r in await env.service.store.unfinished()] == [job_id]
    async with running(db) as env:
        await env.service.idle(cleanups=True)
        assert (await env.status(job_id)).temp_image_deleted is True
        assert env.backend.cleaned == [job_id]


async def test_a_cleanup_still_running_at_shutdown_is_left_recorded_and_finished_at_the_next_start(tmp_path):
    db = tmp_path / "jobs.db"
    async with running(db, shutdown_grace=0.01) as env:
        env.backend.cleanup_gate = asyncio.Event()  # the deletion hangs (registry stalls) past the shutdown grace
        job_id = await env.submit()
        while env.backend.cleaned != [job_id]:
            await asyncio.sleep(0)
    async with running(db) as env:
        await env.service.idle(cleanups=True)
        assert (await env.status(job_id)).temp_image_deleted is True
        assert env.backend.cleaned == [job_id]


# ---------------------------------------------------------------- the service's own deadline

async def test_a_phase_no_backend_event_finishes_is_failed_at_its_deadline_and_the_next_job_starts(tmp_path):
    async with running(tmp_path / "jobs.db") as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        first, second = await env.submit(), await env.submit()
        await env.service.tick()
        assert (await env.status(first)).status is JobStatus.BUILDING
        env.clock.advance(POLICY.build_timeout + POLICY.deadline_grace)
        env.backend.outcomes.clear()
        await env.service.tick()
        final = await env.watch_to_end(first)
        assert final.status is JobStatus.FAILED and "build phase did not finish within" in final.error
        assert [(s.job_id, s.phase) for s in env.backend.stopped] == [(first, Phase.BUILD)]
        assert (await env.watch_to_end(second)).status is JobStatus.SUCCEEDED


async def test_slots_are_counted_from_the_store_not_from_lost_events(tmp_path):
    async with running(tmp_path / "jobs.db", max_jobs=1) as env:
        env.backend.outcomes[Phase.BUILD] = "hold"
        first, second = await env.submit(), await env.submit()
        # The first job ends without this process seeing the event (another instance, a lost message).
        record, version = await env.store.get(first)
        await env.store.put(record.model_copy(update={"status": JobStatus.FAILED, "current_phase": None,
                                                      "error": "ended elsewhere"}), version)
        env.backend.outcomes.clear()
        await env.service.tick()
        assert (await env.watch_to_end(second)).status is JobStatus.SUCCEEDED
