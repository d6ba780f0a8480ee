"""The fake Consul against the reference: shared/reference/consul-kv.md and the samples in consul-samples/.

Expected values are the samples themselves or literals read from the reference, never computed by the fake.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.doubles.consul import FakeConsul

SAMPLES = Path(__file__).resolve().parents[1] / "reference" / "consul-samples"


def sample(name: str):
    path = SAMPLES / name
    assert path.is_file(), f"reference sample missing: {path} (tests/reference holds copies of shared/reference)"
    return json.loads(path.read_text())


@pytest.fixture
def fake(fake_consul_agent):
    return fake_consul_agent


@pytest.fixture
async def http(fake):
    async with aiohttp.ClientSession(f"http://{fake.addr}") as session:
        yield session


async def call(http, method: str, url: str, data: bytes | str | None = None, **kw):
    async with http.request(method, url, data=data, **kw) as resp:
        body = await resp.read()
        return resp.status, resp.headers, body


async def put(http, key: str, value: bytes | str = b"", query: str = ""):
    status, _, body = await call(http, "PUT", f"/v1/kv/{key}{query}", value)
    assert status == 200, body
    return json.loads(body)


async def get_entry(http, key: str) -> dict:
    status, _, body = await call(http, "GET", f"/v1/kv/{key}")
    assert status == 200, body
    return json.loads(body)[0]


# ---------------------------------------------------------------- response shapes (reference samples)

async def test_get_response_has_the_sample_fields_and_types(fake, http):
    expected = sample("kv-get-response.json")[0]
    assert await put(http, "zip", "test") is sample("kv-put-response.json") is True
    entry = await get_entry(http, "zip")
    assert set(entry) == set(expected) - {"Session"}  # Session appears only while a lock is held (§1)
    fake.hold_lock("zip", expected["Session"])
    status, headers, body = await call(http, "GET", "/v1/kv/zip")
    locked = json.loads(body)
    assert status == 200 and isinstance(locked, list) and len(locked) == 1
    assert set(locked[0]) == set(expected)
    assert {k: type(v) for k, v in locked[0].items()} == {k: type(v) for k, v in expected.items()}
    assert (locked[0]["Key"], locked[0]["Value"], locked[0]["Session"]) == ("zip", "dGVzdA==", expected["Session"])
    assert headers["Content-Type"].startswith("application/json")
    assert {"X-Consul-Index", "X-Consul-KnownLeader", "X-Consul-LastContact",
            "X-Consul-Default-ACL-Policy"} <= set(headers)


async def test_keys_listing_reproduces_the_sample():
    fake = FakeConsul(strict_keys=False)  # the docs' sample keys start with "/", which newer agents refuse
    await fake.start()
    try:
        async with aiohttp.ClientSession(f"http://{fake.addr}") as http:
            for key in ("/web/bar", "/web/foo", "/web/subdir/x", "/web/subdir/y", "/other"):
                await put(http, key, "v")
            status, _, body = await call(http, "GET", "/v1/kv//web/?keys&separator=/")
            assert (status, json.loads(body)) == (200, sample("kv-keys-response.json"))
            status, _, body = await call(http, "GET", "/v1/kv//web/?keys")
            assert json.loads(body) == ["/web/bar", "/web/foo", "/web/subdir/x", "/web/subdir/y"]
            status, _, body = await call(http, "GET", "/v1/kv//web/?keys&seperator=/")  # the old misspelling
            assert json.loads(body) == sample("kv-keys-response.json")
    finally:
        await fake.stop()


async def test_catalog_entries_have_the_sample_fields(fake, http):
    expected = sample("catalog-service-response.json")[0]
    fake.register_service("web", 5000, address="172.17.0.3", tags=["prod"])
    fake.register_service("bare", 8080)  # no service address: clients fall back to the node Address
    status, _, body = await call(http, "GET", "/v1/catalog/service/web")
    entries = json.loads(body)
    assert status == 200 and len(entries) == 1
    assert set(entries[0]) == set(expected)
    assert {k: type(v) for k, v in entries[0].items()} == {k: type(v) for k, v in expected.items()}
    assert set(entries[0]["ServiceTaggedAddresses"]["lan"]) == set(expected["ServiceTaggedAddresses"]["lan"])
    assert (entries[0]["ServiceAddress"], entries[0]["ServicePort"], entries[0]["ServiceTags"]) == (
        "172.17.0.3", 5000, ["prod"])
    _, _, body = await call(http, "GET", "/v1/catalog/service/bare")
    assert json.loads(body)[0]["ServiceAddress"] == "" and json.loads(body)[0]["Address"]
    status, _, body = await call(http, "GET", "/v1/catalog/service/nope")
    assert (status, json.loads(body)) == (200, [])  # unknown service: 200 [] (§6)
    status, _, body = await call(http, "GET", "/v1/catalog/service/")
    assert (status, body) == (400, b"Missing service name")


async def test_txn_sample_commits_then_rolls_back_as_a_whole(fake, http):
    fake.index = 199  # so the next write gets the sample's Index 200
    await put(http, "app/config", '{"mode":"lite"}')
    assert (await get_entry(http, "app/config"))["ModifyIndex"] == 200
    await put(http, "app/feature", "on")
    status, _, body = await call(http, "PUT", "/v1/txn", json.dumps(sample("txn-request.json")))
    answer = json.loads(body)
    assert status == 200 and answer["Errors"] is None
    cas, got = (r["KV"] for r in answer["Results"])
    assert (cas["Key"], cas["Value"], cas["ModifyIndex"]) == ("app/config", None, 202)  # Value null but for get
    assert (got["Key"], got["Value"]) == ("app/feature", "b24=")
    assert (await get_entry(http, "app/config"))["Value"] == "eyJtb2RlIjoiZnVsbCJ9"

    again = [{"KV": {"Verb": "set", "Key": "app/other", "Value": "eA=="}}, *sample("txn-request.json")]
    status, _, body = await call(http, "PUT", "/v1/txn", json.dumps(again))
    assert status == 409
    assert json.loads(body) == {"Results": None,
                                "Errors": [{"OpIndex": 1, "What": 'failed to set key "app/config", index is stale'}]}
    assert (await call(http, "GET", "/v1/kv/app/other"))[0] == 404  # all-or-nothing


async def test_txn_cas_index_zero_creates_only_if_absent(http):
    op = [{"KV": {"Verb": "cas", "Key": "jobs/a", "Value": "MQ==", "Flags": 0, "Index": 0}}]
    status, _, body = await call(http, "PUT", "/v1/txn", json.dumps(op))
    created = json.loads(body)["Results"][0]["KV"]
    assert status == 200 and created["CreateIndex"] == created["ModifyIndex"] > 0
    assert (await get_entry(http, "jobs/a"))["ModifyIndex"] == created["ModifyIndex"]
    status, _, body = await call(http, "PUT", "/v1/txn", json.dumps(op))
    assert status == 409 and json.loads(body)["Errors"][0]["What"] == 'failed to set key "jobs/a", index is stale'
    missing = [{"KV": {"Verb": "cas", "Key": "jobs/b", "Value": "MQ==", "Index": 7}}]
    assert (await call(http, "PUT", "/v1/txn", json.dumps(missing)))[0] == 409


async def test_status_leader_is_a_json_string(fake, http):
    status, _, body = await call(http, "GET", "/v1/status/leader")
    assert (status, json.loads(body)) == (200, "127.0.0.1:8300")
    fake.leader = ""
    assert json.loads((await call(http, "GET", "/v1/status/leader"))[2]) == ""


# ---------------------------------------------------------------- KV semantics (§1–§3)

async def test_cas_semantics(http):
    assert await put(http, "k", "one", "?cas=0") is True
    assert await put(http, "k", "two", "?cas=0") is False  # exists: false, still HTTP 200
    first = await get_entry(http, "k")
    assert await put(http, "k", "two", f"?cas={first['ModifyIndex']}") is True
    second = await get_entry(http, "k")
    assert second["ModifyIndex"] > first["ModifyIndex"] and second["CreateIndex"] == first["CreateIndex"]
    assert await put(http, "k", "three", f"?cas={first['ModifyIndex']}") is False  # stale
    assert await put(http, "k", "two") is True  # plain set: always true, bumps ModifyIndex even for equal bytes
    assert (await get_entry(http, "k"))["ModifyIndex"] > second["ModifyIndex"]
    assert await put(http, "never", "x", "?cas=5") is False


async def test_values_flags_and_raw(http):
    await put(http, "empty", b"")
    assert (await get_entry(http, "empty"))["Value"] is None  # empty body: null, not ""
    await put(http, "flagged", b"\x00\xffbin", "?flags=42")
    entry = await get_entry(http, "flagged")
    assert (entry["Flags"], entry["Value"]) == (42, "AP9iaW4=")
    status, headers, body = await call(http, "GET", "/v1/kv/flagged?raw")
    assert (status, body, headers["Content-Type"]) == (200, b"\x00\xffbin", "text/plain")
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Content-Security-Policy"] == "sandbox"


async def test_not_found_and_empty_listings(http):
    status, headers, body = await call(http, "GET", "/v1/kv/missing")
    assert (status, body) == (404, b"") and int(headers["X-Consul-Index"]) >= 1
    assert (await call(http, "GET", "/v1/kv/nothing/?recurse"))[:3:2] == (404, b"")
    assert (await call(http, "GET", "/v1/kv/nothing/?keys"))[:3:2] == (404, b"")
    status, _, body = await call(http, "GET", "/v1/kv/?keys")
    assert (status, json.loads(body)) == (200, [])  # the root lists as [] (§1)


async def test_flags_are_presence_based_and_listings_sorted(http):
    for key in ("p/b", "p/a", "p/c/d", "q"):
        await put(http, key, key)
    status, _, body = await call(http, "GET", "/v1/kv/p/?recurse=false")  # still recurses (§0)
    assert status == 200 and [e["Key"] for e in json.loads(body)] == ["p/a", "p/b", "p/c/d"]


async def test_index_header_rules(http):
    await put(http, "a/x", "1")
    await put(http, "b/y", "2")
    x, y = await get_entry(http, "a/x"), await get_entry(http, "b/y")
    headers = (await call(http, "GET", "/v1/kv/a/x"))[1]
    assert int(headers["X-Consul-Index"]) == x["ModifyIndex"]  # existing key: its ModifyIndex
    headers = (await call(http, "GET", "/v1/kv/a/?recurse"))[1]
    assert int(headers["X-Consul-Index"]) == x["ModifyIndex"]  # prefix: highest ModifyIndex under it
    headers = (await call(http, "GET", "/v1/kv/a/missing"))[1]
    assert int(headers["X-Consul-Index"]) == y["ModifyIndex"]  # missing key: the table's latest index
    await put(http, "a/z", "3")
    assert (await call(http, "DELETE", "/v1/kv/a/z"))[0] == 200
    headers = (await call(http, "GET", "/v1/kv/a/?recurse"))[1]
    assert int(headers["X-Consul-Index"]) > (await get_entry(http, "a/x"))["ModifyIndex"]  # tombstones count


async def test_blocking_query_wakes_on_a_write_under_the_prefix(http):
    await put(http, "w/a", "1")
    index = int((await call(http, "GET", "/v1/kv/w/?recurse"))[1]["X-Consul-Index"])
    started = time.monotonic()
    waiting = asyncio.create_task(call(http, "GET", f"/v1/kv/w/?recurse&index={index}&wait=30s"))
    await put(http, "w/b", "2")
    status, headers, body = await waiting
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert [e["Key"] for e in json.loads(body)] == ["w/a", "w/b"]
    assert time.monotonic() - started < 30


async def test_blocking_query_wakes_on_a_delete_and_times_out_unchanged(http):
    await put(http, "d/a", "1")
    index = int((await call(http, "GET", "/v1/kv/d/a"))[1]["X-Consul-Index"])
    status, headers, _ = await call(http, "GET", f"/v1/kv/d/a?index={index}&wait=50ms")
    assert status == 200 and int(headers["X-Consul-Index"]) == index  # returned when the wait ran out
    waiting = asyncio.create_task(call(http, "GET", f"/v1/kv/d/?keys&index={index}&wait=30s"))
    assert (await call(http, "DELETE", "/v1/kv/d/a"))[2] == b"true"
    status, headers, _ = await waiting
    assert status == 404 and int(headers["X-Consul-Index"]) > index
    assert (await call(http, "GET", "/v1/kv/d/a?index=x"))[:3:2] == (400, b"Invalid index")
    assert (await call(http, "GET", "/v1/kv/d/a?index=1&wait=soon"))[:3:2] == (400, b"Invalid wait time")


async def test_delete_semantics(http):
    await put(http, "del/a", "1")
    await put(http, "del/b", "2")
    current = (await get_entry(http, "del/a"))["ModifyIndex"]
    assert (await call(http, "DELETE", "/v1/kv/del/a?cas=0"))[2] == b"false"  # cas=0 never deletes
    assert (await call(http, "DELETE", f"/v1/kv/del/a?cas={current + 100}"))[2] == b"false"
    assert (await call(http, "DELETE", f"/v1/kv/del/a?cas={current}"))[2] == b"true"
    assert (await call(http, "DELETE", "/v1/kv/del/a?cas=3"))[2] == b"true"  # missing key: true
    assert (await call(http, "DELETE", "/v1/kv/del/zzz"))[2] == b"true"
    assert (await call(http, "DELETE", "/v1/kv/del/?recurse"))[2] == b"true"
    assert (await call(http, "GET", "/v1/kv/del/b"))[0] == 404


# ---------------------------------------------------------------- errors: plain text, Consul's status codes

async def test_errors_are_plain_text(fake, http):
    cases = [
        ("GET", "/v1/kv/", None, 400, b"Missing key name"),
        ("PUT", "/v1/kv/", b"x", 400, b"Missing key name"),
        ("DELETE", "/v1/kv/", None, 400, b"Missing key name"),
        ("PUT", "/v1/kv/a?cas=0&acquire=s", b"x", 400, b"Conflicting flags: acquire=s&cas=0\n"),
        ("DELETE", "/v1/kv/a?cas=0&recurse", None, 400, b"Conflicting flags: cas=0&recurse=\n"),
        ("PUT", "/v1/kv/big", b"x" * (512 * 1024 + 1), 413, None),
        ("GET", "/v1/kv/a.json", None, 400,
         b"key contains suspicious file extension '.json' that may be cached by proxies"),
        ("GET", "/v1/kv/%2Fa", None, 400, b"key must not begin with a '/'"),
        ("PUT", "/v1/kv/a%25b", b"x", 400,
         b"key contains invalid character '%' at position 1. Only alphanumeric characters and ,-_./ are allowed"),
        ("PUT", "/v1/txn", b"{not json", 400, None),
        ("PUT", "/v1/txn", json.dumps([{"KV": {"Verb": "get", "Key": "k"}}] * 65), 413,
         b"Transaction contains too many operations (65 > 64)"),
        ("GET", "/v1/kv/a?dc=elsewhere", None, 500, b"No path to datacenter"),
    ]
    for method, url, data, status, text in cases:
        got_status, headers, body = await call(http, method, url, data)
        assert got_status == status, (method, url, body)
        assert text is None or body == text, (method, url, body)
        assert not headers.get("Content-Type", "").startswith("application/json"), (method, url)
        assert headers["X-Consul-Default-ACL-Policy"] == "allow"
    status, headers, body = await call(http, "POST", "/v1/kv/a", b"x")
    assert (status, headers["Allow"], body) == (405, "GET,PUT,DELETE", b"method POST not allowed")
    fake.outage = (500, "No cluster leader")
    assert (await call(http, "GET", "/v1/kv/a"))[::2] == (500, b"No cluster leader")
    assert (await call(http, "GET", "/v1/status/leader"))[::2] == (500, b"No cluster leader")


async def test_acl_default_deny():
    fake = FakeConsul(acl_token="s3cr3t")
    await fake.start()
    try:
        async with aiohttp.ClientSession(f"http://{fake.addr}") as http:
            assert (await call(http, "PUT", "/v1/kv/a", b"1", headers={"X-Consul-Token": "s3cr3t"}))[2] == b"true"
            assert (await call(http, "GET", "/v1/kv/a"))[::2] == (403, b"Permission denied")
            assert (await call(http, "GET", "/v1/kv/?recurse"))[0] == 404  # listings are filtered, not refused
            assert (await call(http, "GET", "/v1/kv/a", headers={"X-Consul-Token": "nope"}))[::2] == (
                403, b"ACL not found")
            assert (await call(http, "GET", "/v1/kv/a", headers={"Authorization": "Bearer s3cr3t"}))[0] == 200
            op = json.dumps([{"KV": {"Verb": "cas", "Key": "a", "Value": "Mg==", "Index": 0}}])
            status, _, body = await call(http, "PUT", "/v1/txn", op)
            assert (status, json.loads(body)["Errors"]) == (409, [{"OpIndex": 0, "What": "Permission denied"}])
            assert fake.seen[0].token == "s3cr3t" and fake.seen[1].token is None
    finally:
        await fake.stop()


def test_runs_in_a_thread_for_subprocesses():
    fake = FakeConsul()
    with fake.in_thread() as addr, urllib.request.urlopen(f"http://{addr}/v1/status/leader", timeout=10) as resp:
        assert json.loads(resp.read()) == "127.0.0.1:8300"


# ---------------------------------------------------------------- sessions and locks (agent/session_endpoint.go)

async def create_session(http, body: dict | None = None) -> str:
    status, _, raw = await call(http, "PUT", "/v1/session/create", json.dumps(body) if body is not None else None)
    assert status == 200, raw
    return json.loads(raw)["ID"]


async def test_session_defaults_and_fixups(fake, http):
    plain = await create_session(http)
    status, _, raw = await call(http, "GET", f"/v1/session/info/{plain}")
    (info,) = json.loads(raw)
    assert (info["LockDelay"], info["Behavior"], info["TTL"], info["NodeChecks"]) == (
        15_000_000_000, "release", "", ["serfHealth"])  # the endpoint's defaults
    five = await create_session(http, {"LockDelay": 5, "Checks": [], "TTL": "10s"})  # a small number is seconds
    (info,) = json.loads((await call(http, "GET", f"/v1/session/info/{five}"))[2])
    assert (info["LockDelay"], info["NodeChecks"], info["TTL"]) == (5_000_000_000, [], "10s")
    zero = await create_session(http, {"LockDelay": "0s"})
    (info,) = json.loads((await call(http, "GET", f"/v1/session/info/{zero}"))[2])
    assert info["LockDelay"] == 0
    assert json.loads((await call(http, "GET", "/v1/session/info/nope"))[2]) == []


@pytest.mark.parametrize("body, text", [
    ({"TTL": "5s"}, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"),
    ({"TTL": "25h"}, "Invalid Session TTL '90000000000000', must be between [10s=24h0m0s]"),
    ({"TTL": "soon"}, "Session TTL 'soon' invalid"),
    ({"Behavior": "keep"}, "Invalid Behavior setting 'keep'"),
])
async def test_session_create_refusals(http, body, text):
    status, _, raw = await call(http, "PUT", "/v1/session/create", json.dumps(body))
    assert status == 500 and raw.decode().startswith(text)


async def test_acquire_release_and_lock_index(http):
    one, two = await create_session(http, {"LockDelay": "0s"}), await create_session(http, {"LockDelay": "0s"})
    assert await put(http, "lock", "a", f"?acquire={one}") is True
    assert await put(http, "lock", "b", f"?acquire={two}") is False  # held by another session
    assert await put(http, "lock", "c", f"?acquire={one}") is True  # the holder may update it
    entry = await get_entry(http, "lock")
    assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (one, 1, "Yw==")
    assert await put(http, "lock", "x", f"?release={two}") is False  # only the holder releases
    assert await put(http, "lock", "d", f"?release={one}") is True
    entry = await get_entry(http, "lock")
    assert "Session" not in entry and entry["Value"] == "ZA=="
    assert await put(http, "lock", "e", f"?acquire={two}") is True
    assert (await get_entry(http, "lock"))["LockIndex"] == 2
    status, _, raw = await call(http, "PUT", "/v1/kv/lock?acquire=00000000-0000-0000-0000-000000000000", b"")
    assert status == 500 and raw.decode() == 'invalid session "00000000-0000-0000-0000-000000000000"'
    status, _, raw = await call(http, "PUT", f"/v1/kv/lock?acquire={one}&cas=0", b"")
    assert status == 400 and raw.decode().startswith("Conflicting flags")


async def test_destroy_releases_the_locks_under_the_lock_delay(fake, http):
    slow = await create_session(http, {"LockDelay": "60s"})
    quick = await create_session(http, {"LockDelay": "0s"})
    other = await create_session(http, {"LockDelay": "0s"})
    assert await put(http, "held/slow", "", f"?acquire={slow}") and await put(http, "held/quick", "", f"?acquire={quick}")
    for session in (slow, quick):
        status, _, raw = await call(http, "PUT", f"/v1/session/destroy/{session}")
        assert (status, json.loads(raw)) == (200, True)
    assert "Session" not in await get_entry(http, "held/slow")  # behavior release: the key stays, unlocked
    assert await put(http, "held/slow", "", f"?acquire={other}") is False  # its 60s lock-delay runs
    assert await put(http, "held/quick", "", f"?acquire={other}") is True
    status, _, raw = await call(http, "PUT", f"/v1/session/renew/{quick}")
    assert (status, raw.decode()) == (404, f"Session id '{quick}' not found")
    assert (await call(http, "PUT", "/v1/session/destroy/unknown"))[0] == 200


async def test_delete_behavior_and_ttl_expiry(fake, http):
    session = await create_session(http, {"TTL": "10s", "Behavior": "delete", "LockDelay": "0s"})
    status, _, raw = await call(http, "PUT", f"/v1/session/renew/{session}")
    assert status == 200 and json.loads(raw)[0]["ID"] == session
    assert await put(http, "gone", "v", f"?acquire={session}") is True
    fake.expire_session(session)  # what the TTL timer does 2 x TTL after the last renewal
    assert (await call(http, "GET", "/v1/kv/gone"))[0] == 404  # behavior delete: the key went with it
    assert (await call(http, "PUT", f"/v1/session/renew/{session}"))[0] == 404


async def test_ttl_timer_is_twice_the_ttl(fake, http):
    session = await create_session(http, {"TTL": "10s"})
    timer = fake.sessions[session].timer
    assert timer is not None and 19.0 < timer.when() - asyncio.get_running_loop().time() <= 20.0
