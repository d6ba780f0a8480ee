"""The fake Nomad against the reference: shared/reference/nomad-api.md and the samples in nomad-samples/.

Expected values are the samples, literals read from the reference, or the repository's own inputs (the
rendered jobs in nomad-jobs/ and the task scripts they embed), never computed by the fake.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.doubles.nomad import FakeNomad, Node, TaskRun, subprocess_runner
from tests.doubles.nomad_shapes import new_id
from tests.doubles.vault import FakeVault

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "reference" / "nomad-samples"
# The phase jobs; the service's own job has its tests in tests/nomad/test_service_job.py.
JOB_FILES = sorted(p for p in (ROOT / "nomad-jobs").glob("*.nomad.hcl") if p.name != "jobforge-service.nomad.hcl")
CHILD_ID = re.compile(r"^(?P<parent>.+)/dispatch-(?:(?P<prefix>.+)-)?(?P<unix>\d{9,})-(?P<hex>[0-9a-f]{8})$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIMEOUT = 10


def sample(name: str):
    path = SAMPLES / name
    assert path.is_file(), f"reference sample missing: {path} (tests/reference holds copies of shared/reference)"
    return json.loads(path.read_text())


def parameterized_job() -> dict:
    """nomad-samples/parameterized-job.json: payload optional, meta_required [run_id], meta_optional [mode]."""
    return sample("parameterized-job.json")["Job"]


@pytest.fixture
async def fake():
    nomad = FakeNomad(event_heartbeat=0.05, log_heartbeat=0.05)
    await nomad.start()
    yield nomad
    await nomad.stop()


@pytest.fixture
async def http(fake):
    async with aiohttp.ClientSession(fake.url) as session:
        yield session


async def call(http, method: str, url: str, body=None, **kw):
    data = json.dumps(body) if body is not None and not isinstance(body, (bytes, str)) else body
    async with http.request(method, url, data=data, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def ok(http, method: str, url: str, body=None, **kw):
    status, headers, raw = await call(http, method, url, body, **kw)
    assert status == 200, raw
    return json.loads(raw), headers


async def register(http, job: dict, **extra) -> dict:
    return (await ok(http, "PUT", "/v1/jobs", {"Job": job, **extra}))[0]


async def dispatch(http, job_id: str, payload: bytes = b"", meta: dict | None = None, query: str = "",
                   **extra) -> dict:
    body = {"Payload": base64.b64encode(payload).decode(), "Meta": meta or {}, **extra}
    return (await ok(http, "POST", f"/v1/job/{job_id}/dispatch{query}", body))[0]


async def dispatched(http, **kw) -> tuple[str, str]:
    """Register the sample parameterized job, dispatch it; (child ID, its one allocation ID)."""
    await register(http, parameterized_job())
    child = (await dispatch(http, "report-runner", b"{}", {"run_id": "42"}, **kw))["DispatchedJobID"]
    allocs, _ = await ok(http, "GET", f"/v1/job/{child}/allocations")
    return child, allocs[0]["ID"]


def frames(body: bytes) -> list[dict]:
    """A framed log body: JSON objects back to back, no separators (reference §10)."""
    text, decoder, pos, out = body.decode(), json.JSONDecoder(), 0, []
    while pos < len(text):
        frame, pos = decoder.raw_decode(text, pos)
        out.append(frame)
    return out


class Events:
    """Reads /v1/event/stream line by line."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def line(self) -> dict:
        raw = await asyncio.wait_for(self.resp.content.readline(), TIMEOUT)
        assert raw.endswith(b"\n"), raw
        return json.loads(raw)

    async def batch(self) -> dict:
        while not (line := await self.line()):
            pass
        return line

    async def until(self, predicate) -> list[dict]:
        seen = []
        while True:
            batch = await self.batch()
            seen.append(batch)
            if any(predicate(e) for e in batch["Events"]):
                return seen


def open_events(http, query: str = ""):
    return http.get(f"/v1/event/stream{query}")


# ---------------------------------------------------------------- register (§1)

async def test_register_response_has_the_sample_keys(http):
    reply, headers = await ok(http, "PUT", "/v1/jobs", sample("register-job-request.json"))
    assert set(reply) == set(sample("register-job-response.json"))
    assert UUID.match(reply["EvalID"])  # a service job gets an evaluation
    assert reply["EvalCreateIndex"] == reply["JobModifyIndex"] == reply["Index"] == int(headers["X-Nomad-Index"])
    again, _ = await ok(http, "PUT", "/v1/jobs", sample("register-job-request.json"))
    assert again["JobModifyIndex"] == reply["JobModifyIndex"]  # same spec: no new version ...
    assert again["EvalID"] not in ("", reply["EvalID"]) and again["EvalCreateIndex"] > reply["Index"]  # ... new eval
    reply, _ = await ok(http, "POST", "/v1/jobs", {"Job": parameterized_job()})  # POST works as well as PUT
    assert (reply["EvalID"], reply["EvalCreateIndex"]) == ("", 0)  # parameterized: no evaluation
    job, _ = await ok(http, "GET", "/v1/job/report-runner")
    assert (job["Status"], job["Version"], job["Type"]) == ("running", 0, "batch")
    assert set(sample("job-read.json")) <= set(job)


async def test_version_bumps_only_on_spec_change(http):
    first = await register(http, parameterized_job())
    again = await register(http, parameterized_job())
    assert again["JobModifyIndex"] == first["JobModifyIndex"] and again["Index"] == 0
    job, _ = await ok(http, "GET", "/v1/job/report-runner")
    assert job["Version"] == 0
    changed = {**parameterized_job(), "Meta": {"mode": "lite"}}
    third = await register(http, changed)
    assert third["JobModifyIndex"] > first["JobModifyIndex"]
    job, _ = await ok(http, "GET", "/v1/job/report-runner")
    assert (job["Version"], job["Meta"], job["JobModifyIndex"]) == (1, {"mode": "lite"}, third["JobModifyIndex"])
    reply, _ = await ok(http, "PUT", "/v1/job/report-runner", {"Job": changed})  # the "update" path form
    assert reply["JobModifyIndex"] == third["JobModifyIndex"]


async def test_enforce_index_check_and_set(http):
    job = parameterized_job()
    status, _, body = await call(http, "PUT", "/v1/jobs", {"Job": job, "EnforceIndex": True, "JobModifyIndex": 7})
    assert (status, body) == (500, b"Enforcing job modify index 7: job does not exist")
    created = await register(http, job, EnforceIndex=True, JobModifyIndex=0)
    status, _, body = await call(http, "PUT", "/v1/jobs", {"Job": job, "EnforceIndex": True, "JobModifyIndex": 0})
    assert (status, body) == (500, b"Enforcing job modify index 0: job already exists")
    stale = created["JobModifyIndex"] + 5
    status, _, body = await call(http, "PUT", "/v1/jobs", {"Job": {**job, "Meta": {}}, "EnforceIndex": True,
                                                          "JobModifyIndex": stale})
    assert status == 500
    assert body.decode() == (f"Enforcing job modify index {stale}: job exists with conflicting job modify index: "
                             f"{created['JobModifyIndex']}")
    await register(http, {**job, "Meta": {}}, EnforceIndex=True, JobModifyIndex=created["JobModifyIndex"])


@pytest.mark.parametrize(("body", "status", "text"), [
    (b"", 400, "Request body is empty"),
    ({"Jobs": {}}, 400, "Job must be specified"),
    ({"Job": {"Name": "x"}}, 400, "Job ID hasn't been provided"),
    ({"Job": {**parameterized_job(), "Type": "service"}}, 500,
     '1 error occurred:\n\t* Parameterized job can only be used with "batch" or "sysbatch" scheduler\n\n'),
])
async def test_register_refusals(http, body, status, text):
    got_status, _, got = await call(http, "PUT", "/v1/jobs", body)
    assert (got_status, got.decode()) == (status, text)


async def test_register_path_id_and_parameterized_transitions(http):
    status, _, body = await call(http, "PUT", "/v1/job/other", {"Job": parameterized_job()})
    assert (status, body) == (400, b"Job ID does not match name")
    await register(http, parameterized_job())
    plain = {k: v for k, v in parameterized_job().items() if k != "ParameterizedJob"}
    status, _, body = await call(http, "PUT", "/v1/jobs", {"Job": plain})
    assert (status, body) == (500, b"cannot update parameterized job to being non-parameterized")


