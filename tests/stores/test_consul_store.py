"""What only the Consul store has: its key layout, the HTTP it sends, and failures mapped to `StoreError`.

The shared behaviour is in test_contract.py; here the fake agent is inspected directly.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

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
        "jobforge/jobs/job-1", "jobforge/jobs/v1_2E2",
        "jobforge/logs/job-1/build/000000000000", "jobforge/logs/job-1/build/000000000001",
        "jobforge/logs/job-1/test/000000000000",
    ]
    stored = json.loads(fake.table.entries["jobforge/logs/job-1/build/000000000001"].value)
    assert stored == [{"ts": "2026-01-01T00:00:00+00:00", "stream": "stdout", "line": "b"}]


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
        ("GET", "/v1/kv/jobforge/jobs/", "recurse"),
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
        assert sorted(fake.table.entries) == ["blue/jobs/job-1", "jobs/job-2"]
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
