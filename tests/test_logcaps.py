"""Log bounds (jobforge.logcaps): lines split at the cap while reading, per-job caps with one marker."""

from __future__ import annotations

import random
import os
from datetime import UTC, datetime

from jobforge.logcaps import LineSplitter, LogBudget, LogBudgets, LogLimits, split_text
from jobforge.models import LogLine, LogStream
from tests.support import taskscripts

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MARK8 = " [line split: longer than 8 bytes, continued on the next line]"


def clock() -> datetime:
    return T0


def lines(*texts: str) -> list[LogLine]:
    return [LogLine(ts=T0, stream=LogStream.STDOUT, line=t) for t in texts]


def feed_all(splitter: LineSplitter, data: bytes, sizes) -> list[tuple[bytes, bool]]:
    out, i = [], 0
    for size in sizes:
        out += splitter.feed(data[i:i + size])
        i += size
    out += splitter.feed(data[i:])
    return out + splitter.flush()


def test_lines_are_split_at_the_cap_without_breaking_utf8():
    out = feed_all(LineSplitter(10), ("ab\n" + "é" * 12 + "\n" + "x" * 25).encode(), [4] * 20)
    assert [(raw.decode(), split) for raw, split in out] == [
        ("ab", False), ("ééééé", True), ("ééééé", True), ("éé", False),
        ("xxxxxxxxxx", True), ("xxxxxxxxxx", True), ("xxxxx", False)]


def test_splitting_loses_and_reorders_nothing_whatever_the_chunking():
    rng = random.Random(8)
    for _ in range(300):
        cap = rng.randint(4, 20)
        raw = "".join(rng.choice(["a", "é", "😀", "\n", "日"]) for _ in range(rng.randint(0, 200))).encode()
        out = feed_all(LineSplitter(cap), raw, [rng.randint(1, 30) for _ in range(rng.randint(0, 20))])
        assert all(len(piece) <= cap for piece, _ in out)
        joined, current = [], b""
        for piece, split in out:
            piece.decode()  # every piece is whole UTF-8
            current += piece
            if not split:
                joined.append(current)
                current = b""
        expected = raw.split(b"\n")
        assert joined == (expected[:-1] if expected[-1] == b"" else expected)


def test_a_line_exactly_at_the_cap_is_not_marked():
    assert feed_all(LineSplitter(4), b"abcd\nef", [4, 1]) == [(b"abcd", False), (b"ef", False)]


def test_split_text_marks_every_piece_but_the_last_and_keeps_backend_pieces():
    assert split_text("ab" * 10, 8) == ["abababab" + MARK8, "abababab" + MARK8, "abab"]
    assert split_text("abababab" + MARK8, 8) == ["abababab" + MARK8]
    assert split_text("short", 8) == ["short"]


def test_a_job_gets_one_truncation_marker_at_its_byte_cap():
    budget = LogBudget(LogLimits(max_bytes=10, max_lines=100, max_line_bytes=100))
    assert [ln.line for ln in budget.admit(lines("12345", "1234"), clock)] == ["12345", "1234"]
    out = budget.admit(lines("12", "3"), clock)
    assert [ln.line for ln in out] == ["[log truncated: over 10 bytes; further output of this job is dropped]"]
    assert out[0].stream is LogStream.SYSTEM
    assert budget.admit(lines("x"), clock) == []


def test_a_job_gets_one_truncation_marker_at_its_line_cap():
    budget = LogBudget(LogLimits(max_bytes=1000, max_lines=3, max_line_bytes=100))
    out = budget.admit(lines("a", "b", "c", "d", "e"), clock)
    assert [ln.line for ln in out] == ["a", "b", "c",
                                       "[log truncated: over 3 lines; further output of this job is dropped]"]


def test_long_lines_from_any_backend_are_split_before_they_count():
    budget = LogBudget(LogLimits(max_bytes=1000, max_lines=100, max_line_bytes=8))
    assert [ln.line for ln in budget.admit(lines("ab" * 6), clock)] == ["abababab" + MARK8, "abab"]


def test_budgets_are_per_job_and_bounded():
    budgets = LogBudgets(LogLimits(max_bytes=1000, max_lines=1, max_line_bytes=100), keep=2)
    assert len(budgets.admit("a", lines("1"), clock)) == 1
    assert len(budgets.admit("b", lines("1"), clock)) == 1
    assert budgets.admit("a", lines("2"), clock)[0].line.startswith("[log truncated")
    budgets.admit("c", lines("1"), clock)  # "b" is the least recently used: forgotten, so it starts afresh
    assert [ln.line for ln in budgets.admit("b", lines("2"), clock)] == ["2"]


def test_the_test_task_relays_a_long_line_in_bounded_pieces(tmp_path):
    """templates/tasks/test.py relays the container's output file: a huge line comes out in marked pieces."""
    task = taskscripts.load("test")
    output = tmp_path / "output"
    fd = task.create_private(str(output))  # opened before the container writes, as the test phase does
    follower = task.LineFollower(fd)
    assert list(follower.lines()) == []  # nothing written yet
    with output.open("ab") as fh:
        fh.write(b"first\n" + "é".encode() * (3 * 1024 * 1024) + b"x")  # 6 MiB + 1 byte, no newline yet
    pieces = list(follower.lines())
    assert pieces[0] == "first" and len(pieces) == 7
    assert all(p.endswith(task.SPLIT_MARKER) and len(p.encode()) <= 1024 * 1024 + 100 for p in pieces[1:])
    assert all(set(p.removesuffix(task.SPLIT_MARKER)) == {"é"} for p in pieces[1:])
    with output.open("ab") as fh:
        fh.write(b"y\nlast")
    assert list(follower.lines()) == ["xy"]  # the rest of the long line, once its newline came
    assert list(follower.lines(final=True)) == ["last"]
    os.close(fd)


def test_the_services_own_notes_pass_after_truncation():
    budget = LogBudget(LogLimits(max_bytes=1000, max_lines=1, max_line_bytes=100))
    note = LogLine(ts=T0, stream=LogStream.SYSTEM, line="stopped: killed by user")
    out = budget.admit([*lines("a", "b", "c"), note], clock)
    assert [ln.line for ln in out] == ["a", "[log truncated: over 1 lines; further output of this job is dropped]",
                                       "stopped: killed by user"]
    assert budget.admit([*lines("d"), note], clock) == [note]