# ---------------------------------------------------------------- read, list, summary (§3, §4)

async def test_missing_job_is_404_with_the_jobs_index(http):
    await register(http, parameterized_job())
    status, headers, body = await call(http, "GET", "/v1/job/nope")
    assert (status, body) == (404, b"job not found")
    assert int(headers["X-Nomad-Index"]) >= 1
    assert {"X-Nomad-KnownLeader", "X-Nomad-LastContact"} <= set(headers)


async def test_blocking_job_read(fake, http):
    await register(http, parameterized_job())
    job, headers = await ok(http, "GET", "/v1/job/report-runner")
    index = int(headers["X-Nomad-Index"])
    assert index == job["ModifyIndex"]
    _, timed_out = await ok(http, "GET", f"/v1/job/report-runner?index={index}&wait=50ms")
    assert int(timed_out["X-Nomad-Index"]) == index  # timeout: same index, no change
    arrived = len(fake.seen)
    blocked = asyncio.ensure_future(ok(http, "GET", f"/v1/job/report-runner?index={index}&wait=10s"))
    await fake.wait_until(lambda: len(fake.seen) > arrived)  # the read is now blocked in the fake
    assert not blocked.done()
    await register(http, {**parameterized_job(), "Meta": {"mode": "x"}})
    job, headers = await asyncio.wait_for(blocked, TIMEOUT)
    assert int(headers["X-Nomad-Index"]) > index and job["Meta"] == {"mode": "x"}
    status, _, body = await call(http, "GET", "/v1/job/report-runner?index=x")
    assert (status, body) == (400, b"Invalid index")
    # a missing job blocks on the jobs table: it returns when the job appears
    _, missing, _ = await call(http, "GET", "/v1/job/later")
    arrived = len(fake.seen)
    waiting = asyncio.ensure_future(call(http, "GET", f"/v1/job/later?index={missing['X-Nomad-Index']}&wait=10s"))
    await fake.wait_until(lambda: len(fake.seen) > arrived)
    assert not waiting.done()
    await register(http, {**parameterized_job(), "ID": "later", "Name": "later"})
    status, _, _ = await asyncio.wait_for(waiting, TIMEOUT)
    assert status == 200


async def test_jobs_list_stubs(http):
    await register(http, parameterized_job())
    child, _ = (await dispatch(http, "report-runner", b"", {"run_id": "1"}))["DispatchedJobID"], None
    stubs, headers = await ok(http, "GET", "/v1/jobs")
    assert "X-Nomad-Index" in headers
    by_id = {s["ID"]: s for s in stubs}
    assert set(by_id) == {"report-runner", child}
    parent = by_id["report-runner"]
    assert set(sample("jobs-list.json")[0]) <= set(parent)
    assert set(sample("jobs-list.json")[0]["JobSummary"]) <= set(parent["JobSummary"])
    # reference §4: in the stub Periodic/ParameterizedJob are booleans, not objects
    assert (parent["ParameterizedJob"], parent["Periodic"]) == (True, False)
    assert set(parent) == {"ID", "ParentID", "Name", "Namespace", "Datacenters", "NodePool", "Type", "Priority",
                           "Periodic", "ParameterizedJob", "Stop", "Status", "StatusDescription", "JobSummary",
                           "CreateIndex", "ModifyIndex", "JobModifyIndex", "SubmitTime"}
    assert (by_id[child]["ParentID"], by_id[child]["ParameterizedJob"]) == ("report-runner", True)
    children, _ = await ok(http, "GET", "/v1/jobs?prefix=report-runner/dispatch-")
    assert [s["ID"] for s in children] == [child]
    assert (await ok(http, "GET", "/v1/jobs?prefix=zzz"))[0] == []
    with_meta, _ = await ok(http, "GET", "/v1/jobs?prefix=report-runner&meta=true")
    assert with_meta[0]["Meta"] == parameterized_job()["Meta"]


async def test_summary_counts_children(fake, http):
    await register(http, parameterized_job())
    kids = [(await dispatch(http, "report-runner", b"", {"run_id": str(i)}))["DispatchedJobID"] for i in range(2)]
    fake.run_alloc(fake.alloc_ids(kids[0])[0])
    summary, _ = await ok(http, "GET", "/v1/job/report-runner/summary")
    assert set(sample("job-summary.json")) <= set(summary)
    assert summary["Children"] == {"Pending": 0, "Running": 1, "Dead": 1}
    child, _ = await ok(http, "GET", f"/v1/job/{kids[0]}/summary")
    assert set(sample("job-summary.json")["Summary"]["cache"]) <= set(child["Summary"]["run"])
    assert (child["Summary"]["run"]["Complete"], child["Summary"]["run"]["Running"]) == (1, 0)
    status, _, body = await call(http, "GET", "/v1/job/nope/summary")
    assert (status, body) == (404, b"job not found")


# ---------------------------------------------------------------- dispatch (§5)

async def test_dispatch_reply_and_child(fake, http):
    await register(http, parameterized_job())
    payload = json.dumps({"rows": 17}).encode()
    reply, headers = await ok(http, "POST", "/v1/job/report-runner/dispatch",
                              {"Payload": base64.b64encode(payload).decode(),
                               "Meta": {"run_id": "42", "mode": "quick"}})
    assert set(reply) == set(sample("dispatch-response.json"))
    assert int(headers["X-Nomad-Index"]) == reply["Index"] == reply["EvalCreateIndex"] > reply["JobCreateIndex"]
    assert UUID.match(reply["EvalID"])
    match = CHILD_ID.match(reply["DispatchedJobID"])
    assert match and match["parent"] == "report-runner" and match["prefix"] is None
    child, _ = await ok(http, "GET", "/v1/job/" + reply["DispatchedJobID"])
    assert (child["ParentID"], child["Dispatched"], child["Name"]) == ("report-runner", True, child["ID"])
    assert child["ParameterizedJob"] == parameterized_job()["ParameterizedJob"]  # still carried by the child
    assert child["Meta"] == {"mode": "quick", "owner": "reports-team", "run_id": "42"}  # dispatch meta wins
    assert base64.b64decode(child["Payload"]) == payload
    assert child["CreateIndex"] == reply["JobCreateIndex"]
    prefixed = await dispatch(http, "report-runner", meta={"run_id": "1"}, IdPrefixTemplate="config1")
    match = CHILD_ID.match(prefixed["DispatchedJobID"])
    assert match and match["prefix"] == "config1"


async def test_dispatched_child_starts_pending(http):
    fake = FakeNomad(auto_place=False)
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as session:
            await register(session, parameterized_job())
            child = (await dispatch(session, "report-runner", meta={"run_id": "1"}))["DispatchedJobID"]
            job, _ = await ok(session, "GET", f"/v1/job/{child}")
            assert job["Status"] == "pending"
            assert (await ok(session, "GET", f"/v1/job/{child}/allocations"))[0] == []
            fake.place(child)
            allocs, _ = await ok(session, "GET", f"/v1/job/{child}/allocations")
            assert [a["ClientStatus"] for a in allocs] == ["pending"]
            assert (await ok(session, "GET", f"/v1/job/{child}"))[0]["Status"] == "running"
    finally:
        await fake.stop()


