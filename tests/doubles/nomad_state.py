"""The fake Nomad's server side: jobs, evaluations, allocations, one Raft-like index and the event buffer.

Every write takes the next index and publishes the events of that index as one batch (reference §11):
register/dispatch `JobRegistered` (Job, and the Evaluation created in the same write), the dispatch's own eval
write `EvaluationUpdated`, scheduler placements/stops `PlanResult` (Allocation, and Job when its status
changes), client updates `AllocationUpdated`, alloc stop `AllocationUpdateDesiredStatus`, job stop
`JobDeregistered` (a purge deletes the job row: only the eval's event). The "scheduler" places every group
`Count` times on one fake node, at once (or when the test calls `place`). Job status follows the state
store's getJobStatus. Errors are raised as `Refused` with the server's texts (HTTP 500 unless the agent
maps them). Not modelled: deployments, rescheduling of failed allocs (our jobs use `attempts = 0`), job
versions history, GC by time (`gc()` does it on demand).
"""

from __future__ import annotations

import base64
import copy
import pickle
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from tests.doubles.nomad_jobspec import canonicalize
from tests.doubles.nomad_placement import Node
from tests.doubles.nomad_scheduler import Scheduler
from tests.doubles.nomad_shapes import (
    CLIENT_DESCRIPTION,
    DISPATCH_PAYLOAD_LIMIT,
    TERMINAL_CLIENT,
    Refused,
    client_status,
    evaluation,
    go_list,
    multierror,
    new_id,
    snappy_block,
)

JobKey = tuple[str, str]


class Dispatched(NamedTuple):
    """One accepted `POST /v1/job/:id/dispatch`: the parent, the request's meta and token, the child it names."""

    parent: str
    meta: dict[str, str]
    token: str
    child: str
    new: bool
_SERVER_FIELDS = ("Status", "StatusDescription", "Version", "Stable", "CreateIndex", "ModifyIndex",
                  "JobModifyIndex", "SubmitTime", "VaultToken", "ConsulToken", "NomadTokenID")


def snapshot(value: Any) -> Any:
    """A deep copy of plain JSON-shaped data (what `copy.deepcopy` gives, in a third of the time)."""
    return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))


def is_parameterized(job: dict[str, Any]) -> bool:
    return job.get("ParameterizedJob") is not None and not job.get("Dispatched")


