"""Wire shapes and Go-isms for the fake Nomad (tests/doubles/nomad.py): pure functions, no I/O, no state.

Field lists follow shared/reference/nomad-samples (allocation.json, job-allocations.json, allocations-list.json,
jobs-list.json, job-summary.json and the constructed event-stream-allocation-event.json); display messages and
the error texts follow the Nomad source as quoted in shared/reference/nomad-api.md.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

SECOND = 1_000_000_000
DISPATCH_PAYLOAD_LIMIT = 16 * 1024
ZERO_TIME = None  # newer agents send null for a zero TaskState time (reference §0)

# Allocation client statuses and what the alloc's ClientDescription says (client/allocrunner).
TERMINAL_CLIENT = ("complete", "failed", "lost")
CLIENT_DESCRIPTION = {"pending": "No tasks have started", "running": "Tasks are running",
                      "complete": "All tasks have completed", "failed": "Failed tasks", "lost": ""}

# Keys, in order, of the shapes the fake writes. ALLOC_KEYS = allocation.json plus the event sample's extras.
ALLOC_KEYS = ("ID", "Namespace", "EvalID", "Name", "NodeID", "NodeName", "JobID", "Job", "TaskGroup",
              "Resources", "SharedResources", "TaskResources", "Metrics", "DesiredStatus", "DesiredDescription",
              "DesiredTransition", "ClientStatus", "ClientDescription", "TaskStates", "DeploymentID",
              "FollowupEvalID", "PreviousAllocation", "NextAllocation", "RescheduleTracker", "CreateIndex",
              "ModifyIndex", "AllocModifyIndex", "CreateTime", "ModifyTime")
# AllocListStub: job-allocations.json united with allocations-list.json (the newer field set).
ALLOC_STUB_KEYS = ("ID", "EvalID", "Name", "Namespace", "NodeID", "NodeName", "JobID", "JobType", "JobVersion",
                   "TaskGroup", "DesiredStatus", "DesiredDescription", "DesiredTransition", "ClientStatus",
                   "ClientDescription", "TaskStates", "DeploymentStatus", "FollowupEvalID", "PreviousAllocation",
                   "NextAllocation", "RescheduleTracker", "PreemptedAllocations", "PreemptedByAllocation",
                   "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime")
# JobListStub (api/jobs.go); `Meta` only with ?meta=true.
JOB_STUB_KEYS = ("ID", "ParentID", "Name", "Namespace", "Datacenters", "NodePool", "Type", "Priority", "Periodic",
                 "ParameterizedJob", "Stop", "Status", "StatusDescription", "JobSummary", "CreateIndex",
                 "ModifyIndex", "JobModifyIndex", "SubmitTime")

# TaskEvent.DisplayMessage as structs.TaskEvent.PopulateEventDisplayMessage builds it, for the types we emit.
_DISPLAY = {"Received": "Task received by client", "Started": "Task started by client",
            "Killed": "Task successfully killed"}


def new_id() -> str:
    """A UUID, the format of Nomad's eval and alloc IDs."""
    return str(uuid.uuid4())


class Refused(Exception):
    """An HTTP error the agent answers with: plain-text body `text` and `status`."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


def multierror(errors: list[str]) -> str:
    """hashicorp/go-multierror's ListFormatFunc."""
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t".join(f"* {e}" for e in errors)
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


def go_list(items: list[str]) -> str:
    """fmt's %v of a []string: `[a b]` (sorted here: Go builds these lists from a map, in random order)."""
    return "[" + " ".join(sorted(items)) + "]"


def compact(value: Any) -> bytes:
    """Go's encoding/json output: minified, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def rfc3339(ns: int | None) -> str | None:
    """Go's time.RFC3339Nano in UTC (trailing zeros of the fraction dropped)."""
    if ns is None:
        return ZERO_TIME
    stamp = datetime.fromtimestamp(ns // SECOND, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{ns % SECOND:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def snappy_block(data: bytes) -> bytes:
    """A valid snappy block (github.com/golang/snappy Encode format) holding `data` as literals only: what the
    server stores in a dispatched job's Payload and what the event stream therefore carries (only the job
    read endpoint decompresses it). Decoders accept it; Go's encoder would also emit copies."""
    out, n = bytearray(), len(data)
    while True:  # uvarint of the decoded length
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    for start in range(0, len(data), 65536):
        chunk = data[start:start + 65536]
        size = len(chunk) - 1
        if size < 60:
            out.append(size << 2)
        elif size < 256:
            out += bytes([60 << 2, size])
        else:
            out += bytes([61 << 2]) + size.to_bytes(2, "little")
        out += chunk
    return bytes(out)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": SECOND, "m": 60 * SECOND, "h": 3600 * SECOND}


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration, in nanoseconds; raises ValueError with Go's message."""
    body = text[1:] if text[:1] in "+-" else text
    parts = _DURATION.findall(body)
    if body == "0":
        return 0
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f'time: invalid duration "{text}"')
    total = sum(round(float(n) * _UNIT_NS[u]) for n, u in parts)
    return -total if text.startswith("-") else total


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


