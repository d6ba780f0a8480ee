"""The `Store` contract, run over every store: SQLite on a temp file, Consul against the fake agent.

Versions are opaque (SQLite counts, Consul uses ModifyIndex): tests only compare them with each other.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobforge.config import JobConfig
from jobforge.errors import Conflict, NotFound, StoreError
from jobforge.models import DeliveryState, JobRecord, JobStatus, LogLine, LogStream, WebhookDelivery, WebhookEvent
from jobforge.pipeline import new_job
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from tests.doubles.consul import FakeConsul

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
        "registry_url": "127.0.0.1:5000"}


@pytest.fixture(params=["sqlite", "consul"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "jobs.db")
        yield sqlite
        await sqlite.aclose()
        return
    fake = FakeConsul()
    consul = ConsulStore(await fake.start(), prefix="contract/jobforge/")
    yield consul
    await consul.aclose()
    await fake.stop()


def job(job_id: str, seconds: float = 0, *, owner: str = "team", status: JobStatus = JobStatus.PENDING,
        **config) -> JobRecord:
    record = new_job(job_id, JobConfig.model_validate({**BASE, "owner": owner, **config}),
                     T0 + timedelta(seconds=seconds))
    return record.model_copy(update={"status": status})


def lines(*texts: str, stream: LogStream = LogStream.STDOUT) -> list[LogLine]:
    return [LogLine(ts=T0 + timedelta(milliseconds=i), stream=stream, line=t) for i, t in enumerate(texts)]


# ---------------------------------------------------------------- records and compare-and-set

async def test_create_then_get(store):
    record = job("job-1")
    version = await store.put(record, 0)
    assert version > 0
    assert await store.get("job-1") == (record, version)


async def test_cas_update_returns_the_new_version(store):
    v1 = await store.put(job("job-1"), 0)
    building = job("job-1", status=JobStatus.BUILDING)
    v2 = await store.put(building, v1)
    assert v2 != v1
    assert await store.get("job-1") == (building, v2)
    failed = job("job-1", status=JobStatus.FAILED)
    assert await store.put(failed, v2) not in (v1, v2)


async def test_creating_an_existing_job_conflicts(store):
    version = await store.put(job("job-1"), 0)
    with pytest.raises(Conflict):
        await store.put(job("job-1", owner="intruder"), 0)
    assert await store.get("job-1") == (job("job-1"), version)


async def test_a_stale_version_conflicts(store):
    v1 = await store.put(job("job-1"), 0)
    v2 = await store.put(job("job-1", status=JobStatus.BUILDING), v1)
    with pytest.raises(Conflict):
        await store.put(job("job-1", status=JobStatus.FAILED), v1)
    assert await store.get("job-1") == (job("job-1", status=JobStatus.BUILDING), v2)


async def test_updating_a_missing_job_conflicts(store):
    with pytest.raises(Conflict):
        await store.put(job("ghost"), 7)
    with pytest.raises(NotFound):
        await store.get("ghost")


async def test_unknown_job_is_not_found(store):
    with pytest.raises(NotFound):
        await store.get("nope")


async def test_secrets_survive_a_round_trip(store):
    record = job("job-1", webhook_url="http://127.0.0.1:9/hook", webhook_secret="hush-hush-secret",
                 webhook_headers={"Authorization": "Bearer tok-123"})
    await store.put(record, 0)
    got = (await store.get("job-1")).record
    assert got.config.webhook_secret.get_secret_value() == "hush-hush-secret"
    assert got.config.webhook_headers == {"Authorization": "Bearer tok-123"}
    assert (await store.list(10, 0))[0][0].config.webhook_secret.get_secret_value() == "hush-hush-secret"


async def test_job_ids_with_dots_and_underscores(store):
    for job_id in ("a.b", "a_2Eb", "v1.0.json", "x-y_z"):
        await store.put(job(job_id), 0)
    assert [r.job_id for r in (await store.list(10, 0))[0]] == ["x-y_z", "v1.0.json", "a_2Eb", "a.b"]
    assert (await store.get("v1.0.json")).record.job_id == "v1.0.json"


# ---------------------------------------------------------------- history and recovery

@pytest.fixture
async def history(store):
    jobs = [job("j1", 10, owner="ann", status=JobStatus.SUCCEEDED),
            job("j2", 20, owner="bob", status=JobStatus.FAILED),
            job("j3", 30, owner="ann", status=JobStatus.BUILDING),
            job("j4", 40, owner="bob", status=JobStatus.PENDING),
            job("j5", 50, owner="ann", status=JobStatus.SUCCEEDED)]
    for record in jobs:
        await store.put(record, 0)
    return store


async def test_list_is_newest_first_with_a_total(history):
    records, total = await history.list(10, 0)
    assert ([r.job_id for r in records], total) == (["j5", "j4", "j3", "j2", "j1"], 5)


async def test_list_pages(history):
    pages = [await history.list(2, offset) for offset in (0, 2, 4, 6)]
    assert [[r.job_id for r in page] for page, _ in pages] == [["j5", "j4"], ["j3", "j2"], ["j1"], []]
    assert {total for _, total in pages} == {5}


async def test_list_filters_by_owner_and_status(history):
    def ids(result):
        return [r.job_id for r in result[0]], result[1]
    assert ids(await history.list(10, 0, owners={"ann"})) == (["j5", "j3", "j1"], 3)
    assert ids(await history.list(1, 1, owners={"ann"})) == (["j3"], 3)
    assert ids(await history.list(10, 0, status=JobStatus.SUCCEEDED)) == (["j5", "j1"], 2)
    assert ids(await history.list(10, 0, owners={"bob"}, status=JobStatus.FAILED)) == (["j2"], 1)
    assert ids(await history.list(10, 0, owners={"carol"})) == ([], 0)
    assert ids(await history.list(10, 0, owners={"bob", "carol"})) == (["j4", "j2"], 2)
    assert ids(await history.list(10, 0, owners=set())) == ([], 0)
    assert ids(await history.list(1, 1, owners={"ann", "bob"})) == (["j4"], 5)  # owners merged in order
    assert ids(await history.list(10, 1, owners={"ann", "bob"}, status=JobStatus.SUCCEEDED)) == (["j1"], 2)


async def test_list_breaks_ties_by_job_id_descending(store):
    for job_id in ("b", "c", "a"):
        await store.put(job(job_id, 5), 0)
    assert [r.job_id for r in (await store.list(10, 0))[0]] == ["c", "b", "a"]


async def test_list_reflects_updates(history):
    record, version = await history.get("j4")
    await history.put(record.model_copy(update={"status": JobStatus.FAILED}), version)
    assert [r.job_id for r in (await history.list(10, 0, status=JobStatus.FAILED))[0]] == ["j4", "j2"]


async def test_unfinished_is_oldest_first(history):
    assert [r.job_id for r in await history.unfinished()] == ["j3", "j4"]


async def test_unfinished_includes_finished_jobs_that_still_owe_a_cleanup(store):
    owing = [job("c1", 10, status=JobStatus.FAILED).model_copy(update={"cleanup_pending": True}),
             job("c2", 20, status=JobStatus.SUCCEEDED).model_copy(update={"cleanup_retry": True,
                                                                         "temp_image_deleted": False}),
             job("c3", 30, status=JobStatus.SUCCEEDED).model_copy(update={"temp_image_deleted": False,
                                                                         "cleanup_error": "gave up"})]
    for record in owing:
        await store.put(record, 0)
    assert [r.job_id for r in await store.unfinished()] == ["c1", "c2"]


async def test_open_jobs_are_the_unfinished_ones_oldest_first(history):
    record, version = await history.get("j5")
    await history.put(record.model_copy(update={"cleanup_retry": True}), version)  # owes a cleanup, yet finished
    record, version = await history.get("j3")
    await history.put(record.model_copy(update={"status": JobStatus.TESTING}), version)
    assert await history.open_jobs() == [("j3", JobStatus.TESTING), ("j4", JobStatus.PENDING)]


async def test_empty_store(store):
    assert await store.list(10, 0) == ([], 0)
    assert await store.unfinished() == []
    assert await store.open_jobs() == []


# ---------------------------------------------------------------- logs

async def test_logs_keep_write_order_per_phase(store):
    build_1, build_2 = lines("compiling", "linking"), lines("done", stream=LogStream.STDERR)
    test_1 = lines("ok 1", "ok 2")
    await store.append_logs("job-1", "build", build_1)
    await store.append_logs("job-1", "test", test_1)
    await store.append_logs("job-1", "build", build_2)
    await store.append_logs("job-2", "build", lines("other job"))
    assert await store.get_logs("job-1") == {"build": build_1 + build_2, "test": test_1}
    assert await store.get_logs("job-1", "test") == {"test": test_1}
    assert await store.get_logs("job-1", "publish") == {}
    assert await store.get_logs("job-3") == {}


async def test_many_small_appends_stay_in_order(store):
    expected = []
    for i in range(60):
        batch = lines(f"line {i}", stream=LogStream.SYSTEM if i % 3 else LogStream.STDOUT)
        expected += batch
        await store.append_logs("job-1", "build", batch)
    assert (await store.get_logs("job-1", "build"))["build"] == expected


async def test_a_2_mib_batch_round_trips(store):
    batch = lines(*(f"line {i:06d} " + "x" * 200 for i in range(10_500)))
    assert sum(len(ln.line) for ln in batch) > 2 * 1024 * 1024
    await store.append_logs("job-1", "test", batch)
    await store.append_logs("job-1", "test", lines("after"))
    assert await store.get_logs("job-1") == {"test": batch + lines("after")}


async def test_unicode_control_characters_and_very_long_lines(store):
    batch = lines("héllo wörld ✓ 😀 日本語", "\x00\x01\x1b[31mred\x1b[0m\ttab", "", "a\u2028b\r\n",
                  "x" * 300_000, "é" * 100_001, "😀" * 70_000, "\x07" * 50_000, "tail")
    await store.append_logs("job-1", "build", batch)
    assert await store.get_logs("job-1") == {"build": batch}


async def test_empty_append_is_a_no_op(store):
    await store.append_logs("job-1", "build", [])
    assert await store.get_logs("job-1") == {}


async def test_a_failing_line_mid_batch_commits_nothing(store):
    """A write that fails at its third line leaves no line of the batch behind (one transaction per append)."""
    await store.append_logs("job-1", "build", lines("before"))
    with pytest.raises(StoreError):
        await store.append_logs("job-1", "build", lines("one", "two", "bad \ud800 line", "four"))
    assert await store.get_logs("job-1") == {"build": lines("before")}


# ---------------------------------------------------------------- log pages

@pytest.fixture
async def logged(store):
    await store.append_logs("job-1", "publish", lines("p0"))
    await store.append_logs("job-1", "cleanup", lines("c0"))
    await store.append_logs("job-1", "build", lines("b0", "b1", "b2"))
    await store.append_logs("job-1", "test", lines("t0", "t1"))
    await store.append_logs("job-1", "build", lines("b3"))
    await store.append_logs("job-2", "build", lines("other"))
    return store


def texts(page):
    return [(phase, line.line) for phase, line in page.lines]


async def test_log_pages_read_phases_in_order_with_a_total(logged):
    whole = await logged.log_page("job-1", None, 0, 100, 10_000)
    assert texts(whole) == [("build", "b0"), ("build", "b1"), ("build", "b2"), ("build", "b3"), ("test", "t0"),
                            ("test", "t1"), ("publish", "p0"), ("cleanup", "c0")]
    assert whole.total == 8
    pages = [await logged.log_page("job-1", None, offset, 3, 10_000) for offset in (0, 3, 6, 9)]
    assert [texts(p) for p in pages] == [texts(whole)[0:3], texts(whole)[3:6], texts(whole)[6:8], []]
    assert {p.total for p in pages} == {8}


async def test_a_log_page_of_one_phase(logged):
    page = await logged.log_page("job-1", "test", 1, 10, 10_000)
    assert (texts(page), page.total) == ([("test", "t1")], 2)
    assert tuple(await logged.log_page("job-3", None, 0, 10, 10_000)) == ([], 0, None)


async def test_a_text_only_log_page_holds_the_same_lines(logged):
    for offset, limit, max_chars in ((0, 100, 10_000), (3, 4, 10_000), (1, 10, 2)):
        full = await logged.log_page("job-1", None, offset, limit, max_chars)
        text = await logged.log_page("job-1", None, offset, limit, max_chars, text_only=True)
        assert (text.lines, text.texts, text.total) == ([], texts(full), full.total)


async def test_a_log_page_ends_at_its_size_but_always_holds_a_line(store):
    await store.append_logs("job-1", "build", lines("a" * 600, "b" * 600, "c" * 600))
    page = await store.log_page("job-1", None, 0, 10, 1000)
    assert [line.line[0] for _, line in page.lines] == ["a"] and page.total == 3
    page = await store.log_page("job-1", None, 1, 10, 100)
    assert [line.line[0] for _, line in page.lines] == ["b"]


# ---------------------------------------------------------------- readiness

async def test_ping(store):
    await store.ping()


# ---------------------------------------------------------------- webhook outbox

def delivery(job_id: str, event: WebhookEvent, seconds: float = 0, **changes) -> WebhookDelivery:
    fields = {"body": '{"event":"' + event.value + '"}', **changes}
    return WebhookDelivery(delivery_id=f"{job_id}/{event.value}", job_id=job_id, event=event,
                           created_at=T0 + timedelta(seconds=seconds), next_attempt_at=T0 + timedelta(seconds=seconds),
                           **fields)


async def test_a_delivery_is_created_once_and_updated_by_cas(store):
    first = delivery("job-1", WebhookEvent.BUILD_STARTED)
    v1 = await store.put_delivery(first, 0)
    with pytest.raises(Conflict):
        await store.put_delivery(first.model_copy(update={"body": "{}"}), 0)  # queued twice: the first stays
    claimed = first.model_copy(update={"lease_until": T0 + timedelta(seconds=40)})
    v2 = await store.put_delivery(claimed, v1)
    assert v2 != v1
    with pytest.raises(Conflict):  # a second worker holding the old version cannot claim it too
        await store.put_delivery(first.model_copy(update={"lease_until": T0}), v1)
    assert await store.pending_deliveries(10) == [(claimed, v2)]
    done = claimed.model_copy(update={"state": DeliveryState.DELIVERED, "attempts": 1, "last_status": 204})
    v3 = await store.put_delivery(done, v2)
    assert await store.pending_deliveries(10) == []
    assert await store.job_deliveries("job-1") == [done]
    for version in (v3, v2):  # a finished delivery is final, and cannot be queued again either
        with pytest.raises(Conflict):
            await store.put_delivery(done.model_copy(update={"state": DeliveryState.PENDING}), version)
    with pytest.raises(Conflict):
        await store.put_delivery(first, 0)
    assert await store.job_deliveries("job-1") == [done]


async def test_pending_deliveries_are_oldest_first_and_per_job_in_event_order(store):
    queued = [delivery("b", WebhookEvent.BUILD_STARTED, 1), delivery("a", WebhookEvent.JOB_FAILED, 2),
              delivery("a", WebhookEvent.BUILD_STARTED, 0), delivery("a", WebhookEvent.BUILD_FAILED, 2),
              delivery("c", WebhookEvent.JOB_COMPLETED, 3, state=DeliveryState.FAILED)]
    for d in queued:
        await store.put_delivery(d, 0)
    pending = [(v.delivery.job_id, v.delivery.event.value) for v in await store.pending_deliveries(10)]
    assert pending == [("a", "build.started"), ("b", "build.started"), ("a", "build.failed"), ("a", "job.failed")]
    assert [(v.delivery.job_id, v.delivery.event.value) for v in await store.pending_deliveries(2)] == pending[:2]
    assert [d.event.value for d in await store.job_deliveries("a")] == ["build.started", "build.failed", "job.failed"]
    assert [d.state for d in await store.job_deliveries("c")] == [DeliveryState.FAILED]
    assert await store.job_deliveries("nobody") == []


async def test_due_deliveries_are_each_jobs_first_pending_one_once_its_time_has_come(store):
    """The worker's read: heads only (a job's later events wait), heads in backoff or leased left out (and
    their earliest due time given instead), oldest first, bounded by `limit`."""
    plus2 = timezone(timedelta(hours=2))  # a time in another zone compares as the same instant
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    queued = [
        delivery("a", WebhookEvent.BUILD_STARTED, 0, attempts=1).model_copy(update={"next_attempt_at": at(100)}),
        delivery("a", WebhookEvent.BUILD_FAILED, 2), delivery("a", WebhookEvent.JOB_FAILED, 2),
        delivery("b", WebhookEvent.BUILD_STARTED, 1),
        delivery("c", WebhookEvent.BUILD_STARTED, 3, lease_until=at(50).astimezone(plus2)),  # being sent
        delivery("d", WebhookEvent.BUILD_STARTED, 4, state=DeliveryState.FAILED),
        delivery("d", WebhookEvent.BUILD_COMPLETED, 5),
        delivery("e", WebhookEvent.BUILD_STARTED, -1).model_copy(update={"next_attempt_at": at(9).astimezone(plus2)}),
    ]
    for d in queued:
        await store.put_delivery(d, 0)

    async def due(seconds: float, limit: int = 10) -> tuple[list[tuple[str, str]], datetime | None]:
        found = await store.due_deliveries(at(seconds), limit)
        return [(v.delivery.job_id, v.delivery.event.value) for v in found.due], found.next_due

    assert await due(10) == ([("e", "build.started"), ("b", "build.started"), ("d", "build.completed")], at(50))
    assert await due(10, limit=1) == ([("e", "build.started")], at(50))
    assert await due(60) == ([("e", "build.started"), ("b", "build.started"), ("c", "build.started"),
                              ("d", "build.completed")], at(100))
    assert await due(200) == ([("e", "build.started"), ("a", "build.started"), ("b", "build.started"),
                               ("c", "build.started"), ("d", "build.completed")], None)
    [head] = [v for v in (await store.due_deliveries(at(200), 10)).due if v.delivery.job_id == "a"]
    await store.put_delivery(head.delivery.model_copy(update={"state": DeliveryState.DELIVERED}), head.version)
    now_due = (await due(10))[0]  # the next event of `a` is its head now, due at once, in created_at order
    assert now_due == [("e", "build.started"), ("b", "build.started"), ("a", "build.failed"), ("d", "build.completed")]
    assert await store.due_deliveries(at(10), 0) == ([], at(50))


async def test_a_delivery_round_trips_every_field(store):
    full = delivery("job.with_odd-id", WebhookEvent.TEST_FAILED, 5, attempts=3, last_status=503,
                    outcome="HTTP 503", lease_until=T0, finished_at=T0 + timedelta(seconds=9),
                    body='{"error":"caf\\u00e9 ☕ \\"quoted\\"\\n"}')
    await store.put_delivery(full, 0)
    assert await store.job_deliveries("job.with_odd-id") == [full]


async def test_a_record_stored_before_a_newer_rule_stays_readable(store):
    record = job("job-1", webhook_url="http://127.0.0.1:9/hook")
    legacy = record.model_copy(update={"config": record.config.model_copy(update={"webhook_headers": {"Host": "x"}})})
    await store.put(legacy, 0)
    assert (await store.get("job-1")).record.config.webhook_headers == {"Host": "x"}


# ---------------------------------------------------------------- log cursor (streams)

async def read_all(store, job_id: str, after: int = 0, limit: int = 7, phase: str | None = None):
    """Every line after `after`, read in pages of `limit` the way a stream follower does."""
    out = []
    while page := await store.read_logs(job_id, after=after, limit=limit, phase=phase):
        assert len(page) <= limit
        out += page
        after = page[-1].seq
    return out


async def test_read_logs_is_a_cursor_in_write_order_across_phases(store):
    build, test, publish = lines(*(f"b{i}" for i in range(20))), lines("t0", "t1"), lines("p0")
    long_line = lines("y" * 100_000, "x" * 300_000, "z")  # split into pieces, across two Consul chunks
    await store.append_logs("job-1", "build", build[:12])
    await store.append_logs("job-1", "build", build[12:] + long_line)
    await store.append_logs("job-2", "build", lines("other job"))
    await store.append_logs("job-1", "test", test)
    got = await read_all(store, "job-1")
    assert [(s.phase, s.line) for s in got] == [("build", ln) for ln in build + long_line] + [("test", ln) for ln in test]
    seqs = [s.seq for s in got]
    assert seqs == sorted(set(seqs)) and seqs[0] > 0
    # Resuming from any line gives exactly the rest; lines written later follow.
    for cut in (0, 5, 11, 12, 20, 21, 23):
        assert await read_all(store, "job-1", after=seqs[cut]) == got[cut + 1:]
    await store.append_logs("job-1", "publish", publish)
    await store.append_logs("job-1", "cleanup", lines("deleted"))
    rest = await read_all(store, "job-1", after=seqs[-1])
    assert [(s.phase, s.line.line) for s in rest] == [("publish", "p0"), ("cleanup", "deleted")]
    assert rest[0].seq > seqs[-1]
    only_test = await read_all(store, "job-1", phase="test")
    assert [s.line for s in only_test] == test and [s.seq for s in only_test] == seqs[-2:]
    assert await store.read_logs("job-3") == []
