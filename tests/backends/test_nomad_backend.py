"""The Nomad backend against the Nomad double (tests/doubles/nomad.py): registration, dispatch, the event
stream, framed logs, failures, kills, timeouts, cleanup, re-attaching after a restart, control lines and the
allocation's resource usage."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime

import pytest

from jobforge.backends.base import JobEvent, LogChunk
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.config import JobConfig
from jobforge.errors import BackendError
from jobforge.models import Phase
from jobforge.nomad import RenderParams
from jobforge.pipeline import (
    KILLED_BY_USER, CacheUse, DispatchPhase, PhaseFailed, PhaseStarted, PhaseSucceeded, ResourceUsage, StopPhase,
    new_job,
)
from tests.doubles.nomad import FakeNomad
from tests.doubles.nomad_shapes import SECOND

CONFIG = JobConfig.model_validate({"owner": "team", "repo_url": "https://git.example.invalid/app.git",
                                   "image_name": "app", "registry_url": "127.0.0.1:5000"})


def command(phase=Phase.BUILD, attempt=1, timeout=600.0, job_id="job-1", config=CONFIG) -> DispatchPhase:
    return DispatchPhase(job_id=job_id, phase=phase, attempt=attempt, timeout_seconds=timeout,
                         resources=config.resources_for(phase.value))


PAYLOAD = {"job_id": "job-1", "phase": "build", "temp_image": "127.0.0.1:5000/temp-app:job-1"}


@pytest.fixture
async def nomad():
    fake = FakeNomad(event_heartbeat=0.2, log_heartbeat=0.2)
    await fake.start()
    yield fake
    await fake.stop()


def make_backend(fake: FakeNomad, **kw) -> NomadBackend:
    return NomadBackend(NomadAPI(NomadHTTP(fake.url)), RenderParams(), **kw)


@pytest.fixture
async def backend(nomad):
    b = make_backend(nomad)
    yield b
    await b.aclose()


class Collector:
    """Consumes `backend.events()` in the background; tests wait for what they expect, never sleep."""

    def __init__(self, backend: NomadBackend) -> None:
        self.messages: list = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(backend))

    async def _run(self, backend: NomadBackend) -> None:
        async for message in backend.events():
            self.messages.append(message)
            self._changed.set()

    async def until(self, predicate, timeout: float = 15.0):
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    def events(self, job_id: str = "job-1") -> list:
        return [m.event for m in self.messages if isinstance(m, JobEvent) and m.job_id == job_id]

    def ended(self, job_id: str = "job-1"):
        return next((e for e in self.events(job_id) if isinstance(e, (PhaseSucceeded, PhaseFailed))), None)

    def lines(self, phase: str = "build") -> list[str]:
        return [ln.line for m in self.messages if isinstance(m, LogChunk) and m.phase == phase for ln in m.lines]

    def close(self) -> None:
        self._task.cancel()


@pytest.fixture
async def collector(backend):
    c = Collector(backend)
    yield c
    c.close()


def child_of(nomad: FakeNomad, parent: str) -> str:
    children = [jid for (_, jid) in nomad.cluster.jobs if jid.startswith(f"{parent}/dispatch-")]
    assert len(children) == 1, children
    return children[0]


async def test_dispatch_registers_once_and_sends_meta_payload_and_token(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    await backend.dispatch(command(), PAYLOAD, CONFIG)  # same dispatch key: nothing new
    parent = nomad.job("jobforge-build")
    assert parent is not None and parent["ParameterizedJob"]["Payload"] == "required"
    child = nomad.job(child_of(nomad, "jobforge-build"))
    assert child["Meta"]["job_id"] == "job-1" and child["Meta"]["attempt"] == "1"
    assert json.loads(base64.b64decode(child["Payload"])) == PAYLOAD
    assert child["DispatchIdempotencyToken"] == "job-1-build-1"
    registers = [s for s in nomad.seen if s.method in ("POST", "PUT") and s.path == "/v1/jobs"]
    assert len(registers) == 1


async def test_success_reports_start_lines_and_success_in_order(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
    nomad.run_alloc(alloc, stdout=b"STEP 1/2\nSTEP 2/2\nno newline at the end", stderr=b"warning: x\n")
    await collector.until(lambda c: c.ended() is not None)
    kinds = [type(e) for e in collector.events()]
    assert kinds == [PhaseStarted, PhaseSucceeded]
    assert sorted(collector.lines()) == sorted(["STEP 1/2", "STEP 2/2", "warning: x", "no newline at the end"])
    ends_at = next(i for i, m in enumerate(collector.messages) if isinstance(m, JobEvent)
                   and isinstance(m.event, PhaseSucceeded))
    assert all(isinstance(m, JobEvent) or i < ends_at for i, m in enumerate(collector.messages))


async def test_failure_uses_the_scripts_error_line(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
    nomad.run_alloc(alloc, stdout=b"compiling\n", stderr=b"ERROR: image build failed (exit 7): boom\n", exit_code=1)
    await collector.until(lambda c: c.ended() is not None)
    ended = collector.ended()
    assert isinstance(ended, PhaseFailed) and not ended.retryable
    assert ended.error == "build phase failed: image build failed (exit 7): boom"
    assert "compiling" in collector.lines()


async def test_failure_without_error_line_names_the_exit_code(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    nomad.run_alloc(nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0], exit_code=3)
    await collector.until(lambda c: c.ended() is not None)
    assert "exited with code 3" in collector.ended().error


async def test_lost_allocation_is_a_retryable_failure(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
    nomad.start_alloc(alloc)
    await collector.until(lambda c: any(isinstance(e, PhaseStarted) for e in c.events()))
    nomad.lose_alloc(alloc)  # the node died; Nomad places a replacement of the same child
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().retryable and "lost" in collector.ended().error
    child = child_of(nomad, "jobforge-build")
    assert nomad.job(child)["Stop"] is True  # the retry is a new dispatch: the old child must not run on


async def test_kill_stops_the_dispatched_child(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    nomad.start_alloc(nomad.alloc_ids(child)[0])
    nomad.write_log(nomad.alloc_ids(child)[0], b"working\n")
    await collector.until(lambda c: "working" in c.lines())
    await backend.stop(StopPhase(job_id="job-1", phase=Phase.BUILD, attempt=1))
    assert nomad.job(child)["Stop"] is True
    assert nomad.job("jobforge-build")["Stop"] is False  # never the parameterized parent
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().error == KILLED_BY_USER


async def test_timeout_stops_the_child_and_says_so(nomad, backend, collector):
    await backend.dispatch(command(timeout=1.0), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    nomad.start_alloc(nomad.alloc_ids(child)[0])
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().error == "build phase timed out after 1s"
    assert nomad.job(child)["Stop"] is True


async def test_oversized_payload_is_refused_before_dispatch(nomad, backend):
    with pytest.raises(BackendError) as err:
        await backend.dispatch(command(), {**PAYLOAD, "pad": "x" * 20000}, CONFIG)
    assert "16384" in err.value.message
    assert not [jid for (_, jid) in nomad.cluster.jobs if "/dispatch-" in jid]


async def test_config_that_needs_another_spec_dispatches_a_variant(nomad, backend, collector):
    gpu = JobConfig.model_validate({**CONFIG.model_dump(mode="json", exclude_none=True),
                                    "test": {"commands": ["true"], "gpu_required": True, "gpu_count": 2}})
    await backend.dispatch(command(Phase.TEST, config=gpu), PAYLOAD, gpu)
    variants = [jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-test-") and "/" not in jid]
    assert len(variants) == 1
    devices = nomad.job(variants[0])["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"]
    assert devices[0]["Name"] == "nvidia/gpu" and devices[0]["Count"] == 2


async def test_cleanup_waits_for_its_run(nomad, backend, collector):
    async def finish_cleanup():
        await nomad.wait_until(lambda: any(jid.startswith("jobforge-cleanup/") for (_, jid) in nomad.cluster.jobs))
        child = child_of(nomad, "jobforge-cleanup")
        nomad.run_alloc(nomad.alloc_ids(child)[0], stdout=b"deleted temp image x\n")
    helper = asyncio.create_task(finish_cleanup())
    assert await backend.cleanup("job-1", {**PAYLOAD, "phase": "cleanup"}, CONFIG) is True
    await helper
    await collector.until(lambda c: "deleted temp image x" in c.lines("cleanup"))


async def test_a_new_backend_reattaches_to_a_running_phase(nomad):
    first = make_backend(nomad)
    await first.dispatch(command(), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    alloc = nomad.alloc_ids(child)[0]
    nomad.start_alloc(alloc)
    nomad.write_log(alloc, b"before the restart\n")
    await first.aclose()  # the server goes away while the phase runs

    second = make_backend(nomad)
    collector = Collector(second)
    record = new_job("job-1", CONFIG, datetime.now(UTC))
    record = record.model_copy(update={"current_phase": Phase.BUILD, "phases": {
        **record.phases, Phase.BUILD: record.phases[Phase.BUILD].model_copy(
            update={"attempt": 1, "dispatched_at": datetime.now(UTC)})}})
    await second.resume([(command(), record)])
    nomad.write_log(alloc, b"after the restart\n")
    nonce = nomad.job(child)["Meta"]["control_nonce"]  # the first backend's: the task still holds it
    nomad.write_log(alloc, f'::jobforge-{nonce} cache {{"hits": 1, "misses": 0}}\n', "stderr")
    nomad.finish_alloc(alloc, 0)
    await collector.until(lambda c: c.ended() is not None)
    assert isinstance(collector.ended(), PhaseSucceeded)
    assert collector.lines() == ["before the restart", "after the restart"]
    assert collector.ended().cache == CacheUse(hits=1, misses=0)
    collector.close()
    await second.aclose()


def stats_reads(nomad: FakeNomad) -> int:
    return sum(1 for s in nomad.seen if s.path.startswith("/v1/client/allocation/") and s.path.endswith("/stats"))


async def test_the_phase_end_carries_the_usage_sampled_while_the_allocation_ran():
    """CPU is Nomad's rate held since the previous sample (client clock), memory the highest sample."""
    now = [1_800_000_000 * SECOND]
    nomad = FakeNomad(event_heartbeat=0.2, log_heartbeat=0.2, clock=lambda: now[0])
    await nomad.start()
    backend = make_backend(nomad, stats_interval=0.02)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
        started = now[0]
        nomad.start_alloc(alloc)
        await collector.until(lambda c: any(isinstance(e, PhaseStarted) for e in c.events()))
        nomad.report_stats(alloc, rss=100 << 20, percent=50.0, at=started + 4 * SECOND)  # half a core for 4 s
        seen = stats_reads(nomad)
        await nomad.wait_until(lambda: stats_reads(nomad) > seen + 1)  # the sampler read it (reads are sequential)
        nomad.report_stats(alloc, rss=40 << 20, percent=200.0, at=started + 6 * SECOND)  # two cores for 2 s
        now[0] = started + 7 * SECOND
        nomad.finish_alloc(alloc)
        await collector.until(lambda c: c.ended() is not None)
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()
    assert isinstance(collector.ended(), PhaseSucceeded)
    assert collector.ended().usage == ResourceUsage(cpu_seconds=6.0, memory_peak_bytes=100 << 20)


