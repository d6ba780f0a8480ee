"""Nomad's wire formats decoded from the reference samples (shared/reference/nomad-samples), fed in awkward
chunk sizes, and allocation states mapped to phase outcomes."""

from __future__ import annotations

import base64
import copy
import json
import tracemalloc
from pathlib import Path

import pytest

from jobforge.backends.nomad.models import Allocation, AllocResourceUsage, Evaluation, EventBatch, TaskResourceUsage
from jobforge.backends.nomad.wire import (
    AllocState, FrameDecoder, NdjsonDecoder, UsageTally, alloc_outcome, frame_data, placement_failure,
)
from jobforge.pipeline import ResourceUsage
from jobforge.logcaps import LineSplitter

SAMPLES = Path(__file__).resolve().parents[1] / "reference" / "nomad-samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def chunks(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_event_stream_ndjson_in_any_chunking(size):
    wire = sample("event-stream-wire-example.ndjson")
    decoder = NdjsonDecoder()
    batches = [b for c in chunks(wire, size) for b in decoder.feed(c)]
    expected = [json.loads(line) for line in wire.splitlines() if line.strip()]
    assert batches == expected
    assert {} in batches and any(b.get("Events") for b in batches)


def test_event_stream_error_tail_is_reported():
    decoder = NdjsonDecoder()
    with pytest.raises(ValueError):
        list(decoder.feed(b'{}\nsubscription closed by server, client should resubscribe\n'))


def test_event_stream_error_without_newline_is_reported_at_the_end():
    decoder = NdjsonDecoder()
    assert list(decoder.feed(b'{}\nevent dropped from buffer')) == [{}]
    with pytest.raises(ValueError, match="event dropped from buffer"):
        decoder.close()


def test_event_batches_parse_into_models():
    lines = [json.loads(line) for line in sample("event-stream-wire-example.ndjson").splitlines() if line.strip()]
    batches = [EventBatch.model_validate(line) for line in lines]
    assert batches[0].index is None and batches[0].events == ()  # the heartbeat
    assert all(b.index for b in batches if b.events)


@pytest.mark.parametrize("size", [1, 5, 33, 100000])
def test_log_frames_back_to_back_in_any_chunking(size):
    wire = sample("fs-logs-wire-example.txt").strip()
    decoder = FrameDecoder()
    frames = [f for c in chunks(wire, size) for f in decoder.feed(c)]
    data = [frame_data(f) for f in frames if f]
    assert b"".join(data).startswith(b"starting report run 42\nwrote 17 rows\n")
    offsets = [f["Offset"] for f in frames if f.get("Data")]
    assert offsets == sorted(offsets)  # Offset is the end position of each frame's data
    assert {} in frames


def test_line_splitter_keeps_partial_lines_and_cuts_long_lines():
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == [(b"one", False)]
    assert splitter.feed(b"o\r\n" + b"x" * 200000) == [(b"two\r", False)]
    assert splitter.feed(b"\nlast") == [(b"x" * 200000, False)]
    assert splitter.flush() == [(b"last", False)] and splitter.flush() == []


def test_a_64_mib_line_is_assembled_from_frames_in_bounded_memory():
    """A task prints 64 MiB without a newline; Nomad sends it as 64 KiB frames, which arrive in 16 KiB chunks.
    The line leaves as 1 MiB pieces and what the decoder and splitter hold stays a few MiB: nothing grows with
    the line, so each byte is copied a bounded number of times (a growing buffer re-copied per chunk took 23 s)."""
    block = bytes(range(97, 123)) * 2521 + b"0123456789ab"  # 65,558 bytes: frames straddle chunks unevenly
    data = memoryview(block * 1024)[:64 * 1024 * 1024]
    decoder, splitter, pieces, total = FrameDecoder(), LineSplitter(1024 * 1024), 0, 0
    tracemalloc.start()
    try:
        for start in range(0, len(data), 64 * 1024):
            part = data[start:start + 64 * 1024]
            frame = json.dumps({"Offset": start + len(part), "Data": base64.b64encode(part).decode(),
                                "File": "alloc/logs/build.stdout.0"}).encode()
            for chunk in chunks(frame, 16 * 1024):
                for decoded in decoder.feed(chunk):
                    for piece, split in splitter.feed(frame_data(decoded)):
                        assert split and len(piece) == 1024 * 1024
                        pieces, total = pieces + 1, total + len(piece)
            del frame, part
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ((last, split),) = splitter.flush()
    assert (pieces, total + len(last), split) == (63, len(data), False)
    assert peak < 8 * 1024 * 1024, peak


