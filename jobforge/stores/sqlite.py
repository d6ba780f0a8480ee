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
from jobforge.models import DeliveryState, JobRecord, JobStatus, LogLine, WebhookDelivery
from jobforge.stores.base import (
    Versioned,
    VersionedDelivery,
    dump_delivery,
    dump_record,
    load_delivery,
    load_record,
)

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

    async def put_delivery(self, delivery: WebhookDelivery, expected_version: int) -> int:
        raw = dump_delivery(delivery)
        try:
            if expected_version == 0:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries (delivery_id, job_id, seq, version, state, created_at, "
                    "delivery) VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (delivery.delivery_id, delivery.job_id, delivery.seq, delivery.state.value,
                     _ts(delivery.created_at), raw))
            else:
                cur = self._db.execute(
                    "UPDATE webhook_deliveries SET version = ?, state = ?, delivery = ? "
                    "WHERE delivery_id = ? AND version = ? AND state = ?",
                    (expected_version + 1, delivery.state.value, raw, delivery.delivery_id, expected_version,
                     DeliveryState.PENDING.value))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite write failed: {exc}") from exc
        if cur.rowcount != 1:
            raise Conflict(f"webhook delivery {delivery.delivery_id} exists or changed concurrently "
                           f"(expected version {expected_version})")
        return expected_version + 1

    async def pending_deliveries(self, limit: int) -> list[VersionedDelivery]:
        rows = self._db.execute(
            "SELECT delivery, version FROM webhook_deliveries WHERE state = ? "
            "ORDER BY created_at, job_id, seq LIMIT ?", (DeliveryState.PENDING.value, limit)).fetchall()
        return [VersionedDelivery(load_delivery(r[0]), r[1]) for r in rows]

    async def job_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        rows = self._db.execute("SELECT delivery FROM webhook_deliveries WHERE job_id = ? ORDER BY seq",
                                (job_id,)).fetchall()
        return [load_delivery(r[0]) for r in rows]

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite unusable: {exc}") from exc

    async def aclose(self) -> None:
        self._db.close()


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")