async def test_a_phase_without_samples_has_no_usage_and_a_collected_allocation_no_stats(nomad):
    backend = make_backend(nomad, stats_interval=3600)  # no periodic read: only the one when the phase ends
    collector = Collector(backend)
    api = NomadAPI(NomadHTTP(nomad.url))
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
        nomad.run_alloc(alloc)  # ended before the client took a sample: it has none to give
        await collector.until(lambda c: c.ended() is not None)
        assert isinstance(collector.ended(), PhaseSucceeded) and collector.ended().usage is None
        assert stats_reads(nomad) == 1
        kept = await api.alloc_stats(alloc, "build")
        assert kept is not None and kept.tasks == {}  # the client still holds the allocation, without samples
        nomad.gc()
        assert await api.alloc_stats(alloc, "build") is None  # 404 Unknown allocation: the client let it go
    finally:
        collector.close()
        await backend.aclose()
        await api.http.aclose()


async def test_only_the_phases_nonce_makes_a_control_line(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    nonce = nomad.job(child)["Meta"]["control_nonce"]
    assert len(nonce) == 32
    forged = ['::jobforge-cache {"hits": 1000, "misses": 0}', '::jobforge-usage {"cpu_seconds": 9, "max_rss_bytes": 1}',
              '::jobforge-0123456789abcdef0123456789abcdef cache {"hits": 1000, "misses": 0}']
    stderr = "".join(f"{line}\n" for line in [*forged, f'::jobforge-{nonce} cache {{"hits": 2, "misses": 1}}'])
    nomad.run_alloc(nomad.alloc_ids(child)[0], stderr=stderr.encode())
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().cache == CacheUse(hits=2, misses=1)
    assert collector.lines() == forged


async def test_readiness_reflects_the_agent(nomad, backend):
    assert await backend.check() == {}
    nomad.outage = (500, "rpc error: No cluster leader")
    problems = await backend.check()
    assert "No cluster leader" in problems["nomad"]
