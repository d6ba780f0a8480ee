"""The fake Vault against the reference (shared/reference/vault-kv2.md, vault-samples/) and hvac. The templates our
Nomad jobs render from it are tested in test_consul_template.py.

Expected values are the samples, or literals from the reference or the upstream sources the double cites; never
computed by the fake.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import hvac
import pytest
from hvac import exceptions as hvac_errors

from tests.doubles.vault import FakeVault

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "reference" / "vault-samples"
POLICY_DENIED = ["1 error occurred:\n\t* permission denied\n\n"]
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z$")


def sample(name: str):
    path = SAMPLES / name
    assert path.is_file(), f"reference sample missing: {path} (tests/reference holds copies of shared/reference)"
    return json.loads(path.read_text())


def types(obj: dict) -> dict:
    return {k: type(v) for k, v in obj.items()}


@pytest.fixture
async def fake():
    vault = FakeVault()
    await vault.start()
    yield vault
    await vault.stop()


@pytest.fixture
async def http(fake):
    async with aiohttp.ClientSession(fake.url, headers={"X-Vault-Token": "root"}) as session:
        yield session


async def call(http, method: str, url: str, body=None, **kw):
    data = json.dumps(body) if isinstance(body, dict) else body
    async with http.request(method, url, data=data, **kw) as resp:
        raw = await resp.read()
        return resp.status, resp.headers, raw


async def jcall(http, method: str, url: str, body=None, **kw):
    status, _, raw = await call(http, method, url, body, **kw)
    return status, json.loads(raw) if raw else None


@pytest.fixture
def served():
    """A fake served from a thread, for hvac (a blocking client)."""
    vault = FakeVault()
    with vault.in_thread() as url:
        yield vault, url


def client(url: str, token: str = "root") -> hvac.Client:
    return hvac.Client(url=url, token=token)


# ---------------------------------------------------------------- response shapes (reference samples)

async def test_write_and_read_have_the_sample_keys_and_types(http):
    envelope = sample("kv2-read-response-envelope.json")
    status, headers, raw = await call(http, "POST", "/v1/secret/data/app/config", sample("kv2-write-request.json"))
    written = json.loads(raw)
    assert status == 200 and set(written) == set(envelope) and types(written) == types(envelope)
    assert types(written["data"]) == types(sample("kv2-write-response.json")["data"]) | {"custom_metadata": type(None)}
    assert written["data"]["version"] == 1 and written["mount_type"] == "kv"
    assert headers["Content-Type"] == "application/json" and raw.endswith(b"}\n")  # exactly: hvac relies on it

    status, headers, raw = await call(http, "GET", "/v1/secret/data/app/config")
    read = json.loads(raw)
    assert status == 200 and set(read) == set(envelope) and types(read) == types(envelope)
    assert set(read["data"]) == set(envelope["data"])
    assert types(read["data"]["metadata"]) == types(envelope["data"]["metadata"])
    assert read["data"]["data"] == sample("kv2-write-request.json")["data"]
    assert read["data"]["metadata"]["version"] == 1 and read["data"]["metadata"]["deletion_time"] == ""
    assert RFC3339_NANO.match(read["data"]["metadata"]["created_time"])
    assert set(sample("kv2-read-response.json")["data"]["metadata"]) == set(read["data"]["metadata"])


async def test_missing_paths_and_versions_are_404_with_empty_errors(http):
    assert await jcall(http, "GET", "/v1/secret/data/nope") == (404, {"errors": []})
    await call(http, "POST", "/v1/secret/data/app", {"data": {"v": "1"}})
    await call(http, "POST", "/v1/secret/data/app", {"data": {"v": "2"}})
    assert await jcall(http, "GET", "/v1/secret/data/app?version=3") == (404, {"errors": []})
    assert (await jcall(http, "GET", "/v1/secret/data/app?version=1"))[1]["data"]["data"] == {"v": "1"}
    assert (await jcall(http, "GET", "/v1/secret/data/app?version=0"))[1]["data"]["data"] == {"v": "2"}  # 0 = latest
    status, body = await jcall(http, "GET", "/v1/secret/metadata/nope")
    assert (status, body) == (404, {"errors": []})
    assert set(body) == set(sample("error-response.json"))


async def test_soft_delete_answers_404_with_the_deleted_sample_envelope(http):
    await call(http, "POST", "/v1/secret/data/app", {"data": {"v": "1"}})
    await call(http, "POST", "/v1/secret/data/app", {"data": {"v": "2"}})
    status, _, raw = await call(http, "DELETE", "/v1/secret/data/app")
    assert (status, raw) == (204, b"")
    status, body = await jcall(http, "GET", "/v1/secret/data/app")
    deleted = sample("kv2-read-deleted-404.json")
    assert status == 404 and set(body) == set(deleted) and types(body) == types(deleted)
    assert body["data"]["data"] is None and set(body["data"]["metadata"]) == set(deleted["data"]["metadata"])
    assert body["data"]["metadata"]["version"] == 2 and RFC3339_NANO.match(body["data"]["metadata"]["deletion_time"])
    assert "errors" not in body
    assert (await jcall(http, "GET", "/v1/secret/data/app?version=1"))[1]["data"]["data"] == {"v": "1"}
    assert (await call(http, "DELETE", "/v1/secret/data/app"))[0] == 204  # already deleted: still 204
    assert (await call(http, "DELETE", "/v1/secret/data/never-written"))[0] == 204
    # a write after a soft delete is a new version; the deleted one stays deleted
    status, body = await jcall(http, "POST", "/v1/secret/data/app", {"data": {"v": "3"}, "options": {"cas": 2}})
    assert (status, body["data"]["version"]) == (200, 3)
    assert (await jcall(http, "GET", "/v1/secret/data/app?version=2"))[0] == 404


async def test_undelete_and_destroy(http):
    await call(http, "POST", "/v1/secret/data/app", {"data": {"v": "1"}})
    await call(http, "POST", "/v1/secret/delete/app", {"versions": [1]})
    assert (await jcall(http, "GET", "/v1/secret/data/app"))[0] == 404
    assert (await call(http, "POST", "/v1/secret/undelete/app", {"versions": [1]}))[0] == 204
    assert (await jcall(http, "GET", "/v1/secret/data/app"))[1]["data"]["data"] == {"v": "1"}
    assert (await call(http, "PUT", "/v1/secret/destroy/app", {"versions": [1]}))[0] == 204
    status, body = await jcall(http, "GET", "/v1/secret/data/app")
    assert status == 404 and body["data"]["data"] is None
    assert (body["data"]["metadata"]["destroyed"], body["data"]["metadata"]["deletion_time"]) == (True, "")
    await call(http, "POST", "/v1/secret/undelete/app", {"versions": [1]})
    assert (await jcall(http, "GET", "/v1/secret/data/app"))[0] == 404  # destroyed is final
    assert await jcall(http, "POST", "/v1/secret/delete/app", {}) == (400, {"errors": ["No version number provided"]})
    assert await jcall(http, "PUT", "/v1/secret/destroy/app", {}) == (400, {"errors": ["no version number provided"]})


async def test_list_with_the_verb_or_the_query_flag(http):
    for path in ("foo", "foo/bar", "foo/baz/qux"):
        await call(http, "POST", f"/v1/secret/data/{path}", {"data": {"x": "y"}})
    await call(http, "DELETE", "/v1/secret/data/foo")  # soft-deleted keys are still listed
    status, body = await jcall(http, "LIST", "/v1/secret/metadata/")
    assert status == 200 and body["data"] == sample("kv2-list-response.json")["data"]
    assert set(body) == set(sample("kv2-read-response-envelope.json"))
    assert (await jcall(http, "GET", "/v1/secret/metadata?list=true"))[1]["data"] == {"keys": ["foo", "foo/"]}
    assert (await jcall(http, "LIST", "/v1/secret/metadata/foo"))[1]["data"] == {"keys": ["bar", "baz/"]}
    assert await jcall(http, "LIST", "/v1/secret/metadata/nothing/") == (404, {"errors": []})
    assert (await call(http, "GET", "/v1/secret/metadata?list=maybe"))[0] == 400


async def test_metadata_has_the_sample_keys_and_tracks_versions(http):
    expected = sample("kv2-metadata-response.json")["data"]
    for n in range(3):
        await call(http, "POST", "/v1/secret/data/app", {"data": {"n": str(n)}})
    status, body = await jcall(http, "GET", "/v1/secret/metadata/app")
    meta = body["data"]
    assert status == 200 and set(meta) == set(expected) and types(meta) == types(expected) | {
        "custom_metadata": type(None)}  # null until custom_metadata is set
    assert (meta["current_version"], meta["oldest_version"], sorted(meta["versions"])) == (3, 0, ["1", "2", "3"])
    assert set(meta["versions"]["1"]) == set(expected["versions"]["1"])
    assert meta["updated_time"] == meta["versions"]["3"]["created_time"]
    assert meta["created_time"] == meta["versions"]["1"]["created_time"]
    custom = {"owner": "jdoe", "mission_critical": "false"}
    assert (await call(http, "POST", "/v1/secret/metadata/app", {"custom_metadata": custom}))[0] == 204
    assert (await jcall(http, "GET", "/v1/secret/data/app"))[1]["data"]["metadata"]["custom_metadata"] == custom
    assert (await call(http, "DELETE", "/v1/secret/metadata/app"))[0] == 204  # all versions and metadata
    assert await jcall(http, "GET", "/v1/secret/data/app") == (404, {"errors": []})


async def test_max_versions_prunes_the_oldest(http):
    await call(http, "POST", "/v1/secret/metadata/small", {"max_versions": 2})
    for n in range(3):
        await call(http, "POST", "/v1/secret/data/small", {"data": {"n": str(n)}})
    meta = (await jcall(http, "GET", "/v1/secret/metadata/small"))[1]["data"]
    assert (sorted(meta["versions"]), meta["oldest_version"], meta["current_version"]) == (["2", "3"], 2, 3)
    assert await jcall(http, "GET", "/v1/secret/data/small?version=1") == (404, {"errors": []})
    for n in range(11):  # the default is 10
        await call(http, "POST", "/v1/secret/data/big", {"data": {"n": str(n)}})
    meta = (await jcall(http, "GET", "/v1/secret/metadata/big"))[1]["data"]
    assert (sorted(map(int, meta["versions"])), meta["oldest_version"]) == (list(range(2, 12)), 2)


async def test_check_and_set(http):
    url = "/v1/secret/data/cas"
    assert (await jcall(http, "POST", url, {"data": {"a": "1"}, "options": {"cas": 0}}))[0] == 200
    mismatch = (400, {"errors": ["check-and-set parameter did not match the current version"]})
    assert await jcall(http, "POST", url, {"data": {"a": "2"}, "options": {"cas": 0}}) == mismatch
    assert await jcall(http, "POST", url, {"data": {"a": "2"}, "options": {"cas": 5}}) == mismatch
    assert (await jcall(http, "POST", url, {"data": {"a": "2"}, "options": {"cas": 1}}))[1]["data"]["version"] == 2
    assert await jcall(http, "POST", url, {"options": {"cas": 2}}) == (400, {"errors": ["no data provided"]})
    assert await jcall(http, "POST", url, {"data": {"a": "3"}, "options": {"cas": "x"}}) == (
        400, {"errors": ["error parsing check-and-set parameter"]})
    required = (400, {"errors": ["check-and-set parameter required for this call"]})
    await call(http, "POST", "/v1/secret/metadata/cas", {"cas_required": True})
    assert await jcall(http, "POST", url, {"data": {"a": "3"}}) == required
    assert (await jcall(http, "POST", url, {"data": {"a": "3"}, "options": {"cas": 2}}))[0] == 200
    assert (await call(http, "POST", "/v1/secret/config", {"cas_required": True}))[0] == 204
    assert await jcall(http, "POST", "/v1/secret/data/other", {"data": {"a": "1"}}) == required
    assert (await jcall(http, "GET", "/v1/secret/config"))[1]["data"] == {
        "cas_required": True, "delete_version_after": "0s", "max_versions": 0}
    assert (await call(http, "POST", url, b"{not json"))[0] == 400


async def test_tokens_and_the_permission_denied_bodies(fake, http):
    denied = (403, {"errors": ["permission denied"]})
    assert await jcall(http, "GET", "/v1/secret/data/x", headers={"X-Vault-Token": ""}) == denied
    assert await jcall(http, "GET", "/v1/secret/data/x", headers={"X-Vault-Token": "who"}) == denied
    _, body = await jcall(http, "GET", "/v1/secret/data/x", headers={"X-Vault-Token": "who"})
    assert set(body) == set(sample("error-response.json"))
    fake.add_token("reader", {"secret/data/x": ["read"]})
    bearer = {"X-Vault-Token": "", "Authorization": "Bearer reader"}
    assert await jcall(http, "GET", "/v1/secret/data/x", headers=bearer) == (404, {"errors": []})  # allowed
    assert await jcall(http, "GET", "/v1/secret/data/y", headers=bearer) == (403, {"errors": POLICY_DENIED})


async def test_a_policy_lets_a_job_read_x_but_not_y(fake, http):
    fake.put("team/app", {"password": "p"})
    fake.put("team/private", {"password": "q"})
    fake.put("other/app", {"password": "r"})
    fake.add_token("job", {"secret/data/team/*": ["read"], "secret/metadata/team/*": ["list"],
                           "secret/data/team/private": ["deny"]})
    job = {"X-Vault-Token": "job"}
    assert (await jcall(http, "GET", "/v1/secret/data/team/app", headers=job))[1]["data"]["data"] == {"password": "p"}
    for path in ("/v1/secret/data/other/app", "/v1/secret/data/team/private", "/v1/secret/metadata/team/app"):
        assert await jcall(http, "GET", path, headers=job) == (403, {"errors": POLICY_DENIED}), path
    assert (await jcall(http, "LIST", "/v1/secret/metadata/team", headers=job))[1]["data"]["keys"] == [
        "app", "private"]
    assert (await jcall(http, "LIST", "/v1/secret/metadata/", headers=job))[0] == 403
    assert (await jcall(http, "POST", "/v1/secret/data/team/app", {"data": {}}, headers=job))[0] == 403
    # policies merge per path, `deny` wins, and the longest glob decides
    fake.add_token("merged", {"secret/data/*": ["read"]}, {"secret/data/team/*": ["read"]},
                   {"secret/data/team/*": ["deny"]})
    merged = {"X-Vault-Token": "merged"}
    assert (await jcall(http, "GET", "/v1/secret/data/other/app", headers=merged))[0] == 200
    assert await jcall(http, "GET", "/v1/secret/data/team/app", headers=merged) == (403, {"errors": POLICY_DENIED})
    # POST needs `create` for a new key and `update` for an existing one
    fake.add_token("updater", {"secret/data/upd/*": ["update"]})
    upd = {"X-Vault-Token": "updater"}
    assert (await jcall(http, "POST", "/v1/secret/data/upd/k", {"data": {"a": "1"}}, headers=upd))[0] == 403
    fake.put("upd/k", {"a": "0"})
    assert (await jcall(http, "POST", "/v1/secret/data/upd/k", {"data": {"a": "1"}}, headers=upd))[0] == 200


async def test_v1_style_paths_and_unsupported_operations(http):
    await call(http, "POST", "/v1/secret/data/app", {"data": {"a": "1"}})
    status, body = await jcall(http, "GET", "/v1/secret/app")
    warning = ("Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints "
               "to use. If using the Vault CLI, use 'vault kv get' for this operation.")
    assert (status, body["data"], body["warnings"]) == (404, None, [warning])
    assert "vault kv list" in (await jcall(http, "LIST", "/v1/secret/data/app"))[1]["warnings"][0]
    assert (await call(http, "PATCH", "/v1/secret/data/app", b"{}"))[0] == 405
    assert (await jcall(http, "GET", "/v1/secret/delete/app")) == (
        405, {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]})
    assert (await jcall(http, "GET", "/v1/nomount/x"))[1] == {
        "errors": ['no handler for route "nomount/x". route entry not found.']}


async def test_bodies_are_written_like_go(http):
    """Stored numbers come back as float64 (the plugin unmarshals into interface{}); <, >, & are escaped."""
    body = b'{"data": {"i": 12345678901234567890, "f": 1.50, "e": 1e21, "s": 1e-7, "z": 0, "h": "<a&b>"}}'
    await call(http, "POST", "/v1/secret/data/n", body)
    _, _, raw = await call(http, "GET", "/v1/secret/data/n")
    assert (b'"data":{"e":1e+21,"f":1.5,"h":"\\u003ca\\u0026b\\u003e","i":12345678901234567000,"s":1e-7,"z":0}'
            in raw)
    assert raw.startswith(b'{"request_id":"') and b'"mount_type":"kv"}\n' in raw  # the envelope in struct order


async def test_health_and_seal(fake, http):
    status, body = await jcall(http, "GET", "/v1/sys/health", headers={"X-Vault-Token": ""})
    assert status == 200 and set(body) == {  # the /sys/health API docs' sample response
        "initialized", "sealed", "standby", "performance_standby", "replication_performance_mode",
        "replication_dr_mode", "server_time_utc", "version", "cluster_name", "cluster_id"}
    assert (body["initialized"], body["sealed"], body["standby"]) == (True, False, False)
    assert (await call(http, "HEAD", "/v1/sys/health"))[::2] == (200, b"")
    fake.sealed = True
    assert (await jcall(http, "GET", "/v1/sys/health"))[0] == 503
    assert (await jcall(http, "GET", "/v1/sys/health?sealedcode=200"))[0] == 200
    assert await jcall(http, "GET", "/v1/secret/data/x") == (503, {"errors": ["Vault is sealed"]})


async def test_the_kv2_preflight_consul_template_reads(fake, http):
    status, body = await jcall(http, "GET", "/v1/sys/internal/ui/mounts/secret/app/config")
    assert status == 200
    assert (body["data"]["type"], body["data"]["options"], body["data"]["path"]) == ("kv", {"version": "2"}, "secret/")
    fake.add_token("elsewhere", {"other/*": ["read"]})
    status, body = await jcall(http, "GET", "/v1/sys/internal/ui/mounts/secret/app",
                               headers={"X-Vault-Token": "elsewhere"})
    assert status == 403 and "preflight capability check returned 403" in body["errors"][0]


# ---------------------------------------------------------------- hvac

def test_hvac_reads_writes_lists_and_deletes(served):
    _, url = served
    kv = client(url).secrets.kv.v2
    envelope = sample("kv2-read-response-envelope.json")
    written = kv.create_or_update_secret("app/config", {"db_password": "s3cr3t", "api_key": "abc123"})
    assert set(written) == set(envelope) and written["data"]["version"] == 1
    assert set(written["data"]) == set(sample("kv2-write-response.json")["data"])
    kv.create_or_update_secret("app/config", {"db_password": "n3w"}, cas=1)
    read = kv.read_secret_version("app/config", raise_on_deleted_version=True)
    assert set(read) == set(envelope) and read["data"]["data"] == {"db_password": "n3w"}
    first = kv.read_secret_version("app/config", version=1, raise_on_deleted_version=True)
    assert first["data"]["data"] == envelope["data"]["data"]
    kv.create_or_update_secret("app/db/primary", {"x": "y"})
    assert kv.list_secrets("app")["data"] == {"keys": ["config", "db/"]}
    with pytest.raises(hvac_errors.InvalidPath):
        kv.list_secrets("nothing")
    meta = kv.read_secret_metadata("app/config")["data"]
    assert set(meta) == set(sample("kv2-metadata-response.json")["data"]) and meta["current_version"] == 2

    assert kv.delete_latest_version_of_secret("app/config").status_code == 204
    with pytest.raises(hvac_errors.InvalidPath):
        kv.read_secret_version("app/config", raise_on_deleted_version=True)
    deleted = kv.read_secret_version("app/config", raise_on_deleted_version=False)  # hvac returns the 404 body
    assert set(deleted) == set(sample("kv2-read-deleted-404.json")) and deleted["data"]["data"] is None
    kv.undelete_secret_versions("app/config", versions=[2])
    assert kv.read_secret_version("app/config", raise_on_deleted_version=True)["data"]["data"] == {"db_password": "n3w"}
    kv.destroy_secret_versions("app/config", versions=[2])
    assert kv.read_secret_metadata("app/config")["data"]["versions"]["2"]["destroyed"] is True
    kv.delete_metadata_and_all_versions("app/config")
    assert kv.list_secrets("app")["data"] == {"keys": ["db/"]}


def test_hvac_sees_vault_errors(served):
    fake, url = served
    kv = client(url).secrets.kv.v2
    kv.create_or_update_secret("c", {"a": "1"}, cas=0)
    with pytest.raises(hvac_errors.InvalidRequest) as caught:
        kv.create_or_update_secret("c", {"a": "2"}, cas=0)
    assert caught.value.errors == ["check-and-set parameter did not match the current version"]
    kv.update_metadata("c", cas_required=True)  # hvac also sends delete_version_after="0s"
    with pytest.raises(hvac_errors.InvalidRequest) as caught:
        kv.create_or_update_secret("c", {"a": "2"})
    assert caught.value.errors == ["check-and-set parameter required for this call"]
    kv.configure(max_versions=3, cas_required=False)
    assert kv.read_configuration()["data"] == {"cas_required": False, "delete_version_after": "0s", "max_versions": 3}
    with pytest.raises(hvac_errors.Forbidden) as caught:
        client(url, token="unknown").secrets.kv.v2.read_secret_version("c", raise_on_deleted_version=True)
    assert caught.value.errors == ["permission denied"]
    fake.add_token("narrow", {"secret/data/other": ["read"]})
    with pytest.raises(hvac_errors.Forbidden) as caught:
        client(url, token="narrow").secrets.kv.v2.read_secret_version("c", raise_on_deleted_version=True)
    assert caught.value.errors == POLICY_DENIED
    health = client(url, token="").sys.read_health_status(method="GET")
    assert (health["initialized"], health["sealed"]) == (True, False)
