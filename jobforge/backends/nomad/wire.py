"""Pure decoders for Nomad's streaming wire formats and allocation states (no I/O, unit-tested on samples).

- the event stream is newline-delimited JSON, `{}` heartbeats between batches;
- framed logs are JSON objects written back to back with no separator (decode with `raw_decode`);
- an allocation's `ClientStatus` + task events say how a phase ended.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

_DECODER = json.JSONDecoder()


class NdjsonDecoder:
    """Feed bytes, get complete JSON lines; a non-JSON tail (the server's error after a 200) raises ValueError."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> Iterator[dict]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


class FrameDecoder:
    """Feed bytes, get log frames (`{"Data", "File", "Offset", "FileEvent"}`; `{}` heartbeats included)."""

    def __init__(self) -> None:
        self._text = ""

    def feed(self, chunk: bytes) -> Iterator[dict]:
        self._text += chunk.decode("ascii", errors="replace")  # frames are ASCII JSON (log bytes are base64)
        while self._text:
            stripped = self._text.lstrip()
            try:
                frame, end = _DECODER.raw_decode(stripped)
            except ValueError:
                self._text = stripped
                return
            self._text = stripped[end:]
            yield frame


def frame_data(frame: dict) -> bytes:
    data = frame.get("Data")
    return base64.b64decode(data) if data else b""


class LineSplitter:
    """Bytes in, complete text lines out; `flush` returns a last line without a newline."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        return [_text(line) for line in lines]

    def flush(self) -> list[str]:
        tail, self._pending = self._pending, b""
        return [_text(tail)] if tail else []


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


class AllocState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True)
class AllocOutcome:
    state: AllocState
    detail: str | None = None
    """Why a failed allocation failed, from its task events (exit code, driver error, setup failure)."""

    @property
    def terminal(self) -> bool:
        return self.state in (AllocState.SUCCEEDED, AllocState.FAILED, AllocState.LOST)


_CLIENT_STATUS = {
    "pending": AllocState.PENDING, "running": AllocState.RUNNING, "complete": AllocState.SUCCEEDED,
    "failed": AllocState.FAILED, "lost": AllocState.LOST, "unknown": AllocState.PENDING,
}


def alloc_outcome(alloc: dict, task: str) -> AllocOutcome:
    state = _CLIENT_STATUS.get(alloc.get("ClientStatus", ""), AllocState.PENDING)
    if state is not AllocState.FAILED:
        return AllocOutcome(state)
    events = ((alloc.get("TaskStates") or {}).get(task) or {}).get("Events") or []
    return AllocOutcome(state, _failure_detail(events) or alloc.get("ClientDescription") or "allocation failed")


def _failure_detail(events: list[dict]) -> str | None:
    for event in reversed(events):
        kind = event.get("Type", "")
        if kind == "Terminated":
            code, signal = event.get("ExitCode", 0), event.get("Signal", 0)
            return f"task exited with code {code}" + (f" (signal {signal})" if signal else "")
        for key in ("DriverError", "SetupError", "ValidationError", "DownloadError"):
            if event.get(key):
                return f"{kind}: {event[key]}"
    return None