def test_a_long_event_line_in_small_chunks_is_decoded_once():
    line = json.dumps({"Index": 7, "Events": [{"Topic": "Allocation", "Key": "x" * 1000}] * 2000}).encode()
    decoder = NdjsonDecoder()
    out = [b for c in chunks(line + b"\n{}\n", 4096) for b in decoder.feed(c)]
    assert out == [json.loads(line), {}]


def test_frame_data_decodes_base64():
    assert frame_data({"Data": base64.b64encode(b"\xffbytes").decode()}) == b"\xffbytes"
    assert frame_data({}) == b""


ALLOC = json.loads(sample("event-stream-allocation-event.json"))["Events"][0]["Payload"]["Allocation"]


def outcome_of(alloc: dict):
    return alloc_outcome(Allocation.model_validate(alloc), "worker")


def test_failed_allocation_reports_the_exit_code():
    outcome = outcome_of(ALLOC)
    assert outcome.state is AllocState.FAILED and outcome.terminal
    assert "exited with code" in outcome.detail


@pytest.mark.parametrize("client_status, state", [
    ("pending", AllocState.PENDING), ("running", AllocState.RUNNING), ("complete", AllocState.SUCCEEDED),
    ("lost", AllocState.LOST), ("unknown", AllocState.PENDING),
])
def test_client_status_mapping(client_status, state):
    alloc = copy.deepcopy(ALLOC) | {"ClientStatus": client_status}
    assert outcome_of(alloc).state is state


def test_driver_failure_is_named():
    alloc = copy.deepcopy(ALLOC)
    alloc["TaskStates"]["worker"]["Events"] = [
        {"Type": "Received"}, {"Type": "Driver Failure", "DriverError": "image pull failed: not found"}]
    assert outcome_of(alloc).detail == "Driver Failure: image pull failed: not found"


def test_a_failing_events_display_message_is_the_detail():
    alloc = copy.deepcopy(ALLOC)
    alloc["TaskStates"]["worker"]["Events"] = [
        {"Type": "Received"}, {"Type": "Driver Failure", "DriverError": "pull: 404",
                               "DisplayMessage": "Failed to pull `app:1`: manifest unknown"},
        {"Type": "Not Restarting", "FailsTask": True, "DisplayMessage": "Policy allows no restarts"}]
    assert outcome_of(alloc).detail == "Failed to pull `app:1`: manifest unknown"
    alloc["TaskStates"]["worker"]["Events"] = [
        {"Type": "Killing", "FailsTask": True, "DisplayMessage": "Template failed: no secret exists at x"}]
    assert outcome_of(alloc).detail == "Template failed: no secret exists at x"


@pytest.mark.parametrize("desired, events, client", [
    ({"DesiredStatus": "stop", "DesiredDescription": "alloc is being migrated"}, [], "complete"),
    ({}, [{"Type": "Killing", "DisplayMessage": "Sent interrupt"}, {"Type": "Killed"}], "complete"),
    ({"DesiredStatus": "stop", "DesiredDescription": "alloc not needed due to job update"}, [], "failed"),
])
def test_a_stopped_or_killed_allocation_is_no_success(desired, events, client):
    alloc = copy.deepcopy(ALLOC) | {"ClientStatus": client, **desired}
    alloc["TaskStates"]["worker"]["Events"] = events
    outcome = outcome_of(alloc)
    assert outcome.state is AllocState.STOPPED and outcome.terminal
    assert outcome.detail == desired.get("DesiredDescription", "Sent interrupt")


def _eval(**metric) -> Evaluation:
    base = {"NodesEvaluated": 1, "NodesFiltered": 0, "NodesInPool": 1, "NodesExhausted": 0,
            "ConstraintFiltered": None, "DimensionExhausted": None}
    return Evaluation.model_validate({"ID": "e1", "JobID": "j", "FailedTGAllocs": {"build": {**base, **metric}}})