async def test_dispatch_idempotency_token(fake, http):
    await register(http, parameterized_job())
    first = await dispatch(http, "report-runner", b"a", {"run_id": "1"}, "?idempotency_token=build-1")
    again = await dispatch(http, "report-runner", b"other", {"run_id": "2"}, "?idempotency_token=build-1")
    assert again["DispatchedJobID"] == first["DispatchedJobID"]
    assert (again["EvalID"], again["EvalCreateIndex"]) == ("", 0)
    assert again["JobCreateIndex"] == first["JobCreateIndex"]
    child, _ = await ok(http, "GET", "/v1/job/" + first["DispatchedJobID"])
    assert again["Index"] == child["ModifyIndex"] and child["DispatchIdempotencyToken"] == "build-1"
    body_token = await dispatch(http, "report-runner", b"", {"run_id": "1"}, IdempotencyToken="build-1")
    assert body_token["DispatchedJobID"] == first["DispatchedJobID"]
    overridden = await dispatch(http, "report-runner", b"", {"run_id": "1"}, "?idempotency_token=build-2",
                                IdempotencyToken="build-1")
    assert overridden["DispatchedJobID"] != first["DispatchedJobID"] and overridden["EvalID"]
    # a dead (stopped) child still short-circuits; once purged the token dispatches anew
    fake.run_alloc(fake.alloc_ids(first["DispatchedJobID"])[0])
    await ok(http, "DELETE", "/v1/job/" + first["DispatchedJobID"])
    still = await dispatch(http, "report-runner", b"", {"run_id": "1"}, "?idempotency_token=build-1")
    assert still["DispatchedJobID"] == first["DispatchedJobID"]
    await ok(http, "DELETE", "/v1/job/" + first["DispatchedJobID"].replace("/", "%2F") + "?purge=true")
    fresh = await dispatch(http, "report-runner", b"", {"run_id": "1"}, "?idempotency_token=build-1")
    assert fresh["DispatchedJobID"] != first["DispatchedJobID"] and fresh["EvalID"]


@pytest.mark.parametrize(("job_id", "body", "status", "text"), [
    ("nope", {"Meta": {"run_id": "1"}}, 500, "parameterized job not found"),
    ("plain", {}, 500, 'Specified job "plain" is not a parameterized job'),
    ("stopped", {"Meta": {"run_id": "1"}}, 500, 'Specified job "stopped" is stopped'),
    ("required", {"Meta": {"run_id": "1"}}, 500, "Payload is not provided but required by parameterized job"),
    ("forbidden", {"Payload": "YQ==", "Meta": {"run_id": "1"}}, 500,
     "Payload provided but forbidden by parameterized job"),
    ("report-runner", {"Meta": {"run_id": "1", "color": "red", "alpha": "a"}}, 500,
     "Dispatch request included unpermitted metadata keys: [alpha color]"),
    ("report-runner", {"Meta": {"mode": "x"}}, 500, "Dispatch did not provide required meta keys: [run_id]"),
    ("report-runner", {"JobID": "other", "Meta": {"run_id": "1"}}, 400, "Job ID does not match"),
    ("report-runner", sample("dispatch-request.json"), 400, "illegal base64 data at input byte 5"),
    ("report-runner", {"Payload": "@@@@", "Meta": {"run_id": "1"}}, 400, "illegal base64 data at input byte 0"),
])
async def test_dispatch_refusals(http, job_id, body, status, text):
    base = parameterized_job()
    await register(http, base)
    await register(http, {**base, "ID": "stopped", "Name": "stopped"})
    await ok(http, "DELETE", "/v1/job/stopped")
    for name, mode in (("required", "required"), ("forbidden", "forbidden")):
        await register(http, {**base, "ID": name, "Name": name,
                              "ParameterizedJob": {**base["ParameterizedJob"], "Payload": mode}})
    await register(http, {**sample("register-job-request.json")["Job"], "ID": "plain"})
    got_status, _, got = await call(http, "POST", f"/v1/job/{job_id}/dispatch", body)
    assert (got_status, got.decode()) == (status, text)


async def test_payload_limit_is_16_kib(http):
    await register(http, parameterized_job())
    await dispatch(http, "report-runner", b"x" * 16384, {"run_id": "1"})
    status, _, body = await call(http, "POST", "/v1/job/report-runner/dispatch",
                                 {"Payload": base64.b64encode(b"x" * 16385).decode(), "Meta": {"run_id": "1"}})
    assert (status, body) == (500, b"Payload exceeds maximum size; 16385 > 16384")


async def test_child_ids_with_slash_raw_or_percent_encoded(http):
    child, alloc_id = await dispatched(http)
    encoded = child.replace("/", "%2F")
    raw_job, _ = await ok(http, "GET", f"/v1/job/{child}")
    enc_job, _ = await ok(http, "GET", f"/v1/job/{encoded}")
    assert raw_job == enc_job and raw_job["ID"] == child
    for path in (child, encoded):
        allocs, _ = await ok(http, "GET", f"/v1/job/{path}/allocations")
        assert [a["ID"] for a in allocs] == [alloc_id]
        summary, _ = await ok(http, "GET", f"/v1/job/{path}/summary")
        assert summary["JobID"] == child


# ---------------------------------------------------------------- deregister (§6)

async def test_deregister(fake, http):
    child, alloc_id = await dispatched(http)
    reply, headers = await ok(http, "DELETE", f"/v1/job/{child}")
    assert set(reply) == set(sample("job-deregister-response.json"))
    assert UUID.match(reply["EvalID"]) and reply["JobModifyIndex"] == int(headers["X-Nomad-Index"])
    job, _ = await ok(http, "GET", f"/v1/job/{child}")
    assert (job["Stop"], job["Status"]) == (True, "dead")
    alloc, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert (alloc["DesiredStatus"], alloc["ClientStatus"]) == ("stop", "complete")
    parent, _ = await ok(http, "DELETE", "/v1/job/report-runner")
    assert parent["EvalID"] == ""  # stopping a parameterized parent creates no eval
    assert (await ok(http, "GET", "/v1/job/report-runner"))[0]["Status"] == "dead"
    await ok(http, "DELETE", f"/v1/job/{child}?purge=true")
    assert (await call(http, "GET", f"/v1/job/{child}"))[0] == 404
    nothing, _ = await ok(http, "DELETE", "/v1/job/never-was")
    assert nothing == {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0}
    status, _, body = await call(http, "DELETE", "/v1/job/report-runner?purge=maybe")
    assert status == 500
    assert body == (b'Failed to parse value of "purge" (maybe) as a bool: '
                    b'strconv.ParseBool: parsing "maybe": invalid syntax')


# ---------------------------------------------------------------- allocations (§7, §8, §9)

async def test_allocation_shapes(fake, http):
    child, alloc_id = await dispatched(http)
    alloc, headers = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert set(sample("allocation.json")) <= set(alloc)
    assert set(sample("event-stream-allocation-event.json")["Events"][0]["Payload"]["Allocation"]) <= set(alloc)
    assert int(headers["X-Nomad-Index"]) == alloc["ModifyIndex"]
    assert (alloc["JobID"], alloc["Job"]["ID"], alloc["TaskGroup"], alloc["Name"]) == (child, child, "run",
                                                                                        f"{child}.run[0]")
    assert (alloc["DesiredStatus"], alloc["ClientStatus"], alloc["TaskStates"]) == ("run", "pending", None)
    assert set(sample("allocation.json")["Resources"]) <= set(alloc["Resources"])
    fake.run_alloc(alloc_id)
    stubs, _ = await ok(http, "GET", f"/v1/job/{child}/allocations")
    assert set(sample("job-allocations.json")[0]) | set(sample("allocations-list.json")[0]) <= set(stubs[0])
    event_keys = set(sample("allocations-list.json")[0]["TaskStates"]["redis"]["Events"][0])
    assert all(set(e) == event_keys for e in stubs[0]["TaskStates"]["worker"]["Events"])
    assert set(stubs[0]["TaskStates"]["worker"]) == set(sample("allocations-list.json")[0]["TaskStates"]["redis"])
    assert (await ok(http, "GET", "/v1/job/unknown/allocations"))[0] == []
    listed, _ = await ok(http, "GET", f"/v1/allocations?prefix={alloc_id[:4]}")
    assert [a["ID"] for a in listed] == [alloc_id]
    status, _, body = await call(http, "GET", "/v1/allocation/00000000-0000-0000-0000-000000000000")
    assert (status, body) == (404, b"alloc not found")


async def test_successful_run_events(fake, http):
    child, alloc_id = await dispatched(http)
    fake.run_alloc(alloc_id, stdout=b"ok\n", exit_code=0)
    alloc, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    state = alloc["TaskStates"]["worker"]
    assert [(e["Type"], e["DisplayMessage"]) for e in state["Events"]] == [
        ("Received", "Task received by client"), ("Task Setup", "Building Task Directory"),
        ("Started", "Task started by client"), ("Terminated", "Exit Code: 0")]
    assert (state["State"], state["Failed"], alloc["ClientStatus"]) == ("dead", False, "complete")
    assert alloc["ClientDescription"] == "All tasks have completed"
    assert state["StartedAt"].endswith("Z") and state["FinishedAt"].endswith("Z")
    assert (await ok(http, "GET", f"/v1/job/{child}"))[0]["Status"] == "dead"


