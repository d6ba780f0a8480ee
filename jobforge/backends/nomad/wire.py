"""Pure decoders for Nomad's streaming wire formats and allocation states (no I/O, unit-tested on samples).

- the event stream is newline-delimited JSON, `{}` heartbeats between batches;
- framed logs are JSON objects written back to back with no separator (decode with `raw_decode`);
- an allocation's `ClientStatus`, `DesiredStatus` + task events say how a phase ended;
- an evaluation's `FailedTGAllocs` metrics say why a phase cannot be placed, and whether it ever can be;
- a running task's stats samples add up to its phase's resource usage (`UsageTally`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from jobforge.backends.nomad.models import (
    AllocMetric,
    Allocation,
    Evaluation,
    MemoryStats,
    TaskEvent,
    TaskResourceUsage,
)
from jobforge.pipeline import ResourceUsage

_DECODER = json.JSONDecoder()


class NdjsonDecoder:
    """Feed bytes, get complete JSON lines; a non-JSON tail (the server's error after a 200) raises ValueError.

    An unfinished line is kept as its chunks and joined once when its newline arrives: linear in its length,
    however many chunks it came in."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, chunk: bytes) -> Iterator[dict]:
        newline = chunk.find(b"\n")
        if newline == -1:
            if chunk:
                self._parts.append(chunk)
            return
        head, *lines, tail = chunk.split(b"\n")
        lines.insert(0, b"".join([*self._parts, head]))
        self._parts = [tail] if tail else []
        for line in lines:
            if line.strip():
                yield json.loads(line)

    def close(self) -> None:
        """At the end of the body: a tail that is not a JSON line is the server's error (`event dropped from
        buffer`, written after the 200)."""
        tail, self._parts = b"".join(self._parts).strip(), []
        if tail:
            raise ValueError(tail.decode("utf-8", errors="replace")[:500])


class FrameDecoder:
    """Feed bytes, get log frames (`{"Data", "File", "Offset", "FileEvent"}`; `{}` heartbeats included).

    Frames are decoded in place (`raw_decode` at an offset) and the consumed text dropped once per feed; a JSON
    object can only become complete in the chunk holding its closing `}`, so an unfinished frame is not decoded
    again before one arrives: linear in the bytes received, however they are chunked."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[dict]:
        if self._parts and b"}" not in chunk:
            self._parts.append(chunk.decode("ascii", errors="replace"))
            return
        self._parts.append(chunk.decode("ascii", errors="replace"))  # frames are ASCII JSON (log bytes base64)
        text = "".join(self._parts) if len(self._parts) > 1 else self._parts[0]
        pos, end = 0, len(text)
        while True:
            while pos < end and text[pos] in " \t\r\n":
                pos += 1
            if pos == end:
                break
            try:
                frame, pos = _DECODER.raw_decode(text, pos)
            except ValueError:
                break
            yield frame
        rest = text[pos:] if pos else text
        self._parts = [rest] if rest else []


def frame_data(frame: dict) -> bytes:
    data = frame.get("Data")
    return base64.b64decode(data) if data else b""


class AllocState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    STOPPED = "stopped"
    """Terminal, but because the server stopped it (`alloc stop`, `job stop`, a drain) or its task was killed:
    Nomad reports such an allocation `complete`, which is no success."""


@dataclass(frozen=True)
class AllocOutcome:
    state: AllocState
    detail: str | None = None
    """Why a failed or stopped allocation ended: Nomad's `DisplayMessage` of the failing task event (template,
    image pull, driver), the exit code, or the server's `DesiredDescription`."""

    @property
    def terminal(self) -> bool:
        return self.state in (AllocState.SUCCEEDED, AllocState.FAILED, AllocState.LOST, AllocState.STOPPED)


_CLIENT_STATUS = {
    "pending": AllocState.PENDING, "running": AllocState.RUNNING, "complete": AllocState.SUCCEEDED,
    "failed": AllocState.FAILED, "lost": AllocState.LOST, "unknown": AllocState.PENDING,
}
# Task events whose DisplayMessage is generic: the failing event before them says more.
_GENERIC = {"Not Restarting", "Killed", "Terminated", "Received", "Task Setup", "Started", "Restarting"}
_KILL_EVENTS = {"Killing", "Killed"}


def alloc_outcome(alloc: Allocation, task: str) -> AllocOutcome:
    state = _CLIENT_STATUS.get(alloc.client_status, AllocState.PENDING)
    events = alloc.events(task)
    if state in (AllocState.SUCCEEDED, AllocState.FAILED):
        failing = any(e.fails_task for e in events)
        killed = any(e.type in _KILL_EVENTS for e in events)
        if alloc.desired_status == "stop" or (killed and not failing):
            reason = alloc.desired_description or _kill_detail(events) or "its task was killed"
            return AllocOutcome(AllocState.STOPPED, reason)
    if state is not AllocState.FAILED:
        return AllocOutcome(state)
    return AllocOutcome(state, _failure_detail(events) or alloc.client_description or "allocation failed")


