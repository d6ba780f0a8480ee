"""Log bounds, pure: a cap per line (longer lines are split and marked) and a cap per job (then one marker).

Two users: the local backend splits output while reading it (`LineSplitter`, so a 100 MB line without a newline
never sits in memory whole), and the service passes every batch of lines through a job's `LogBudget` before it
reaches the store and the watchers (`admit`), whatever backend produced them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from jobforge.models import LogLine, LogStream

DEFAULT_MAX_LOG_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_LOG_LINES = 1_000_000
DEFAULT_MAX_LINE_BYTES = 1024 * 1024

SPLIT_MARKER = " [line split: longer than {cap} bytes, continued on the next line]"
TRUNCATED_MARKER = "[log truncated: {why}; further output of this job is dropped]"


@dataclass(frozen=True)
class LogLimits:
    max_bytes: int = DEFAULT_MAX_LOG_BYTES
    max_lines: int = DEFAULT_MAX_LOG_LINES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES


def split_text(text: str, max_line_bytes: int) -> list[str]:
    """One line as pieces of at most `max_line_bytes` UTF-8 bytes (never inside a character); every piece but
    the last carries the marker. Linear in the line's length."""
    if len(text) * 4 <= max_line_bytes:
        return [text]  # cannot be over the cap, whatever its characters
    data = text.encode("utf-8", errors="surrogateescape")
    marker = SPLIT_MARKER.format(cap=max_line_bytes)
    if len(data) <= max_line_bytes or (text.endswith(marker) and len(data) - len(marker) <= max_line_bytes):
        return [text]  # short enough, or a piece a backend already split (its marker does not count)
    pieces = []
    start = 0
    while len(data) - start > max_line_bytes:
        cut = start + max_line_bytes
        while cut > start + max_line_bytes - 3 and data[cut] & 0xC0 == 0x80:  # a continuation byte: back up
            cut -= 1
        pieces.append(data[start:cut].decode("utf-8", errors="replace") + marker)
        start = cut
    pieces.append(data[start:].decode("utf-8", errors="replace"))
    return pieces


class LineSplitter:
    """Bytes in, complete lines out, never holding more than `max_line_bytes` of an unfinished line.

    `feed` returns `(raw_line, split)` pairs; `split` is True for a piece cut at the cap (more of the same line
    follows). Each byte is copied a bounded number of times: linear in the output, whatever its shape.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline == -1 else newline
            # Append at most what still fits before the cap, emitting full pieces as they fill up.
            while start < end:
                room = self.max_line_bytes - len(self._pending)
                self._pending += data[start:min(end, start + room)]
                start = min(end, start + room)
                if len(self._pending) >= self.max_line_bytes and start < end:
                    out.append(self._take_piece())
            if newline == -1:
                return out
            out.append((bytes(self._pending), False))
            self._pending.clear()
            start = newline + 1

    def flush(self) -> list[tuple[bytes, bool]]:
        """The last line when the stream ended without a newline."""
        if not self._pending:
            return []
        line = bytes(self._pending)
        self._pending.clear()
        return [(line, False)]

    def _take_piece(self) -> tuple[bytes, bool]:
        cut = len(self._pending) - _incomplete_tail(self._pending) or len(self._pending)
        piece = bytes(self._pending[:cut])
        del self._pending[:cut]
        return piece, True


def _incomplete_tail(data: bytes | bytearray) -> int:
    """How many bytes at the end start a UTF-8 sequence that is not complete yet (0-3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: a lead (or ASCII) byte
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


def decode_piece(raw: bytes, split: bool, max_line_bytes: int) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    return text + SPLIT_MARKER.format(cap=max_line_bytes) if split else text


class LogBudget:
    """What one job may still log; `admit` passes, splits or drops lines and adds the truncation marker once."""

    def __init__(self, limits: LogLimits) -> None:
        self.limits = limits
        self.bytes = 0
        self.lines = 0
        self.truncated = False

    def admit(self, lines: Sequence[LogLine], clock: Callable[[], datetime]) -> list[LogLine]:
        """The lines to keep. The service's own notes (stream `system`: a timeout, a kill) always pass: there
        are a few per phase, and they say why a phase ended even after the task's output was truncated."""
        out: list[LogLine] = []
        for line in lines:
            if self.truncated:
                if line.stream is LogStream.SYSTEM:
                    out.append(line)
                continue
            for text in split_text(line.line, self.limits.max_line_bytes):
                size = len(text.encode("utf-8", errors="surrogateescape"))
                why = None
                if self.lines + 1 > self.limits.max_lines:
                    why = f"over {self.limits.max_lines} lines"
                elif self.bytes + size > self.limits.max_bytes:
                    why = f"over {self.limits.max_bytes} bytes"
                if why is not None:
                    self.truncated = True
                    out.append(LogLine(ts=clock(), stream=LogStream.SYSTEM, line=TRUNCATED_MARKER.format(why=why)))
                    break
                self.lines += 1
                self.bytes += size
                out.append(line if text is line.line else line.model_copy(update={"line": text}))
        return out


class LogBudgets:
    """One `LogBudget` per job, least recently used dropped beyond `keep` (a finished job logs no more)."""

    def __init__(self, limits: LogLimits, keep: int = 4096) -> None:
        self.limits = limits
        self._keep = keep
        self._budgets: OrderedDict[str, LogBudget] = OrderedDict()

    def admit(self, job_id: str, lines: Sequence[LogLine], clock: Callable[[], datetime]) -> list[LogLine]:
        budget = self._budgets.pop(job_id, None) or LogBudget(self.limits)
        self._budgets[job_id] = budget
        while len(self._budgets) > self._keep:
            self._budgets.popitem(last=False)
        return budget.admit(lines, clock)