async def test_failed_run_matches_the_reference_events(fake, http):
    _, alloc_id = await dispatched(http)
    fake.run_alloc(alloc_id, stderr=b"ERROR: boom\n", exit_code=3)
    alloc, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    expected = sample("event-stream-allocation-event.json")["Events"][0]["Payload"]["Allocation"]
    state, ref = alloc["TaskStates"]["worker"], expected["TaskStates"]["worker"]
    fields = ("Type", "DisplayMessage", "Details", "Message", "FailsTask", "ExitCode", "Signal")
    assert [{k: e[k] for k in fields} for e in state["Events"]] == [{k: e[k] for k in fields} for e in ref["Events"]]
    assert state["Events"][-1]["RestartReason"] == ref["Events"][-1]["RestartReason"]
    assert (state["State"], state["Failed"]) == (ref["State"], ref["Failed"])
    assert (alloc["ClientStatus"], alloc["ClientDescription"]) == (expected["ClientStatus"],
                                                                   expected["ClientDescription"])


async def test_lost_alloc_is_replaced(fake, http):
    child, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    replacement = fake.lose_alloc(alloc_id)
    old, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert (old["ClientStatus"], old["DesiredStatus"], old["NextAllocation"]) == ("lost", "stop", replacement)
    assert old["DesiredDescription"] == "alloc is lost since its node is down"
    new, _ = await ok(http, "GET", f"/v1/allocation/{replacement}")
    assert (new["PreviousAllocation"], new["ClientStatus"], new["Name"]) == (alloc_id, "pending", old["Name"])
    assert len((await ok(http, "GET", f"/v1/job/{child}/allocations"))[0]) == 2


async def test_fail_to_place(fake, http):
    await register(http, parameterized_job())
    fake.fail_to_place("report-runner")
    child = (await dispatch(http, "report-runner", meta={"run_id": "1"}))["DispatchedJobID"]
    assert (await ok(http, "GET", f"/v1/job/{child}/allocations"))[0] == []
    job, _ = await ok(http, "GET", f"/v1/job/{child}")
    assert job["Status"] == "pending"
    evals, _ = await ok(http, "GET", f"/v1/job/{child}/evaluations")
    done = next(e for e in evals if e["Status"] == "complete")
    assert set(done["FailedTGAllocs"]) == {"run"} and done["BlockedEval"]
    assert any(e["ID"] == done["BlockedEval"] and e["Status"] == "blocked" for e in evals)
    assert (await ok(http, "GET", f"/v1/job/{child}/summary"))[0]["Summary"]["run"]["Queued"] == 1
    fake.allow_placement("report-runner")
    allocs, _ = await ok(http, "GET", f"/v1/job/{child}/allocations")
    assert [a["ClientStatus"] for a in allocs] == ["pending"]


def _with_group(job: dict, **changes) -> dict:
    group = {**job["TaskGroups"][0], **changes.pop("group", {})}
    task = {**group["Tasks"][0], **changes.pop("task", {})}
    return {**job, **changes, "TaskGroups": [{**group, "Tasks": [task]}]}


GPU_TASK = {"Resources": {"CPU": 200, "MemoryMB": 256, "Devices": [{"Name": "nvidia/gpu", "Count": 1}]}}