def _kill_detail(events: Sequence[TaskEvent]) -> str | None:
    return next((e.display_message or e.kill_reason for e in reversed(events)
                 if e.type in _KILL_EVENTS and (e.display_message or e.kill_reason)), None)


def _failure_detail(events: Sequence[TaskEvent]) -> str | None:
    """The most specific reason: a failing event's DisplayMessage (what `nomad alloc status` shows), else the
    error fields of the driver/setup events, else the exit code."""
    for event in reversed(events):
        if event.type in _GENERIC:
            continue
        if event.error:
            return event.display_message or f"{event.type}: {event.error}"
        if event.fails_task and event.display_message:
            return event.display_message
    for event in reversed(events):
        if event.type == "Terminated":
            return f"task exited with code {event.exit_code}" + (f" (signal {event.signal})" if event.signal else "")
    return None


@dataclass(frozen=True)
class PlacementFailure:
    reason: str
    permanent: bool
    """True when no node of the cluster could ever take it as it stands (no node in the job's datacenters or
    node pool, every node filtered by a constraint, host volume, device or driver): waiting cannot help."""


def placement_failure(evaluation: Evaluation) -> PlacementFailure | None:
    """Why an evaluation could not place its groups (`FailedTGAllocs`, as `nomad job status` prints it)."""
    failed = evaluation.failed_tg_allocs
    if not failed:
        return None
    reasons, permanent = [], True
    for group, metric in sorted(failed.items()):
        text, never = _metric_reason(metric)
        reasons.append(f"{group}: {text}" if len(failed) > 1 else text)
        permanent = permanent and never
    return PlacementFailure("; ".join(reasons), permanent)


def _counts(mapping: dict[str, int]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in sorted(mapping.items()))


def _metric_reason(metric: AllocMetric) -> tuple[str, bool]:
    if metric.nodes_evaluated == 0:
        return (f"no node in the job's datacenters ({metric.nodes_in_pool} node(s) in the pool); "
                "check NOMAD_DATACENTERS", True)
    parts = []
    if metric.constraint_filtered or metric.class_filtered:
        parts.append("constraint filtered " + _counts({**metric.class_filtered, **metric.constraint_filtered}))
    if metric.nodes_exhausted:
        dims = _counts(metric.dimension_exhausted) or _counts(metric.class_exhausted)
        parts.append(f"resources exhausted on {metric.nodes_exhausted} node(s)" + (f": {dims}" if dims else ""))
    if metric.quota_exhausted:
        parts.append("quota exhausted: " + ", ".join(metric.quota_exhausted))
    if not parts:
        parts.append(f"{metric.nodes_filtered} of {metric.nodes_evaluated} node(s) filtered")
    never = metric.nodes_filtered >= metric.nodes_evaluated and not metric.nodes_exhausted \
        and not metric.quota_exhausted
    return "; ".join(parts), never


def _memory_bytes(stats: MemoryStats) -> int:
    """The cgroup's own peak where the driver measures it (cgroup v1), else the resident memory of the sample."""
    if "Max Usage" in stats.measured and stats.max_usage:
        return stats.max_usage
    return stats.rss if "RSS" in stats.measured or not stats.measured else stats.usage


@dataclass(frozen=True)
class UsageTally:
    """A task's stats samples folded into its phase's usage, in the client's clock (no skew with ours).

    Nomad reports CPU as a rate (`Percent` over the driver's last period, 100 per busy core), never a total: the
    CPU seconds are that rate held over the time since the previous sample folded in (or since the task started),
    so they are an estimate that is as fine as the sampling. Memory is the highest value seen."""

    since_ns: int | None
    """The client's time up to which CPU is counted: the task's start, then the last sample's timestamp."""
    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0
    samples: int = 0

    def add(self, sample: TaskResourceUsage) -> UsageTally:
        usage = sample.resource_usage
        memory = max(self.memory_peak_bytes, _memory_bytes(usage.memory_stats))
        if self.since_ns is not None and sample.timestamp <= self.since_ns:
            # The same sample again (the client had no newer one) or an older one: its time is counted already.
            return replace(self, memory_peak_bytes=memory)
        seconds = 0.0 if self.since_ns is None else (sample.timestamp - self.since_ns) / 1e9
        busy = usage.cpu_stats.percent / 100 * seconds
        return replace(self, since_ns=sample.timestamp, cpu_seconds=self.cpu_seconds + max(0.0, busy),
                       memory_peak_bytes=memory, samples=self.samples + 1)

    @property
    def usage(self) -> ResourceUsage | None:
        if not self.samples:
            return None
        return ResourceUsage(cpu_seconds=round(self.cpu_seconds, 3), memory_peak_bytes=self.memory_peak_bytes)