@pytest.mark.parametrize("evaluation, reason, permanent", [
    (_eval(NodesEvaluated=0, NodesInPool=3), "no node in the job's datacenters (3 node(s) in the pool); "
                                             "check NOMAD_DATACENTERS", True),
    (_eval(NodesFiltered=1, ConstraintFiltered={"missing compatible host volumes": 1}),
     "constraint filtered missing compatible host volumes (1)", True),
    (_eval(NodesExhausted=1, DimensionExhausted={"memory": 1}), "resources exhausted on 1 node(s): memory (1)",
     False),
    (_eval(NodesEvaluated=2, NodesFiltered=1, NodesExhausted=1, ConstraintFiltered={"missing devices": 1},
           DimensionExhausted={"disk": 1}),
     "constraint filtered missing devices (1); resources exhausted on 1 node(s): disk (1)", False),
])
def test_placement_failure_reason_and_permanence(evaluation, reason, permanent):
    failure = placement_failure(evaluation)
    assert (failure.reason, failure.permanent) == (reason, permanent)


def test_an_evaluation_without_failures_is_no_placement_failure():
    assert placement_failure(Evaluation.model_validate({"ID": "e", "FailedTGAllocs": None})) is None


# ---------------------------------------------------------------- allocation stats (client/structs/structs.go)

S = 1_000_000_000


def task_sample(at: int, percent: float, rss: int, max_usage: int = 0, measured=("RSS", "Cache", "Swap", "Usage")):
    """A `TaskResourceUsage` as Nomad writes it (docker driver, cgroup v2 unless "Max Usage" is measured)."""
    return TaskResourceUsage.model_validate({"ResourceUsage": {
        "MemoryStats": {"RSS": rss, "Cache": 0, "Swap": 0, "MappedFile": 0, "Usage": rss, "MaxUsage": max_usage,
                        "KernelUsage": 0, "KernelMaxUsage": 0, "Measured": list(measured)},
        "CpuStats": {"SystemMode": 0, "UserMode": 0, "TotalTicks": 0, "ThrottledPeriods": 0, "ThrottledTime": 0,
                     "Percent": percent, "Measured": ["Throttled Periods", "Throttled Time", "Percent"]},
        "DeviceStats": None}, "Timestamp": at, "Pids": None})


def test_cpu_is_the_reported_rate_held_since_the_previous_sample_and_memory_the_peak():
    tally = UsageTally(since_ns=100 * S)
    assert tally.usage is None  # nothing sampled: nothing to report
    tally = tally.add(task_sample(104 * S, 50.0, 300))  # half a core since the start, 4 s
    tally = tally.add(task_sample(104 * S, 50.0, 300))  # the client had no newer sample: no time counted twice
    tally = tally.add(task_sample(106 * S, 250.0, 100))  # 2.5 cores for 2 s
    tally = tally.add(task_sample(105 * S, 0.0, 900))  # an older sample arriving late: its peak counts, not its time
    assert tally.usage == ResourceUsage(cpu_seconds=7.0, memory_peak_bytes=900)


def test_without_a_start_the_first_sample_counts_no_time_and_max_usage_is_the_peak_where_measured():
    v1 = ("RSS", "Cache", "Swap", "Usage", "Max Usage")
    tally = UsageTally(since_ns=None).add(task_sample(10 * S, 100.0, 300, max_usage=4096, measured=v1))
    tally = tally.add(task_sample(11 * S, 100.0, 200, max_usage=2048, measured=v1))
    assert tally.usage == ResourceUsage(cpu_seconds=1.0, memory_peak_bytes=4096)


def test_alloc_stats_with_go_nulls():
    stats = AllocResourceUsage.model_validate({
        "ResourceUsage": {"MemoryStats": {"RSS": 0, "Measured": None}, "CpuStats": {"Percent": 0, "Measured": None},
                          "DeviceStats": []}, "Tasks": None, "Timestamp": 0})
    assert stats.tasks == {} and stats.resource_usage.memory_stats.measured == ()
