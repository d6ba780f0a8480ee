"""/health latency while the service is under load (issue 8, acceptance 3 and 7).

    .venv/bin/python bench/health_under_load.py [--history 1000] [--repeat 5]

A real `jobforge-service` (local backend, SQLite store) builds examples/hello from a throw-away registry. A
thread probes GET /health on a fresh connection every 10 ms (a load balancer's view) while each load runs:

- `idle`: nothing else (the baseline);
- `line_100mb`: a test command printing 100 MB without a newline;
- `binary_5mb`: a test command printing 5 MB of /dev/urandom;
- `stalled_watcher`: a test command printing 3,000,000 lines while a WebSocket client of the job's watch
  (`?logs=true`) completes the handshake and then never reads (the service must drop it, not wait for it);
- `batch_10000`: `--repeat` JSON-RPC batches of 10,000 getHistory calls, sent at once (each refused whole);
- `batch_100_history_1000`: `--repeat` batches of 100 × getHistory{limit: 1000} (each call refused: over the cap);
- `batch_100_history_500`: `--repeat` batches of 100 × getHistory{limit: 500}, the largest allowed, over
  `--history` stored jobs (the reply is bounded in size).

The store is seeded with `--history` finished jobs before the service starts. Prints one JSON object on stdout
(progress on stderr): per load the probes' p50/p99/max in ms, the load's own outcome, and the goal (p99 < 100 ms).
No assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import yaml

from jobforge.config import JobConfig
from jobforge.devinfra import Registry, ServiceProcess, git_repo_of, remove_tree, seed_busybox_image
from jobforge.models import JobStatus
from jobforge.pipeline import new_job
from jobforge.stores.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello"
GOAL_P99_MS = 100
PROBE_EVERY = 0.01


def progress(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Prober(threading.Thread):
    """GET /health every PROBE_EVERY seconds on a new connection until stopped; latencies in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[float] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status != 200:
                    self.failures.append(f"HTTP {resp.status}")
            except OSError as exc:
                self.failures.append(f"{exc.__class__.__name__}: {exc}")
            self.samples.append((time.perf_counter() - start) * 1000)
            self.halt.wait(PROBE_EVERY)

    def summary(self) -> dict:
        s = self.samples
        return {"probes": len(s), "failures": self.failures[:5], "p50_ms": round(statistics.median(s), 1),
                "p99_ms": round(percentile(s, 0.99), 1), "max_ms": round(max(s), 1),
                "goal_met": not self.failures and percentile(s, 0.99) < GOAL_P99_MS}


def seed_history(db: Path, count: int, registry_host: str) -> None:
    """`count` finished jobs with a few KB of config each, written through the store before the service runs."""
    async def seed() -> None:
        store = SqliteStore(db)
        start = datetime.now(UTC) - timedelta(days=1)
        config = JobConfig.model_validate({
            "owner": "bench", "repo_url": "https://git.example.invalid/app.git", "image_name": "seeded",
            "registry_url": registry_host, "image_tags": [f"v{i}" for i in range(20)],
            "build_args": {f"ARG_{i}": "x" * 100 for i in range(20)}})
        for i in range(count):
            record = new_job(f"seeded-{i:06d}", config, start + timedelta(seconds=i)).model_copy(
                update={"status": JobStatus.FAILED, "error": "seeded for the benchmark", "temp_image_deleted": True,
                        "finished_at": start + timedelta(seconds=i + 1)})
            await store.put(record, 0)
        await store.aclose()
    asyncio.run(seed())


def stalled_watcher(port: int, job_id: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /json/job/{job_id}/watch?logs=true HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"no WebSocket upgrade: {head!r}")
    return sock


async def run_job(url: str, config: dict) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/json/submitJob", json={"job_config": config}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"submitJob answered {resp.status}: {body}")
        job_id = body["job_id"]
        while True:  # polling the status: the watch stream would carry the flood to this client too
            async with session.get(f"{url}/json/job/{job_id}/status") as resp:
                status = await resp.json()
            if status["status"] in ("SUCCEEDED", "FAILED"):
                return {"job": status["status"], "error": status.get("error")}
            await asyncio.sleep(0.5)


