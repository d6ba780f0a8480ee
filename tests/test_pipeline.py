"""The pure pipeline, driven with bare events (no I/O, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobforge.config import JobConfig
from jobforge.errors import IllegalTransition
from jobforge.models import JobStatus, Phase, PhaseStatus
from jobforge.pipeline import (
    Admitted, DeleteTempImage, DispatchPhase, FireWebhook, KillRequested, PhaseFailed, PhaseStarted,
    JobFailed, PhaseSucceeded, Policy, StopPhase, TempImageDeleted, Tick, new_job, step, store_retry_delay,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Policy(build_timeout=1800, test_timeout=900, publish_timeout=600, max_attempts=2)
BASE = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
        "registry_url": "127.0.0.1:5000"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(**extra):
    return new_job("job-1", JobConfig.model_validate({**BASE, **extra}), T0)


WITH_TEST = {"test": {"commands": ["true"]}}


def run(record, *events):
    commands = []
    for event in events:
        record, cmds = step(record, event, POLICY)
        commands.append(cmds)
    return record, commands


def ok(phase, t, attempt=1):
    return PhaseSucceeded(phase=phase, attempt=attempt, at=at(t))


def test_happy_path_with_test_phase():
    record, cmds = run(job(**WITH_TEST), Admitted(at=at(1)), PhaseStarted(phase=Phase.BUILD, attempt=1, at=at(2)),
                       ok(Phase.BUILD, 10), ok(Phase.TEST, 20), ok(Phase.PUBLISH, 25))
    assert record.status is JobStatus.SUCCEEDED
    assert record.current_phase is None and record.failed_phase is None and record.error is None
    assert record.finished_at == at(25)
    assert [c.phase for c in (cmds[0][0], cmds[2][0], cmds[3][0])] == [Phase.BUILD, Phase.TEST, Phase.PUBLISH]
    assert cmds[0][0].timeout_seconds == 1800 and cmds[2][0].timeout_seconds == 900
    assert cmds[3][0].timeout_seconds == 600
    assert cmds[4] == [DeleteTempImage(job_id="job-1")]
    assert record.phases[Phase.BUILD].started_at == at(2)
    assert record.phases[Phase.BUILD].duration_seconds == 8
    assert record.phases[Phase.TEST].duration_seconds == 10
    assert all(r.status is PhaseStatus.SUCCEEDED for r in record.phases.values())


def test_status_follows_the_dispatched_phase():
    record, _ = run(job(**WITH_TEST), Admitted(at=at(1)))
    assert (record.status, record.current_phase) == (JobStatus.BUILDING, Phase.BUILD)
    record, _ = run(record, ok(Phase.BUILD, 2))
    assert (record.status, record.current_phase) == (JobStatus.TESTING, Phase.TEST)
    record, _ = run(record, ok(Phase.TEST, 3))
    assert (record.status, record.current_phase) == (JobStatus.PUBLISHING, Phase.PUBLISH)


@pytest.mark.parametrize("test_block", [None, {}, {"entry_point": False}, {"commands": []}, {"env": {"A": "1"}}])
def test_test_phase_skipped_without_entry_point_or_commands(test_block):
    extra = {} if test_block is None else {"test": test_block}
    record, cmds = run(job(**extra), Admitted(at=at(1)), ok(Phase.BUILD, 2))
    assert cmds[1][0].phase is Phase.PUBLISH
    record, _ = run(record, ok(Phase.PUBLISH, 3))
    assert record.status is JobStatus.SUCCEEDED
    assert record.phases[Phase.TEST].status is PhaseStatus.SKIPPED


def test_entry_point_alone_enables_the_test_phase():
    _, cmds = run(job(test={"entry_point": True}), Admitted(at=at(1)), ok(Phase.BUILD, 2))
    assert cmds[1][0].phase is Phase.TEST


def running_in(phase: Phase):
    """A job with a test phase, admitted and advanced until `phase` runs."""
    record, _ = run(job(**WITH_TEST), Admitted(at=at(1)))
    for earlier in (Phase.BUILD, Phase.TEST, Phase.PUBLISH):
        if earlier is phase:
            return record
        record, _ = run(record, ok(earlier, 2))
    raise AssertionError(phase)


@pytest.mark.parametrize("failing", [Phase.BUILD, Phase.TEST, Phase.PUBLISH])
def test_failure_in_each_phase(failing):
    record = running_in(failing)
    assert record.current_phase is failing
    record, cmds = run(record, PhaseFailed(phase=failing, attempt=1, at=at(5), error="boom"))
    assert record.status is JobStatus.FAILED
    assert record.failed_phase is failing and record.error == "boom"
    assert record.phases[failing].status is PhaseStatus.FAILED
    order = [Phase.BUILD, Phase.TEST, Phase.PUBLISH]
    for later in order[order.index(failing) + 1:]:
        assert record.phases[later].status is PhaseStatus.SKIPPED
    assert DeleteTempImage(job_id="job-1") in cmds[0]
    assert not any(isinstance(c, DispatchPhase) for c in cmds[0])


def test_kill_while_pending_needs_no_stop_and_no_cleanup():
    record, cmds = run(job(), KillRequested(at=at(1)))
    assert record.status is JobStatus.FAILED and record.error == "killed by user"
    assert record.failed_phase is None
    assert cmds == [[]]
    assert all(r.status is PhaseStatus.SKIPPED for r in record.phases.values())


@pytest.mark.parametrize("phase", [Phase.BUILD, Phase.TEST, Phase.PUBLISH])
def test_kill_while_running_stops_the_phase(phase):
    record, cmds = run(running_in(phase), KillRequested(at=at(9)))
    assert record.status is JobStatus.FAILED and record.error == "killed by user"
    assert record.failed_phase is phase
    assert cmds[0][0] == StopPhase(job_id="job-1", phase=phase, attempt=1)
    assert DeleteTempImage(job_id="job-1") in cmds[0]


def test_kill_after_finish_is_illegal():
    record, _ = run(job(), Admitted(at=at(1)), ok(Phase.BUILD, 2), ok(Phase.PUBLISH, 3))
    with pytest.raises(IllegalTransition) as err:
        step(record, KillRequested(at=at(4)), POLICY)
    assert "SUCCEEDED" in str(err.value) and "KillRequested" in str(err.value)


def test_admitting_twice_is_illegal():
    record, _ = run(job(), Admitted(at=at(1)))
    with pytest.raises(IllegalTransition):
        step(record, Admitted(at=at(2)), POLICY)


def test_stale_events_are_ignored():
    record, _ = run(job(**WITH_TEST), Admitted(at=at(1)), ok(Phase.BUILD, 2))
    for stale in (ok(Phase.BUILD, 3), PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(3), error="late"),
                  ok(Phase.TEST, 3, attempt=7), PhaseStarted(phase=Phase.PUBLISH, attempt=1, at=at(3))):
        assert step(record, stale, POLICY) == (record, [])
    finished, _ = run(record, KillRequested(at=at(4)))
    assert step(finished, PhaseFailed(phase=Phase.TEST, attempt=1, at=at(5), error="killed"), POLICY) == (finished, [])


def test_retryable_failure_redispatches_with_a_new_attempt():
    record, cmds = run(job(), Admitted(at=at(1)),
                       PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(2), error="alloc lost", retryable=True))
    retry = cmds[1][0]
    assert isinstance(retry, DispatchPhase) and retry.attempt == 2
    assert retry.dispatch_key == "job-1-build-2" != cmds[0][0].dispatch_key
    assert record.status is JobStatus.BUILDING and record.phases[Phase.BUILD].attempt == 2
    record, _ = run(record, PhaseFailed(phase=Phase.BUILD, attempt=2, at=at(3), error="alloc lost", retryable=True))
    assert record.status is JobStatus.FAILED and record.error == "alloc lost"


def test_job_failure_is_never_retried():
    record, cmds = run(job(), Admitted(at=at(1)), PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(2), error="x"))
    assert record.status is JobStatus.FAILED


def test_job_timeouts_override_the_policy():
    _, cmds = run(job(build_timeout="2m", test={"commands": ["true"], "timeout": 90}), Admitted(at=at(1)),
                  ok(Phase.BUILD, 2))
    assert cmds[0][0].timeout_seconds == 120
    assert cmds[1][0].timeout_seconds == 90


def test_dispatch_carries_resolved_resources():
    _, cmds = run(job(resource_limits={"cpu": "2000", "build": {"memory": 4096}}), Admitted(at=at(1)),
                  ok(Phase.BUILD, 2))
    build, publish = cmds[0][0].resources, cmds[1][0].resources
    assert (build.cpu, build.memory, build.disk) == (2000, 4096, 10240)
    assert (publish.cpu, publish.memory, publish.disk) == (2000, 1024, 2048)


HOOK = {"webhook_url": "http://127.0.0.1:9/hook"}


def hooks(cmds):
    return [(c.event.value, c.status.value, c.phase and c.phase.value, c.duration, c.error)
            for step_cmds in cmds for c in step_cmds if isinstance(c, FireWebhook)]


def test_every_transition_of_a_successful_job_fires_its_event_in_order():
    _, cmds = run(job(**HOOK, **WITH_TEST), Admitted(at=at(1)), PhaseStarted(phase=Phase.BUILD, attempt=1, at=at(2)),
                  ok(Phase.BUILD, 10), ok(Phase.TEST, 20), ok(Phase.PUBLISH, 25))
    assert hooks(cmds) == [
        ("build.started", "BUILDING", "build", 0.0, None),
        ("build.completed", "TESTING", "build", 8.0, None),
        ("test.started", "TESTING", "test", 0.0, None),
        ("test.completed", "PUBLISHING", "test", 10.0, None),
        ("publish.started", "PUBLISHING", "publish", 0.0, None),
        ("publish.completed", "SUCCEEDED", "publish", 5.0, None),
        ("job.completed", "SUCCEEDED", None, 25.0, None),
    ]
    assert [c.at for s in cmds for c in s if isinstance(c, FireWebhook)] == [at(1), at(10), at(10), at(20), at(20),
                                                                              at(25), at(25)]
    assert isinstance(cmds[0][0], DispatchPhase)  # the dispatch comes first, its webhook after


@pytest.mark.parametrize("failing", [Phase.BUILD, Phase.TEST, Phase.PUBLISH])
def test_a_failed_phase_fires_its_failure_then_the_jobs(failing):
    record = running_in_with_hook(failing)
    _, cmds = run(record, PhaseFailed(phase=failing, attempt=1, at=at(5), error="boom"))
    assert [(e, s, p, err) for e, s, p, _, err in hooks(cmds)] == [
        (f"{failing.value}.failed", "FAILED", failing.value, "boom"), ("job.failed", "FAILED", failing.value, "boom")]


def running_in_with_hook(phase: Phase):
    record, _ = run(job(**HOOK, **WITH_TEST), Admitted(at=at(1)))
    for earlier in (Phase.BUILD, Phase.TEST, Phase.PUBLISH):
        if earlier is phase:
            return record
        record, _ = run(record, ok(earlier, 2))
    raise AssertionError(phase)


def test_a_retried_phase_does_not_start_twice_and_a_kill_fails_the_running_phase():
    _, cmds = run(job(**HOOK), Admitted(at=at(1)),
                  PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(2), error="alloc lost", retryable=True),
                  KillRequested(at=at(3)))
    assert [h[0] for h in hooks(cmds)] == ["build.started", "build.failed", "job.failed"]
    assert hooks(cmds)[-1][4] == "killed by user"


def test_a_job_killed_while_pending_fires_only_job_failed():
    _, cmds = run(job(**HOOK), KillRequested(at=at(1)))
    assert hooks(cmds) == [("job.failed", "FAILED", None, 1.0, "killed by user")]


@pytest.mark.parametrize("outcome,flags,expected", [
    ("ok", {}, ["build.started", "build.completed", "publish.started", "publish.completed", "job.completed"]),
    ("fail", {}, ["build.started", "build.completed", "publish.started", "publish.failed", "job.failed"]),
    ("ok", {"webhook_on_success": False}, ["build.started", "publish.started"]),
    ("fail", {"webhook_on_success": False}, ["build.started", "publish.started", "publish.failed", "job.failed"]),
    ("fail", {"webhook_on_failure": False}, ["build.started", "build.completed", "publish.started"]),
])
def test_webhooks_follow_the_flags(outcome, flags, expected):
    end = ok(Phase.PUBLISH, 3) if outcome == "ok" else PhaseFailed(phase=Phase.PUBLISH, attempt=1, at=at(3), error="e")
    _, cmds = run(job(**HOOK, **flags), Admitted(at=at(1)), ok(Phase.BUILD, 2), end)
    assert [h[0] for h in hooks(cmds)] == expected


def test_no_webhook_without_url():
    _, cmds = run(job(), Admitted(at=at(1)), ok(Phase.BUILD, 2), ok(Phase.PUBLISH, 3))
    assert not any(isinstance(c, FireWebhook) for c in cmds[2])


def test_image_tags_start_with_the_job_id():
    assert job(image_tags=["latest", "job-1", "v1", "latest"]).image_tags == ["job-1", "latest", "v1"]


@pytest.mark.parametrize("ok", [True, False])
def test_a_finished_job_is_settled_once_its_temp_image_is_handled(ok):
    record, _ = run(job(), Admitted(at=at(1)), PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(2), error="x"))
    assert record.status is JobStatus.FAILED and record.cleanup_pending and not record.settled
    record, cmds = run(record, TempImageDeleted(at=at(3), ok=ok, error=None if ok else "registry down"))
    assert record.settled and record.temp_image_deleted is ok
    assert cmds == [[] if ok else [DeleteTempImage(job_id="job-1", delay_seconds=POLICY.cleanup_backoff)]]
    assert record.cleanup_error == (None if ok else "registry down") and record.outstanding is not ok


def test_a_failed_cleanup_is_retried_with_backoff_then_given_up_and_success_clears_the_error():
    policy = POLICY.model_copy(update={"cleanup_attempts": 3, "cleanup_backoff": 2.0})
    record, _ = run(job(), Admitted(at=at(1)), PhaseFailed(phase=Phase.BUILD, attempt=1, at=at(2), error="x"))
    delays = []
    for t in range(3):
        record, cmds = step(record, TempImageDeleted(at=at(3 + t), ok=False, error=f"down {t}"), policy)
        delays.append([c.delay_seconds for c in cmds])
    assert delays == [[2.0], [4.0], []]
    assert record.cleanup_error == "down 2" and not record.cleanup_retry and not record.outstanding
    record, cmds = step(record, TempImageDeleted(at=at(9), ok=True), policy)
    assert record.temp_image_deleted and record.cleanup_error is None and cmds == []
    assert step(record, TempImageDeleted(at=at(10), ok=False), policy) == (record, [])


def test_tick_fails_a_phase_past_its_deadline_and_stops_it():
    record, _ = run(job(**WITH_TEST), Admitted(at=at(0)), ok(Phase.BUILD, 10))
    deadline = 10 + POLICY.test_timeout + POLICY.deadline_grace
    assert step(record, Tick(at=at(deadline - 1)), POLICY) == (record, [])
    new, cmds = step(record, Tick(at=at(deadline)), POLICY)
    assert (new.status, new.failed_phase) == (JobStatus.FAILED, Phase.TEST)
    assert "test phase did not finish within 20m" in new.error and "never reported" in new.error
    assert cmds[0] == StopPhase(job_id="job-1", phase=Phase.TEST, attempt=1)
    assert step(job(), Tick(at=at(10**6)), POLICY) == (job(), [])  # pending: nothing to time out


def test_job_failed_ends_a_running_or_pending_job_with_its_error_and_is_dropped_when_finished():
    record, _ = run(job(), Admitted(at=at(1)))
    new, cmds = step(record, JobFailed(at=at(2), error="no space left on device: x"), POLICY)
    assert (new.status, new.error, new.failed_phase) == (JobStatus.FAILED, "no space left on device: x", Phase.BUILD)
    assert isinstance(cmds[0], StopPhase)
    assert step(new, JobFailed(at=at(3), error="again"), POLICY) == (new, [])
    pending, cmds = step(job(), JobFailed(at=at(2), error="e"), POLICY)
    assert pending.status is JobStatus.FAILED and cmds == []


def test_store_retry_delays_double_and_are_bounded():
    policy = POLICY.model_copy(update={"store_attempts": 3, "store_backoff": 0.5})
    assert [store_retry_delay(n, policy) for n in (1, 2, 3)] == [0.5, 1.0, None]


def test_a_job_killed_before_building_is_settled_at_once():
    record, _ = run(job(), KillRequested(at=at(1)))
    assert record.settled and record.temp_image_deleted is None


def test_temp_image_events_are_illegal_before_the_job_ends():
    record, _ = run(job(), Admitted(at=at(1)))
    with pytest.raises(IllegalTransition):
        step(record, TempImageDeleted(at=at(2), ok=True), POLICY)


# ---------------------------------------------------------------- exhaustive: random event sequences

EVENTS = st.one_of(
    st.builds(lambda t: Admitted(at=at(t)), st.integers(0, 100)),
    st.builds(lambda t: KillRequested(at=at(t)), st.integers(0, 100)),
    st.builds(lambda t, ok: TempImageDeleted(at=at(t), ok=ok), st.integers(0, 100), st.booleans()),
    st.builds(lambda t: Tick(at=at(t)), st.integers(0, 10**5)),
    st.builds(lambda t: JobFailed(at=at(t), error="store down"), st.integers(0, 100)),
    st.builds(lambda p, a, t: PhaseStarted(phase=p, attempt=a, at=at(t)), st.sampled_from(Phase), st.integers(1, 3),
              st.integers(0, 100)),
    st.builds(lambda p, a, t: PhaseSucceeded(phase=p, attempt=a, at=at(t)), st.sampled_from(Phase),
              st.integers(1, 3), st.integers(0, 100)),
    st.builds(lambda p, a, t, r: PhaseFailed(phase=p, attempt=a, at=at(t), error="e", retryable=r),
              st.sampled_from(Phase), st.integers(1, 3), st.integers(0, 100), st.booleans()),
)


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(EVENTS, max_size=12))
def test_invariants_hold_for_any_event_sequence(with_test, events):
    record = job(**WITH_TEST, **HOOK) if with_test else job(**HOOK)
    fired = []
    for event in events:
        try:
            new, commands = step(record, event, POLICY)
        except IllegalTransition:
            continue
        if new.status.terminal:
            assert new.current_phase is None and new.finished_at is not None
            assert not any(r.status in (PhaseStatus.RUNNING, PhaseStatus.PENDING) for r in new.phases.values())
        if new.status is JobStatus.FAILED:
            assert new.error
        if new.status.running:
            assert new.current_phase is not None
            assert new.phases[new.current_phase].status is PhaseStatus.RUNNING
        if record.status.terminal and not isinstance(event, TempImageDeleted):
            assert new == record
        fired += [c.event for c in commands if isinstance(c, FireWebhook)]
        assert [e.seq for e in fired] == sorted({e.seq for e in fired})  # each event once, in lifecycle order
        dispatches = [c for c in commands if isinstance(c, DispatchPhase)]
        assert len(dispatches) <= 1
        if not with_test:
            assert all(c.phase is not Phase.TEST for c in dispatches)
        record = new
