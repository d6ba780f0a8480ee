"""Issue 10, configuration in Consul KV (acceptance 4): the service watches `jobforge-service/config/` on the
Consul double with blocking queries; a change applies to jobs submitted afterwards without a restart, an invalid
value is logged and the previous one kept, a set environment variable wins, and /ready reports the index."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from jobforge.config import JobConfig
from jobforge.models import JobIdParams, JobStatus, Phase, SubmitJobParams
from jobforge.pipeline import Policy
from jobforge.runtime_config import JobDefaults, RuntimeConfig, parse_entries
from jobforge.server.app import create_app
from jobforge.server.wiring import build_config_watcher
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.doubles.consul import FakeConsul
from tests.support.fake_backend import FakeBackend
from tests.support.service import ServiceProcess

PREFIX = "jobforge-service/config/"
BASE = {"owner": "team-a", "repo_url": "https://git.example/app.git", "image_name": "app",
        "registry_url": "registry.example:5000"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def consul():
    fake = FakeConsul()
    await fake.start()
    yield fake
    await fake.stop()


async def put(consul: FakeConsul, key: str, value: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://{consul.addr}/v1/kv/{PREFIX}{key}", data=value.encode()) as resp:
            assert resp.status == 200, await resp.text()


@pytest.fixture
def env(monkeypatch, consul):
    for name in ("BUILD_TIMEOUT", "TEST_TIMEOUT", "MAX_CONCURRENT_JOBS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.addr)
    monkeypatch.setenv("JOBFORGE_CONSUL_CONFIG", "true")
    monkeypatch.setenv("JOBFORGE_CONSUL_CONFIG_WAIT", "5s")
    return monkeypatch


@pytest.fixture
async def rig(tmp_path, env):
    """(service, backend, clock, make_watcher): builds stay running until their deadline."""
    backend = FakeBackend()
    backend.outcomes[Phase.BUILD] = "hold"
    clock = Clock()
    service = JobService(SqliteStore(tmp_path / "jobs.db"), backend, policy=Policy(deadline_grace=0),
                         max_concurrent_jobs=2, registry=RegistryTarget(registry_url="127.0.0.1:5000"), clock=clock)
    await service.start()
    watchers = []

    def watcher():
        w = build_config_watcher(Settings(), service)
        watchers.append(w)
        return w
    yield service, backend, clock, watcher
    for w in watchers:
        await w.aclose()
    await service.aclose()


async def submit(service: JobService, **changes) -> str:
    return (await service.submit_job(SubmitJobParams(job_config=JobConfig.model_validate({**BASE, **changes})))).job_id


async def status(service: JobService, job_id: str):
    return await service.get_status(JobIdParams(job_id=job_id))


async def stored_config(service: JobService, job_id: str) -> JobConfig:
    return (await service.store.get(job_id)).record.config


async def changed(watcher) -> None:
    """One blocking query that returns because the prefix changed (bounded: never the full wait)."""
    assert await asyncio.wait_for(watcher.poll(), 4) is True


async def test_a_new_build_timeout_times_out_the_next_job_without_a_restart(rig, consul, caplog):
    service, backend, clock, make = rig
    await put(consul, "build_timeout", "1h")
    watcher = make()
    await changed(watcher)
    first = await submit(service)
    assert backend.dispatched[-1].timeout_seconds == 3600

    waiting = asyncio.create_task(watcher.poll())  # blocks until Consul has news
    await put(consul, "build_timeout", "5s")
    assert await asyncio.wait_for(waiting, 4) is True
    second = await submit(service)
    assert backend.dispatched[-1].timeout_seconds == 5  # what the runner enforces
    clock.now += timedelta(seconds=6)
    await service.tick()
    timed_out = await status(service, second)
    assert timed_out.status is JobStatus.FAILED and "within 5s" in timed_out.error, timed_out
    assert (await status(service, first)).status is JobStatus.BUILDING  # submitted before: keeps its hour

    with caplog.at_level(logging.WARNING, logger="jobforge.consul_config"):
        await put(consul, "build_timeout", "soon")
        await changed(watcher)
    assert any("build_timeout='soon' is invalid" in r.getMessage() and "keeping 5.0" in r.getMessage()
               for r in caplog.records), caplog.text
    third = await submit(service)
    assert backend.dispatched[-1].timeout_seconds == 5
    assert (await stored_config(service, third)).build_timeout == timedelta(seconds=5)


async def test_the_running_watcher_follows_changes_and_ready_reports_the_index(rig, consul):
    service, backend, clock, make = rig
    await put(consul, "max_concurrent_jobs", "1")
    seen = asyncio.Event()
    watcher = make()
    apply = watcher._on_change
    watcher._on_change = lambda config, index: (apply(config, index), seen.set())
    watcher.start()
    await asyncio.wait_for(seen.wait(), 4)
    jobs = [await submit(service) for _ in range(3)]
    assert len(backend.dispatched) == 1

    seen.clear()
    await put(consul, "max_concurrent_jobs", "3")
    await asyncio.wait_for(seen.wait(), 4)
    await service.tick()  # admission
    assert len(backend.dispatched) == 3
    assert {(await status(service, j)).status for j in jobs} == {JobStatus.BUILDING}

    client = TestClient(TestServer(create_app(service)))
    await client.start_server()
    try:
        resp = await client.get("/ready")
        body = await resp.json()
    finally:
        await client.close()
    assert body["config_index"] == watcher.index == service.config_index > 0


async def test_environment_variables_win_and_resources_are_pinned(rig, consul, env):
    env.setenv("BUILD_TIMEOUT", "2m")
    service, backend, clock, make = rig
    await put(consul, "build_timeout", "5s")
    await put(consul, "default_resource_limits/cpu", "3000")
    watcher = make()
    await changed(watcher)
    job = await submit(service, resource_limits={"memory": 512})
    assert backend.dispatched[-1].timeout_seconds == 120
    config = await stored_config(service, job)
    assert config.build_timeout is None  # the environment's value, not pinned
    assert config.resources_for("build").cpu == 3000 and config.resources_for("build").memory == 512
    own = await submit(service, resource_limits={"build": {"cpu": 700}})
    assert (await stored_config(service, own)).resources_for("build").cpu == 700


async def test_per_phase_default_resources_apply_to_jobs_submitted_afterwards(rig, consul, caplog):
    service, backend, clock, make = rig
    await put(consul, "default_resource_limits/cpu", "3000")
    await put(consul, "default_resource_limits/build/cpu", "4000")
    await put(consul, "default_resource_limits/test/memory", "1500")
    watcher = make()
    await changed(watcher)
    before = await submit(service)
    assert backend.dispatched[-1].resources.cpu == 4000  # the phase's default beats the global one
    config = await stored_config(service, before)
    assert [config.resources_for(p).cpu for p in ("build", "test", "publish")] == [4000, 3000, 3000]
    assert [config.resources_for(p).memory for p in ("build", "test", "publish")] == [2048, 1500, 1024]

    # The job's own values win, its global value too: over a phase default.
    own = await stored_config(service, await submit(service, resource_limits={"cpu": 700, "test": {"memory": 900}}))
    assert [own.resources_for(p).cpu for p in ("build", "test", "publish")] == [700, 700, 700]
    assert own.resources_for("test").memory == 900

    with caplog.at_level(logging.WARNING, logger="jobforge.consul_config"):
        await put(consul, "default_resource_limits/build/cpu", "-5")
        await changed(watcher)
    assert any("default_resource_limits/build/cpu='-5' is invalid" in r.getMessage()
               and "keeping 4000" in r.getMessage() for r in caplog.records), caplog.text
    await put(consul, "default_resource_limits/publish/disk", "8000")
    await changed(watcher)
    after = await stored_config(service, await submit(service))
    assert after.resources_for("build").cpu == 4000 and after.resources_for("publish").disk == 8000
    assert config.resources_for("publish").disk == 2048  # the job submitted before keeps its pinned values
    assert (await stored_config(service, before)).resources_for("publish").disk == 2048


def test_parse_keeps_the_previous_value_of_an_invalid_key():
    previous = RuntimeConfig(test_timeout=60, cpu=100)
    found, problems = parse_entries({"test_timeout": "-3s", "default_resource_limits/cpu": "lots",
                                     "build_timeout": "45m", "unknown": "x"}, previous)
    assert found == RuntimeConfig(build_timeout=2700, test_timeout=60, cpu=100)
    assert [p.split("=")[0] for p in problems] == ["test_timeout", "default_resource_limits/cpu"]
    assert parse_entries({}, previous)[0] == RuntimeConfig()  # keys removed from Consul: back to the defaults
    job = JobConfig.model_validate({**BASE, "build_timeout": "10m"})
    assert JobDefaults(build_timeout=5).apply(job) == job


@pytest.mark.slow
def test_the_service_process_starts_with_consul_config_and_ready_reports_its_index(tmp_path, registry):
    """The entry point's wiring: the real `jobforge-service` reads the prefix before it answers."""
    fake = FakeConsul()
    with fake.in_thread() as addr:
        asyncio.run(put(fake, "build_timeout", "7m"))
        asyncio.run(put(fake, "default_resource_limits/memory", "many"))
        with ServiceProcess(tmp_path / "svc", registry.host, CONSUL_HTTP_ADDR=addr, JOBFORGE_CONSUL_CONFIG="true",
                            JOBFORGE_CONSUL_CONFIG_WAIT="2s") as svc:
            _, body = svc.get("/ready")
            log = svc.log_path.read_text()
    assert body["config_index"] == fake.index > 0, body
    assert "build_timeout=420s" in log
    assert "default_resource_limits/memory='many' is invalid" in log
