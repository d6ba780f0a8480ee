"""What only the Consul store has: its key layout, the HTTP it sends, and failures mapped to `StoreError`.

The shared behaviour is in test_contract.py; here the fake agent is inspected directly.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from jobforge.config import JobConfig
from jobforge.devinfra import free_port
from jobforge.errors import Conflict, NotFound, StoreError
from jobforge.models import JobStatus, LogLine, LogStream
from jobforge.pipeline import new_job
from jobforge.stores.consul import ConsulStore
from tests.doubles.consul import FakeConsul

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000"}


def job(job_id: str = "job-1"):
    return new_job(job_id, JobConfig.model_validate(CONFIG), T0)


def line(text: str) -> LogLine:
    return LogLine(ts=T0, stream=LogStream.STDOUT, line=text)


@pytest.fixture
def fake(fake_consul_agent):
    return fake_consul_agent


@pytest.fixture
async def store(fake):
    consul = ConsulStore(fake.addr)
    yield consul
    await consul.aclose()


async def test_key_layout(fake, store):
    await store.put(job("job-1"), 0)
    await store.put(job("v1.2"), 0)
    await store.append_logs("job-1", "build", [line("a")])
    await store.append_logs("job-1", "build", [line("b")])
    await store.append_logs("job-1", "test", [line("c")])
    assert sorted(fake.table.entries) == [
        "jobforge/history/team/20260101000000000000_job-1", "jobforge/history/team/20260101000000000000_v1_2E2",
        "jobforge/jobs/job-1", "jobforge/jobs/v1_2E2",
        "jobforge/logs/job-1/build/000000000000", "jobforge/logs/job-1/build/000000000001",
        "jobforge/logs/job-1/test/000000000000",
    ]
    stored = json.loads(fake.table.entries["jobforge/logs/job-1/build/000000000001"].value)
    assert stored == [{"ts": "2026-01-01T00:00:00+00:00", "stream": "stdout", "line": "b"}]
    assert fake.table.entries["jobforge/history/team/20260101000000000000_job-1"].value == b"PENDING outstanding"


async def test_the_version_is_the_modify_index(fake, store):
    version = await store.put(job(), 0)
    assert version == fake.table.entries["jobforge/jobs/job-1"].modify_index
    record = json.loads(fake.table.entries["jobforge/jobs/job-1"].value)
    assert record["job_id"] == "job-1" and record["status"] == "PENDING"


async def test_requests_match_the_reference(fake, store):
    await store.put(job(), 0)
    await store.get("job-1")
    await store.list(10, 0)
    await store.append_logs("job-1", "build", [line("a")])
    await store.get_logs("job-1")
    await store.ping()
    assert [(s.method, s.path, s.query) for s in fake.seen] == [
        ("PUT", "/v1/txn", ""),
        ("GET", "/v1/kv/jobforge/jobs/job-1", ""),
        ("GET", "/v1/kv/jobforge/meta/history-index", ""),  # once per store: is the history index complete?
        ("GET", "/v1/kv/jobforge/jobs/", "recurse"),  # no: give the records their entries (cas 0, 64 a txn)
        ("PUT", "/v1/txn", ""),
        ("PUT", "/v1/kv/jobforge/history/team/20260101000000000000_job-1", "cas=0"),  # it exists: one by one
        ("PUT", "/v1/kv/jobforge/meta/history-index", ""),
        ("GET", "/v1/kv/jobforge/history/", "recurse"),
        ("PUT", "/v1/txn", ""),
        ("GET", "/v1/kv/jobforge/logs/job-1/build/", "keys"),
        ("PUT", "/v1/kv/jobforge/logs/job-1/build/000000000000", "cas=0"),
        ("GET", "/v1/kv/jobforge/logs/job-1/", "recurse"),
        ("GET", "/v1/status/leader", ""),
    ]
    assert {s.token for s in fake.seen} == {None}


async def test_token_and_datacenter_are_sent():
    fake = FakeConsul(acl_token="s3cr3t", datacenter="east")
    store = ConsulStore(await fake.start(), token="s3cr3t", datacenter="east")
    try:
        await store.put(job(), 0)
        assert (await store.get("job-1")).record.job_id == "job-1"
        assert {s.token for s in fake.seen} == {"s3cr3t"}
        assert all("dc=east" in s.query.split("&") for s in fake.seen)
    finally:
        await store.aclose()
        await fake.stop()


async def test_acl_refusals_are_store_errors_not_conflicts():
    fake = FakeConsul(acl_token="s3cr3t")
    anonymous, stranger = ConsulStore(await fake.start()), ConsulStore(fake.addr, token="wrong")
    try:
        with pytest.raises(StoreError, match="Permission denied"):
            await anonymous.put(job(), 0)  # a txn rolled back for a reason other than a stale index
        with pytest.raises(StoreError, match="403"):
            await anonymous.get("job-1")
        with pytest.raises(StoreError, match="ACL not found"):
            await stranger.put(job(), 0)
    finally:
        await anonymous.aclose()
        await stranger.aclose()
        await fake.stop()


async def test_a_scheme_in_the_address_is_kept(fake):
    store = ConsulStore(f"http://{fake.addr}/")
    try:
        await store.ping()
    finally:
        await store.aclose()


async def test_large_batches_are_split_into_values_well_under_the_limit(fake, store):
    batch = [line(f"{i:05d} " + "y" * 500) for i in range(5000)] + [line("z" * 1_500_000)]
    await store.append_logs("job-1", "build", batch)
    sizes = [len(e.value) for e in fake.table.under("jobforge/logs/job-1/build/")]
    assert len(sizes) > 8 and max(sizes) <= 256 * 1024
    assert (await store.get_logs("job-1", "build"))["build"] == batch


async def test_two_writers_never_overwrite_each_others_chunks(fake, store):
    other = ConsulStore(fake.addr)
    try:
        await store.append_logs("job-1", "build", [line("a1")])
        await other.append_logs("job-1", "build", [line("b1")])
        await store.append_logs("job-1", "build", [line("a2")])  # its cached slot was taken: it moves on
        await other.append_logs("job-1", "build", [line("b2")])
        logs = await store.get_logs("job-1")
        assert [ln.line for ln in logs["build"]] == ["a1", "b1", "a2", "b2"]
    finally:
        await other.aclose()


async def test_two_writers_cas_on_the_record(fake, store):
    other = ConsulStore(fake.addr)
    try:
        version = await store.put(job(), 0)
        _, seen_by_other = await other.get("job-1")
        await store.put(job().model_copy(update={"status": JobStatus.BUILDING}), version)
        with pytest.raises(Conflict):
            await other.put(job().model_copy(update={"status": JobStatus.FAILED}), seen_by_other)
    finally:
        await other.aclose()


OPERATIONS = {
    "get": lambda s: s.get("job-1"),
    "put": lambda s: s.put(job(), 0),
    "list": lambda s: s.list(10, 0),
    "unfinished": lambda s: s.unfinished(),
    "append_logs": lambda s: s.append_logs("job-1", "build", [line("x")]),
    "get_logs": lambda s: s.get_logs("job-1"),
    "ping": lambda s: s.ping(),
}


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_a_consul_error_is_a_store_error(fake, store, operation):
    fake.outage = (500, "No cluster leader")
    with pytest.raises(StoreError, match="HTTP 500.*No cluster leader"):
        await OPERATIONS[operation](store)


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_an_unreachable_consul_is_a_store_error(operation):
    store = ConsulStore(f"127.0.0.1:{free_port()}", timeout=5)
    try:
        with pytest.raises(StoreError, match="unreachable"):
            await OPERATIONS[operation](store)
    finally:
        await store.aclose()


async def test_a_leaderless_cluster_is_not_ready(fake, store):
    fake.leader = ""
    with pytest.raises(StoreError, match="no cluster leader"):
        await store.ping()


async def test_unreadable_stored_data_is_a_store_error(fake, store):
    fake.table.set("jobforge/jobs/job-1", b"{not a record", 0, 1)
    fake.table.set("jobforge/logs/job-1/build/000000000000", b"[{\"ts\": 1}]", 0, 2)
    with pytest.raises(StoreError, match="unexpected data"):
        await store.get("job-1")
    with pytest.raises(StoreError, match="unexpected data"):
        await store.list(10, 0)
    with pytest.raises(StoreError, match="unexpected data"):
        await store.get_logs("job-1")
    with pytest.raises(NotFound):
        await store.get("job-2")


@pytest.mark.parametrize("prefix", ["jobforge", "/jobforge/", "../x/", "a b/", "ünï/"])
def test_a_bad_prefix_is_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        ConsulStore(prefix=prefix)


async def test_prefixes_keep_deployments_apart(fake):
    blue, green = ConsulStore(fake.addr, prefix="blue/"), ConsulStore(fake.addr, prefix="")
    try:
        await blue.put(job("job-1"), 0)
        await green.put(job("job-2"), 0)
        assert [r.job_id for r in (await blue.list(10, 0))[0]] == ["job-1"]
        assert [r.job_id for r in (await green.list(10, 0))[0]] == ["job-2"]
        assert sorted(k for k in fake.table.entries if "/jobs/" in f"/{k}") == ["blue/jobs/job-1", "jobs/job-2"]
    finally:
        await blue.aclose()
        await green.aclose()


async def test_folder_keys_made_in_the_consul_ui_are_ignored(fake, store):
    await store.put(job(), 0)
    await store.append_logs("job-1", "build", [line("a")])
    fake.table.set("jobforge/jobs/", b"", 0, 90)  # what "create folder" in the UI stores
    fake.table.set("jobforge/logs/job-1/", b"", 0, 91)
    assert [r.job_id for r in (await store.list(10, 0))[0]] == ["job-1"]
    assert await store.get_logs("job-1") == {"build": [line("a")]}


# ---------------------------------------------------------------- the history index

async def _seed(store, count: int, owners=("ann", "bob")) -> None:
    for i in range(count):
        record = new_job(f"job-{i:03d}", JobConfig.model_validate({**CONFIG, "owner": owners[i % len(owners)]}),
                         T0 + timedelta(seconds=i))
        status = JobStatus.SUCCEEDED if i % 10 else JobStatus.BUILDING
        await store.put(record.model_copy(update={"status": status}), 0)


async def test_a_history_page_reads_only_its_own_records(fake, store):
    await _seed(store, 200)
    await store.list(1, 0)  # the one-time index check
    fake.seen.clear()
    records, total = await store.list(5, 10, owners={"bob"})
    assert ([r.job_id for r in records], total) == (["job-179", "job-177", "job-175", "job-173", "job-171"], 100)
    # one listing of bob's index entries, one txn of 5 `get`s: no other record is read or parsed
    assert [(s.method, s.path, s.query) for s in fake.seen] == [
        ("GET", "/v1/kv/jobforge/history/bob/", "recurse"), ("PUT", "/v1/txn", "")]


async def test_a_page_larger_than_a_txn_is_read_in_several(fake, store):
    await _seed(store, 150)
    await store.list(1, 0)
    fake.seen.clear()
    records, total = await store.list(150, 0)
    assert total == 150 and [r.job_id for r in records] == [f"job-{i:03d}" for i in reversed(range(150))]
    assert [s.path for s in fake.seen].count("/v1/txn") == 3  # 64 + 64 + 22 ops: Consul's limit per txn


async def test_unfinished_reads_only_the_outstanding_records(fake, store):
    await _seed(store, 100)
    done, version = await store.get("job-001")
    await store.put(done.model_copy(update={"cleanup_retry": True}), version)  # finished, still owes a cleanup
    await store.list(1, 0)
    fake.seen.clear()
    assert [r.job_id for r in await store.unfinished()] == [
        "job-000", "job-001", "job-010", "job-020", "job-030", "job-040", "job-050", "job-060", "job-070",
        "job-080", "job-090"]
    assert [(s.method, s.path) for s in fake.seen] == [("GET", "/v1/kv/jobforge/history/"), ("PUT", "/v1/txn")]
    fake.seen.clear()
    assert [job_id for job_id, _ in await store.open_jobs()] == [f"job-{i:03d}" for i in range(0, 100, 10)]
    assert [(s.method, s.path) for s in fake.seen] == [("GET", "/v1/kv/jobforge/history/")]  # no record read


async def test_records_written_before_the_index_get_their_entries_once(fake, store):
    """Records of an older version (no index entry) are indexed by the first history read; an entry a newer
    write made meanwhile is kept, not overwritten by the older record's status."""
    old = job("old-1").model_copy(update={"status": JobStatus.FAILED})
    fake.table.set("jobforge/jobs/old-1", old.model_dump_json().encode(), 0, 1)
    fake.table.set("jobforge/history/team/20260101000000000000_old-1", b"SUCCEEDED", 0, 2)  # a newer put's
    older = new_job("old-2", JobConfig.model_validate(CONFIG), T0 - timedelta(days=1))
    fake.table.set("jobforge/jobs/old-2", older.model_dump_json().encode(), 0, 3)
    records, total = await store.list(10, 0)
    assert ([r.job_id for r in records], total) == (["old-1", "old-2"], 2)
    assert fake.table.entries["jobforge/history/team/20260101000000000000_old-1"].value == b"SUCCEEDED"
    assert fake.table.entries["jobforge/history/team/20251231000000000000_old-2"].value == b"PENDING outstanding"
    assert "jobforge/meta/history-index" in fake.table.entries
    again = ConsulStore(fake.addr)  # another replica: sees the marker, indexes nothing
    try:
        fake.seen.clear()
        assert (await again.list(10, 0))[1] == 2
        assert not [s for s in fake.seen if s.path.startswith("/v1/kv/") and s.method == "PUT"]
    finally:
        await again.aclose()


async def test_a_malformed_history_entry_is_a_store_error(fake, store):
    await store.put(job(), 0)
    fake.table.set("jobforge/history/team/not-a-time", b"PENDING", 0, 99)
    with pytest.raises(StoreError, match="unexpected data"):
        await store.list(10, 0)


async def test_many_older_records_are_indexed_64_to_a_txn(fake, store):
    for i in range(150):
        record = new_job(f"old-{i:03d}", JobConfig.model_validate(CONFIG), T0 + timedelta(seconds=i))
        fake.table.set(f"jobforge/jobs/old-{i:03d}", record.model_dump_json().encode(), 0, i + 1)
    records, total = await store.list(2, 0)
    assert ([r.job_id for r in records], total) == (["old-149", "old-148"], 150)
    writes = [s for s in fake.seen if s.method == "PUT"]
    assert [s.path for s in writes] == ["/v1/txn"] * 3 + ["/v1/kv/jobforge/meta/history-index", "/v1/txn"]
