"""The Nomad backend against Nomad as it really behaves (the double made as strict, tests/doubles/nomad*.py):
event-stream gaps larger than Nomad's event buffer, dropped subscriptions, half-open connections, phases that
cannot be placed, allocations stopped by an operator, stopped parent jobs, failing templates, restarts.

Every case must end with the right status and error within seconds (short configured timeouts), never at the
phase timeout: the phase timeout here is 10 minutes, the collector gives up after 15 s."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.config import JobConfig
from jobforge.errors import BackendError
from jobforge.models import Phase
from jobforge.nomad import RenderParams
from jobforge.pipeline import KILLED_BY_USER, PhaseFailed, PhaseStarted, PhaseSucceeded, StopPhase, new_job
from tests.backends.test_nomad_backend import CONFIG, PAYLOAD, Collector, child_of, command
from tests.doubles.nomad import FakeNomad, Node
from tests.doubles.nomad_jobspec import decode_job
from tests.doubles.nomad_shapes import new_id

SAMPLES = Path(__file__).resolve().parent.parent / "reference" / "nomad-samples"


def make_backend(fake: FakeNomad, **kw) -> NomadBackend:
    options = {"placement_timeout": 600.0, "stream_timeout": 0.5, "log_read_timeout": 2.0, "retry_delay": 0.05,
               **kw}
    return NomadBackend(NomadAPI(NomadHTTP(fake.url)), RenderParams(), **options)


async def started(**kw) -> FakeNomad:
    fake_nomad = FakeNomad(event_heartbeat=0.1, log_heartbeat=0.1, **kw)
    await fake_nomad.start()
    return fake_nomad


@pytest.fixture
async def nomad():
    fake = await started()
    yield fake
    await fake.stop()


@pytest.fixture
async def backend(nomad):
    b = make_backend(nomad)
    yield b
    await b.aclose()


@pytest.fixture
async def collector(backend):
    c = Collector(backend)
    yield c
    c.close()


async def running(nomad: FakeNomad, backend: NomadBackend, collector: Collector) -> tuple[str, str]:
    """Dispatch the build phase and start its allocation; returns (child, alloc)."""
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    alloc = nomad.alloc_ids(child)[0]
    nomad.start_alloc(alloc)
    await collector.until(lambda c: any(isinstance(e, PhaseStarted) for e in c.events()))
    return child, alloc


def unrelated_writes(nomad: FakeNomad, count: int) -> None:
    """Raft writes of other jobs: each one pushes an older event out of Nomad's bounded event buffer."""
    job = json.loads((SAMPLES / "parameterized-job.json").read_text())["Job"]
    for i in range(count):
        nomad.cluster.register(decode_job({**job, "ID": f"other-{new_id()[:8]}", "Meta": {"n": str(i)}}))


def building_record():
    """The stored record of job-1 while its build (attempt 1) runs: what a restarted service resumes."""
    record = new_job("job-1", CONFIG, datetime.now(UTC))
    return record.model_copy(update={"current_phase": Phase.BUILD, "phases": {
        **record.phases, Phase.BUILD: record.phases[Phase.BUILD].model_copy(
            update={"attempt": 1, "dispatched_at": datetime.now(UTC)})}})


# ---------------------------------------------------------------- event-stream gaps and dead connections

async def test_allocation_finishing_in_a_gap_larger_than_the_buffer_is_found():
    nomad = await started(event_buffer_size=3)
    backend = make_backend(nomad)
    collector = Collector(backend)
    try:
        _, alloc = await running(nomad, backend, collector)
        nomad.cut_streams()  # the subscription dies silently
        nomad.write_log(alloc, b"last words\n")
        nomad.finish_alloc(alloc, 0)
        unrelated_writes(nomad, 5)  # the finish event is no longer in Nomad's buffer when we resubscribe
        assert nomad.cluster.evicted_upto > 0
        await collector.until(lambda c: c.ended() is not None)
        assert isinstance(collector.ended(), PhaseSucceeded)
        assert "last words" in collector.lines()
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


async def test_event_dropped_from_buffer_resubscribes_and_reconciles():
    nomad = await started(event_buffer_size=2)
    backend = make_backend(nomad, stream_timeout=60.0)  # only the server's error can end this subscription
    collector = Collector(backend)
    try:
        _, alloc = await running(nomad, backend, collector)
        # Before the stream handler runs again, the buffer overtakes it: Nomad writes `event dropped from
        # buffer` after the 200 and ends the subscription.
        nomad.run_alloc(alloc, stderr=b"ERROR: unit tests failed: 3 of 10\n", exit_code=1)
        unrelated_writes(nomad, 4)
        await collector.until(lambda c: c.ended() is not None)
        assert collector.ended().error == "build phase failed: unit tests failed: 3 of 10"
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


