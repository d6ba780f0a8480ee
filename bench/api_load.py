"""API load: 50 concurrent clients against a real `jobforge-service` (local backend, SQLite store).

    .venv/bin/python bench/api_load.py [--clients 50] [--interval 0.1] [--log-lines 200000] [--jobs 1000,10000]

The store is seeded directly (finished jobs, one job with `--log-lines` log lines) with the installed
`SqliteStore`, so nothing needs to build; the service is then started on it. Measured, in this order:

* `getHistory` (JSON-RPC: newest 10, one owner's newest 100, one status's newest 10) at each `--jobs` size: one
  service per size, each on its own store, called in turn by one client (so load on the machine weighs on every
  size alike), back to back. Goal < 50 ms p99 and flat: the ratio of the p50 at the largest size to the p50 at
  the smallest is reported (baseline = the smallest size, same run).
* `/health` idle (the HTTP floor of this machine: the baseline of every other latency), and `getStatus` from one
  client, back to back (the service's own cost, without queueing: the baseline of the loaded figure).
* `getStatus`: `--clients` clients, each sending one request every `--interval` s (paced: latency under a steady
  load, not a throughput test). Goal p99 < 20 ms.
* `getLogs` of the big job: every page read one after the other (`next_offset`), while a prober sends `/health`
  every 10 ms. Goals: whole log < 1 s, `/health` p99 < 50 ms meanwhile (vs idle, same run).
* `submitJob`: `--clients` clients, paced the same way, `--submits` each. Jobs name a repository that does not
  exist, so the few that are admitted fail at the clone; the rest wait in the queue. Goal p99 < 50 ms.

Prints one JSON object on stdout (progress on stderr). No assertion is made on the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from jobforge.config import JobConfig
from jobforge.devinfra import ServiceProcess, free_port, progress, run_in_scratch
from jobforge.models import JobStatus, LogLine, LogStream
from jobforge.pipeline import new_job
from jobforge.stores.sqlite import SqliteStore

GOALS_MS = {"submitJob_p99": 50, "getStatus_p99": 20, "getLogs_whole_log": 1000, "health_during_getLogs_p99": 50,
            "getHistory_p99": 50}
GOAL_HISTORY_FLATNESS = 1.5
"""`flat in the number of jobs`: p50 at the largest size at most this many times the p50 at the smallest."""
OWNERS = 5
BIG_JOB = "bench-big-log"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), **{name: round(percentile(values_ms, q), 2)
                                    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            "max": round(max(values_ms), 2)}


# ------------------------------------------------------------------------------------------- seeding

def job_config(owner: str, repo_url: str = "https://git.example.invalid/app.git") -> dict:
    return {"owner": owner, "repo_url": repo_url, "image_name": "app", "registry_url": "127.0.0.1:5000"}


async def seed(db: Path, first: int, count: int, log_lines: int) -> None:
    """`count` finished jobs (numbered from `first`), and the big log job when `log_lines` > 0."""
    store = SqliteStore(db)
    try:
        for i in range(first, first + count):
            record = new_job(f"bench-{i:06d}", JobConfig.model_validate(job_config(f"owner-{i % OWNERS}")),
                             T0 + timedelta(seconds=i))
            status = JobStatus.SUCCEEDED if i % 7 else JobStatus.FAILED
            await store.put(record.model_copy(update={
                "status": status, "finished_at": record.submitted_at + timedelta(seconds=30),
                "temp_image_deleted": True}), 0)
        if log_lines:
            record = new_job(BIG_JOB, JobConfig.model_validate(job_config("owner-big")), T0)
            await store.put(record.model_copy(update={"status": JobStatus.SUCCEEDED, "temp_image_deleted": True,
                                                      "finished_at": T0 + timedelta(minutes=5)}), 0)
            batch = 10_000
            for start in range(0, log_lines, batch):
                lines = [LogLine(ts=T0 + timedelta(microseconds=n), stream=LogStream.STDOUT,
                                 line=f"step {n:07d}: compiling module_{n % 977}.c -> module_{n % 977}.o [ok]")
                         for n in range(start, min(log_lines, start + batch))]
                phase = "build" if start < log_lines // 2 else "test"
                await store.append_logs(BIG_JOB, phase, lines)
    finally:
        await store.aclose()


# ------------------------------------------------------------------------------------------- clients

class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def rpc(self, method: str, params: dict) -> tuple[float, dict]:
        """(latency in ms, result); raises on an error reply."""
        body = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
        started = time.perf_counter()
        async with self.session.post(f"{self.url}/json", json=body) as resp:
            reply = await resp.json()
        elapsed = (time.perf_counter() - started) * 1000
        if "result" not in reply:
            raise RuntimeError(f"{method} failed: {reply.get('error')}")
        return elapsed, reply["result"]

    async def health(self) -> float:
        started = time.perf_counter()
        async with self.session.get(f"{self.url}/health") as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"/health answered {resp.status}")
        return (time.perf_counter() - started) * 1000


async def paced(clients: int, requests: int, interval: float, call) -> tuple[list[float], float]:
    """`clients` tasks, each calling `call(client, n)` every `interval` s (starts spread over one interval);
    returns every latency (ms) and the achieved request rate."""
    async def one(client: int) -> list[float]:
        await asyncio.sleep(interval * client / clients)
        out = []
        next_at = time.perf_counter()
        for n in range(requests):
            out.append(await call(client, n))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        return out
    started = time.perf_counter()
    results = await asyncio.gather(*(one(c) for c in range(clients)))
    latencies = [v for r in results for v in r]
    return latencies, len(latencies) / (time.perf_counter() - started)


HISTORY_CALLS = {"limit_10_ms": {"limit": 10}, "owner_limit_100_ms": {"limit": 100, "owner": "owner-3"},
                 "status_limit_10_ms": {"limit": 10, "status": "FAILED"}}


async def histories(apis: list[Api], rounds: int) -> list[dict]:
    """Each call in turn on every service (one per store size), so a change of load on the machine during
    the run weighs on every size alike."""
    samples: list[dict[str, list[float]]] = [{name: [] for name in HISTORY_CALLS} for _ in apis]
    for _ in range(rounds):
        for name, params in HISTORY_CALLS.items():
            for api, sample in zip(apis, samples):
                sample[name].append((await api.rpc("getHistory", params))[0])
    totals = [(await api.rpc("getHistory", {"limit": 1}))[1]["total"] for api in apis]
    return [{"stored_jobs": total, **{name: summary(values) for name, values in sample.items()}}
            for total, sample in zip(totals, samples)]


async def logs_under_probe(api: Api) -> dict:
    """Read the big job's log page by page while `/health` is probed every 10 ms."""
    probes: list[float] = []
    done = asyncio.Event()

    async def prober() -> None:
        while not done.is_set():
            probes.append(await api.health())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(prober())
    await asyncio.sleep(0.1)  # the prober's first samples: the loop as it is before the reads
    pages: list[float] = []
    lines = 0
    offset: int | None = 0
    started = time.perf_counter()
    while offset is not None:
        ms, result = await api.rpc("getLogs", {"job_id": BIG_JOB, "offset": offset})
        pages.append(ms)
        lines += sum(len(v) for v in result["logs"].values())
        offset = result["next_offset"]
    whole = (time.perf_counter() - started) * 1000
    done.set()
    await task
    return {"lines": lines, "pages": len(pages), "whole_log_ms": round(whole, 1), "page_ms": summary(pages),
            "health_during_ms": summary(probes)}


