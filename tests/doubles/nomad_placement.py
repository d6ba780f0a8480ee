"""The fake Nomad's one client node and its feasibility check: what the scheduler's stack does before it places.

As in Nomad (scheduler/feasible, generic_sched setNodes): only ready, eligible nodes of the job's datacenters
(globs) and node pool are evaluated; none -> `NodesEvaluated: 0` with `NodesAvailable` empty. A node is then
filtered by the first check it fails, in the stack's order: job, group and task constraints (recorded in
`ConstraintFiltered` under the constraint's `LTarget Operand RTarget` text), host volumes ("missing compatible
host volumes"), devices ("missing devices"); a node that passes but lacks free CPU, memory or disk (or device
instances) is exhausted (`NodesExhausted`, `DimensionExhausted`). Each failure is one `FailedTGAllocs` entry.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

FILTER_HOST_VOLUMES = "missing compatible host volumes"
FILTER_DEVICES = "missing devices"


@dataclass
class Node:
    id: str
    name: str
    datacenter: str = "dc1"
    pool: str = "default"
    attributes: dict[str, str] = field(default_factory=lambda: {
        "kernel.name": "linux", "cpu.arch": "amd64", "driver.docker": "1", "os.name": "ubuntu"})
    meta: dict[str, str] = field(default_factory=dict)
    host_volumes: set[str] = field(default_factory=lambda: {"buildah-cache"})
    devices: dict[str, int] = field(default_factory=dict)  # "vendor/type" (or "type") -> instances
    cpu: int = 8000
    memory_mb: int = 16384
    disk_mb: int = 100_000
    eligible: bool = True  # False while draining or marked ineligible

    def target(self, name: str) -> str | None:
        """scheduler/feasible resolveTarget: `${node.*}`, `${attr.*}`, `${meta.*}`, else a literal."""
        if not (name.startswith("${") and name.endswith("}")):
            return name
        key = name[2:-1]
        fixed = {"node.unique.id": self.id, "node.unique.name": self.name, "node.datacenter": self.datacenter,
                 "node.pool": self.pool, "node.class": ""}
        if key in fixed:
            return fixed[key]
        if key.startswith("attr."):
            return self.attributes.get(key[5:])
        if key.startswith("meta."):
            return self.meta.get(key[5:])
        return None


def _meets(node: Node, constraint: dict[str, Any]) -> bool:
    op = constraint.get("Operand") or "="
    left, right = node.target(constraint.get("LTarget") or ""), node.target(constraint.get("RTarget") or "")
    if op in ("distinct_hosts", "distinct_property"):
        return True  # one node: nothing to spread
    if op == "is_set":
        return left is not None
    if op == "is_not_set":
        return left is None
    if left is None:
        return False
    if op in ("=", "==", "is"):
        return left == right
    if op in ("!=", "not"):
        return left != right
    if op == "regexp":
        return re.search(right or "", left) is not None
    if op in ("set_contains", "set_contains_all"):
        return {v.strip() for v in (right or "").split(",")} <= {v.strip() for v in left.split(",")}
    if op == "set_contains_any":
        return bool({v.strip() for v in (right or "").split(",")} & {v.strip() for v in left.split(",")})
    if op in ("<", "<=", ">", ">="):
        try:
            a, b = float(left), float(right or "")
        except ValueError:
            a, b = left, right or ""  # type: ignore[assignment]
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    return False  # version/semver and anything else: not modelled, never met


def _constraint_text(constraint: dict[str, Any]) -> str:
    return f"{constraint.get('LTarget', '')} {constraint.get('Operand', '')} {constraint.get('RTarget', '')}"


def _device_count(node: Node, name: str) -> int | None:
    """A request names `type`, `vendor/type` or `vendor/type/model`; None when the node has no such device."""
    found = [n for kind, n in node.devices.items() if kind == name or kind.endswith(f"/{name}")
             or name.startswith(f"{kind}/")]
    return sum(found) if found else None


def _metric(node: Node, *, evaluated: int, available: dict[str, int]) -> dict[str, Any]:
    return {"NodesEvaluated": evaluated, "NodesFiltered": 0, "NodesInPool": 1, "NodesAvailable": available,
            "ClassFiltered": None, "ConstraintFiltered": None, "NodesExhausted": 0, "ClassExhausted": None,
            "DimensionExhausted": None, "QuotaExhausted": None, "ResourcesExhausted": None, "Scores": None,
            "AllocationTime": 10000, "CoalescedFailures": 0, "ScoreMetaData": None}


def infeasible(node: Node, job: dict[str, Any], group: dict[str, Any], used: dict[str, int]) -> dict[str, Any] | None:
    """None when `group` fits on `node` (with `used` = the cpu/memory/disk its live allocations take), else the
    AllocMetric Nomad records in the evaluation's FailedTGAllocs."""
    in_dc = any(fnmatch.fnmatchcase(node.datacenter, dc) for dc in job.get("Datacenters") or ["*"])
    ready = node.eligible and in_dc and node.pool == (job.get("NodePool") or "default")
    if not ready:
        return _metric(node, evaluated=0, available={})
    metric = _metric(node, evaluated=1, available={node.datacenter: 1})
    tasks = group.get("Tasks") or []
    constraints = [*(job.get("Constraints") or []), *(group.get("Constraints") or []),
                   *(c for t in tasks for c in (t.get("Constraints") or []))]
    reason = next((_constraint_text(c) for c in constraints if not _meets(node, c)), None)
    if reason is None:
        wanted = {v.get("Source") for v in (group.get("Volumes") or {}).values() if v.get("Type") == "host"}
        if wanted - node.host_volumes:
            reason = FILTER_HOST_VOLUMES
    devices = [d for t in tasks for d in ((t.get("Resources") or {}).get("Devices") or [])]
    if reason is None and any(_device_count(node, d["Name"]) is None for d in devices):
        reason = FILTER_DEVICES
    if reason is not None:
        metric.update(NodesFiltered=1, ConstraintFiltered={reason: 1})
        return metric
    need = {"cpu": sum((t.get("Resources") or {}).get("CPU") or 0 for t in tasks),
            "memory": sum((t.get("Resources") or {}).get("MemoryMB") or 0 for t in tasks),
            "disk": (group.get("EphemeralDisk") or {}).get("SizeMB") or 0}
    have = {"cpu": node.cpu, "memory": node.memory_mb, "disk": node.disk_mb}
    short = next((dim for dim in ("cpu", "memory", "disk") if used.get(dim, 0) + need[dim] > have[dim]), None)
    if short is None and any((_device_count(node, d["Name"]) or 0) < (d.get("Count") or 1) for d in devices):
        short = "devices: no devices match request"
    if short is not None:
        metric.update(NodesExhausted=1, DimensionExhausted={short: 1})
        return metric
    return None