_CANONICAL = re.compile(r"[A-Za-z0-9+/]*")


def go_b64decode(text: str) -> bytes:
    """encoding/base64 StdEncoding.Decode as encoding/json uses it for []byte (so the error names Go's byte
    offset, e.g. the docs' sample "A28C3==" fails at byte 5). Raises ValueError("illegal base64 data ...")."""
    body = text.rstrip("=")
    if len(text) % 4 == 0 and len(text) - len(body) <= 2 and _CANONICAL.fullmatch(body):
        return base64.b64decode(text)  # well-formed: Go decodes it the same (the byte loop below is for errors)
    src, out, si = text.encode("latin-1", "replace"), bytearray(), 0

    def corrupt(pos: int) -> ValueError:
        return ValueError(f"illegal base64 data at input byte {pos}")

    while True:
        quantum, dlen = [0, 0, 0, 0], 4
        j = 0
        while j < 4:
            if si == len(src):
                if j == 0:
                    return bytes(out)
                raise corrupt(si - j)
            char = chr(src[si])
            si += 1
            if char in _B64:
                quantum[j] = _B64[char]
                j += 1
                continue
            if char in "\r\n":
                continue
            if char != "=" or j in (0, 1):
                raise corrupt(si - 1)
            if j == 2:  # "==" expected
                while si < len(src) and chr(src[si]) in "\r\n":
                    si += 1
                if si == len(src):
                    raise corrupt(len(src))
                if chr(src[si]) != "=":
                    raise corrupt(si - 1)
                si += 1
            while si < len(src) and chr(src[si]) in "\r\n":
                si += 1
            if si < len(src):
                raise corrupt(si)
            dlen = j
            break
        value = quantum[0] << 18 | quantum[1] << 12 | quantum[2] << 6 | quantum[3]
        out += value.to_bytes(3, "big")[:dlen - 1]
        if dlen < 4:
            return bytes(out)


# ---------------------------------------------------------------- task events and states

def task_event(kind: str, time_ns: int, *, message: str = "", details: dict[str, str] | None = None,
               display: str | None = None, fails_task: bool = False, exit_code: int = 0, signal: int = 0,
               restart_reason: str = "", driver_error: str = "", kill_reason: str = "", kill_timeout: int = 0,
               setup_error: str = "") -> dict[str, Any]:
    """One TaskEvent with the newer field set of allocations-list.json (Details + DisplayMessage)."""
    return {"Details": details or {}, "DiskLimit": 0, "DisplayMessage": display or _DISPLAY.get(kind, message),
            "DownloadError": "", "DriverError": driver_error, "DriverMessage": "", "ExitCode": exit_code,
            "FailedSibling": "", "FailsTask": fails_task, "GenericSource": "", "KillError": "",
            "KillReason": kill_reason, "KillTimeout": kill_timeout, "Message": message,
            "RestartReason": restart_reason, "SetupError": setup_error, "Signal": signal, "StartDelay": 0,
            "TaskSignal": "", "TaskSignalReason": "", "Time": time_ns, "Type": kind, "ValidationError": "",
            "VaultError": ""}


def received(now: int) -> dict[str, Any]:
    return task_event("Received", now)


def task_setup(now: int) -> dict[str, Any]:
    return task_event("Task Setup", now, message="Building Task Directory",
                      details={"message": "Building Task Directory"})


def started(now: int) -> dict[str, Any]:
    return task_event("Started", now)


def terminated(now: int, exit_code: int, signal: int = 0) -> dict[str, Any]:
    display = f"Exit Code: {exit_code}" + (f", Signal: {signal}" if signal else "")
    return task_event("Terminated", now, exit_code=exit_code, signal=signal, display=display,
                      details={"exit_code": str(exit_code), "signal": str(signal), "oom_killed": "false"})


def not_restarting(now: int, reason: str = "Policy allows no restarts") -> dict[str, Any]:
    return task_event("Not Restarting", now, restart_reason=reason, fails_task=True, display=reason,
                      details={"restart_reason": reason, "fails_task": "true"})


def killing(now: int, kill_timeout_ns: int) -> dict[str, Any]:
    timeout = format_duration(kill_timeout_ns)
    return task_event("Killing", now, kill_timeout=kill_timeout_ns,
                      display=f"Sent interrupt. Waiting {timeout} before force killing",
                      details={"kill_timeout": timeout})


def killed(now: int) -> dict[str, Any]:
    return task_event("Killed", now)