async def measure(url: str, args: argparse.Namespace, job_ids: list[str]) -> dict:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.clients + 10)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        api = Api(session, url)
        for _ in range(20):  # warm-up: connections, first queries
            await api.health()
            await api.rpc("getStatus", {"job_id": job_ids[0]})
        idle = [await api.health() for _ in range(200)]
        single = [(await api.rpc("getStatus", {"job_id": job_ids[n % len(job_ids)]}))[0] for n in range(200)]
        progress(f"getStatus: {args.clients} clients, one request every {args.interval} s each")

        async def status(client: int, n: int) -> float:
            return (await api.rpc("getStatus", {"job_id": job_ids[(client * 997 + n) % len(job_ids)]}))[0]
        status_ms, status_rate = await paced(args.clients, args.requests, args.interval, status)
        progress(f"getLogs of a {args.log_lines}-line job while /health is probed")
        logs = await logs_under_probe(api)
        progress(f"submitJob: {args.clients} clients x {args.submits}")
        config = job_config("owner-submit", "file:///nonexistent/jobforge-bench.git")

        async def submit(client: int, n: int) -> float:
            return (await api.rpc("submitJob", {"job_config": {**config, "owner": f"owner-{client % OWNERS}"}}))[0]
        submit_ms, submit_rate = await paced(args.clients, args.submits, args.interval, submit)
    return {"health_idle_ms": summary(idle), "getStatus_one_client_ms": summary(single),
            "getStatus_ms": {**summary(status_ms), "requests_per_s": round(status_rate, 1)},
            "getLogs": logs,
            "submitJob_ms": {**summary(submit_ms), "requests_per_s": round(submit_rate, 1)}}


