"""The fake Nomad as a process of its own, for benchmarks: `python -m tests.doubles.serve_nomad [--hold S]`.

Run it from the checkout root (the doubles are test code, never installed nor put on the service's path). One big
client node (room for thousands of allocations); every task is played by a trivial runner: one line of output,
`--hold` seconds of "work" (± `--spread`), exit 0. Protocol on stdout, one line each: `url <NOMAD_ADDR>` once serving, `done
<job_id>` when a job's cleanup allocation completed; on stdin EOF it stops and prints `timeline <json>`: per
dispatched child, the `job_id` meta, its parent job, and when (wall clock, as `time.time()`) Nomad registered it
and when its allocation completed, both taken as the server publishes the event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import os
import sys
import tempfile
import time
from typing import Any

from tests.doubles.nomad import FakeNomad, Node, TaskRun
from tests.doubles.nomad_shapes import new_id


class Timeline:
    """Dispatch and completion times of every child, from the server's own events."""

    def __init__(self) -> None:
        self.children: dict[str, dict[str, Any]] = {}

    def observe(self, idx: int, events: list[dict[str, Any]]) -> None:
        now = time.time()
        for event in events:
            payload = event["Payload"]
            if event["Topic"] == "Job" and event["Type"] == "JobRegistered":
                job = payload["Job"]
                if job.get("ParentID") and job["ID"] not in self.children:
                    self.children[job["ID"]] = {"job_id": (job.get("Meta") or {}).get("job_id"),
                                                "parent": job["ParentID"], "dispatched": now, "completed": None}
            elif event["Topic"] == "Allocation" and payload["Allocation"]["ClientStatus"] == "complete":
                child = self.children.get(payload["Allocation"]["JobID"])
                if child is not None and child["completed"] is None:
                    child["completed"] = now
                    if child["parent"].startswith("jobforge-cleanup"):
                        print(f"done {child['job_id']}", flush=True)


async def main(hold: float, spread: float, event_buffer: int) -> None:
    async def runner(run: TaskRun, payload: bytes, env: dict) -> int:
        run.write(f"{run.name}: nothing to do\n".encode())
        # the task's work: `hold` seconds on average, each task its own share of the spread (seeded by its id)
        await asyncio.sleep(hold * (1 + spread * (random.Random(run.alloc["ID"]).random() * 2 - 1)))
        return 0

    if os.path.isdir("/dev/shm"):  # task directories in memory: thousands of them are made and removed
        tempfile.tempdir = "/dev/shm"
    node = Node(id=new_id(), name="fake-client-1", cpu=10**9, memory_mb=10**9, disk_mb=10**9)
    fake = FakeNomad(runner=runner, node=node, event_buffer_size=event_buffer)
    timeline = Timeline()
    fake.cluster.on_publish = timeline.observe
    print(f"url {await fake.start()}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the benchmark closes our stdin
    await fake.stop()
    print("timeline " + json.dumps(list(timeline.children.values())), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each task runs")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="task times spread uniformly over hold * (1 +- spread)")
    parser.add_argument("--event-buffer", type=int, default=100, help="events kept (Nomad's event_buffer_size)")
    args = parser.parse_args()
    asyncio.run(main(args.hold, args.spread, args.event_buffer))
