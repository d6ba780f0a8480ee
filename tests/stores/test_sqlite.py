"""SQLite-only behaviour: real faults injected into a real database file (a trigger from a second connection,
a page limit, a held write lock), each surfacing as `StoreError` with nothing half-written."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import timedelta

import pytest

from jobforge.errors import StoreError
from jobforge.models import DeliveryState, JobStatus, WebhookEvent
from jobforge.stores.base import dump_delivery
from jobforge.stores.sqlite import MAX_MERGED_OWNERS, SqliteStore
from tests.stores.test_contract import T0, delivery, job, lines


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


# ---------------------------------------------------------------- query plans of history and admission

async def _plans(store: SqliteStore, call) -> list[tuple[str, list[str]]]:
    """Each statement `call` ran on the store's connection (values bound) with SQLite's plan for it."""
    ran: list[str] = []
    store._db.set_trace_callback(ran.append)
    try:
        await call()
    finally:
        store._db.set_trace_callback(None)
    db = store._db
    return [(sql, [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]) for sql in ran]


@pytest.fixture
async def big_history(store):
    """Enough rows (three owners, mixed statuses) that the planner has a choice to make."""
    statuses = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.BUILDING, JobStatus.PENDING]
    for i in range(300):
        await store.put(job(f"j{i:03d}", i, owner=f"owner-{i % 3}", status=statuses[i % 4]), 0)
    return store


@pytest.mark.parametrize("owners, status", [
    (None, None), ({"owner-1"}, None), (None, JobStatus.FAILED), ({"owner-1"}, JobStatus.FAILED),
    ({"owner-0", "owner-2"}, None), ({"owner-0", "owner-2"}, JobStatus.PENDING)])
async def test_history_pages_walk_an_index_in_order(big_history, owners, status):
    plans = await _plans(big_history, lambda: big_history.list(10, 20, owners, status))
    (count_sql, count_plan), (page_sql, page_plan) = plans
    assert count_sql.startswith("SELECT COUNT(*)") and page_sql.startswith("SELECT")
    for sql, plan in plans:
        assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)  # no sort of the matching rows
        assert all(" USING " in step for step in plan if step.startswith(("SCAN jobs", "SEARCH jobs"))), plan
    if owners is not None or status is not None:  # filtered: only the matching index range is visited
        reads = [step for step in page_plan + count_plan if step.startswith(("SCAN", "SEARCH"))]
        assert reads and all(step.startswith("SEARCH jobs USING") for step in reads), (page_plan, count_plan)
    else:
        assert page_plan == ["SCAN jobs USING INDEX jobs_submitted"]  # newest first, stops after the page


async def test_unfinished_and_open_jobs_read_only_the_partial_index(big_history):
    for read in (big_history.unfinished, big_history.open_jobs):
        [(sql, plan)] = await _plans(big_history, read)
        assert plan == ["SCAN jobs USING INDEX jobs_unfinished"], (sql, plan)
        assert len(await read()) == 150  # BUILDING and PENDING ones


async def test_an_existing_database_gains_the_history_indexes(tmp_path):
    """A file made before the indexes existed gets them when the store opens it (CREATE INDEX IF NOT EXISTS)."""
    old = sqlite3.connect(tmp_path / "jobs.db")
    old.executescript("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, version INTEGER NOT NULL, submitted_at TEXT "
                      "NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL);")
    old.close()
    store = SqliteStore(tmp_path / "jobs.db")
    try:
        names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_owner", "jobs_status", "jobs_owner_status", "jobs_unfinished"} <= names
    finally:
        await store.aclose()


# ---------------------------------------------------------------- log pages

async def test_a_log_page_is_an_index_range_whatever_its_offset(store):
    await store.append_logs("job-1", "build", lines(*(f"b{i}" for i in range(50))))
    await store.append_logs("job-2", "build", lines("other"))
    await store.append_logs("job-1", "test", lines(*(f"t{i}" for i in range(50))))
    plans = await _plans(store, lambda: store.log_page("job-1", None, 70, 5, 10_000))
    assert [sql.split(" FROM ")[1].split()[0] for sql, _ in plans] == ["log_counts", "logs"]  # no COUNT(*)
    for sql, plan in plans:
        assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), (sql, plan)
    assert "USING INDEX logs_position (job_id=? AND phase=? AND n>?)" in plans[1][1][0]
    page = await store.log_page("job-1", None, 70, 5, 10_000)
    assert ([line.line for _, line in page.lines], page.total) == (["t20", "t21", "t22", "t23", "t24"], 100)


async def test_logs_stored_before_line_positions_existed_are_numbered_on_open(tmp_path):
    """A database from before `logs.n` and `log_counts`: opening it numbers the stored lines per job and phase,
    and later appends carry on from there."""
    old = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    old.executescript("CREATE TABLE logs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, "
                      "phase TEXT NOT NULL, ts TEXT NOT NULL, stream TEXT NOT NULL, line TEXT NOT NULL);")
    for job_id, phase, text in [("a", "build", "a-b0"), ("b", "build", "b-b0"), ("a", "build", "a-b1"),
                                ("a", "test", "a-t0"), ("a", "build", "a-b2")]:
        old.execute("INSERT INTO logs (job_id, phase, ts, stream, line) VALUES (?, ?, ?, 'stdout', ?)",
                    (job_id, phase, "2026-01-01T00:00:00.000000+00:00", text))
    old.close()
    store = SqliteStore(tmp_path / "jobs.db")
    try:
        await store.append_logs("a", "build", lines("a-b3"))
        page = await store.log_page("a", None, 2, 10, 10_000, text_only=True)
        assert (page.texts, page.total) == ([("build", "a-b2"), ("build", "a-b3"), ("test", "a-t0")], 5)
        assert (await store.log_page("b", "build", 0, 10, 10_000, text_only=True)).texts == [("build", "b-b0")]
    finally:
        await store.aclose()


async def test_history_of_more_owners_than_are_merged_scans_in_order(big_history):
    owners = {"owner-1", "owner-2", *(f"nobody-{i}" for i in range(MAX_MERGED_OWNERS))}
    records, total = await big_history.list(3, 1, owners, JobStatus.PENDING)
    assert ([r.job_id for r in records], total) == (["j295", "j287", "j283"], 50)  # after j299


# ---------------------------------------------------------------- the webhook worker's read

async def test_due_deliveries_read_the_pending_index_not_the_delivered_history(store):
    """The worker reads at every round: what it costs grows with the backlog (one covering partial index),
    not with every delivery ever made, and only the answer's deliveries are read whole."""
    for i in range(200):
        for event in (WebhookEvent.BUILD_STARTED, WebhookEvent.BUILD_COMPLETED):
            state = DeliveryState.DELIVERED if i < 180 else DeliveryState.PENDING
            await store.put_delivery(delivery(f"j{i:03d}", event, i, state=state), 0)
    plans = await _plans(store, lambda: store.due_deliveries(T0 + timedelta(days=1), 5))
    assert len(plans) == 2
    for sql, plan in plans:
        reads = [step for step in plan if step.startswith(("SCAN webhook_deliveries", "SEARCH webhook_deliveries"))]
        assert reads == ["SCAN webhook_deliveries USING COVERING INDEX webhook_deliveries_heads"], (sql, plan)
    [lookup] = [step for step in plans[0][1] if step.startswith("SEARCH d ")]
    assert "(job_id=? AND seq=?)" in lookup
    found = await store.due_deliveries(T0 + timedelta(days=1), 5)
    assert [v.delivery.job_id for v in found.due] == [f"j{i}" for i in range(180, 185)]


async def test_deliveries_queued_before_due_times_were_stored_get_them_on_open(tmp_path):
    """A database from before `webhook_deliveries.due_at`: opening it computes the column for pending rows
    from their JSON, so a delivery in backoff stays in backoff and a due one is sent."""
    old = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    old.executescript("CREATE TABLE webhook_deliveries (delivery_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, "
                      "seq INTEGER NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL, "
                      "delivery TEXT NOT NULL);")
    waiting = delivery("a", WebhookEvent.BUILD_STARTED, 0, attempts=1).model_copy(
        update={"next_attempt_at": T0 + timedelta(minutes=5)})
    for d in (waiting, delivery("b", WebhookEvent.BUILD_STARTED, 1)):
        old.execute("INSERT INTO webhook_deliveries VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (d.delivery_id, d.job_id, d.seq, d.state.value, d.created_at.isoformat(), dump_delivery(d)))
    old.close()
    store = SqliteStore(tmp_path / "jobs.db")
    try:
        found = await store.due_deliveries(T0 + timedelta(minutes=1), 10)
        assert [v.delivery.job_id for v in found.due] == ["b"] and found.next_due == T0 + timedelta(minutes=5)
    finally:
        await store.aclose()
