"""Nomad-path scale: N concurrent jobs through the Nomad double on one replica, and how the costs grow with N.

    .venv/bin/python bench/nomad_scale.py [--sizes 100,300,1000] [--hold 8] [--spread 0.5] [--event-buffer 1000]

For each N: a fresh fake Nomad (tests/doubles/serve_nomad.py, started as `python -m tests.doubles.serve_nomad`
from the checkout root in a process of its own: the doubles are test code, never installed nor put on the
service's path) and a fresh `jobforge-service` subprocess (installed script, Nomad backend, SQLite store,
MAX_CONCURRENT_JOBS = N). N jobs are submitted at once (64 requests in flight); every phase (build, test,
publish, then the temp-image cleanup) is played by the double's trivial runner: one line of output, `--hold`
seconds of work (each task its own share of ± `--spread`, so phases do not all end in the same instant), exit 0.
So about N phases run at the same time, each with its two followed log streams. The double's event buffer is
`--event-buffer` (an operator running a thousand jobs raises Nomad's `event_buffer_size`; with the default of
100 the figures show what the drops cost: `event_stream_drops`).

Measured (wall clock; the double stamps its events as it publishes them):
* transition: allocation complete (the double publishes it) -> the next phase's child registered by a dispatch
  (build -> test -> publish -> cleanup); p50/p95/p99/max;
* submit: submitJob sent -> build child registered;
* the service's peak RSS (VmHWM) and CPU seconds (user + system) over the run, per job;
* growth: each figure at N over its value at the smallest N, next to N's own ratio (linear growth of a
  per-job figure would be 1.0 for all N; of a latency, flat is the goal).
Prints one JSON object on stdout (progress on stderr). Goals at N = 1,000: transition p99 < 50 ms, RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from jobforge.devinfra import ServiceProcess, remove_tree

ROOT = Path(__file__).resolve().parent.parent
GOAL_P99_MS, GOAL_RSS_MB = 50.0, 300.0
IN_FLIGHT = 64
ORDER = ("build", "test", "publish", "cleanup")


def progress(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)
    return {"n": len(ordered), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


class Double:
    """The fake Nomad process and its line protocol (see tests/doubles/serve_nomad.py)."""

    def __init__(self, hold: float, spread: float, event_buffer: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.doubles.serve_nomad", "--hold", str(hold), "--spread", str(spread),
             "--event-buffer", str(event_buffer)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        kind, _, self.url = self.proc.stdout.readline().strip().partition(" ")
        if kind != "url":
            raise RuntimeError(f"the fake Nomad did not start: {kind!r}")

    def wait_done(self, n: int, timeout: float) -> float:
        """Block until `n` jobs' cleanups completed; returns when (wall clock)."""
        deadline, done = time.monotonic() + timeout, 0
        while done < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {n} jobs finished within {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the fake Nomad exited")
            done += line.startswith("done ")
        return time.time()

    def timeline(self) -> list[dict]:
        self.proc.stdin.close()
        for line in self.proc.stdout:
            if line.startswith("timeline "):
                self.proc.wait(30)
                return json.loads(line[len("timeline "):])
        raise RuntimeError("the fake Nomad gave no timeline")


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, user + system CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm_kb / 1024, cpu


async def submit_all(url: str, n: int) -> dict[str, float]:
    """Submit n jobs, IN_FLIGHT at a time; returns job_id -> when its submitJob was sent."""
    sent: dict[str, float] = {}
    queue = list(range(n))
    config = {"owner": "bench", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
              "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]}}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            queue.pop()
            at = time.time()
            async with session.post(f"{url}/json/submitJob", json={"job_config": config}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"submitJob answered {resp.status}: {body}")
            sent[body["job_id"]] = at
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
    return sent


async def statuses(url: str, job_ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for job_id in job_ids:
            async with session.post(f"{url}/json/getStatus", json={"job_id": job_id}) as resp:
                status = (await resp.json()).get("status", f"HTTP {resp.status}")
            counts[status] = counts.get(status, 0) + 1
    return counts


def run_size(work: Path, n: int, hold: float, spread: float, event_buffer: int) -> dict:
    progress(f"N = {n}: starting the fake Nomad and the service")
    double = Double(hold, spread, event_buffer)
    service = ServiceProcess(work / f"n{n}", "127.0.0.1:5000", JOBFORGE_BACKEND="nomad", JOBFORGE_STORE="sqlite", NOMAD_ADDR=double.url,
                             MAX_CONCURRENT_JOBS=str(n), MAX_QUEUED_JOBS=str(max(n, 1000)), LOG_LEVEL="warning")
    try:
        service.start()
        assert service.proc is not None
        _, cpu_before = proc_stats(service.proc.pid)
        started = time.time()
        sent = asyncio.run(submit_all(service.url, n))
        progress(f"N = {n}: submitted in {time.time() - started:.1f} s; waiting for the jobs to finish")
        finished = double.wait_done(n, timeout=120 + 10 * hold + n * 0.5)
        rss_mb, cpu_after = proc_stats(service.proc.pid)
        _, double_cpu = proc_stats(double.proc.pid)
        ended = asyncio.run(statuses(service.url, sorted(sent)))
    finally:
        service.stop()
        timeline = double.timeline()
    by_job: dict[str, dict[str, dict]] = {}
    for child in timeline:
        phase = child["parent"].split("-")[1] if child["parent"].startswith("jobforge-") else child["parent"]
        by_job.setdefault(child["job_id"], {})[phase] = child
    transitions, submits = [], []
    for job_id, phases in by_job.items():
        if job_id in sent and "build" in phases:
            submits.append((phases["build"]["dispatched"] - sent[job_id]) * 1000)
        for before, after in zip(ORDER, ORDER[1:]):
            if before in phases and after in phases and phases[before]["completed"]:
                transitions.append((phases[after]["dispatched"] - phases[before]["completed"]) * 1000)
    cpu = cpu_after - cpu_before
    drops = service.log_path.read_text(errors="replace").count("event dropped from buffer")
    result = {"jobs": n, "wall_s": round(finished - started, 2), "statuses": ended,
              "transition_ms": percentiles(transitions), "submit_to_build_dispatched_ms": percentiles(submits),
              "service_peak_rss_mb": round(rss_mb, 1), "service_cpu_s": round(cpu, 2),
              "service_cpu_ms_per_job": round(cpu / n * 1000, 2),
              "double_cpu_s": round(double_cpu, 2), "event_stream_drops": drops}  # the fake Nomad shares the machine's CPUs
    progress(f"N = {n}: {json.dumps(result)}")
    return result


def growth(results: list[dict]) -> dict:
    """Each figure relative to the smallest N, next to N's own ratio."""
    base = results[0]

    def ratio(value, reference):
        return round(value / reference, 2) if value is not None and reference else None
    return {str(r["jobs"]): {
        "jobs_ratio": ratio(r["jobs"], base["jobs"]),
        "transition_p99_ratio": ratio(r["transition_ms"]["p99"], base["transition_ms"]["p99"]),
        "transition_p50_ratio": ratio(r["transition_ms"]["p50"], base["transition_ms"]["p50"]),
        "submit_p99_ratio": ratio(r["submit_to_build_dispatched_ms"]["p99"],
                                  base["submit_to_build_dispatched_ms"]["p99"]),
        "rss_ratio": ratio(r["service_peak_rss_mb"], base["service_peak_rss_mb"]),
        "cpu_per_job_ratio": ratio(r["service_cpu_ms_per_job"], base["service_cpu_ms_per_job"]),
    } for r in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,300,1000", help="comma-separated N (default 100,300,1000)")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds each task runs, on average (default 8)")
    parser.add_argument("--spread", type=float, default=0.5,
                        help="task times spread uniformly over hold * (1 +- spread) (default 0.5)")
    parser.add_argument("--event-buffer", type=int, default=1000,
                        help="the double's event buffer, Nomad's server `event_buffer_size` (default 1000; "
                             "Nomad's own default of 100 gets a thousand jobs' subscriber dropped again and again)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        parser.error("--sizes: positive integers")
    work = Path(tempfile.mkdtemp(prefix="jobforge-bench-nomad-"))
    load_before = os.getloadavg()[0]
    try:
        results = [run_size(work, n, args.hold, args.spread, args.event_buffer) for n in sizes]
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            remove_tree(work)
    largest = results[-1]
    print(json.dumps({
        "benchmark": "nomad_scale",
        "workload": "N concurrent jobs (build, test, publish, cleanup) on the Nomad double's trivial runner; "
                    "one jobforge-service replica, SQLite store",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "inputs": {"sizes": sizes, "hold_s": args.hold, "hold_spread": args.spread, "submit_in_flight": IN_FLIGHT,
                   "event_buffer": args.event_buffer},
        "definitions": {"transition_ms": "allocation complete (event published) -> next phase's child registered",
                        "submit_to_build_dispatched_ms": "submitJob sent -> build child registered"},
        "results": results,
        "growth_vs_smallest": growth(results),
        "goals": {"at_jobs": largest["jobs"], "transition_p99_ms": GOAL_P99_MS, "rss_mb": GOAL_RSS_MB,
                  "transition_p99_met": (largest["transition_ms"]["p99"] or 0) < GOAL_P99_MS,
                  "rss_met": largest["service_peak_rss_mb"] < GOAL_RSS_MB},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