@pytest.mark.parametrize(("job_changes", "node_changes", "expected"), [
    ({}, {"datacenter": "dc2"}, {"NodesEvaluated": 0, "NodesAvailable": {}, "ConstraintFiltered": None}),
    ({"Constraints": [{"LTarget": "${attr.kernel.name}", "RTarget": "windows", "Operand": "="}]}, {},
     {"NodesEvaluated": 1, "NodesFiltered": 1, "ConstraintFiltered": {"${attr.kernel.name} = windows": 1}}),
    ({"group": {"Volumes": {"cache": {"Name": "cache", "Type": "host", "Source": "buildah-cache"}}}},
     {"host_volumes": set()},
     {"NodesEvaluated": 1, "NodesFiltered": 1, "ConstraintFiltered": {"missing compatible host volumes": 1}}),
    ({"task": GPU_TASK}, {}, {"NodesFiltered": 1, "ConstraintFiltered": {"missing devices": 1}}),
    ({"task": GPU_TASK}, {"devices": {"nvidia/gpu": 0}},
     {"NodesExhausted": 1, "DimensionExhausted": {"devices: no devices match request": 1}}),
    ({}, {"memory_mb": 128}, {"NodesFiltered": 0, "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}),
], ids=["datacenter", "constraint", "host-volume", "device", "device-count", "memory"])
async def test_placement_is_as_strict_as_nomads_feasibility(fake, http, job_changes, node_changes, expected):
    original = {k: getattr(fake.node, k) for k in node_changes}
    for key, value in node_changes.items():
        setattr(fake.node, key, value)
    await register(http, _with_group(parameterized_job(), **job_changes))
    child = (await dispatch(http, "report-runner", b"{}", {"run_id": "1"}))["DispatchedJobID"]
    assert (await ok(http, "GET", f"/v1/job/{child}/allocations"))[0] == []
    evals, _ = await ok(http, "GET", f"/v1/job/{child}/evaluations")
    done = next(e for e in evals if e["Status"] == "complete")
    metric = done["FailedTGAllocs"]["run"]
    assert {k: metric[k] for k in expected} == expected
    assert any(e["ID"] == done["BlockedEval"] and e["Status"] == "blocked" for e in evals)
    if not node_changes or "devices" in node_changes:
        return  # a job that can never fit stays blocked; a node change that takes the restriction back places it
    for key, value in original.items():  # the operator fixes the node: the blocked evaluation places it
        setattr(fake.node, key, value)
    fake.node_changed()
    allocs, _ = await ok(http, "GET", f"/v1/job/{child}/allocations")
    assert [a["ClientStatus"] for a in allocs] == ["pending"]


async def test_job_stop_of_a_child_kills_its_task_and_ends_complete(fake, http):
    child, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    fake.stop_job(child)
    alloc, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert (alloc["DesiredStatus"], alloc["DesiredDescription"], alloc["ClientStatus"]) == (
        "stop", "alloc not needed due to job update", "complete")
    (state,) = alloc["TaskStates"].values()
    assert [e["Type"] for e in state["Events"]][-3:] == ["Killing", "Terminated", "Killed"]


async def test_node_drain_migrates_and_the_replacement_finds_no_node(fake, http):
    child, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    fake.drain_node()
    alloc, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert (alloc["DesiredStatus"], alloc["DesiredDescription"], alloc["ClientStatus"]) == (
        "stop", "alloc is being migrated", "complete")
    assert alloc["DesiredTransition"]["Migrate"] is True
    evals, _ = await ok(http, "GET", f"/v1/job/{child}/evaluations")
    drained = next(e for e in evals if e["TriggeredBy"] == "node-drain")
    assert drained["FailedTGAllocs"]["run"]["NodesEvaluated"] == 0  # the only node is ineligible
    assert [a["ID"] for a in (await ok(http, "GET", f"/v1/job/{child}/allocations"))[0]] == [alloc_id]


async def test_cut_streams_go_half_open_while_new_ones_work(fake, http):
    async with open_events(http) as old:
        assert await Events(old).line() == {}
        fake.cut_streams()
        start = fake.cluster.index + 1
        await register(http, parameterized_job())
        async with open_events(http, f"?index={start}") as new:
            events = Events(new)
            assert (await events.batch())["Index"] == start
            assert await events.line() == {}  # a heartbeat period has passed on the new stream ...
        assert not old.content.at_eof() and old.content.total_bytes == len(b"{}\n")  # ... none came on the old


async def test_alloc_stop_reschedules(fake, http):
    child, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    start = fake.cluster.index + 1
    async with open_events(http, f"?topic=Allocation:{child}&index={start}") as resp:
        events = Events(resp)
        assert await events.line() == {}
        again = await events.batch()  # one past the newest index: Nomad sends the newest again (StartAtClosest)
        assert again["Index"] == start - 1 and [e["Type"] for e in again["Events"]] == ["AllocationUpdated"]
        reply, headers = await ok(http, "POST", f"/v1/allocation/{alloc_id}/stop")
        assert set(reply) == set(sample("alloc-stop-response.json"))
        assert reply["Index"] == int(headers["X-Nomad-Index"]) and UUID.match(reply["EvalID"])
        batch = await events.batch()
        assert [(e["Type"], e["Key"]) for e in batch["Events"]] == [("AllocationUpdateDesiredStatus", alloc_id)]
        assert batch["Events"][0]["Payload"]["Allocation"]["DesiredTransition"]["Migrate"] is True
        placed = await events.batch()
        assert {e["Type"] for e in placed["Events"]} == {"PlanResult"}
    old, _ = await ok(http, "GET", f"/v1/allocation/{alloc_id}")
    assert (old["DesiredStatus"], old["ClientStatus"]) == ("stop", "complete")
    assert [e["Type"] for e in old["TaskStates"]["worker"]["Events"]][-3:] == ["Killing", "Terminated", "Killed"]
    new, _ = await ok(http, "GET", f"/v1/allocation/{old['NextAllocation']}")
    assert (new["PreviousAllocation"], new["DesiredStatus"]) == (alloc_id, "run")
    status, _, body = await call(http, "PUT", "/v1/allocation/00000000-0000-0000-0000-000000000000/stop")
    assert (status, body) == (404, b"alloc not found")
    assert (await call(http, "GET", f"/v1/allocation/{alloc_id}/stop"))[0] == 405


# ---------------------------------------------------------------- allocation stats (client/structs/structs.go)

# The fields of Nomad's MemoryStats and CpuStats (client/structs/structs.go), every one written by encoding/json.
MEMORY_KEYS = {"RSS", "Cache", "Swap", "MappedFile", "Usage", "MaxUsage", "KernelUsage", "KernelMaxUsage", "Measured"}
CPU_KEYS = {"SystemMode", "UserMode", "TotalTicks", "ThrottledPeriods", "ThrottledTime", "Percent", "Measured"}


async def test_alloc_stats_exist_while_the_client_holds_the_allocation(fake, http):
    _, alloc_id = await dispatched(http)
    url = f"/v1/client/allocation/{alloc_id}/stats"
    unknown = (404, f'Unknown allocation "{alloc_id}"'.encode())
    status, _, body = await call(http, "GET", url)
    assert (status, body) == unknown  # placed, not received by the client yet
    fake.start_alloc(alloc_id)
    fake.report_stats(alloc_id, rss=64 << 20, percent=150.0, at=1_700_000_000_000_000_000)
    stats, _ = await ok(http, "GET", url)
    assert set(stats) == {"ResourceUsage", "Tasks", "Timestamp"}
    task = stats["Tasks"]["worker"]
    assert set(task) == {"ResourceUsage", "Timestamp", "Pids"}
    assert set(task["ResourceUsage"]) == {"MemoryStats", "CpuStats", "DeviceStats"}
    memory, cpu = task["ResourceUsage"]["MemoryStats"], task["ResourceUsage"]["CpuStats"]
    assert set(memory) == MEMORY_KEYS and set(cpu) == CPU_KEYS
    assert (memory["RSS"], cpu["Percent"], task["Timestamp"]) == (64 << 20, 150.0, 1_700_000_000_000_000_000)
    assert "Max Usage" not in memory["Measured"]  # cgroup v2: the driver has no peak to give
    running = stats["ResourceUsage"]  # the sum over running tasks
    assert (running["MemoryStats"]["RSS"], running["CpuStats"]["Percent"], stats["Timestamp"]) == (
        64 << 20, 150.0, 1_700_000_000_000_000_000)
    other, _ = await ok(http, "GET", f"{url}?task=other")
    assert other["Tasks"] == {} and other["ResourceUsage"]["MemoryStats"]["RSS"] == 0
    fake.finish_alloc(alloc_id)
    done, _ = await ok(http, "GET", url)
    assert done["Tasks"]["worker"] == task  # the last sample stays with the client
    assert (done["ResourceUsage"]["MemoryStats"]["RSS"], done["ResourceUsage"]["MemoryStats"]["Measured"],
            done["Timestamp"]) == (0, None, 0)  # no task runs: nothing adds up
    assert fake.gc()
    status, _, body = await call(http, "GET", url)
    assert (status, body) == unknown  # garbage-collected: gone with the allocation


async def test_alloc_stats_refusals(fake, http):
    _, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    fake.lose_alloc(alloc_id, replace=False)
    for path, status, text in [(f"/v1/client/allocation/{alloc_id}/stats", 404, b"No path to node"),
                               (f"/v1/client/allocation/{alloc_id}", 404, b"Resource not found"),
                               (f"/v1/client/allocation/{alloc_id}/stats/x", 404, b"Resource not found"),
                               (f"/v1/client/allocation/{alloc_id}/nothing", 404, b"Resource not found")]:
        assert (await call(http, "GET", path))[::2] == (status, text), path


async def test_the_subprocess_runner_samples_the_task_like_the_docker_driver():
    """A task holding 64 MiB and busy for a second: its last sample, taken while it ran, shows both."""
    program = "import time\nheld = b'x' * (64 << 20)\nstart = time.process_time()\n" \
              "while time.process_time() - start < 1.0:\n    pass\n"
    hcl = (f'job "burn" {{\n  type = "batch"\n  datacenters = ["dc1"]\n  group "g" {{\n    task "burn" {{\n'
           f'      driver = "docker"\n      config {{\n        command = "python3"\n'
           f'        args = ["-c", {json.dumps(program)}]\n      }}\n    }}\n  }}\n}}\n')
    fake = FakeNomad(runner=subprocess_runner(python=sys.executable, stats_interval=0.2))
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            job, _ = await ok(http, "POST", "/v1/jobs/parse", {"JobHCL": hcl})
            await register(http, job)
            await fake.settle()
            (alloc_id,) = fake.alloc_ids("burn")
            stats, _ = await ok(http, "GET", f"/v1/client/allocation/{alloc_id}/stats")
    finally:
        await fake.stop()
    assert fake.allocations("burn")[0]["ClientStatus"] == "complete"
    last = stats["Tasks"]["burn"]["ResourceUsage"]
    assert last["MemoryStats"]["RSS"] >= 64 << 20 and last["CpuStats"]["Percent"] > 0


# ---------------------------------------------------------------- task logs (§10)

async def test_log_frames(fake, http):
    _, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    for chunk in (b"starting report run 42\n", b"wrote 17 rows\n"):
        fake.write_log(alloc_id, chunk)
    fake.write_log(alloc_id, b"warn\n", "stderr")
    status, headers, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    got = frames(body)
    assert got == [{"Offset": 37, "Data": base64.b64encode(b"starting report run 42\nwrote 17 rows\n").decode(),
                    "File": "alloc/logs/worker.stdout.0"}]
    wire = frames((SAMPLES / "fs-logs-wire-example.txt").read_bytes().strip())
    assert set(got[0]) == set(wire[0])
    assert frames((await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stderr"))[2]) == [
        {"Offset": 5, "Data": base64.b64encode(b"warn\n").decode(), "File": "alloc/logs/worker.stderr.0"}]
    status, headers, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout"
                                                    "&plain=true")
    assert (status, headers["Content-Type"], body) == (200, "text/plain",
                                                       b"starting report run 42\nwrote 17 rows\n")
    _, _, tail = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout&plain=true"
                                         "&origin=end&offset=5")
    assert tail == b"rows\n"
    _, _, framed_tail = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout"
                                                "&origin=start&offset=23")
    assert [f["Offset"] for f in frames(framed_tail)] == [37]  # Offset = end position, not start
    assert base64.b64decode(frames(framed_tail)[0]["Data"]) == b"wrote 17 rows\n"


async def test_log_frames_are_back_to_back_and_at_most_64_kib(fake, http):
    _, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    fake.write_log(alloc_id, b"a" * (64 * 1024 + 10))
    _, _, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout")
    assert b"}{" in body and b"\n" not in body  # no separator between frames
    got = frames(body)
    assert [f["Offset"] for f in got] == [64 * 1024, 64 * 1024 + 10]
    assert b"".join(base64.b64decode(f["Data"]) for f in got) == b"a" * (64 * 1024 + 10)


