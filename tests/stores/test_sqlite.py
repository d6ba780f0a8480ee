"""SQLite-only behaviour: real faults injected into a real database file (a trigger from a second connection,
a page limit, a held write lock), each surfacing as `StoreError` with nothing half-written."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from jobforge.errors import StoreError
from jobforge.models import JobStatus
from jobforge.stores.sqlite import SqliteStore
from tests.stores.test_contract import job, lines


@pytest.fixture
async def store(tmp_path):
    sqlite = SqliteStore(tmp_path / "jobs.db")
    yield sqlite
    await sqlite.aclose()


def other(tmp_path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, check_same_thread=False)


async def test_a_failing_third_row_leaves_no_row_of_the_append(store, tmp_path):
    db = other(tmp_path)
    db.execute("CREATE TRIGGER third BEFORE INSERT ON logs WHEN NEW.line = 'three' "
               "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(StoreError, match="injected failure"):
        await store.append_logs("job-1", "build", lines("one", "two", "three", "four"))
    assert db.execute("SELECT COUNT(*) FROM logs").fetchone() == (0,)
    db.execute("DROP TRIGGER third")
    await store.append_logs("job-1", "build", lines("one", "two", "three"))
    assert [ln.line for ln in (await store.get_logs("job-1"))["build"]] == ["one", "two", "three"]


async def test_a_failing_record_update_keeps_the_old_record(store, tmp_path):
    version = await store.put(job("job-1"), 0)
    db = other(tmp_path)
    db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON jobs BEGIN SELECT RAISE(ABORT, 'no update'); END")
    with pytest.raises(StoreError, match="no update"):
        await store.put(job("job-1", status=JobStatus.BUILDING), version)
    assert await store.get("job-1") == (job("job-1"), version)


async def test_a_full_disk_is_named_and_earlier_data_survives(store, tmp_path):
    await store.put(job("job-1"), 0)
    await store.append_logs("job-1", "build", lines("kept"))
    pages = other(tmp_path).execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the store's own connection: SQLITE_FULL for real
    with pytest.raises(StoreError, match="no space left on device"):
        await store.append_logs("job-1", "build", lines(*("x" * 4000 for _ in range(50))))
    assert [ln.line for ln in (await store.get_logs("job-1"))["build"]] == ["kept"]
    assert (await store.get("job-1")).record.job_id == "job-1"


async def test_a_write_waits_for_another_writer_instead_of_failing(store, tmp_path):
    db = other(tmp_path)
    db.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    released = threading.Timer(0.3, lambda: db.execute("COMMIT"))
    released.start()
    await store.put(job("job-1"), 0)  # waits for the lock (busy timeout) rather than "database is locked"
    released.join()
    assert (await store.get("job-1")).version == 1


async def test_store_calls_do_not_block_the_event_loop(store):
    """A slow query runs on the store's thread: the loop keeps ticking meanwhile."""
    await store.append_logs("job-1", "build", lines(*(f"line {i}" + "x" * 500 for i in range(20_000))))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for _ in range(3):
        await store.get_logs("job-1")
    task.cancel()
    assert ticks > 3
