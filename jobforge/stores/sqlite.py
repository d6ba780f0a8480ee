"""SQLite store for the local backend: one file, WAL, survives restarts.

- Every call runs on one worker thread that owns the connection, so a slow query (a 500-record history page, a
  large log page) never blocks the event loop, and calls are serialised without a lock.
- Every write is one explicit transaction (`BEGIN IMMEDIATE` … `COMMIT`, `ROLLBACK` on any error): a log append
  is all or nothing, a record update is one compare-and-set. The connection itself is in autocommit mode
  (`isolation_level=None`), where Python's `sqlite3` would not open transactions by itself.
- History and admission read along indexes: `list` walks an index already in its newest-first order for every
  filter (owner, status, both, several owners merged), so a page costs its own rows whatever the history holds;
  `unfinished` and `open_jobs` read a partial index of the jobs still owed work. tests/stores/test_sqlite.py
  checks the plans. A log page's total comes from `log_counts`, kept in step by every append.
- A busy timeout waits for another process's write lock instead of failing at once.
- No `sqlite3` error escapes: `_mapped` turns each into a `StoreError` (HTTP 503 + Retry-After); a full disk
  ("database or disk is full", SQLITE_FULL) says "no space left on device".
- Log lines never take the last `disk_reserve` bytes of the disk: an append that would is refused as "no space
  left on device", so a job whose output fills the disk can still be recorded as failed (a record update, the
  service's own `system` notes such as the lost-lines marker, and new submissions may use the reserve).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from jobforge.errors import Conflict, NotFound, StoreError
from jobforge.models import DeliveryState, JobRecord, JobStatus, LogLine, LogStream, WebhookDelivery
from jobforge.stores.base import (
    DueDeliveries,
    LogPage,
    SeqLine,
    Versioned,
    VersionedDelivery,
    dump_delivery,
    due_at,
    dump_record,
    load_delivery,
    load_record,
    phase_order,
)

T = TypeVar("T")

BUSY_TIMEOUT_SECONDS = 10.0
_WAL_PAGES = 128
_ROW_OVERHEAD = 64  # bytes of a log row besides its text (ids, phase, timestamp, stream)

_UNFINISHED = ("status NOT IN ('SUCCEEDED', 'FAILED') "
               "OR json_extract(record, '$.cleanup_pending') OR json_extract(record, '$.cleanup_retry')")
"""`JobRecord.outstanding` in SQL. The partial index `jobs_unfinished` holds exactly these rows, so admission
and the tick read the jobs still owed work, not the whole history (the query must repeat this text verbatim
for SQLite to use that index)."""
MAX_MERGED_OWNERS = 100
"""History of up to this many owners is one ordered merge of per-owner index ranges; more owners (a rare
token) scan the newest-first index and filter."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    submitted_at TEXT NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs (submitted_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, submitted_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, submitted_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_owner_status ON jobs (owner, status, submitted_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (submitted_at, job_id) WHERE {UNFINISHED};
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    ts TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, phase, seq);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    delivery TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries (state, created_at, job_id, seq);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id, seq);
CREATE INDEX IF NOT EXISTS logs_job_seq ON logs (job_id, seq);
""".replace("{UNFINISHED}", _UNFINISHED)


_LOG_COUNTS = """
CREATE TABLE log_counts (
    job_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    lines INTEGER NOT NULL,
    PRIMARY KEY (job_id, phase)
) WITHOUT ROWID
"""
"""Lines per job and phase, kept in step by `append_logs` (same transaction): a log page's total and where its
phases start are read here, not counted over the job's every line on every page."""


