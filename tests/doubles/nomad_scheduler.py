"""The fake Nomad's scheduler: what the servers do with an evaluation, plus node-loss and garbage collection.

One node, every group placed `Count` times at once. Each run is one plan-apply write (`PlanResult` events for
the stopped and placed allocations, and the Job when its status changes), then one write completing the eval
(`EvaluationUpdated`). A group the node cannot take (nomad_placement: datacenters, node pool, constraints, host
volumes, devices, free resources; a draining node takes nothing) is a failed placement: the eval completes with
`FailedTGAllocs` and a `blocked` eval waits until the node changes (`node_changed`) or `unblock`; a blocked eval
that still cannot place stays blocked. A job listed in `Cluster.unplaceable` always fails to place. Lost allocations are replaced in the same plan
(as Nomad does unless `prevent_reschedule_on_lost`); failed ones are not rescheduled (our jobs use
`reschedule { attempts = 0 }`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from tests.doubles.nomad_placement import infeasible
from tests.doubles.nomad_shapes import (
    ALLOC_KEYS,
    TERMINAL_CLIENT,
    alloc_resources,
    failed_tg_alloc,
    metrics,
    new_id,
    transition,
)

if TYPE_CHECKING:
    from tests.doubles.nomad_state import Cluster, JobKey


class Scheduler:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def process(self, eval_id: str) -> None:
        """Run the scheduler on one pending evaluation."""
        work, arg = self.cluster.work.pop(eval_id)
        ev = self.cluster.evals[eval_id]
        key = (ev["Namespace"], ev["JobID"])
        job = self.cluster.jobs.get(key)
        placed: list[str] = []
        stopped: list[str] = []
        failed: dict[str, Any] = {}
        if work == "migrate":
            alloc = self.cluster.allocs[arg]
            if alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] not in TERMINAL_CLIENT:
                stopped.append(arg)
                wanted = [("migrate", arg)] if job and not job["Stop"] else []
                wanted, failed = self._feasible(job, wanted, exclude=arg)
                placed = self._plan(key, job, wanted, stopped, "alloc is being migrated", eval_id)
        elif job is None or job["Stop"]:
            stopped = [a["ID"] for a in self.cluster.allocs_of(*key)
                       if a["DesiredStatus"] == "run" and a["ClientStatus"] not in TERMINAL_CLIENT]
            self._plan(key, job, [], stopped, "alloc not needed due to job update", eval_id)
        elif ev["JobID"] in self.cluster.unplaceable or job["ParentID"] in self.cluster.unplaceable:
            failed = {g["Name"]: failed_tg_alloc(self.cluster.datacenter) for g in job["TaskGroups"]}
        else:
            wanted = []
            for group in job["TaskGroups"]:
                have = [a for a in self.cluster.allocs_of(*key) if a["TaskGroup"] == group["Name"]
                        and a["DesiredStatus"] == "run" and a["ClientStatus"] != "lost"]
                wanted += [("new", (group["Name"], i)) for i in range(len(have), group["Count"])]
            wanted, failed = self._feasible(job, wanted)
            placed = self._plan(key, job, wanted, [], "", eval_id)
        if failed:
            self._block(ev, job, failed)
        else:
            idx = self.cluster.next_index()
            ev.update(Status="complete", ModifyIndex=idx, ModifyTime=self.cluster.clock())
            self.cluster.touch("evals", idx)
            events = [self.cluster.eval_event("EvaluationUpdated", ev, idx)]
            self.cluster.refresh(key, idx, "EvaluationUpdated", events)
            self.cluster.publish(idx, events)
        for alloc_id in stopped:
            self.cluster.on_stop(alloc_id)
        for alloc_id in placed:
            self.cluster.on_place(alloc_id)

    def _feasible(self, job: dict[str, Any] | None, wanted: list[tuple[str, Any]], exclude: str | None = None
                  ) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
        """Split the wanted placements into those the node can take and FailedTGAllocs for the rest."""
        if job is None:
            return wanted, {}
        used = self.cluster.used()
        if exclude is not None:  # the alloc being replaced gives its resources back
            res = self.cluster.allocs[exclude]["Resources"]
            used = {"cpu": used["cpu"] - res["CPU"], "memory": used["memory"] - res["MemoryMB"],
                    "disk": used["disk"] - res["DiskMB"]}
        fits, failed = [], {}
        for how, arg in wanted:
            name = self.cluster.allocs[arg]["TaskGroup"] if how in ("migrate", "replace") else arg[0]
            group = next(g for g in job["TaskGroups"] if g["Name"] == name)
            metric = failed.get(name) or infeasible(self.cluster.node, job, group, used)
            if metric is None:
                fits.append((how, arg))
                resources, _, _ = alloc_resources(group)
                used = {"cpu": used["cpu"] + resources["CPU"], "memory": used["memory"] + resources["MemoryMB"],
                        "disk": used["disk"] + resources["DiskMB"]}
            elif name in failed:
                metric["CoalescedFailures"] += 1
            else:
                failed[name] = metric
        return fits, failed

    def _plan(self, key: JobKey, job: dict[str, Any] | None, wanted: list[tuple[str, Any]], stop: list[str],
              why: str, eval_id: str = "") -> list[str]:
        """One plan-apply write: stop `stop`, place `wanted`; returns the new alloc IDs."""
        if not wanted and not stop:
            return []
        idx, now = self.cluster.next_index(), self.cluster.clock()
        events: list[dict[str, Any]] = []
        for alloc_id in stop:
            alloc = self.cluster.allocs[alloc_id]
            alloc.update(DesiredStatus="stop", DesiredDescription=why, ModifyIndex=idx, AllocModifyIndex=idx,
                         ModifyTime=now)
        new_ids = []
        for how, arg in wanted:
            previous = self.cluster.allocs[arg] if how in ("migrate", "replace") else None
            group_name, number = (previous["TaskGroup"], None) if previous else arg
            name = previous["Name"] if previous else f"{job['ID']}.{group_name}[{number}]"
            alloc = self._new_alloc(job, group_name, name, eval_id, idx, now)
            if previous:
                alloc["PreviousAllocation"] = previous["ID"]
                previous.update(NextAllocation=alloc["ID"], ModifyIndex=idx, ModifyTime=now)
                if previous["ID"] not in stop:
                    stop = [*stop, previous["ID"]]
            new_ids.append(alloc["ID"])
        for alloc_id in [*stop, *new_ids]:
            events.append(self.cluster.alloc_event("PlanResult", self.cluster.allocs[alloc_id], idx))
        self.cluster.touch("allocs", idx)
        self.cluster.refresh(key, idx, "PlanResult", events)
        self.cluster.publish(idx, events)
        return new_ids

    def _new_alloc(self, job: dict[str, Any], group_name: str, name: str, eval_id: str, idx: int,
                   now: int) -> dict[str, Any]:
        group = next(g for g in job["TaskGroups"] if g["Name"] == group_name)
        resources, shared, per_task = alloc_resources(group)
        node_id = self.cluster.node_id
        values = {"ID": new_id(), "Namespace": job["Namespace"], "EvalID": eval_id, "Name": name, "NodeID": node_id,
                  "NodeName": self.cluster.node_name, "JobID": job["ID"], "Job": None, "TaskGroup": group_name,
                  "Resources": resources, "SharedResources": shared, "TaskResources": per_task,
                  "Metrics": metrics(node_id, self.cluster.datacenter), "DesiredStatus": "run",
                  "DesiredDescription": "", "DesiredTransition": transition(), "ClientStatus": "pending",
                  "ClientDescription": "", "TaskStates": None, "DeploymentID": "", "FollowupEvalID": "",
                  "PreviousAllocation": "", "NextAllocation": "", "RescheduleTracker": None, "CreateIndex": idx,
                  "ModifyIndex": idx, "AllocModifyIndex": idx, "CreateTime": now, "ModifyTime": now}
        alloc = {k: values[k] for k in ALLOC_KEYS}
        self.cluster.add_alloc(alloc, copy.deepcopy(job))
        return alloc

    def _block(self, ev: dict[str, Any], job: dict[str, Any], failed: dict[str, Any]) -> None:
        """A placement failure: the eval completes with FailedTGAllocs and a blocked eval waits for capacity
        (a blocked eval that still fails stays blocked, as Nomad reuses it)."""
        idx, now = self.cluster.next_index(), self.cluster.clock()
        if ev["TriggeredBy"] == "queued-allocs":
            ev.update(Status="blocked", ModifyIndex=idx, ModifyTime=now, FailedTGAllocs=failed)
            self.cluster.touch("evals", idx)
            self.cluster.publish(idx, [self.cluster.eval_event("EvaluationUpdated", ev, idx)])
            return
        blocked = self.cluster.new_eval({"ID": new_id(), "TriggeredBy": "queued-allocs"}, job, idx, now, "place",
                                        status="blocked")
        blocked["PreviousEval"] = ev["ID"]
        ev.update(Status="complete", ModifyIndex=idx, ModifyTime=now, BlockedEval=blocked["ID"],
                  FailedTGAllocs=failed)
        events = [self.cluster.eval_event("EvaluationUpdated", e, idx) for e in (ev, blocked)]
        self.cluster.refresh((job["Namespace"], job["ID"]), idx, "EvaluationUpdated", events)
        self.cluster.publish(idx, events)

    def unblock(self, job_id: str | None = None) -> None:
        """Capacity came back: blocked evals of `job_id` (or of its children; all when None) run again."""
        if job_id is not None:
            self.cluster.unplaceable.discard(job_id)
        for ev in list(self.cluster.evals.values()):
            job = self.cluster.jobs.get((ev["Namespace"], ev["JobID"]))
            if ev["Status"] == "blocked" and job and (job_id is None or job_id in (job["ID"], job["ParentID"])):
                idx = self.cluster.next_index()
                ev.update(Status="pending", ModifyIndex=idx)
                self.cluster.work[ev["ID"]] = ("place", None)
                self.cluster.publish(idx, [self.cluster.eval_event("EvaluationUpdated", ev, idx)])
                self.cluster.schedule(ev["ID"])

    # ------------------------------------------------------------ allocation lifecycle

    def lose(self, alloc_id: str, replace: bool = True) -> str | None:
        """The node stopped heartbeating: the alloc is `lost`, and (by default) replaced in the same plan."""
        alloc = self.cluster.allocs[alloc_id]
        key = (alloc["Namespace"], alloc["JobID"])
        job = self.cluster.jobs.get(key)
        alloc.update(ClientStatus="lost", ClientDescription="")
        wanted = [("replace", alloc_id)] if replace and job is not None and not job["Stop"] else []
        placed = self._plan(key, job, wanted, [alloc_id], "alloc is lost since its node is down")
        self.cluster.on_stop(alloc_id)
        for new in placed:
            self.cluster.on_place(new)
        return placed[0] if placed else None

    def gc(self) -> list[str]:
        """Garbage-collect dead jobs (and their evals/allocs), as the periodic core job would."""
        gone = [key for key, job in self.cluster.jobs.items()
                if job["Status"] == "dead" and all(a["ClientStatus"] in TERMINAL_CLIENT or a["DesiredStatus"] != "run"
                                                   for a in self.cluster.allocs_of(*key))]
        if not gone:
            return []
        idx = self.cluster.next_index()
        for key in gone:
            del self.cluster.jobs[key]
            self.cluster.payloads.pop(key, None)
            for alloc in self.cluster.allocs_of(*key):
                del self.cluster.allocs[alloc["ID"]]
                del self.cluster.alloc_jobs[alloc["ID"]]
            for ev in self.cluster.evals_of({"Namespace": key[0], "ID": key[1]}):
                del self.cluster.evals[ev["ID"]]
        for table in self.cluster.tables:
            self.cluster.touch(table, idx)
        self.cluster.publish(idx, [])
        return [job_id for _, job_id in gone]