@pytest.mark.parametrize(("query", "status", "text"), [
    ("type=stdout", 400, "must provide task name"),
    ("task=worker", 400, "must provide log type (stdout/stderr)"),
    ("task=worker&type=stdout&origin=middle", 400, "origin must be start or end"),
    ("task=nope&type=stdout", 400, 'unknown task name "nope"'),
    ("task=worker&type=stdout", 404, 'task "worker" not started yet. No logs available'),
])
async def test_log_refusals(http, query, status, text):
    _, alloc_id = await dispatched(http)
    got_status, _, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc_id}?{query}")
    assert (got_status, body.decode()) == (status, text)
    missing = "00000000-0000-0000-0000-000000000000"
    got_status, _, _ = await call(http, "GET", f"/v1/client/fs/logs/{missing}?task=worker&type=stdout")
    assert got_status == 404


async def test_log_follow_streams_new_output_and_heartbeats(fake, http):
    _, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    fake.write_log(alloc_id, b"one\n")
    async with http.get(f"/v1/client/fs/logs/{alloc_id}?task=worker&type=stdout&follow=true") as resp:
        buffer, decoder, received = "", json.JSONDecoder(), []

        async def next_frame() -> dict:
            nonlocal buffer
            while True:
                try:
                    frame, end = decoder.raw_decode(buffer)
                    buffer = buffer[end:]
                    return frame
                except ValueError:
                    buffer += (await asyncio.wait_for(resp.content.readany(), TIMEOUT)).decode()

        received.append(await next_frame())
        assert received[0]["Offset"] == 4
        assert await next_frame() == {}  # idle: a heartbeat, the 2-byte object
        fake.write_log(alloc_id, b"two\n")
        frame = await next_frame()
        while frame == {}:
            frame = await next_frame()
        assert (frame["Offset"], base64.b64decode(frame["Data"])) == (8, b"two\n")
        fake.finish_alloc(alloc_id, 0)
        assert await next_frame() == {}  # follow does not end when the task does


# ---------------------------------------------------------------- event stream (§11)

async def test_event_stream_wire_format_and_lifecycle(fake, http):
    await register(http, parameterized_job())
    async with open_events(http, f"?index={fake.cluster.index + 1}") as resp:
        assert resp.headers["Content-Type"] == "application/json"
        first = await asyncio.wait_for(resp.content.readline(), TIMEOUT)
        assert first == b"{}\n"  # a heartbeat right after subscribing
        events = Events(resp)
        again = await events.batch()  # one past the newest index: the newest (the registration) comes again
        assert [(e["Topic"], e["Type"], e["Key"]) for e in again["Events"]] == [("Job", "JobRegistered",
                                                                                  "report-runner")]
        child = (await dispatch(http, "report-runner", b"{}", {"run_id": "42"}))["DispatchedJobID"]
        registered = await events.batch()
        assert [(e["Topic"], e["Type"], e["Key"]) for e in registered["Events"]] == [("Job", "JobRegistered", child)]
        wire = [json.loads(line) for line in (SAMPLES / "event-stream-wire-example.ndjson").read_text().splitlines()]
        assert set(registered) == set(wire[1]) and set(registered["Events"][0]) == set(wire[1]["Events"][0])
        assert registered["Events"][0]["FilterKeys"] is None
        # events carry the stored job: its payload b"{}" snappy-compressed (len 2, literal tag 0x04), not decoded
        assert registered["Events"][0]["Payload"]["Job"]["Payload"] == base64.b64encode(b"\x02\x04{}").decode()
        seen = await events.until(lambda e: e["Type"] == "PlanResult" and e["Topic"] == "Allocation")
        plan = next(e for e in seen[-1]["Events"] if e["Topic"] == "Allocation")
        alloc_id = plan["Key"]
        fake.run_alloc(alloc_id, exit_code=3)
        seen = await events.until(lambda e: e["Topic"] == "Allocation" and
                                  e["Payload"]["Allocation"]["ClientStatus"] == "failed")
        final = next(e for e in seen[-1]["Events"] if e["Topic"] == "Allocation")
        reference = sample("event-stream-allocation-event.json")
        assert set(seen[-1]) == set(reference) and set(final) == set(reference["Events"][0])
        assert set(reference["Events"][0]["Payload"]["Allocation"]) <= set(final["Payload"]["Allocation"])
        assert (final["Type"], final["FilterKeys"], final["Payload"]["Allocation"]["Job"]) == (
            "AllocationUpdated", [child, ""], None)
        assert all(e["Index"] == batch["Index"] for batch in seen for e in batch["Events"])
        assert any(e["Topic"] == "Job" and e["Payload"]["Job"]["Status"] == "dead" for e in seen[-1]["Events"])


async def test_event_stream_replays_inclusively_from_index(fake, http):
    child, _ = await dispatched(http)
    batches = list(fake.cluster.buffer)
    start = batches[2]["Index"]
    async with open_events(http, f"?index={start}") as resp:
        events = Events(resp)
        replay = [await events.batch() for _ in range(len(batches) - 2)]
    assert [b["Index"] for b in replay] == [b["Index"] for b in batches[2:]]
    async with open_events(http, "?index=0") as resp:  # 0: the oldest event still buffered
        assert (await Events(resp).batch())["Index"] == batches[0]["Index"]


async def test_event_stream_filter_keys(fake, http):
    child_a, alloc_a = await dispatched(http)
    child_b = (await dispatch(http, "report-runner", meta={"run_id": "b"}))["DispatchedJobID"]
    alloc_b = fake.alloc_ids(child_b)[0]
    fake.run_alloc(alloc_b)
    fake.run_alloc(alloc_a)
    async with open_events(http, f"?index=1&topic=Allocation:{child_a}") as resp:
        seen = await Events(resp).until(lambda e: e["Payload"]["Allocation"]["ClientStatus"] == "complete")
    keys = {e["Key"] for b in seen for e in b["Events"]}
    assert keys == {alloc_a}  # FilterKeys [JobID, DeploymentID] match the child's full ID only
    async with open_events(http, f"?index=1&topic=Allocation:{alloc_b}&topic=Job:report-runner") as resp:
        events = Events(resp)
        first = await events.batch()
        assert [(e["Topic"], e["Key"]) for e in first["Events"]] == [("Job", "report-runner")]
        second = await events.batch()
        assert {e["Key"] for e in second["Events"]} == {alloc_b}  # a Key match; child Job events filtered out


async def test_event_stream_heartbeats_periodically(fake, http):
    async with open_events(http) as resp:
        events = Events(resp)
        assert [await events.line() for _ in range(3)] == [{}, {}, {}]


async def test_event_stream_buffer_is_bounded():
    fake = FakeNomad(event_buffer_size=3, event_heartbeat=0.05)
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            for i in range(6):
                await register(http, {**parameterized_job(), "Meta": {"n": str(i)}})
            assert [b["Index"] for b in fake.cluster.buffer] == [4, 5, 6]
            async with open_events(http, "?index=2") as resp:  # older than the buffer: silently the oldest kept
                assert (await Events(resp).batch())["Index"] == 4
    finally:
        await fake.stop()


async def test_event_stream_subscriber_overtaken_by_the_buffer_is_closed():
    fake = FakeNomad(event_buffer_size=2, event_heartbeat=5)
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            _, alloc_id = await dispatched(http)
            newest = fake.cluster.index
            async with open_events(http, f"?index={newest + 1}") as resp:
                assert await asyncio.wait_for(resp.content.readline(), TIMEOUT) == b"{}\n"
                fake.run_alloc(alloc_id)  # three writes before the stream gets to run: the first is evicted
                rest = await asyncio.wait_for(resp.content.read(), TIMEOUT)
        *lines, tail = rest.split(b"\n")
        # The subscription starts on the newest item (past it: StartAtClosest), delivers it, and finds it evicted
        # when it moves on: a non-JSON tail, then the stream ends (reference §11, nomad/stream bufferItem.Next).
        assert [json.loads(line)["Index"] for line in lines] == [newest]
        assert tail == b"event dropped from buffer"
    finally:
        await fake.stop()


async def test_outage_answers_every_request(fake, http):
    fake.outage = (500, "No cluster leader")
    assert (await call(http, "GET", "/v1/jobs"))[::2] == (500, b"No cluster leader")