def _add_log_positions(db: sqlite3.Connection) -> None:
    """`logs.n` (a line's position in its job's phase, from 0) with its index, and `log_counts`, filled from the
    lines already stored when the database was made before they existed. A log page is then an index range
    (`n >= offset`), not a walk over every line before it."""
    if not db.execute("SELECT 1 FROM pragma_table_info('logs') WHERE name = 'n'").fetchone():
        db.execute("ALTER TABLE logs ADD COLUMN n INTEGER")
        db.execute("UPDATE logs SET n = ranked.n FROM (SELECT seq, ROW_NUMBER() OVER (PARTITION BY job_id, phase "
                   "ORDER BY seq) - 1 AS n FROM logs) AS ranked WHERE logs.seq = ranked.seq")
    db.execute("CREATE INDEX IF NOT EXISTS logs_position ON logs (job_id, phase, n)")
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'log_counts'").fetchone():
        db.execute(_LOG_COUNTS)
        db.execute("INSERT INTO log_counts SELECT job_id, phase, COUNT(*) FROM logs GROUP BY job_id, phase")


_PENDING = DeliveryState.PENDING.value
_HEADS = ("SELECT job_id, MIN(seq) AS seq, due_at, created_at FROM webhook_deliveries "
          f"INDEXED BY webhook_deliveries_heads WHERE state = '{_PENDING}' GROUP BY job_id")
"""Each job's first pending delivery (SQLite takes a bare column from the row holding the MIN), read from the
partial index of pending deliveries alone: it costs the backlog, never the delivered history. The state is a
literal, as a partial index needs."""


