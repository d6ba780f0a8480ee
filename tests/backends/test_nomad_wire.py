"""Nomad's wire formats decoded from the reference samples (shared/reference/nomad-samples), fed in awkward
chunk sizes, and allocation states mapped to phase outcomes."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest

from jobforge.backends.nomad.wire import (
    AllocState, FrameDecoder, LineSplitter, NdjsonDecoder, alloc_outcome, frame_data,
)

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


def test_line_splitter_keeps_partial_lines_and_long_lines():
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\r\n" + b"x" * 200000) == ["two"]
    assert splitter.feed(b"\nlast") == ["x" * 200000]
    assert splitter.flush() == ["last"] and splitter.flush() == []


def test_frame_data_decodes_base64():
    assert frame_data({"Data": base64.b64encode(b"\xffbytes").decode()}) == b"\xffbytes"
    assert frame_data({}) == b""


ALLOC = json.loads(sample("event-stream-allocation-event.json"))["Events"][0]["Payload"]["Allocation"]


def test_failed_allocation_reports_the_exit_code():
    outcome = alloc_outcome(ALLOC, "worker")
    assert outcome.state is AllocState.FAILED and outcome.terminal
    assert "exited with code" in outcome.detail


@pytest.mark.parametrize("client_status, state", [
    ("pending", AllocState.PENDING), ("running", AllocState.RUNNING), ("complete", AllocState.SUCCEEDED),
    ("lost", AllocState.LOST), ("unknown", AllocState.PENDING),
])
def test_client_status_mapping(client_status, state):
    alloc = copy.deepcopy(ALLOC) | {"ClientStatus": client_status}
    assert alloc_outcome(alloc, "worker").state is state


def test_driver_failure_is_named():
    alloc = copy.deepcopy(ALLOC)
    alloc["TaskStates"]["worker"]["Events"] = [
        {"Type": "Received"}, {"Type": "Driver Failure", "DriverError": "image pull failed: not found"}]
    assert alloc_outcome(alloc, "worker").detail == "Driver Failure: image pull failed: not found"
