"""SQLite store for the local backend: one file, WAL, survives restarts.

Calls are short local transactions, so they run inline on the event loop; a single connection serialises them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from jobforge.errors import Conflict, NotFound, StoreError
from jobforge.models import JobRecord, JobStatus, LogLine
from jobforge.stores.base import SeqLine, Versioned, dump_record, load_record

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
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    ts TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, phase, seq);
CREATE INDEX IF NOT EXISTS logs_job_seq ON logs (job_id, seq);
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # the file holds webhook secrets: owner-only
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    async def get(self, job_id: str) -> Versioned:
        row = self._db.execute("SELECT record, version FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return Versioned(load_record(row[0]), row[1])

    async def put(self, record: JobRecord, expected_version: int) -> int:
        raw = dump_record(record)
        new_version = expected_version + 1
        try:
            if expected_version == 0:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, version, submitted_at, owner, status, record) "
                    "VALUES (?, 1, ?, ?, ?, ?)",
                    (record.job_id, _ts(record.submitted_at), record.config.owner, record.status.value, raw))
            else:
                cur = self._db.execute(
                    "UPDATE jobs SET version = ?, status = ?, record = ? WHERE job_id = ? AND version = ?",
                    (new_version, record.status.value, raw, record.job_id, expected_version))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite write failed: {exc}") from exc
        if cur.rowcount != 1:
            raise Conflict(f"job {record.job_id} changed concurrently (expected version {expected_version})")
        return new_version

    async def list(self, limit: int, offset: int, owner: str | None = None,
                   status: JobStatus | None = None) -> tuple[list[JobRecord], int]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self._db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
        rows = self._db.execute(
            f"SELECT record FROM jobs {clause} ORDER BY submitted_at DESC, job_id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset]).fetchall()
        return [load_record(r[0]) for r in rows], total

    async def unfinished(self) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT record FROM jobs WHERE status NOT IN ('SUCCEEDED', 'FAILED') ORDER BY submitted_at, job_id"
        ).fetchall()
        return [load_record(r[0]) for r in rows]

    async def append_logs(self, job_id: str, phase: str, lines: Sequence[LogLine]) -> None:
        try:
            with self._db:
                self._db.executemany(
                    "INSERT INTO logs (job_id, phase, ts, stream, line) VALUES (?, ?, ?, ?, ?)",
                    [(job_id, phase, _ts(ln.ts), ln.stream.value, ln.line) for ln in lines])
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite log write failed: {exc}") from exc

    async def get_logs(self, job_id: str, phase: str | None = None) -> dict[str, list[LogLine]]:
        sql, args = "SELECT phase, ts, stream, line FROM logs WHERE job_id = ?", [job_id]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)
        out: dict[str, list[LogLine]] = {}
        for ph, ts, stream, line in self._db.execute(sql + " ORDER BY seq", args):
            out.setdefault(ph, []).append(LogLine(ts=datetime.fromisoformat(ts), stream=stream, line=line))
        return out

    async def read_logs(self, job_id: str, after: int = 0, limit: int = 500,
                        phase: str | None = None) -> list[SeqLine]:
        """`seq` is the AUTOINCREMENT row id: it only grows, so it orders a job's lines across phases."""
        sql, args = "SELECT seq, phase, ts, stream, line FROM logs WHERE job_id = ? AND seq > ?", [job_id, after]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)
        rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", [*args, limit]).fetchall()
        return [SeqLine(seq, ph, LogLine(ts=datetime.fromisoformat(ts), stream=stream, line=line))
                for seq, ph, ts, stream, line in rows]

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite unusable: {exc}") from exc

    async def aclose(self) -> None:
        self._db.close()


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")