async def batches(url: str, batch: list[dict], repeat: int) -> dict:
    data = json.dumps(batch).encode()
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(session: aiohttp.ClientSession) -> tuple[int, int, float]:
        start = time.perf_counter()
        async with session.post(f"{url}/json", data=data, headers={"Content-Type": "application/json"}) as resp:
            size = len(await resp.read())
            return resp.status, size, time.perf_counter() - start
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session) for _ in range(repeat)))
    return {"request_bytes": len(data), "statuses": sorted({r[0] for r in results}),
            "reply_bytes_max": max(r[1] for r in results), "slowest_reply_s": round(max(r[2] for r in results), 2)}


def calls(method: str, params: dict, count: int) -> list[dict]:
    return [{"jsonrpc": "2.0", "method": method, "params": params, "id": i} for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1000, help="finished jobs seeded into the store")
    parser.add_argument("--repeat", type=int, default=5, help="batches sent at once per batch load")
    parser.add_argument("--only", default="", help="comma-separated loads to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobforge-health-"))
    registry = Registry(work / "registry")
    registry.start()
    service = None
    try:
        data = work / "service"
        storage = data / "buildah"
        progress("seeding busybox into the registry")
        seed_busybox_image(registry.host, storage / "root", storage / "runroot")
        progress(f"seeding {args.history} finished jobs into the store")
        seed_history(data / "jobforge.db", args.history, registry.host)
        repo_url = git_repo_of(EXAMPLE, work / "hello")
        text = (EXAMPLE / "build.yaml").read_text().replace("__REPO_URL__", repo_url)
        config = yaml.safe_load(text.replace("__REGISTRY__", registry.host))
        service = ServiceProcess(data, registry.host, LOG_LEVEL="warning", JOBFORGE_BUILD_USER="").start()
        url = service.url

        def job(command: str) -> dict:
            return {**config, "test": {"commands": [command]}}

        def flood(command: str):
            return lambda: asyncio.run(run_job(url, job(command)))

        def with_stalled_watcher() -> dict:
            async def go() -> dict:
                async with aiohttp.ClientSession() as session:
                    async with session.post(f"{url}/json/submitJob",
                                            json={"job_config": job("yes 'a line for a stalled watcher' | "
                                                                    "head -n 3000000")}) as resp:
                        job_id = (await resp.json())["job_id"]
                sock = stalled_watcher(service.port, job_id)
                try:
                    while True:
                        async with aiohttp.ClientSession() as session:
                            async with session.get(f"{url}/json/job/{job_id}/status") as resp:
                                status = await resp.json()
                        if status["status"] in ("SUCCEEDED", "FAILED"):
                            return {"job": status["status"], "error": status.get("error")}
                        await asyncio.sleep(0.5)
                finally:
                    sock.close()
            return asyncio.run(go())

        loads = {
            "idle": lambda: time.sleep(3) or {},
            "line_100mb": flood("yes x | tr -d '\\n' | head -c 104857600"),
            "binary_5mb": flood("head -c 5242880 /dev/urandom"),
            "stalled_watcher": with_stalled_watcher,
            "batch_10000": lambda: asyncio.run(batches(url, calls("getHistory", {"limit": 10}, 10_000), args.repeat)),
            "batch_100_history_1000": lambda: asyncio.run(batches(url, calls("getHistory", {"limit": 1000}, 100),
                                                                  args.repeat)),
            "batch_100_history_500": lambda: asyncio.run(batches(url, calls("getHistory", {"limit": 500}, 100),
                                                                 args.repeat)),
        }
        results = {}
        for name, load in loads.items():
            if args.only and name not in args.only.split(","):
                continue
            progress(name)
            prober = Prober(service.port)
            prober.start()
            started = time.perf_counter()
            try:
                outcome = load()
            finally:
                prober.halt.set()
                prober.join()
            results[name] = {**prober.summary(), "load_s": round(time.perf_counter() - started, 1), **outcome}
        print(json.dumps({"bench": "health_under_load", "goal_p99_ms": GOAL_P99_MS, "history": args.history,
                          "results": results}, indent=2))
        return 0
    finally:
        if service is not None:
            service.stop()
        registry.stop()
        if not args.keep:
            remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