async def test_half_open_stream_is_noticed_by_its_read_timeout(nomad, backend, collector):
    _, alloc = await running(nomad, backend, collector)
    nomad.write_log(alloc, b"before\n")
    await collector.until(lambda c: "before" in c.lines())
    nomad.cut_streams()  # no FIN, no heartbeat: only a read timeout notices
    nomad.write_log(alloc, b"after\n")
    nomad.finish_alloc(alloc, 0)
    await collector.until(lambda c: c.ended() is not None)
    assert isinstance(collector.ended(), PhaseSucceeded)
    assert collector.lines() == ["before", "after"]


# ---------------------------------------------------------------- placement

@pytest.mark.parametrize(("node", "reason"), [
    (Node(id="n1", name="n1", datacenter="cluster"), "no node in the job's datacenters"),
    (Node(id="n1", name="n1", host_volumes=set()), "constraint filtered missing compatible host volumes (1)"),
], ids=["wrong-datacenter", "no-host-volume"])
async def test_a_phase_that_can_never_be_placed_fails_at_once(node, reason):
    nomad = await started(node=node)
    backend = make_backend(nomad)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        await collector.until(lambda c: c.ended() is not None)
        ended = collector.ended()
        assert isinstance(ended, PhaseFailed) and not ended.retryable
        assert ended.error.startswith("build phase cannot be placed: ") and reason in ended.error
        assert nomad.job(child_of(nomad, "jobforge-build"))["Stop"] is True  # the blocked eval will not place it
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


async def test_a_gpu_phase_without_gpu_nodes_names_the_constraint(nomad, backend, collector):
    gpu = JobConfig.model_validate({**CONFIG.model_dump(mode="json", exclude_none=True),
                                    "test": {"commands": ["true"], "gpu_required": True, "gpu_count": 1}})
    await backend.dispatch(command(Phase.TEST, config=gpu), PAYLOAD, gpu)
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().error == "test phase cannot be placed: constraint filtered ${meta.gpu-capable} = true (1)"


async def test_exhausted_resources_fail_after_the_placement_timeout():
    nomad = await started(node=Node(id="n1", name="n1", memory_mb=512))
    backend = make_backend(nomad, placement_timeout=0.5)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        await collector.until(lambda c: c.ended() is not None)
        assert collector.ended().error == ("build phase cannot be placed: resources exhausted on 1 node(s): "
                                           "memory (1)")
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


async def test_capacity_back_before_the_placement_timeout_runs_the_phase():
    nomad = await started(node=Node(id="n1", name="n1", memory_mb=512))
    backend = make_backend(nomad, placement_timeout=600.0)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        child = child_of(nomad, "jobforge-build")
        assert nomad.alloc_ids(child) == []
        nomad.node.memory_mb = 16384
        nomad.node_changed()  # the blocked evaluation places it now
        nomad.run_alloc(nomad.alloc_ids(child)[0])
        await collector.until(lambda c: c.ended() is not None)
        assert isinstance(collector.ended(), PhaseSucceeded)
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


async def test_killing_a_phase_waiting_for_placement_is_acknowledged_at_once():
    nomad = await started(node=Node(id="n1", name="n1", memory_mb=512))
    backend = make_backend(nomad, placement_timeout=600.0)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        await backend.stop(StopPhase(job_id="job-1", phase=Phase.BUILD, attempt=1))
        await collector.until(lambda c: c.ended() is not None)
        assert collector.ended().error == KILLED_BY_USER
        assert nomad.job(child_of(nomad, "jobforge-build"))["Stop"] is True
    finally:
        collector.close()
        await backend.aclose()
        await nomad.stop()


# ---------------------------------------------------------------- stops from outside

async def test_alloc_stop_by_an_operator_is_a_failure_and_its_replacement_does_not_run(nomad, backend, collector):
    child, alloc = await running(nomad, backend, collector)
    nomad.stop_alloc(alloc)  # `nomad alloc stop`: Nomad migrates it, a replacement is placed
    await collector.until(lambda c: c.ended() is not None)
    ended = collector.ended()
    assert isinstance(ended, PhaseFailed) and not ended.retryable
    assert ended.error == "build phase: stopped outside Job Forge (alloc is being migrated)"
    assert nomad.job(child)["Stop"] is True
    await nomad.wait_until(lambda: all(a["DesiredStatus"] == "stop" for a in nomad.allocations(child)))


async def test_job_stop_of_the_child_by_an_operator_is_a_failure(nomad, backend, collector):
    child, alloc = await running(nomad, backend, collector)
    nomad.stop_job(child)
    await collector.until(lambda c: c.ended() is not None)
    assert nomad.allocations(child)[0]["ClientStatus"] == "complete"  # what Nomad says; it is no success
    assert collector.ended().error == "build phase: stopped outside Job Forge (alloc not needed due to job update)"


async def test_node_drain_is_a_failure(nomad, backend, collector):
    await running(nomad, backend, collector)
    nomad.drain_node()
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().error == "build phase: stopped outside Job Forge (alloc is being migrated)"


# ---------------------------------------------------------------- dispatch