async def history_at(urls: list[str], rounds: int) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        apis = [Api(session, url) for url in urls]
        for api in apis:  # warm-up
            for _ in range(10):
                await api.rpc("getHistory", {"limit": 10})
        return await histories(apis, rounds)


# ------------------------------------------------------------------------------------------- main

def bench(work: Path, args: argparse.Namespace) -> dict:
    sizes = sorted(int(n) for n in args.jobs.split(","))
    load_before = os.getloadavg()[0]
    env = {"LOG_LEVEL": "warning", "JOBFORGE_BUILD_USER": "", "MAX_QUEUED_JOBS": "10000",
           "JOBFORGE_BUILD_NETWORK": "none"}
    registry = f"127.0.0.1:{free_port()}"  # nothing listens: no job in this benchmark gets to push
    started = time.perf_counter()
    services: list[ServiceProcess] = []
    try:
        for number, size in enumerate(sizes):  # one store and one service per size; the largest gets the big log
            progress(f"seeding a store with {size} finished jobs" + (" and the big log job" if size == sizes[-1] else ""))
            data = work / f"data-{number}"
            data.mkdir(parents=True)
            asyncio.run(seed(data / "jobforge.db", 0, size, args.log_lines if size == sizes[-1] else 0))
            services.append(ServiceProcess(data, registry, **env).start())
        progress(f"getHistory at {', '.join(map(str, sizes))} jobs, alternating between the services")
        figures = asyncio.run(history_at([s.url for s in services], args.history_rounds))
        for service in services[:-1]:
            service.stop()
        job_ids = [f"bench-{i:06d}" for i in range(0, sizes[-1], max(1, sizes[-1] // 1000))]
        loaded = asyncio.run(measure(services[-1].url, args, job_ids))
    finally:
        for service in services:
            service.stop()
    small, large = figures[0], figures[-1]
    flat = {name: round(large[name]["p50"] / small[name]["p50"], 2)
            for name in ("limit_10_ms", "owner_limit_100_ms", "status_limit_10_ms")}
    floor = loaded["health_idle_ms"]["p50"]
    return {
        "benchmark": "api_load",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "inputs": {"clients": args.clients, "interval_s": args.interval, "status_requests_per_client": args.requests,
                   "submits_per_client": args.submits, "log_lines": args.log_lines, "history_sizes": sizes,
                   "history_rounds": args.history_rounds, "store": "sqlite", "backend": "local",
                   "transport": "JSON-RPC POST /json, one aiohttp session (keep-alive)"},
        "goals_ms": GOALS_MS,
        "getHistory": figures,
        "getHistory_p50_ratio_largest_to_smallest": flat,
        **loaded,
        "ratios": {
            "getStatus_p99_to_goal": round(loaded["getStatus_ms"]["p99"] / GOALS_MS["getStatus_p99"], 2),
            "submitJob_p99_to_goal": round(loaded["submitJob_ms"]["p99"] / GOALS_MS["submitJob_p99"], 2),
            "getLogs_whole_log_to_goal": round(loaded["getLogs"]["whole_log_ms"] / GOALS_MS["getLogs_whole_log"], 2),
            "health_during_getLogs_p99_to_goal": round(
                loaded["getLogs"]["health_during_ms"]["p99"] / GOALS_MS["health_during_getLogs_p99"], 2),
            "health_during_getLogs_p99_to_idle_p99": round(
                loaded["getLogs"]["health_during_ms"]["p99"] / loaded["health_idle_ms"]["p99"], 2),
            "getHistory_p99_to_goal": round(large["limit_10_ms"]["p99"] / GOALS_MS["getHistory_p99"], 2),
            "getStatus_p50_to_health_idle_p50": round(loaded["getStatus_ms"]["p50"] / floor, 2),
            "getStatus_p50_50_clients_to_one_client": round(
                loaded["getStatus_ms"]["p50"] / loaded["getStatus_one_client_ms"]["p50"], 2),
            "getHistory_flat_goal": GOAL_HISTORY_FLATNESS,
        },
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between a client's requests")
    parser.add_argument("--requests", type=int, default=40, help="getStatus requests per client")
    parser.add_argument("--submits", type=int, default=4, help="submitJob requests per client")
    parser.add_argument("--log-lines", type=int, default=200_000)
    parser.add_argument("--jobs", default="1000,10000", help="stored jobs at which getHistory is measured")
    parser.add_argument("--history-rounds", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.submits, args.log_lines, args.history_rounds) < 1 or args.interval < 0:
        parser.error("counts must be at least 1 and --interval not negative")
    return run_in_scratch("jobforge-api-load-", args.keep, lambda work: bench(work, args))


if __name__ == "__main__":
    sys.exit(main())