async def test_event_stream_refusals(http):
    status, _, body = await call(http, "GET", "/v1/event/stream?topic=Job:a:b")
    assert (status, body) == (400, b"Invalid topic query: error parsing topics: Invalid key value pair for topic, "
                                   b"topic: Job:a:b")
    status, _, body = await call(http, "GET", "/v1/event/stream?index=x")
    assert (status, body) == (400, b'Unable to parse index: strconv.Atoi: parsing "x": invalid syntax')


async def test_job_stop_and_purge_events(fake, http):
    child, alloc_id = await dispatched(http)
    fake.start_alloc(alloc_id)
    start = fake.cluster.index + 1
    await ok(http, "DELETE", f"/v1/job/{child}")
    async with open_events(http, f"?index={start}&topic=Job:{child}&topic=Evaluation:{child}") as resp:
        batch = await Events(resp).batch()
    assert [(e["Topic"], e["Type"]) for e in batch["Events"]] == [("Job", "JobDeregistered"),
                                                                  ("Evaluation", "JobDeregistered")]
    assert batch["Events"][0]["Payload"]["Job"]["Stop"] is True
    start = fake.cluster.index + 1
    await ok(http, "DELETE", f"/v1/job/{child}?purge=true")
    async with open_events(http, f"?index={start}&topic=Job:{child}&topic=Evaluation:{child}") as resp:
        batch = await Events(resp).batch()
    assert [(e["Topic"], e["Type"]) for e in batch["Events"]] == [("Evaluation", "JobDeregistered")]


# ---------------------------------------------------------------- ACL (§0)

async def test_acl_token():
    fake = FakeNomad(acl_token="s3cret")
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            assert (await call(http, "GET", "/v1/jobs"))[::2] == (403, b"Permission denied")
            assert (await call(http, "GET", "/v1/jobs", headers={"X-Nomad-Token": "wrong"}))[::2] == (
                403, b"ACL token not found")
            assert (await call(http, "GET", "/v1/event/stream"))[0] == 403
            assert (await call(http, "GET", "/v1/jobs", headers={"X-Nomad-Token": "s3cret"}))[0] == 200
            assert (await call(http, "GET", "/v1/jobs", headers={"Authorization": "bearer s3cret"}))[0] == 200
    finally:
        await fake.stop()


# ---------------------------------------------------------------- parse (§2)

ENV = {"JOBFORGE_PAYLOAD": "${NOMAD_TASK_DIR}/payload.json", "JOBFORGE_WORKDIR": "${NOMAD_ALLOC_DIR}/work",
       "JOBFORGE_BUILDAH_ROOT": "/var/lib/jobforge/buildah/root",
       "JOBFORGE_BUILDAH_RUNROOT": "/var/lib/jobforge/buildah/runroot", "JOBFORGE_STORAGE_DRIVER": "vfs",
       "JOBFORGE_ISOLATION": "chroot", "JOBFORGE_BUILD_NETWORK": "runner",
       "JOBFORGE_CONTROL_NONCE": "${NOMAD_META_control_nonce}", "PYTHONUNBUFFERED": "1"}
RESOURCES = {"build": (1000, 2048), "test": (500, 1024), "publish": (500, 1024), "cleanup": (200, 256)}


def test_every_rendered_job_is_checked():
    assert [p.name for p in JOB_FILES] == [f"jobforge-{p}.nomad.hcl" for p in ("build", "cleanup", "publish", "test")]


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
async def test_parse_rendered_job(http, path):
    phase = path.name.split("-")[1].split(".")[0]
    job, _ = await ok(http, "POST", "/v1/jobs/parse", {"JobHCL": path.read_text(), "Canonicalize": True})
    assert set(job) == set(sample("json-job-example.json")["Job"])
    assert (job["ID"], job["Name"], job["Type"]) == (f"jobforge-{phase}", f"jobforge-{phase}", "batch")
    required = ["job_id"] if phase == "cleanup" else ["job_id", "attempt"]
    assert job["ParameterizedJob"] == {"Payload": "required", "MetaRequired": required,
                                      "MetaOptional": ["owner", "control_nonce"]}
    (group,) = job["TaskGroups"]
    (task,) = group["Tasks"]
    assert set(task) == set(sample("json-job-example.json")["Job"]["TaskGroups"][0]["Tasks"][0])
    assert (task["Driver"], task["DispatchPayload"], task["Env"]) == ("docker", {"File": "payload.json"}, ENV)
    assert task["Config"]["args"] == [f"${{NOMAD_TASK_DIR}}/{phase}.py"]
    scripts = ROOT / "templates" / "tasks"
    modules = ["_common", *(["_cache", "_relay"] if phase == "build" else []), phase]  # the build's cache helpers
    assert [(t["DestPath"], t["Envvars"], t["ChangeMode"]) for t in task["Templates"]] == [
        (f"local/{name}.py", False, "noop") for name in modules]
    for tmpl, name in zip(task["Templates"], modules, strict=True):
        # docs/nomad.md: every `{{` of a script is written as `{{"{{"}}`; the heredoc keeps its last newline
        assert tmpl["EmbeddedTmpl"] == (scripts / f"{name}.py").read_text().replace("{{", '{{"{{"}}')
    assert (task["Resources"]["CPU"], task["Resources"]["MemoryMB"]) == RESOURCES[phase]
    assert task["KillTimeout"] == 30_000_000_000
    assert group["RestartPolicy"]["Attempts"] == 0 and group["ReschedulePolicy"]["Attempts"] == 0
    assert group["Volumes"]["buildah-cache"]["Type"] == "host"
    assert task["VolumeMounts"][0]["Destination"] == "/var/lib/jobforge/buildah"
    reply = await register(http, job)  # what the backend will do with it
    assert reply["EvalID"] == ""


async def test_parse_sample_and_canonicalize(http):
    request = sample("jobs-parse-request.json")
    job, _ = await ok(http, "POST", "/v1/jobs/parse", request)
    assert set(sample("jobs-parse-response.json")) <= set(job)
    assert (job["ID"], job["Region"], job["Namespace"], job["Priority"], job["Type"]) == (
        "example", "global", "default", 50, "service")
    raw, _ = await ok(http, "PUT", "/v1/jobs/parse", {**request, "Canonicalize": False})
    assert (raw["Region"], raw["Priority"], raw["TaskGroups"][0]["Count"]) == (None, None, None)


async def test_parse_refusals(http):
    status, _, body = await call(http, "POST", "/v1/jobs/parse", {"JobHCL": 'job "x" {\n  type = \n}'})
    assert status == 400 and body.startswith(b"Failed to parse job: ")
    status, _, body = await call(http, "POST", "/v1/jobs/parse", {"JobHCL": ""})
    assert (status, body) == (400, b"Job spec is empty")
    assert (await call(http, "GET", "/v1/jobs/parse"))[::2] == (405, b"Invalid method")


def vault_variant() -> str:
    """A test-phase variant with Vault credentials, a secret, a GPU and constraints (jobforge.nomad.render)."""
    from jobforge.nomad.render import RenderParams, render_job
    from jobforge.nomad.variants import variant_spec
    from tests.nomad.helpers import make_config

    config = make_config(
        registry_credentials_path="secret/nomad/jobs/registry-credentials",
        test={"entry_point": True, "gpu_required": True, "gpu_count": 2, "vault_policies": ["ml"],
              "vault_secrets": [{"path": "secret/data/ml/api-keys", "fields": {"hf-token": "HF_TOKEN"}}],
              "constraints": [{"attribute": "${meta.storage-type}", "operand": "is_set"},
                              {"attribute": "${node.datacenter}", "operand": "=", "value": "us-west-2"}]})
    return render_job("test", variant_spec("test", config),
                      RenderParams(vault_role="jobforge", datacenters=("us-west-2",)))


def gpu_node() -> Node:
    """A client the vault_variant() constraints, datacenter and GPU request can be placed on."""
    return Node(id=new_id(), name="gpu-1", datacenter="us-west-2", meta={"storage-type": "ssd", "gpu-capable": "true"},
                devices={"nvidia/gpu": 2})