@pytest.mark.parametrize("purge", [False, True], ids=["stopped", "purged"])
async def test_a_stopped_or_purged_parent_job_is_registered_again(nomad, backend, collector, purge):
    await backend.dispatch(command(job_id="job-0"), PAYLOAD, CONFIG)
    nomad.stop_job("jobforge-build", purge=purge)  # an operator's `nomad job stop [-purge] jobforge-build`
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    assert nomad.job("jobforge-build")["Stop"] is False
    mine = [jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-build/dispatch-")
            and nomad.job(jid)["Meta"]["job_id"] == "job-1"]
    assert len(mine) == 1
    nomad.run_alloc(nomad.alloc_ids(mine[0])[0])
    await collector.until(lambda c: c.ended() is not None)
    assert isinstance(collector.ended(), PhaseSucceeded)


async def test_dispatch_is_retried_with_the_same_token_through_5xx(nomad, backend, collector):
    await backend.dispatch(command(job_id="job-0"), PAYLOAD, CONFIG)  # registers the parent

    async def outage_until_two_dispatches():
        await nomad.wait_until(lambda: sum(s.path.endswith("/dispatch") for s in nomad.seen) >= 3)
        nomad.outage = None
    nomad.outage = (503, "rpc error: No cluster leader")
    healer = asyncio.create_task(outage_until_two_dispatches())
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    await healer
    tokens = [nomad.job(jid)["DispatchIdempotencyToken"] for (_, jid) in nomad.cluster.jobs
              if jid.startswith("jobforge-build/dispatch-")]
    assert sorted(tokens) == ["job-0-build-1", "job-1-build-1"]


async def test_a_dispatch_whose_reply_is_lost_is_retried_into_the_same_child(nomad, backend, collector):
    nomad.lose_replies = ["/dispatch"]  # Nomad dispatches, the connection dies before the reply
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    assert sum(s.path.endswith("/dispatch") for s in nomad.seen) == 2
    child = child_of(nomad, "jobforge-build")  # exactly one: the token made the retry return it
    nomad.run_alloc(nomad.alloc_ids(child)[0])
    await collector.until(lambda c: c.ended() is not None)
    assert isinstance(collector.ended(), PhaseSucceeded)


async def test_dispatch_gives_up_after_its_attempts(nomad):
    backend = make_backend(nomad, dispatch_attempts=3)
    try:
        await backend.dispatch(command(job_id="job-0"), PAYLOAD, CONFIG)
        nomad.outage = (500, "rpc error: No cluster leader")
        with pytest.raises(BackendError, match="No cluster leader"):
            await backend.dispatch(command(), PAYLOAD, CONFIG)
        assert sum(s.path.endswith("/dispatch") for s in nomad.seen) == 1 + 3
    finally:
        await backend.aclose()


# ---------------------------------------------------------------- what Nomad says a task died of

async def test_a_failing_vault_template_surfaces_nomads_display_message(nomad, backend, collector):
    await backend.dispatch(command(), PAYLOAD, CONFIG)
    alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
    nomad.receive_alloc(alloc)
    nomad.fail_template(alloc, "vault.read(secret/data/ci/git): no secret exists at secret/data/ci/git")
    await collector.until(lambda c: c.ended() is not None)
    assert collector.ended().error == ("build phase failed: Template failed: vault.read(secret/data/ci/git): "
                                       "no secret exists at secret/data/ci/git")


# ---------------------------------------------------------------- restarts

async def test_resume_takes_the_newest_allocation_and_its_result_while_down(nomad):
    first = make_backend(nomad)
    await first.dispatch(command(), PAYLOAD, CONFIG)
    child = child_of(nomad, "jobforge-build")
    lost = nomad.alloc_ids(child)[0]
    nomad.start_alloc(lost)
    await first.aclose()  # the service dies; meanwhile the node is lost, Nomad replaces the allocation,
    replacement = nomad.lose_alloc(lost)  # and the replacement finishes before the service is back
    nomad.run_alloc(replacement, stdout=b"done by the replacement\n")

    second = make_backend(nomad)
    collector = Collector(second)
    record = building_record()
    try:
        await second.resume([(command(), record)])
        await collector.until(lambda c: c.ended() is not None)
        assert isinstance(collector.ended(), PhaseSucceeded)
        assert collector.lines() == ["done by the replacement"]
    finally:
        collector.close()
        await second.aclose()


async def test_resume_while_nomad_is_unreachable_retries_until_it_answers(nomad):
    first = make_backend(nomad)
    await first.dispatch(command(), PAYLOAD, CONFIG)
    alloc = nomad.alloc_ids(child_of(nomad, "jobforge-build"))[0]
    await first.aclose()
    nomad.run_alloc(alloc, stdout=b"finished while nobody watched\n")

    second = make_backend(nomad)
    collector = Collector(second)
    record = building_record()
    try:
        nomad.outage = (500, "rpc error: No cluster leader")
        await second.resume([(command(), record)])  # does not raise: the service starts anyway
        assert collector.ended() is None
        nomad.outage = None
        await collector.until(lambda c: c.ended() is not None)
        assert isinstance(collector.ended(), PhaseSucceeded)
        assert collector.lines() == ["finished while nobody watched"]
    finally:
        collector.close()
        await second.aclose()