class Cluster:
    def __init__(self, *, clock: Callable[[], int], region: str = "global", datacenter: str = "dc1",
                 event_buffer_size: int = 100) -> None:
        self.clock, self.region = clock, region
        self.node = Node(id=new_id(), name="fake-client-1", datacenter=datacenter)
        self.index = 0
        self.jobs: dict[JobKey, dict[str, Any]] = {}
        self.payloads: dict[JobKey, bytes] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.alloc_jobs: dict[str, dict[str, Any]] = {}  # the alloc's copy of its job, as placed
        # Indexes by job (as the state store's), so a read or a write about one job never scans them all; rows
        # deleted from the tables above are skipped on read.
        self._allocs_by_job: dict[JobKey, dict[str, None]] = {}
        self._evals_by_job: dict[JobKey, dict[str, None]] = {}
        self._children: dict[JobKey, dict[str, None]] = {}
        self._tokens: dict[tuple[str, str, str], str] = {}  # (ns, parent, idempotency token) -> child
        self._live: dict[str, None] = {}  # allocations that may still take the node's resources
        self.tables = {"jobs": 0, "evals": 0, "allocs": 0}
        self.buffer: deque[dict[str, Any]] = deque(maxlen=event_buffer_size)
        self.evicted_upto = 0
        self.auto_place = True
        self.unplaceable: set[str] = set()
        self.work: dict[str, tuple[str, Any]] = {}  # pending eval -> what the scheduler does with it
        self.scheduler = Scheduler(self)
        self.on_change: Callable[[], None] = lambda: None
        self.on_place: Callable[[str], None] = lambda alloc_id: None
        self.on_stop: Callable[[str], None] = lambda alloc_id: None
        self.on_publish: Callable[[int, list[dict[str, Any]]], None] = lambda idx, events: None  # observers
        self.dispatch_log: list[Dispatched] = []
        """Every accepted dispatch request, in order, an idempotent repeat included (`new` False)."""

    @property
    def datacenter(self) -> str:
        return self.node.datacenter

    @property
    def node_id(self) -> str:
        return self.node.id

    @property
    def node_name(self) -> str:
        return self.node.name

    def used(self) -> dict[str, int]:
        """CPU, memory and disk the node's live allocations take (what binpacking subtracts)."""
        live = []
        for alloc_id in list(self._live):  # an allocation once stopped or terminal never runs again: dropped
            alloc = self.allocs.get(alloc_id)
            if alloc is not None and alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] not in TERMINAL_CLIENT:
                live.append(alloc)
            else:
                del self._live[alloc_id]
        return {"cpu": sum(a["Resources"]["CPU"] for a in live),
                "memory": sum(a["Resources"]["MemoryMB"] for a in live),
                "disk": sum(a["Resources"]["DiskMB"] for a in live)}

    # ------------------------------------------------------------ writes and events

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def publish(self, idx: int, events: list[dict[str, Any]]) -> None:
        if events:
            if len(self.buffer) == self.buffer.maxlen:
                self.evicted_upto = self.buffer[0]["Index"]
            self.buffer.append({"Index": idx, "Events": snapshot(events)})
            self.on_publish(idx, events)
        self.on_change()

    def event(self, topic: str, kind: str, key: str, ns: str, filter_keys: list[str] | None, idx: int,
               payload: dict[str, Any]) -> dict[str, Any]:
        return {"Topic": topic, "Type": kind, "Key": key, "Namespace": ns, "FilterKeys": filter_keys,
                "Index": idx, "Payload": payload}

    def job_event(self, kind: str, job: dict[str, Any], idx: int) -> dict[str, Any]:
        """The stored job: a dispatched payload stays snappy-compressed here (only the read endpoint decodes)."""
        payload = self.payloads.get((job["Namespace"], job["ID"]))
        view = {**self.job_view(job), "Payload": base64.b64encode(snappy_block(payload)).decode() if payload else None}
        return self.event("Job", kind, job["ID"], job["Namespace"], None, idx, {"Job": view})

    def alloc_event(self, kind: str, alloc: dict[str, Any], idx: int) -> dict[str, Any]:
        return self.event("Allocation", kind, alloc["ID"], alloc["Namespace"], [alloc["JobID"], ""], idx,
                           {"Allocation": {**alloc, "Job": None}})

    def eval_event(self, kind: str, ev: dict[str, Any], idx: int) -> dict[str, Any]:
        return self.event("Evaluation", kind, ev["ID"], ev["Namespace"], [ev["JobID"], ""], idx,
                           {"Evaluation": dict(ev)})

    def touch(self, table: str, idx: int) -> None:
        self.tables[table] = idx

    # ------------------------------------------------------------ reads

    def job(self, ns: str, job_id: str) -> dict[str, Any] | None:
        return self.jobs.get((ns, job_id))

    def job_view(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job as GET /v1/job/:id shows it: the payload decompressed and base64-encoded."""
        payload = self.payloads.get((job["Namespace"], job["ID"]))
        return {**snapshot(job), "Payload": base64.b64encode(payload).decode() if payload else None}

    def add_alloc(self, alloc: dict[str, Any], job: dict[str, Any]) -> None:
        self.allocs[alloc["ID"]] = alloc
        self.alloc_jobs[alloc["ID"]] = job
        self._live[alloc["ID"]] = None
        self._allocs_by_job.setdefault((alloc["Namespace"], alloc["JobID"]), {})[alloc["ID"]] = None

    def allocs_of(self, ns: str, job_id: str) -> list[dict[str, Any]]:
        ids = self._allocs_by_job.get((ns, job_id), {})
        return sorted((a for a in map(self.allocs.get, ids) if a is not None and a["JobID"] == job_id
                       and a["Namespace"] == ns), key=lambda a: a["CreateIndex"])

    def alloc_view(self, alloc: dict[str, Any]) -> dict[str, Any]:
        return {**copy.deepcopy(alloc), "Job": self.job_view(self.alloc_jobs[alloc["ID"]])}

    def children(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        ns = job["Namespace"]
        kids = (self.jobs.get((ns, kid)) for kid in self._children.get((ns, job["ID"]), {}))
        return [j for j in kids if j is not None and j["ParentID"] == job["ID"]]

    def summary(self, job: dict[str, Any]) -> dict[str, Any]:
        groups = {tg["Name"]: {"Queued": 0, "Complete": 0, "Failed": 0, "Running": 0, "Starting": 0, "Lost": 0,
                               "Unknown": 0} for tg in job.get("TaskGroups") or []}
        allocs = self.allocs_of(job["Namespace"], job["ID"])
        column = {"pending": "Starting", "running": "Running", "complete": "Complete", "failed": "Failed",
                  "lost": "Lost", "unknown": "Unknown"}
        for alloc in allocs:
            if alloc["TaskGroup"] in groups:
                groups[alloc["TaskGroup"]][column[alloc["ClientStatus"]]] += 1
        if any(e["Status"] == "blocked" for e in self.evals_of(job)):
            for group in job.get("TaskGroups") or []:
                placed = sum(1 for a in allocs if a["TaskGroup"] == group["Name"] and a["DesiredStatus"] == "run")
                groups[group["Name"]]["Queued"] = max(group["Count"] - placed, 0)
        kids = self.children(job)
        counts = {"Pending": 0, "Running": 0, "Dead": 0}
        for kid in kids:
            counts[kid["Status"].capitalize()] += 1
        modify = max([job["ModifyIndex"]] + [a["ModifyIndex"] for a in allocs] + [k["ModifyIndex"] for k in kids])
        return {"JobID": job["ID"], "Namespace": job["Namespace"], "Summary": groups, "Children": counts,
                "CreateIndex": job["CreateIndex"], "ModifyIndex": modify}

    def evals_of(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        ids = self._evals_by_job.get((job["Namespace"], job["ID"]), {})
        return [e for e in map(self.evals.get, ids) if e is not None and e["JobID"] == job["ID"]
                and e["Namespace"] == job["Namespace"]]

    def status(self, job: dict[str, Any]) -> str:
        """nomad/state getJobStatus."""
        if job["Type"] == "system" or is_parameterized(job) or job.get("Periodic") is not None:
            return "dead" if job["Stop"] else "running"
        allocs = self.allocs_of(job["Namespace"], job["ID"])
        if any(a["DesiredStatus"] == "run" and a["ClientStatus"] not in TERMINAL_CLIENT for a in allocs):
            return "running"
        evals = self.evals_of(job)
        if any(e["Status"] in ("pending", "blocked") for e in evals):
            return "pending"
        return "dead" if evals or allocs else "pending"

    def refresh(self, job_key: JobKey, idx: int, kind: str, events: list[dict[str, Any]]) -> None:
        job = self.jobs.get(job_key)
        if job is None:
            return
        status = self.status(job)
        if status != job["Status"]:
            job["Status"], job["ModifyIndex"] = status, idx
            self.touch("jobs", idx)
            events.append(self.job_event(kind, job, idx))

    # ------------------------------------------------------------ register

    def register(self, job: dict[str, Any], *, enforce: bool = False, enforce_index: int = 0) -> dict[str, Any]:
        job = self._server_canonical(canonicalize(job))
        self._validate(job)
        key = (job["Namespace"], job["ID"])
        existing = self.jobs.get(key)
        if enforce:
            if existing is not None and enforce_index == 0:
                raise Refused(500, "Enforcing job modify index 0: job already exists")
            if existing is not None and enforce_index != existing["JobModifyIndex"]:
                raise Refused(500, f"Enforcing job modify index {enforce_index}: job exists with conflicting "
                                   f"job modify index: {existing['JobModifyIndex']}")
            if existing is None and enforce_index != 0:
                raise Refused(500, f"Enforcing job modify index {enforce_index}: job does not exist")
        _validate_update(existing, job)
        now = self.clock()
        ev = None
        if not (is_parameterized(job) or job.get("Periodic") is not None):
            ev = {"ID": new_id(), "TriggeredBy": "job-register"}
        changed = existing is None or _spec(existing) != _spec(job)
        reply = {"EvalID": ev["ID"] if ev else "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Warnings": "",
                 "Index": 0, "LastContact": 0, "KnownLeader": False}
        events: list[dict[str, Any]] = []
        if changed:
            idx = self.next_index()
            job.update(Version=existing["Version"] + 1 if existing else 0, Stable=False, SubmitTime=now,
                       CreateIndex=existing["CreateIndex"] if existing else idx, ModifyIndex=idx, JobModifyIndex=idx,
                       Status="")
            self.jobs[key] = job
            self.payloads.pop(key, None)
            self.touch("jobs", idx)
            if ev:
                self.new_eval(ev, job, idx, now, "place")
            job["Status"] = self.status(job)
            events.append(self.job_event("JobRegistered", job, idx))
            if ev:
                events.append(self.eval_event("JobRegistered", self.evals[ev["ID"]], idx))
            reply.update(JobModifyIndex=idx, Index=idx, EvalCreateIndex=idx if ev else 0)
            self.publish(idx, events)
        else:
            reply["JobModifyIndex"] = existing["JobModifyIndex"]
            if ev:
                idx = self.next_index()
                self.new_eval(ev, existing, idx, now, "place")
                events.append(self.eval_event("EvaluationUpdated", self.evals[ev["ID"]], idx))
                self.refresh(key, idx, "EvaluationUpdated", events)
                reply.update(EvalCreateIndex=idx, Index=idx)
                self.publish(idx, events)
        if ev:
            self.schedule(ev["ID"])
        return reply

    def _server_canonical(self, job: dict[str, Any]) -> dict[str, Any]:
        """What the server's canonicalizer/mutators add on top of the api's Canonicalize."""
        if job["Region"] in ("", "global"):
            job["Region"] = self.region
        job["NodePool"] = job["NodePool"] or "default"
        job["Datacenters"] = job["Datacenters"] or ["*"]
        if job.get("ParameterizedJob") is not None and not job["ParameterizedJob"].get("Payload"):
            job["ParameterizedJob"]["Payload"] = "optional"
        job["Dispatched"] = bool(job.get("Dispatched"))
        job["DispatchIdempotencyToken"] = job.get("DispatchIdempotencyToken") or ""
        job.update(VaultToken="", ConsulToken="")
        return job

    def _validate(self, job: dict[str, Any]) -> None:
        """A subset of structs.Job.Validate, with its texts; HTTP 500 (admission validator)."""
        errors: list[str] = []
        if not job["ID"]:
            errors.append("Missing job ID")
        elif " " in job["ID"]:
            errors.append("Job ID contains a space")
        if not job["Name"]:
            errors.append("Missing job name")
        if job["Type"] not in ("service", "batch", "system", "sysbatch"):
            errors.append(f'Invalid job type: "{job["Type"]}"')
        if not 1 <= job["Priority"] <= 100:
            errors.append("Job priority must be between [1, 100]")
        if not job.get("TaskGroups"):
            errors.append("Missing job task groups")
        for group in job.get("TaskGroups") or []:
            inner = [] if group.get("Tasks") else ["Missing tasks for task group"]
            for task in group.get("Tasks") or []:
                if not task.get("Driver"):
                    inner.append(f"Task {task.get('Name')} validation failed: {multierror(['Missing task driver'])}")
            if inner:
                errors.append(f"Task group {group['Name']} validation failed: {multierror(inner)}")
        if is_parameterized(job):
            if job["Type"] not in ("batch", "sysbatch"):
                errors.append('Parameterized job can only be used with "batch" or "sysbatch" scheduler')
            config, inner = job["ParameterizedJob"], []
            if config["Payload"] not in ("optional", "required", "forbidden"):
                inner.append(f'Unknown payload requirement: "{config["Payload"]}"')
            both = set(config.get("MetaRequired") or []) & set(config.get("MetaOptional") or [])
            if both:
                inner.append(f"Required and optional meta keys should be disjoint. Following keys exist in both: "
                             f"{go_list(list(both))}")
            if inner:
                errors.append(multierror(inner))
        if job["Dispatched"] and (job["Namespace"], job["ID"]) not in self.jobs:
            errors.append("job can't be submitted with 'Dispatched' set")
        if errors:
            raise Refused(500, multierror(errors))

    def new_eval(self, ev: dict[str, Any], job: dict[str, Any], idx: int, now: int, work: str,
                  arg: Any = None, status: str = "pending", eval_type: str | None = None) -> dict[str, Any]:
        stored = evaluation(ev["ID"], job, triggered_by=ev["TriggeredBy"], status=status, index=idx, now=now,
                            job_modify_index=job["JobModifyIndex"], eval_type=eval_type)
        self.evals[ev["ID"]] = stored
        self._evals_by_job.setdefault((stored["Namespace"], stored["JobID"]), {})[ev["ID"]] = None
        self.touch("evals", idx)
        if status == "pending":
            self.work[ev["ID"]] = (work, arg)
        return stored

    # ------------------------------------------------------------ dispatch

    def dispatch(self, ns: str, parent_id: str, payload: bytes, meta: dict[str, str], prefix: str,
                 token: str) -> dict[str, Any]:
        parent = self.jobs.get((ns, parent_id))
        if parent is None:
            raise Refused(500, "parameterized job not found")
        if not is_parameterized(parent):
            raise Refused(500, f'Specified job "{parent_id}" is not a parameterized job')
        if parent["Stop"]:
            raise Refused(500, f'Specified job "{parent_id}" is stopped')
        _validate_dispatch(parent["ParameterizedJob"], payload, meta)
        if token:
            kid = self.jobs.get((ns, self._tokens.get((ns, parent_id, token), "")))
            if kid is not None and kid["ParentID"] == parent_id and kid["DispatchIdempotencyToken"] == token:
                self.dispatch_log.append(Dispatched(parent_id, dict(meta), token, kid["ID"], new=False))
                return {"Index": kid["ModifyIndex"], "JobCreateIndex": kid["CreateIndex"], "EvalCreateIndex": 0,
                        "EvalID": "", "DispatchedJobID": kid["ID"]}
        now = self.clock()
        child = copy.deepcopy(parent)
        middle = f"{prefix}-" if prefix else ""
        child_id = f"{parent_id}/dispatch-{middle}{now // 1_000_000_000}-{new_id()[:8]}"
        idx = self.next_index()
        child.update(ID=child_id, Name=child_id, ParentID=parent_id, Dispatched=True, Status="",
                     StatusDescription="", DispatchIdempotencyToken=token, SubmitTime=now,
                     Meta={**(parent.get("Meta") or {}), **meta} or None, Version=0, Stable=False,
                     CreateIndex=idx, ModifyIndex=idx, JobModifyIndex=idx)
        key = (ns, child_id)
        self.dispatch_log.append(Dispatched(parent_id, dict(meta), token, child_id, new=True))
        self.jobs[key] = child
        self._children.setdefault((ns, parent_id), {})[child_id] = None
        if token:
            self._tokens[(ns, parent_id, token)] = child_id
        if payload:
            self.payloads[key] = payload
        self.touch("jobs", idx)
        child["Status"] = self.status(child)
        self.publish(idx, [self.job_event("JobRegistered", child, idx)])
        reply = {"Index": idx, "JobCreateIndex": idx, "EvalCreateIndex": 0, "EvalID": "",
                 "DispatchedJobID": child_id}
        if child.get("Periodic") is None:
            ev_idx = self.next_index()
            ev = self.new_eval({"ID": new_id(), "TriggeredBy": "job-register"}, child, ev_idx, now, "place")
            events = [self.eval_event("EvaluationUpdated", ev, ev_idx)]
            self.refresh(key, ev_idx, "EvaluationUpdated", events)
            self.publish(ev_idx, events)
            reply.update(Index=ev_idx, EvalCreateIndex=ev_idx, EvalID=ev["ID"])
            self.schedule(ev["ID"])
        return reply

    # ------------------------------------------------------------ deregister

    def deregister(self, ns: str, job_id: str, purge: bool) -> dict[str, Any]:
        job = self.jobs.get((ns, job_id))
        if job is None:
            return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Index": 0}
        now, idx = self.clock(), self.next_index()
        ev = None
        if not (is_parameterized(job) or job.get("Periodic") is not None):
            ev = self.new_eval({"ID": new_id(), "TriggeredBy": "job-deregister"}, job, idx, now, "stop",
                                eval_type="service")
        events: list[dict[str, Any]] = []
        if purge:
            del self.jobs[(ns, job_id)]
            self.payloads.pop((ns, job_id), None)
        else:
            job.update(Stop=True, Version=job["Version"] + 1, JobModifyIndex=idx, ModifyIndex=idx, SubmitTime=now)
            job["Status"] = self.status(job)
            events.append(self.job_event("JobDeregistered", job, idx))
        self.touch("jobs", idx)
        if ev:
            events.append(self.eval_event("JobDeregistered", ev, idx))
        self.publish(idx, events)
        if ev:
            self.schedule(ev["ID"])
        return {"EvalID": ev["ID"] if ev else "", "EvalCreateIndex": idx, "JobModifyIndex": idx, "Index": idx}

    # ------------------------------------------------------------ scheduling and the client's updates

    def schedule(self, eval_id: str) -> None:
        if self.auto_place:
            self.scheduler.process(eval_id)

    def pending_evals(self) -> list[str]:
        return list(self.work)

    def stop_alloc(self, alloc_id: str, triggered_by: str = "alloc-stop") -> dict[str, Any]:
        alloc = self.allocs.get(alloc_id)
        if alloc is None:
            raise Refused(404, "alloc not found")
        job = self.alloc_jobs[alloc_id]
        idx, now = self.next_index(), self.clock()
        alloc.update(DesiredTransition={**alloc["DesiredTransition"], "Migrate": True}, ModifyIndex=idx,
                     ModifyTime=now)
        current = self.jobs.get((alloc["Namespace"], alloc["JobID"])) or job
        ev = self.new_eval({"ID": new_id(), "TriggeredBy": triggered_by}, current, idx, now, "migrate", alloc_id)
        self.touch("allocs", idx)
        self.publish(idx, [self.alloc_event("AllocationUpdateDesiredStatus", alloc, idx),
                            self.eval_event("AllocationUpdateDesiredStatus", ev, idx)])
        self.schedule(ev["ID"])
        return {"EvalID": ev["ID"], "Index": idx}

    def client_update(self, alloc_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        """One update from the client: `change` edits the alloc's TaskStates; the status follows from them."""
        alloc = self.allocs[alloc_id]
        change(alloc)
        if alloc["ClientStatus"] != "lost":
            alloc["ClientStatus"] = client_status(alloc["TaskStates"] or {})
            alloc["ClientDescription"] = CLIENT_DESCRIPTION[alloc["ClientStatus"]]
        idx = self.next_index()
        alloc.update(ModifyIndex=idx, ModifyTime=self.clock())
        self.touch("allocs", idx)
        events = [self.alloc_event("AllocationUpdated", alloc, idx)]
        self.refresh((alloc["Namespace"], alloc["JobID"]), idx, "AllocationUpdated", events)
        self.publish(idx, events)

def _spec(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in _SERVER_FIELDS}


def _validate_update(old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    if old is None:
        return
    checks = [(old["Type"] != new["Type"], f'cannot update job from type "{old["Type"]}" to "{new["Type"]}"'),
              (old.get("Periodic") is not None and new.get("Periodic") is None,
               "cannot update periodic job to being non-periodic"),
              (new.get("Periodic") is not None and old.get("Periodic") is None,
               "cannot update non-periodic job to being periodic"),
              (is_parameterized(old) and not is_parameterized(new),
               "cannot update parameterized job to being non-parameterized"),
              (is_parameterized(new) and not is_parameterized(old),
               "cannot update non-parameterized job to being parameterized"),
              (old["Dispatched"] != new["Dispatched"], "field 'Dispatched' is read-only")]
    for failed, text in checks:
        if failed:
            raise Refused(500, text)


def _validate_dispatch(config: dict[str, Any], payload: bytes, meta: dict[str, str]) -> None:
    """nomad/job_endpoint.go validateDispatchRequest."""
    if config["Payload"] == "required" and not payload:
        raise Refused(500, "Payload is not provided but required by parameterized job")
    if config["Payload"] == "forbidden" and payload:
        raise Refused(500, "Payload provided but forbidden by parameterized job")
    if len(payload) > DISPATCH_PAYLOAD_LIMIT:
        raise Refused(500, f"Payload exceeds maximum size; {len(payload)} > {DISPATCH_PAYLOAD_LIMIT}")
    required, optional = set(config.get("MetaRequired") or []), set(config.get("MetaOptional") or [])
    unpermitted = [k for k in meta if k not in required | optional]
    if unpermitted:
        raise Refused(500, f"Dispatch request included unpermitted metadata keys: {go_list(unpermitted)}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise Refused(500, f"Dispatch did not provide required meta keys: {go_list(missing)}")
