"""Log latency: a line written by a test command -> its arrival at WebSocket clients of /json/streamLogs.

    .venv/bin/python bench/log_latency.py [--lines 40] [--clients 1,50]

A real `jobforge-service` (local backend) builds examples/hello from a throw-away registry; its test command
prints `LAT <uptime>` lines, 100 ms apart, where <uptime> is /proc/uptime (CLOCK_BOOTTIME, which a PID or
network namespace does not change) at the moment of writing. Each client connects right after submitJob and
notes CLOCK_BOOTTIME when the line arrives; latency = arrival - written. /proc/uptime has 10 ms resolution
(truncated), so each sample may read up to 10 ms high. One job per client count. Prints one JSON object on
stdout (progress on stderr) with p50/p95/max per client count and the goal (p95 < 250 ms). No assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from jobforge.devinfra import Registry, ServiceProcess, git_repo_of, remove_tree, seed_busybox_image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello"
GOAL_P95_MS = 250


def progress(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def client(session: aiohttp.ClientSession, url: str, job_id: str) -> list[float]:
    """Latencies (ms) of the LAT lines this client received; raises unless the stream ends with a status."""
    latencies: list[float] = []
    async with session.ws_connect(f"{url}/json/streamLogs?job_id={job_id}&phase=test", max_msg_size=0) as ws:
        async for message in ws:
            arrived = time.clock_gettime(time.CLOCK_BOOTTIME)
            data = json.loads(message.data)
            if data.get("type") == "status":
                if data["status"] != "SUCCEEDED":
                    raise RuntimeError(f"job {job_id} ended {data['status']}: {data.get('error')}")
                return latencies
            text = data.get("message", "")
            if text.startswith("LAT "):
                latencies.append((arrived - float(text.split()[1])) * 1000)
    raise RuntimeError("the stream closed without a status message")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--clients", default="1,50")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobforge-log-latency-"))
    registry = Registry(work / "registry")
    registry.start()
    service = None
    try:
        data = work / "service"
        storage = data / "buildah"
        progress("seeding busybox into the registry")
        seed_busybox_image(registry.host, storage / "root", storage / "runroot")
        repo_url = git_repo_of(EXAMPLE, work / "hello")
        text = (EXAMPLE / "build.yaml").read_text().replace("__REPO_URL__", repo_url)
        config = yaml.safe_load(text.replace("__REGISTRY__", registry.host))
        script = (f"i=0; while [ $i -lt {args.lines} ]; do read up idle < /proc/uptime; echo \"LAT $up\"; "
                  "i=$((i+1)); usleep 100000; done")
        config["test"] = {"commands": [script]}
        service = ServiceProcess(data, registry.host, LOG_LEVEL="warning", JOBFORGE_BUILD_USER="").start()
        results = []
        for clients in (int(c) for c in args.clients.split(",")):
            progress(f"one build, {clients} client(s)")
            results.append(asyncio.run(measure(service.url, config, clients, args.lines)))
        print(json.dumps({"bench": "log_latency", "goal_p95_ms": GOAL_P95_MS, "lines_per_job": args.lines,
                          "results": results}, indent=2))
        return 0
    finally:
        if service is not None:
            service.stop()
        registry.stop()
        if not args.keep:
            remove_tree(work)


async def measure(url: str, config: dict, clients: int, lines: int) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/json/submitJob", json={"job_config": config}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"submitJob answered {resp.status}: {body}")
        per_client = await asyncio.gather(*(client(session, url, body["job_id"]) for _ in range(clients)))
    samples = [ms for got in per_client for ms in got]
    return {"clients": clients, "samples": len(samples), "expected_samples": clients * lines,
            "p50_ms": round(statistics.median(samples), 1), "p95_ms": round(percentile(samples, 0.95), 1),
            "max_ms": round(max(samples), 1), "goal_met": percentile(samples, 0.95) < GOAL_P95_MS}


if __name__ == "__main__":
    sys.exit(main())