def _add_delivery_due(db: sqlite3.Connection) -> None:
    """`webhook_deliveries.due_at` (`stores.base.due_at`, UTC text) and the partial index of pending deliveries
    the worker reads; pending rows stored before the column existed get theirs from their JSON."""
    if not db.execute("SELECT 1 FROM pragma_table_info('webhook_deliveries') WHERE name = 'due_at'").fetchone():
        db.execute("ALTER TABLE webhook_deliveries ADD COLUMN due_at TEXT")
        rows = db.execute("SELECT delivery_id, delivery FROM webhook_deliveries WHERE state = ?", (_PENDING,))
        db.executemany("UPDATE webhook_deliveries SET due_at = ? WHERE delivery_id = ?",
                       [(_ts(due_at(load_delivery(raw))), delivery_id) for delivery_id, raw in rows.fetchall()])
    db.execute("CREATE INDEX IF NOT EXISTS webhook_deliveries_heads ON webhook_deliveries "
               f"(job_id, seq, due_at, created_at, state) WHERE state = '{_PENDING}'")


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """The one boundary where SQLite's errors become `StoreError`."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            raise StoreError(f"sqlite {what} failed: no space left on device ({exc})") from exc
        if code == sqlite3.SQLITE_BUSY or "locked" in str(exc):
            raise StoreError(f"sqlite {what} failed: the database stayed locked for {BUSY_TIMEOUT_SECONDS:g}s "
                             f"({exc})") from exc
        raise StoreError(f"sqlite {what} failed: {exc}") from exc
    except UnicodeEncodeError as exc:  # a lone surrogate cannot be bound as TEXT
        raise StoreError(f"sqlite {what} failed: text is not valid Unicode ({exc.reason})") from exc


class SqliteStore:
    def __init__(self, path: Path, disk_reserve: int = 0) -> None:
        self._dir = path.parent
        self._reserve = disk_reserve
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # the file holds webhook secrets: owner-only
        os.close(fd)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobforge-sqlite")
        with _mapped("open"):
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_SECONDS)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoint and rewind the WAL every 512 KiB, not SQLite's 4 MB: every small log append writes a
            # few whole pages to it, so on a small data disk (2 MiB) the default WAL alone filled the disk.
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_PAGES * 4096}")
            self._db.executescript(_SCHEMA)
            self._write(_add_log_positions)
            self._write(_add_delivery_due)

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        def mapped() -> T:
            with _mapped(what):
                return fn()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, mapped)
        except RuntimeError as exc:  # the executor is shut down: the store was closed
            raise StoreError(f"sqlite {what} failed: the store is closed") from exc
        return await future

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction: all of `fn`'s statements or none (runs on the worker thread)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._db)
            self._db.execute("COMMIT")  # may fail too (a full disk): then roll back as well
        except BaseException:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (e.g. after SQLITE_FULL); the original error matters
            raise
        return result

    async def get(self, job_id: str) -> Versioned:
        def read() -> Versioned | None:
            row = self._db.execute("SELECT record, version FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else Versioned(load_record(row[0]), row[1])  # parsed off the event loop
        found = await self._run("read", read)
        if found is None:
            raise NotFound(f"job {job_id} not found")
        return found

    async def put(self, record: JobRecord, expected_version: int) -> int:
        raw = dump_record(record)
        new_version = expected_version + 1

        def cas(db: sqlite3.Connection) -> int:
            if expected_version == 0:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, version, submitted_at, owner, status, record) "
                    "VALUES (?, 1, ?, ?, ?, ?)",
                    (record.job_id, _ts(record.submitted_at), record.config.owner, record.status.value, raw))
            else:
                cur = db.execute(
                    "UPDATE jobs SET version = ?, status = ?, record = ? WHERE job_id = ? AND version = ?",
                    (new_version, record.status.value, raw, record.job_id, expected_version))
            return cur.rowcount

        if await self._run("write", lambda: self._write(cas)) != 1:
            raise Conflict(f"job {record.job_id} changed concurrently (expected version {expected_version})")
        return new_version

    async def list(self, limit: int, offset: int, owners: Collection[str] | None = None,
                   status: JobStatus | None = None) -> tuple[list[JobRecord], int]:
        count_sql, count_args = history_count_query(owners, status)
        page_sql, page_args = history_page_query(owners, status)

        def read() -> tuple[list[JobRecord], int]:
            total = self._db.execute(count_sql, count_args).fetchone()[0]
            rows = self._db.execute(page_sql, [*page_args, limit, offset]).fetchall()
            return [load_record(r[-1]) for r in rows], total  # parsed here too: off the event loop
        return await self._run("read", read)

    async def unfinished(self) -> list[JobRecord]:
        def read() -> list[JobRecord]:
            rows = self._db.execute(
                f"SELECT record FROM jobs WHERE {_UNFINISHED} ORDER BY submitted_at, job_id").fetchall()
            return [load_record(r[0]) for r in rows]
        return await self._run("read", read)

    async def open_jobs(self) -> list[tuple[str, JobStatus]]:
        def read() -> list[tuple[str, JobStatus]]:  # the `_UNFINISHED` term selects the partial index
            rows = self._db.execute(
                f"SELECT job_id, status FROM jobs WHERE ({_UNFINISHED}) AND status NOT IN ('SUCCEEDED', 'FAILED') "
                "ORDER BY submitted_at, job_id").fetchall()
            return [(job_id, JobStatus(status)) for job_id, status in rows]
        return await self._run("read", read)

    async def append_logs(self, job_id: str, phase: str, lines: Sequence[LogLine]) -> None:
        if not lines:
            return
        rows = [(job_id, phase, _ts(ln.ts), ln.stream.value, ln.line) for ln in lines]

        def insert(db: sqlite3.Connection) -> None:
            found = db.execute("SELECT lines FROM log_counts WHERE job_id = ? AND phase = ?", (job_id, phase))
            first = (found.fetchone() or (0,))[0]
            db.executemany("INSERT INTO logs (job_id, phase, ts, stream, line, n) VALUES (?, ?, ?, ?, ?, ?)",
                           [(*row, first + i) for i, row in enumerate(rows)])
            db.execute("INSERT INTO log_counts (job_id, phase, lines) VALUES (?, ?, ?) "
                       "ON CONFLICT (job_id, phase) DO UPDATE SET lines = lines + excluded.lines",
                       (job_id, phase, len(rows)))

        def write() -> None:
            if self._reserve and any(ln.stream is not LogStream.SYSTEM for ln in lines):
                need = self._reserve + 2 * sum(len(row[4]) + _ROW_OVERHEAD for row in rows)  # row + index, in the WAL
                try:
                    stat = os.statvfs(self._dir)
                except OSError:  # cannot tell: let the write itself find out
                    stat = None
                free = stat.f_bavail * stat.f_frsize if stat is not None else need
                if free < need:
                    raise StoreError(f"sqlite log write failed: no space left on device ({free} bytes free on the "
                                     f"data disk, the last {self._reserve} are kept for job records)")
            self._write(insert)
        await self._run("log write", write)

    async def get_logs(self, job_id: str, phase: str | None = None) -> dict[str, list[LogLine]]:
        sql, args = "SELECT phase, ts, stream, line FROM logs WHERE job_id = ?", [job_id]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)

        def read() -> dict[str, list[LogLine]]:
            out: dict[str, list[LogLine]] = {}
            for ph, ts, stream, line in self._db.execute(sql + " ORDER BY seq", args):
                out.setdefault(ph, []).append(_line(ts, stream, line))
            return out
        return await self._run("log read", read)

    async def log_page(self, job_id: str, phase: str | None, offset: int, limit: int, max_chars: int,
                       text_only: bool = False) -> LogPage:
        columns = "line" if text_only else "line, ts, stream"

        def read() -> LogPage:
            sql, args = "SELECT phase, lines FROM log_counts WHERE job_id = ?", [job_id]
            if phase is not None:
                sql += " AND phase = ?"
                args.append(phase)
            counts = dict(self._db.execute(sql, args).fetchall())
            lines: list[tuple[str, Any]] = []
            chars, skip = 0, offset
            for name in sorted(counts, key=phase_order):
                if skip >= counts[name]:
                    skip -= counts[name]
                    continue
                cur = self._db.execute(f"SELECT {columns} FROM logs WHERE job_id = ? AND phase = ? AND n >= ? "
                                       "ORDER BY n LIMIT ?", (job_id, name, skip, limit - len(lines)))
                skip = 0
                for row in cur:
                    if lines and chars + len(row[0]) > max_chars:
                        return _page(lines, sum(counts.values()), text_only)
                    lines.append((name, row[0] if text_only else _line(row[1], row[2], row[0])))
                    chars += len(row[0])
                if len(lines) >= limit:
                    break
            return _page(lines, sum(counts.values()), text_only)
        return await self._run("log read", read)

    async def put_delivery(self, delivery: WebhookDelivery, expected_version: int) -> int:
        raw, due = dump_delivery(delivery), _ts(due_at(delivery))

        def cas(db: sqlite3.Connection) -> int:
            if expected_version == 0:
                cur = db.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries (delivery_id, job_id, seq, version, state, created_at, "
                    "delivery, due_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?)",
                    (delivery.delivery_id, delivery.job_id, delivery.seq, delivery.state.value,
                     _ts(delivery.created_at), raw, due))
            else:
                cur = db.execute(
                    "UPDATE webhook_deliveries SET version = ?, state = ?, delivery = ?, due_at = ? "
                    "WHERE delivery_id = ? AND version = ? AND state = ?",
                    (expected_version + 1, delivery.state.value, raw, due, delivery.delivery_id, expected_version,
                     _PENDING))
            return cur.rowcount

        if await self._run("delivery write", lambda: self._write(cas)) != 1:
            raise Conflict(f"webhook delivery {delivery.delivery_id} exists or changed concurrently "
                           f"(expected version {expected_version})")
        return expected_version + 1

    async def pending_deliveries(self, limit: int) -> list[VersionedDelivery]:
        def read() -> list[VersionedDelivery]:
            rows = self._db.execute(
                "SELECT delivery, version FROM webhook_deliveries WHERE state = ? "
                "ORDER BY created_at, job_id, seq LIMIT ?", (DeliveryState.PENDING.value, limit)).fetchall()
            return [VersionedDelivery(load_delivery(r[0]), r[1]) for r in rows]
        return await self._run("delivery read", read)

    async def due_deliveries(self, now: datetime, limit: int) -> DueDeliveries:
        """Two reads of the heads' partial index; only the due heads in the answer are read whole and parsed."""
        cutoff = _ts(now.astimezone(UTC))

        def read() -> DueDeliveries:
            rows = self._db.execute(
                f"WITH heads AS ({_HEADS}), due AS (SELECT job_id, seq, created_at FROM heads WHERE due_at <= ? "
                "ORDER BY created_at, job_id LIMIT ?) SELECT d.delivery, d.version FROM due JOIN webhook_deliveries "
                "AS d ON d.job_id = due.job_id AND d.seq = due.seq ORDER BY due.created_at, due.job_id",
                (cutoff, limit)).fetchall()
            (later,) = self._db.execute(f"WITH heads AS ({_HEADS}) SELECT MIN(due_at) FROM heads WHERE due_at > ?",
                                        (cutoff,)).fetchone()
            return DueDeliveries([VersionedDelivery(load_delivery(r[0]), r[1]) for r in rows],
                                 None if later is None else datetime.fromisoformat(later))
        return await self._run("delivery read", read)

    async def job_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        def read() -> list[WebhookDelivery]:
            rows = self._db.execute("SELECT delivery FROM webhook_deliveries WHERE job_id = ? ORDER BY seq",
                                    (job_id,)).fetchall()
            return [load_delivery(r[0]) for r in rows]
        return await self._run("delivery read", read)

    async def read_logs(self, job_id: str, after: int = 0, limit: int = 500,
                        phase: str | None = None) -> list[SeqLine]:
        """`seq` is the AUTOINCREMENT row id: it only grows, so it orders a job's lines across phases."""
        sql, args = "SELECT seq, phase, ts, stream, line FROM logs WHERE job_id = ? AND seq > ?", [job_id, after]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)

        def read() -> list[SeqLine]:
            rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", [*args, limit]).fetchall()
            return [SeqLine(seq, ph, _line(ts, stream, line)) for seq, ph, ts, stream, line in rows]
        return await self._run("log read", read)

    async def ping(self) -> None:
        await self._run("ping", lambda: self._db.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await self._run("close", self._db.close)
        self._executor.shutdown(wait=True)


_NEWEST_FIRST = "ORDER BY submitted_at DESC, job_id DESC"


def history_page_query(owners: Collection[str] | None, status: JobStatus | None) -> tuple[str, list[str]]:
    """One history page (then `LIMIT ? OFFSET ?`), read along an index already in newest-first order: no scan
    of other owners' or statuses' rows, no sort. Several owners: one `UNION ALL` branch per owner, which SQLite
    merges in order (each branch walks `jobs_owner` or `jobs_owner_status`)."""
    cond, args = ("status = ?", [status.value]) if status is not None else ("", [])
    if owners is None or len(owners) > MAX_MERGED_OWNERS:
        where, where_args = _history_where(owners, status)
        return f"SELECT record FROM jobs {where} {_NEWEST_FIRST} LIMIT ? OFFSET ?", where_args
    names = sorted(owners)
    if not names:
        return "SELECT record FROM jobs WHERE 0 LIMIT ? OFFSET ?", []
    branch = "SELECT submitted_at, job_id, record FROM jobs WHERE owner = ?" + (f" AND {cond}" if cond else "")
    sql = " UNION ALL ".join([branch] * len(names))
    return f"{sql} {_NEWEST_FIRST} LIMIT ? OFFSET ?", [a for name in names for a in (name, *args)]


def history_count_query(owners: Collection[str] | None, status: JobStatus | None) -> tuple[str, list[str]]:
    """The history's total: counted on the same indexes (covering, so no record is read)."""
    where, args = _history_where(owners, status)
    return f"SELECT COUNT(*) FROM jobs {where}", args


def _history_where(owners: Collection[str] | None, status: JobStatus | None) -> tuple[str, list[str]]:
    where, args = [], []
    if owners is not None:
        names = sorted(owners)
        where.append(f"owner IN ({', '.join('?' * len(names))})" if names else "0")
        args.extend(names)
    if status is not None:
        where.append("status = ?")
        args.append(status.value)
    return (f"WHERE {' AND '.join(where)}" if where else ""), args


def _page(lines: list[tuple[str, Any]], total: int, text_only: bool) -> LogPage:
    return LogPage([], total, lines) if text_only else LogPage(lines, total)


def _line(ts: str, stream: str, line: str) -> LogLine:
    return LogLine(ts=datetime.fromisoformat(ts), stream=stream, line=line)


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")