async def test_parse_vault_gpu_constraint_variant(http):
    job, _ = await ok(http, "POST", "/v1/jobs/parse", {"JobHCL": vault_variant(), "Canonicalize": True})
    (group,) = job["TaskGroups"]
    (task,) = group["Tasks"]
    assert {k: task["Vault"][k] for k in ("Role", "ChangeMode", "Env", "DisableFile")} == {
        "Role": "jobforge", "ChangeMode": "noop", "Env": False, "DisableFile": True}
    assert group["Constraints"] == [
        {"LTarget": "${meta.storage-type}", "RTarget": "", "Operand": "is_set"},
        {"LTarget": "${node.datacenter}", "RTarget": "us-west-2", "Operand": "="},
        {"LTarget": "${meta.gpu-capable}", "RTarget": "true", "Operand": "="}]
    assert [(d["Name"], d["Count"]) for d in task["Resources"]["Devices"]] == [("nvidia/gpu", 2)]
    env_templates = [t for t in task["Templates"] if t["Envvars"]]
    assert [(t["DestPath"], t["Perms"]) for t in env_templates] == [("secrets/registry.env", "600"),
                                                                    ("secrets/vault-1.env", "600")]
    assert env_templates[1]["EmbeddedTmpl"].startswith('{{ with secret "secret/data/ml/api-keys" }}\n')


# ---------------------------------------------------------------- the runner hook ("docker driver")

async def test_runner_gets_payload_env_and_rendered_templates():
    seen: dict = {}

    async def runner(run: TaskRun, payload: bytes, env: dict) -> int:
        seen.update(payload=payload, env=env, file=Path(env["JOBFORGE_PAYLOAD"]).read_bytes(),
                    common=(run.task_dir / "_common.py").read_text(),
                    registry=(run.root / "secrets" / "registry.env").read_text(), config=run.config)
        run.write(b"building\n")
        run.write(b"ERROR: nothing to do\n", "stderr")
        return 0

    vault = FakeVault()
    vault.put("nomad/jobs/registry-credentials", {"username": "ci", "password": 'p"w#1'})
    vault.put("ml/api-keys", {"hf-token": "hf_123"})
    fake = FakeNomad(runner=runner, vault=vault, node=gpu_node())
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            job, _ = await ok(http, "POST", "/v1/jobs/parse", {"JobHCL": vault_variant(), "Canonicalize": True})
            await register(http, job)
            child = (await dispatch(http, job["ID"], b'{"phase": "test"}', {"job_id": "j1", "attempt": "1"}))
            await fake.settle()
            (alloc,) = fake.allocations(child["DispatchedJobID"])
            assert alloc["ClientStatus"] == "complete"
            _, _, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc['ID']}?task=test&type=stdout&plain=1")
            assert body == b"building\n"
    finally:
        await fake.stop()
    env = seen["env"]
    assert seen["payload"] == seen["file"] == b'{"phase": "test"}'
    assert env["JOBFORGE_PAYLOAD"] == env["NOMAD_TASK_DIR"] + "/payload.json"
    assert env["JOBFORGE_WORKDIR"] == env["NOMAD_ALLOC_DIR"] + "/work"
    assert (env["NOMAD_META_job_id"], env["NOMAD_META_attempt"]) == ("j1", "1")
    assert (env["JOBFORGE_JOB_REGISTRY_USERNAME"], env["JOBFORGE_JOB_REGISTRY_PASSWORD"],
            env["JOBFORGE_SECRET_HF_TOKEN"]) == ("ci", 'p"w#1', "hf_123")
    assert not {"REGISTRY_USERNAME", "REGISTRY_PASSWORD", "HF_TOKEN"} & set(env)
    assert seen["common"] == (ROOT / "templates" / "tasks" / "_common.py").read_text()  # byte for byte
    assert seen["registry"] == ('\nJOBFORGE_JOB_REGISTRY_USERNAME="ci"\n'  # Go trim markers
                                'JOBFORGE_JOB_REGISTRY_PASSWORD="p\\"w#1"\n\n')
    assert seen["config"]["args"] == [env["NOMAD_TASK_DIR"] + "/test.py"]


async def test_template_without_its_secret_fails_the_task():
    async def runner(run, payload, env):
        raise AssertionError("must not start")

    fake = FakeNomad(runner=runner, vault=FakeVault(), node=gpu_node())
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            job, _ = await ok(http, "POST", "/v1/jobs/parse", {"JobHCL": vault_variant(), "Canonicalize": True})
            await register(http, job)
            child = await dispatch(http, job["ID"], b"{}", {"job_id": "j1", "attempt": "1"})
            await fake.settle()
            (alloc,) = fake.allocations(child["DispatchedJobID"])
    finally:
        await fake.stop()
    state = alloc["TaskStates"]["test"]
    assert (alloc["ClientStatus"], state["Failed"], state["StartedAt"]) == ("failed", True, None)
    assert state["Events"][-1]["DisplayMessage"] == (
        "Template failed: vault.read(secret/nomad/jobs/registry-credentials): no secret exists at "
        "secret/data/nomad/jobs/registry-credentials")  # consul-template names the path it read: data/ inserted


async def test_stopping_a_job_kills_its_runner():
    started = asyncio.Event()

    async def runner(run: TaskRun, payload: bytes, env: dict) -> int:
        started.set()
        await run.killed.wait()
        run.write(b"terminated\n")
        return 143

    # the sample job's template reads Vault: give it the secret, or the task fails before it starts
    vault = FakeVault()
    vault.put("report-runner/config", {"db_password": "pw", "api_key": "k"})
    fake = FakeNomad(runner=runner, vault=vault)
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            await register(http, parameterized_job())
            child = (await dispatch(http, "report-runner", meta={"run_id": "1"}))["DispatchedJobID"]
            await asyncio.wait_for(started.wait(), TIMEOUT)
            (running,) = fake.allocations(child)
            assert running["ClientStatus"] == "running"
            await ok(http, "DELETE", f"/v1/job/{child}")
            await fake.settle()
            (alloc,) = fake.allocations(child)
    finally:
        await fake.stop()
    events = alloc["TaskStates"]["worker"]["Events"]
    assert [e["Type"] for e in events][-3:] == ["Killing", "Terminated", "Killed"]
    assert events[-3]["DisplayMessage"] == "Sent interrupt. Waiting 5s before force killing"
    assert events[-2]["ExitCode"] == 143
    assert (alloc["ClientStatus"], alloc["DesiredStatus"]) == ("complete", "stop")


@pytest.mark.parametrize(("payload", "exit_code", "stream", "text"), [
    ({"temp_image": "127.0.0.1:5000/hello:t1", "publish_targets": ["127.0.0.1:5000/hello:v1"]}, 0, "stdout",
     b"WARNING: keeping 127.0.0.1:5000/hello:t1"),
    ({}, 1, "stderr", b"ERROR: payload is missing 'temp_image'"),
])
async def test_subprocess_runner_runs_the_real_cleanup_script(payload, exit_code, stream, text):
    fake = FakeNomad(runner=subprocess_runner(python=sys.executable))
    await fake.start()
    try:
        async with aiohttp.ClientSession(fake.url) as http:
            job, _ = await ok(http, "POST", "/v1/jobs/parse",
                              {"JobHCL": (ROOT / "nomad-jobs" / "jobforge-cleanup.nomad.hcl").read_text()})
            await register(http, job)
            child = await dispatch(http, "jobforge-cleanup", json.dumps(payload).encode(), {"job_id": "j1"})
            await fake.settle()
            (alloc,) = fake.allocations(child["DispatchedJobID"])
            _, _, body = await call(http, "GET", f"/v1/client/fs/logs/{alloc['ID']}?task=cleanup&type={stream}"
                                                 "&plain=true")
    finally:
        await fake.stop()
    assert alloc["ClientStatus"] == ("complete" if exit_code == 0 else "failed")
    assert alloc["TaskStates"]["cleanup"]["Events"][3]["ExitCode"] == exit_code
    assert text in body


def test_serves_from_a_thread_for_subprocesses():
    fake = FakeNomad()
    with fake.in_thread() as url:
        request = urllib.request.Request(f"{url}/v1/jobs", data=json.dumps({"Job": parameterized_job()}).encode(),
                                         method="PUT")
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            assert json.load(resp)["EvalID"] == ""
        assert fake.call(lambda: fake.job("report-runner")["Status"]) == "running"
