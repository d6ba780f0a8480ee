"""Two `jobforge-service` replicas on one Consul (store + leases) and one Nomad, both doubles: they share the
jobs, one is SIGKILLed mid-way and the other takes its jobs over; any replica answers for any job.

The Nomad double's client plays every task with a trivial runner: a build waits at one gate (so jobs are
mid-flight when a replica dies), every other task ends at once. The takeover time is printed, never asserted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest

from jobforge.client import AsyncClient
from jobforge.stores.consul import segment
from tests.doubles.consul import FakeConsul
from tests.doubles.nomad import FakeNomad, TaskRun
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.e2e

LIMIT = 6
JOBS = 20
CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]}}
LEASES = "jobforge/cluster/leases/"


class Gate:
    """Builds wait here until `open()`; counts the tasks running at once (the cluster-wide limit)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None
        self.running = 0
        self.peak = 0

    async def runner(self, run: TaskRun, payload: bytes, env: dict) -> int:
        if self.event is None:  # created in the double's own loop
            self.loop, self.event = asyncio.get_running_loop(), asyncio.Event()
        if run.name == "cleanup":
            return 0
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            run.write(f"{run.name} started\n".encode())
            if run.name == "build":
                opened = asyncio.ensure_future(self.event.wait())
                killed = asyncio.ensure_future(run.killed.wait())
                await asyncio.wait([opened, killed], return_when=asyncio.FIRST_COMPLETED)
                for waiter in (opened, killed):
                    waiter.cancel()
            run.write(f"{run.name} done\n".encode())
            return 0
        finally:
            self.running -= 1

    def open(self) -> None:
        assert self.loop is not None and self.event is not None
        self.loop.call_soon_threadsafe(self.event.set)


async def eventually(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll a condition that lives in other processes (no event crosses the process boundary)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)  # polling another process's state against a deadline


def drivers(consul: FakeConsul) -> dict[str, str]:
    """job id -> name of the replica whose session holds its lease."""
    table = consul.table
    names = {s.id: s.name.removeprefix("jobforge-service ") for s in list(consul.sessions.values())}
    out = {}
    for key, entry in list(table.entries.items()):
        if key.startswith(LEASES) and entry.session:
            out[key[len(LEASES):]] = names.get(entry.session, "?")
    return out


def held_by(consul: FakeConsul, name: str, job_ids) -> list[str]:
    held = drivers(consul)
    return [job for job in job_ids if held.get(segment(job)) == name]


def running_builds(nomad: FakeNomad) -> int:
    return sum(1 for (_, jid) in list(nomad.cluster.jobs) if jid.startswith("jobforge-build/dispatch-") and any(
        a["ClientStatus"] == "running" for a in nomad.allocations(jid)))


def child_stopped(nomad: FakeNomad, job_id: str) -> bool:
    children = [d.child for d in nomad.cluster.dispatch_log if d.meta.get("job_id") == job_id]
    return bool(children) and all(all(a["ClientStatus"] != "running" for a in nomad.allocations(c))
                                  for c in children)


async def test_two_replicas_share_the_work_and_survive_a_sigkill(tmp_path):
    gate = Gate()
    nomad, consul = FakeNomad(runner=gate.runner, event_heartbeat=0.5, log_heartbeat=0.5), FakeConsul()
    with nomad.in_thread() as nomad_url, consul.in_thread() as consul_addr:
        env = {"JOBFORGE_BACKEND": "nomad", "NOMAD_ADDR": nomad_url, "JOBFORGE_STORE": "consul",
               "CONSUL_HTTP_ADDR": consul_addr, "MAX_CONCURRENT_JOBS": str(LIMIT), "JOBFORGE_TICK": "1",
               # an hour-long session TTL: only the survivor noticing the silent heartbeat can free the leases
               "JOBFORGE_LEASE_TTL": "3600"}
        a = ServiceProcess(tmp_path / "a", "127.0.0.1:5000", JOBFORGE_REPLICA_NAME="a", **env).start()
        b = ServiceProcess(tmp_path / "b", "127.0.0.1:5000", JOBFORGE_REPLICA_NAME="b", **env).start()
        try:
            async with AsyncClient(a.url) as client_a, AsyncClient(b.url) as client_b:
                clients = {"a": client_a, "b": client_b}
                ids = [(await (client_a if n % 2 == 0 else client_b).submit_job(CONFIG)).job_id
                       for n in range(JOBS)]
                await eventually(lambda: running_builds(nomad) == LIMIT, what=f"{LIMIT} builds running")
                on_a, on_b = held_by(consul, "a", ids), held_by(consul, "b", ids)
                assert len(on_a) + len(on_b) == LIMIT and on_a and on_b, drivers(consul)

                # killJob on either replica stops a job the other one drives, its Nomad child included
                for victim, receiver in ((on_a.pop(), "b"), (on_b.pop(), "a")):
                    result = await clients[receiver].kill_job(victim)
                    assert result.status.value == "FAILED"
                    status = await clients["a" if receiver == "b" else "b"].get_status(victim)
                    assert (status.status.value, status.error) == ("FAILED", "killed by user")
                    await eventually(lambda: child_stopped(nomad, victim), what=f"{victim}'s build stopped")
                await eventually(lambda: running_builds(nomad) == LIMIT, what="two more jobs admitted")
                on_a = held_by(consul, "a", ids)
                assert on_a, drivers(consul)

                # a watcher on b follows a job a drives, through a's death, to its end
                watched = on_a[0]
                updates = []

                async def watch() -> None:
                    async for update in client_b.watch(watched, logs=True):
                        updates.append(update)
                watcher = asyncio.create_task(watch())
                await eventually(lambda: bool(updates), what="the watch's first update")

                os.killpg(a.proc.pid, signal.SIGKILL)
                a.proc.wait()
                killed_at = time.monotonic()
                await eventually(lambda: held_by(consul, "b", on_a) == on_a, timeout=60,
                                 what="b taking a's jobs over")
                print(f"\ntakeover of {len(on_a)} jobs after SIGKILL: {time.monotonic() - killed_at:.1f}s")
                gate.open()

                async def all_final() -> list:
                    return [await client_b.get_status(job) for job in ids]
                deadline = time.monotonic() + 120
                while not all((s.status.value in ("SUCCEEDED", "FAILED")) for s in await all_final()):
                    assert time.monotonic() < deadline, "not every job reached a final state"
                    await asyncio.sleep(0.2)  # polling the other process against a deadline
                final = await all_final()
                for job in on_a:  # taken over mid-build: the lines a stored are not stored again by b
                    logs = (await client_b.get_logs(job)).logs
                    assert logs["build"] == ["build started", "build done"], logs
                async with asyncio.timeout(60):
                    await watcher
        finally:
            for replica in (a, b):
                replica.stop()
        log = list(nomad.cluster.dispatch_log)

    statuses = Counter(s.status.value for s in final)
    assert statuses == {"SUCCEEDED": JOBS - 2, "FAILED": 2}, statuses
    assert updates[-1].type == "end" and updates[-1].job.status.value == "SUCCEEDED"
    assert any(u.type == "log" and u.log.line == "build done" for u in updates)
    # every phase attempt was dispatched exactly once, across both replicas and the takeover
    attempts = Counter((d.meta["job_id"], d.parent.split("-")[1], d.meta["attempt"])
                       for d in log if "attempt" in d.meta)
    assert attempts and max(attempts.values()) == 1, [k for k, n in attempts.items() if n > 1]
    for job in ids:
        assert {phase for (j, phase, _) in attempts if j == job} <= {"build", "test", "publish"}
    assert gate.peak <= LIMIT

