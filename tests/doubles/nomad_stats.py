"""Allocation resource usage for the fake Nomad: `GET /v1/client/allocation/:id/stats` and its wire objects.

As in Nomad (client/structs/structs.go, client/allocrunner/alloc_runner.go `LatestAllocStats`): the client keeps
each task's latest `TaskResourceUsage` sample; the answer lists them under `Tasks` (filtered by `?task=`), and
`ResourceUsage` is the sum over the tasks *running now* (zero values, `Measured: null`, once they exited), with
`Timestamp` the newest of those. The client samples every second (`client.stats_collection_interval`), and CPU
is a rate: `Percent` over the last period, 100 per busy core (drivers/docker/util/stats_posix.go). Only the
allocation's client can answer: not received yet or garbage-collected -> 404 `Unknown allocation "<id>"`; its
node gone (a lost allocation) -> 404 `No path to node`.

`ProcessSampler` plays the docker driver's stats for `subprocess_runner`: CPU and resident memory of a process
tree read from /proc (cgroup v2 shape: no `MaxUsage`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict

from tests.doubles.nomad_shapes import Refused

# What the docker driver measures under cgroup v2 / v1 (drivers/docker/util/stats_posix.go).
MEASURED_MEMORY_V2 = ["RSS", "Cache", "Swap", "Usage"]
MEASURED_MEMORY_V1 = [*MEASURED_MEMORY_V2, "Max Usage"]
MEASURED_CPU = ["Throttled Periods", "Throttled Time", "Percent"]


class _Go(BaseModel):
    """A Go struct as encoding/json writes it: every field, zero values included, nil slices and maps as null."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def add(self, other: _Go) -> _Go:
        """Go's `Add`: numbers summed, `Measured` joined (first seen first; nil joined with anything is a list)."""
        values = {}
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "Measured":
                values[name] = list(dict.fromkeys([*(mine or []), *(theirs or [])]))
            elif isinstance(mine, _Go):
                values[name] = mine.add(theirs) if theirs is not None else mine
            else:
                values[name] = mine + theirs
        return type(self)(**values)


class MemoryStats(_Go):
    RSS: int = 0
    Cache: int = 0
    Swap: int = 0
    MappedFile: int = 0
    Usage: int = 0
    MaxUsage: int = 0
    KernelUsage: int = 0
    KernelMaxUsage: int = 0
    Measured: list[str] | None = None


class CpuStats(_Go):
    SystemMode: float = 0.0
    UserMode: float = 0.0
    TotalTicks: float = 0.0
    ThrottledPeriods: int = 0
    ThrottledTime: int = 0
    Percent: float = 0.0
    Measured: list[str] | None = None


class ResourceUsage(_Go):
    MemoryStats: MemoryStats
    CpuStats: CpuStats
    DeviceStats: list[dict] | None = None

    def add(self, other: _Go) -> ResourceUsage:
        assert isinstance(other, ResourceUsage)
        return ResourceUsage(MemoryStats=self.MemoryStats.add(other.MemoryStats),
                             CpuStats=self.CpuStats.add(other.CpuStats),
                             DeviceStats=[*(self.DeviceStats or []), *(other.DeviceStats or [])])


class TaskResourceUsage(_Go):
    ResourceUsage: ResourceUsage
    Timestamp: int
    Pids: dict[str, ResourceUsage] | None = None


class AllocResourceUsage(_Go):
    ResourceUsage: ResourceUsage
    Tasks: dict[str, TaskResourceUsage]
    Timestamp: int


def sample(*, rss: int, percent: float, at: int, max_usage: int | None = None) -> TaskResourceUsage:
    """One docker-driver sample: cgroup v1 when `max_usage` is given (then measured), else cgroup v2."""
    memory = MemoryStats(RSS=rss, Usage=max(rss, max_usage or 0), MaxUsage=max_usage or 0,
                         Measured=MEASURED_MEMORY_V1 if max_usage is not None else MEASURED_MEMORY_V2)
    return TaskResourceUsage(ResourceUsage=ResourceUsage(MemoryStats=memory,
                                                         CpuStats=CpuStats(Percent=percent, Measured=MEASURED_CPU)),
                             Timestamp=at)


def alloc_stats(alloc_id: str, known: bool, lost: bool, tasks: Iterable[tuple[str, bool]],
                samples: dict[str, TaskResourceUsage], task_filter: str) -> AllocResourceUsage:
    """The answer for one allocation: `tasks` are (name, running now) of its group, `samples` the latest per task."""
    if not known:
        raise Refused(404, f'Unknown allocation "{alloc_id}"')
    if lost:
        raise Refused(404, "No path to node")
    total = ResourceUsage(MemoryStats=MemoryStats(), CpuStats=CpuStats(), DeviceStats=[])
    listed, newest = {}, 0
    for name, running in tasks:
        if task_filter and name != task_filter or name not in samples:
            continue
        listed[name] = samples[name]
        if running:
            total = total.add(samples[name].ResourceUsage)
            newest = max(newest, samples[name].Timestamp)
    return AllocResourceUsage(ResourceUsage=total, Tasks=listed, Timestamp=newest)


# --- the subprocess runner's "driver": /proc ------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_usage(root: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of `root` and its live descendants, None once `root` has exited. CPU counts
    what each has used plus what the children it reaped used (`cutime`/`cstime`), so processes that ended inside
    the tree stay counted."""
    table: dict[int, tuple[int, float, int]] = {}
    exited = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rfind(b")") + 2:].split()  # from field 3 (state): ppid 4, utime 14..cstime 17, rss 24
            table[int(name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICKS, int(fields[21]) * _PAGE)
        except (OSError, ValueError, IndexError):  # gone, or going, while we read
            continue
        if fields[0] in (b"Z", b"X"):
            exited.add(int(name))
    if root not in table or root in exited:
        return None
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, (ppid, _, _) in table.items() if ppid in tree} - tree
        tree |= found
        grew = bool(found)
    members = [table[pid] for pid in tree if pid in table]
    return sum(cpu for _, cpu, _ in members), sum(rss for _, _, rss in members)


class ProcessSampler:
    """A task's samples as the docker driver takes them: the first one's CPU rate is 0 (nothing to compare with)."""

    def __init__(self, pid: int, clock: Callable[[], int]) -> None:
        self.pid, self.clock = pid, clock
        self._last: tuple[int, float] | None = None

    def take(self) -> TaskResourceUsage | None:
        """None once the task exited: the driver's stats stop with it (the client keeps the last sample)."""
        now = self.clock()
        usage = tree_usage(self.pid)
        if usage is None:
            return None
        cpu, rss = usage
        percent = 0.0
        if self._last is not None and now > self._last[0]:
            percent = max(0.0, cpu - self._last[1]) / ((now - self._last[0]) / 1e9) * 100
        self._last = (now, cpu)
        return sample(rss=rss, percent=percent, at=now)