def template_failed(now: int, error: str) -> dict[str, Any]:
    """What the template hook reports when a template cannot render (the task is killed and fails)."""
    return task_event("Killing", now, fails_task=True, display=f"Template failed: {error}",
                      details={"fails_task": "true"})


def format_duration(ns: int) -> str:
    """Go's Duration.String() for whole seconds/minutes (what kill timeouts are)."""
    seconds = ns // SECOND
    if ns % SECOND:
        return f"{ns / SECOND:g}s"
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    return f"{minutes}m{sec}s" if minutes else f"{sec}s"


def task_state(state: str = "pending", events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"State": state, "Failed": False, "Restarts": 0, "LastRestart": ZERO_TIME, "StartedAt": ZERO_TIME,
            "FinishedAt": ZERO_TIME, "Events": events or [], "TaskHandle": None}


def client_status(states: dict[str, dict[str, Any]]) -> str:
    """The alloc's ClientStatus from its task states (client/allocrunner getClientStatus)."""
    values = list(states.values())
    if any(s["State"] == "dead" and s["Failed"] for s in values):
        return "failed"
    if values and all(s["State"] == "dead" for s in values):
        return "complete"
    if any(s["State"] == "running" for s in values):
        return "running"
    return "pending"


# ---------------------------------------------------------------- allocations

def alloc_resources(group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Resources, SharedResources, TaskResources) in the shape of allocation.json."""
    disk = (group.get("EphemeralDisk") or {}).get("SizeMB") or 0
    tasks = {}
    for task in group.get("Tasks") or []:
        res = task.get("Resources") or {}
        tasks[task["Name"]] = {"CPU": res.get("CPU") or 0, "MemoryMB": res.get("MemoryMB") or 0, "DiskMB": 0,
                               "Networks": None}
    total = {"CPU": sum(t["CPU"] for t in tasks.values()), "MemoryMB": sum(t["MemoryMB"] for t in tasks.values()),
             "DiskMB": disk, "Networks": None}
    return total, {"CPU": 0, "MemoryMB": 0, "DiskMB": disk, "Networks": None}, tasks


def metrics(node_id: str, dc: str) -> dict[str, Any]:
    return {"NodesEvaluated": 1, "NodesFiltered": 0, "NodesAvailable": {dc: 1}, "NodesInPool": 1,
            "ClassFiltered": None, "ConstraintFiltered": None, "NodesExhausted": 0, "ClassExhausted": None,
            "DimensionExhausted": None, "Scores": {f"{node_id}.binpack": 0.5}, "AllocationTime": 31729,
            "CoalescedFailures": 0}


def alloc_stub(alloc: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """AllocListStub of a stored allocation (job = the alloc's copy of its job)."""
    extra = {"JobType": job["Type"], "JobVersion": job["Version"], "DeploymentStatus": None,
             "PreemptedAllocations": None, "PreemptedByAllocation": ""}
    return {k: alloc[k] if k in alloc else extra[k] for k in ALLOC_STUB_KEYS}


def transition() -> dict[str, Any]:
    return {"Migrate": None, "Reschedule": None, "ForceReschedule": None}


# ---------------------------------------------------------------- evaluations

def evaluation(eval_id: str, job: dict[str, Any], *, triggered_by: str, status: str, index: int, now: int,
               job_modify_index: int = 0, eval_type: str | None = None) -> dict[str, Any]:
    return {"ID": eval_id, "Namespace": job["Namespace"], "Priority": job["Priority"],
            "Type": eval_type or job["Type"], "TriggeredBy": triggered_by, "JobID": job["ID"],
            "JobModifyIndex": job_modify_index, "NodeID": "", "NodeModifyIndex": 0, "DeploymentID": "",
            "Status": status, "StatusDescription": "", "Wait": 0, "WaitUntil": None, "NextEval": "",
            "PreviousEval": "", "BlockedEval": "", "RelatedEvals": None, "FailedTGAllocs": None,
            "ClassEligibility": None, "QuotaLimitReached": "", "EscapedComputedClass": False,
            "AnnotatePlan": False, "QueuedAllocations": None, "LeaderACL": "", "SnapshotIndex": 0,
            "CreateIndex": index, "ModifyIndex": index, "CreateTime": now, "ModifyTime": now}


def failed_tg_alloc(dc: str) -> dict[str, Any]:
    """Eval.FailedTGAllocs[group]: what `nomad job status` prints as a placement failure."""
    return {"NodesEvaluated": 1, "NodesFiltered": 1, "NodesInPool": 1, "NodesAvailable": {dc: 1},
            "ClassFiltered": None, "ConstraintFiltered": {"${attr.kernel.name} = linux": 1},
            "NodesExhausted": 0, "ClassExhausted": None, "DimensionExhausted": None, "QuotaExhausted": None,
            "ResourcesExhausted": None, "Scores": None, "AllocationTime": 10000, "CoalescedFailures": 0,
            "ScoreMetaData": None}
