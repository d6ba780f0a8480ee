"""Pipeline overhead: a Job Forge build of examples/hello against the same work done by hand, in one run.

    .venv/bin/python bench/pipeline_overhead.py [--rounds 4] [--tags 3] [--keep]

Both variants do the same work on the same machine, against the same throw-away registry and the same
containers-storage (so both see the same, warm, layer cache):

* **jobforge**: `POST /json/submitJob` to a real `jobforge-service` subprocess (local backend), then wait on its
  WebSocket watch stream for the end of the job, i.e. SUCCEEDED *and* its temp image deleted;
* **direct**: the commands the task scripts in templates/tasks/ run, with the same flags, started one after the
  other from this process: git init/fetch --depth 1/checkout, `buildah bud` (argv from build.py's `bud_argv`),
  `buildah push` to the temp image; `buildah from --pull=never` of the verified local image, `inspect`, `run`
  of the entry point and of each test command, `rm`; `skopeo copy --preserve-digests` per tag and `skopeo inspect --raw` of source and targets;
  `skopeo delete` of the temp image and `skopeo inspect` proving it is gone. Each command gets its own session,
  as each phase does in the local backend (with autogroup scheduling a session is a CPU-share unit);
* **naive**: the hand sequence a person would type, kept fixed as the baseline whatever the scripts become:
  `git clone`, `buildah bud --layers`, `buildah push`, `buildah from --pull-always` + `buildah run` of the entry
  point and each test command, `skopeo copy` per tag, `skopeo delete` (no sandbox, no verification).

One warm-up run of each, then `--rounds` rounds rotating the order (J D N, D N J, N J D, ...). Prints one JSON
object on stdout (progress goes to stderr): per-variant median/mean/min/max, the ratio of medians (and the median of the
per-round ratios, which drifting load on the machine disturbs less), and the phase transition
latency of the Job Forge runs (previous phase's end -> next phase's process start, from the job's status metrics).
No assertion is made on the numbers; on a machine busy with other work, use more rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import ModuleType

import aiohttp
import yaml

from jobforge.devinfra import (Registry, ServiceProcess, git_repo_of, progress, run_in_scratch,
                               seed_busybox_image)

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = ROOT / "examples" / "hello"
TASKS = ROOT / "templates" / "tasks"
BIN = Path(sys.executable).parent
IMAGE = "hello"
TARGET_RATIO = 1.15
TARGET_RATIO_NAIVE = 1.0
VARIANTS = ("jobforge", "direct", "naive")
TRANSITIONS = [("job_start", "build_start"), ("build_end", "test_start"), ("test_end", "publish_start")]


def stats(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "mean": round(statistics.fmean(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


# --------------------------------------------------------------------------------------------- Job Forge

async def jobforge_run(service: ServiceProcess, config: dict) -> dict:
    """Submit over HTTP and follow the push stream to the end; returns wall times and the final status."""
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{service.url}/json/submitJob", json={"job_config": config}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"submitJob answered {resp.status}: {body}")
        job_id = body["job_id"]
        succeeded_at = None
        async with session.ws_connect(f"{service.url}/json/job/{job_id}/watch") as ws:
            async for message in ws:
                update = json.loads(message.data)
                job = update.get("job") or {}
                if succeeded_at is None and job.get("status") in ("SUCCEEDED", "FAILED"):
                    succeeded_at = time.perf_counter()
                if update["type"] == "end":
                    break
        ended = time.perf_counter()
        async with session.get(f"{service.url}/json/job/{job_id}/status") as resp:
            status = await resp.json()
    if status["status"] != "SUCCEEDED" or status.get("temp_image_deleted") is not True:
        raise RuntimeError(f"job {job_id} ended {status['status']} (temp image deleted: "
                           f"{status.get('temp_image_deleted')}): {status.get('error')}")
    return {"total": ended - started, "to_succeeded": (succeeded_at or ended) - started, "status": status}


def transition_ms(status: dict) -> dict[str, float]:
    metrics = status["metrics"]
    out = {}
    for before, after in TRANSITIONS:
        if metrics.get(before) and metrics.get(after):
            delta = datetime.fromisoformat(metrics[after]) - datetime.fromisoformat(metrics[before])
            out[f"{before}->{after}"] = delta.total_seconds() * 1000
    return out


# --------------------------------------------------------------------------------------------- direct

def load_task_module(name: str) -> ModuleType:
    """A task script from templates/tasks/ as a module, so the direct variant builds the very same argv."""
    spec = importlib.util.spec_from_file_location(f"jobforge_task_{name}", TASKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Direct:
    """The task scripts' commands, with their flags, run straight from here (no service, no payload files).

    `buildah bud` argv, git flags and storage flags come from the scripts themselves (`bud_argv`, `GIT`,
    `Context.buildah`); the few inline commands of test/publish/cleanup are spelled out as those scripts do.
    """

    def __init__(self, work: Path, storage: Path, registry_host: str, repo_url: str, config: dict) -> None:
        self.build_task = load_task_module("build")
        self.common = sys.modules["_common"]  # imported by build.py from templates/tasks
        self.work = work
        self.storage = storage
        self.registry = registry_host
        self.repo_url = repo_url
        self.config = config
        self.env = {**os.environ, "GIT_ALLOW_PROTOCOL": self.build_task.GIT_ALLOW_PROTOCOL, "GIT_TERMINAL_PROMPT": "0"}

    def context(self, workdir: Path, payload: dict):
        return self.common.Context(payload=payload, workdir=str(workdir), storage_driver="vfs",
                                   root=str(self.storage / "root"), runroot=str(self.storage / "runroot"),
                                   isolation="chroot")

    def sh(self, argv: list[str], *, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        # Own session, as the local backend starts each phase: with the kernel's autogroup scheduling a session
        # is a CPU-share unit, so on a busy machine this keeps the two variants on equal terms.
        result = subprocess.run(argv, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                                start_new_session=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout.decode()[-800:]}"
                               f"{result.stderr.decode()[-800:]}")
        return result

    def run(self, tags: int) -> dict:
        run_id = str(uuid.uuid4())
        cfg = self.config
        payload = {
            "job_id": run_id, "repo_url": self.repo_url, "git_ref": cfg["git_ref"],
            "build_args": cfg.get("build_args") or {}, "target": cfg.get("target"), "clear_cache": False,
            "temp_image": f"{self.registry}/temp-{IMAGE}:{run_id}", "tls_verify": False,
            "test": cfg["test"],
            "publish_targets": [f"{self.registry}/{IMAGE}:{tag}" for tag in [run_id, *cfg["image_tags"]][:tags]],
        }
        scratch = self.work / run_id
        times = {}
        started = mark = time.perf_counter()
        try:
            for step in ("build", "test", "publish", "cleanup"):
                workdir = scratch / step
                workdir.mkdir(parents=True)
                getattr(self, step)(self.context(workdir, payload))
                now = time.perf_counter()
                times[step], mark = now - mark, now
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        times["total"] = time.perf_counter() - started
        times["to_succeeded"] = times["total"] - times["cleanup"]
        return times

    def build(self, ctx) -> None:
        git, p = self.build_task.GIT, ctx.payload
        src = str(Path(ctx.workdir) / "src")
        self.sh(["git", "check-ref-format", "--allow-onelevel", p["git_ref"]])
        self.sh(git + ["init", "-q", "--", src])
        self.sh(git + ["-C", src, "remote", "add", "--", "origin", p["repo_url"]])
        self.sh(git + ["-C", src, "fetch", "--depth", "1", "--no-tags", "--", "origin", p["git_ref"]])
        self.sh(git + ["-C", src, "checkout", "-q", "--detach", "FETCH_HEAD"])
        self.sh(git + ["-C", src, "rev-parse", "HEAD"])
        self.sh(self.build_task.bud_argv(ctx, os.path.join(src, "Dockerfile"), src, None), cwd=Path(src))
        temp = p["temp_image"]
        self.sh(ctx.buildah("push", "--tls-verify=false", "--digestfile", os.path.join(ctx.workdir, "digest"),
                            temp, f"docker://{temp}"))

    def test(self, ctx) -> None:
        spec, temp = ctx.payload["test"], ctx.payload["temp_image"]
        container = f"jobforge-test-{ctx.payload['job_id']}"
        env = [flag for name, value in (spec.get("env") or {}).items() for flag in ("-e", f"{name}={value}")]
        self.sh(ctx.buildah("rm", container), check=False)
        # As test.py: the local image, once its id is checked against the pushed manifest's config digest.
        image_id = self.sh(ctx.buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", temp)).stdout
        self.sh(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{temp}"])
        self.sh(ctx.buildah("from", "--pull=never", "--name", container, image_id.decode().strip()))
        try:
            info = json.loads(self.sh(ctx.buildah("inspect", "--type", "container", container)).stdout)
            config = info["OCIv1"]["config"]
            if spec.get("entry_point"):
                entry = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
                self.sh(ctx.buildah("run", "--isolation", ctx.isolation, *env, container, "--", *entry))
            for command in spec.get("commands") or []:
                self.sh(ctx.buildah("run", "--isolation", ctx.isolation, *env, container, "--", "sh", "-c", command))
        finally:
            self.sh(ctx.buildah("rm", container))

    def publish(self, ctx) -> None:
        temp, targets = ctx.payload["temp_image"], ctx.payload["publish_targets"]
        for target in targets:
            self.sh(["skopeo", "copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
                     f"docker://{temp}", f"docker://{target}"])
        for ref in [temp, *targets]:  # the digest check: every target's manifest equals the temp image's
            self.sh(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"])

    def cleanup(self, ctx) -> None:
        temp = ctx.payload["temp_image"]
        self.sh(["skopeo", "delete", "--tls-verify=false", f"docker://{temp}"])
        gone = self.sh(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{temp}"], check=False)
        if gone.returncode == 0:
            raise RuntimeError(f"{temp} still present after delete")


class Naive(Direct):
    """The fixed hand sequence: `git clone; buildah bud --layers; buildah push; buildah from --pull-always + run;
    skopeo copy ×tags; skopeo delete`, with the same storage and registry, nothing else."""

    def build(self, ctx) -> None:
        p, src = ctx.payload, str(Path(ctx.workdir) / "src")
        self.sh(["git", "clone", "-q", "--branch", p["git_ref"], "--", p["repo_url"], src])
        args = [flag for name, value in p["build_args"].items() for flag in ("--build-arg", f"{name}={value}")]
        # chroot isolation: what buildah needs on this kind of machine (no cgroup-capable OCI runtime).
        self.sh(ctx.buildah("bud", "--layers", "--isolation", "chroot", *args, "-t", p["temp_image"], src),
                cwd=Path(src))
        self.sh(ctx.buildah("push", "--tls-verify=false", p["temp_image"], f"docker://{p['temp_image']}"))

    def test(self, ctx) -> None:
        spec, temp = ctx.payload["test"], ctx.payload["temp_image"]
        container = f"naive-test-{ctx.payload['job_id']}"
        env = [flag for name, value in (spec.get("env") or {}).items() for flag in ("-e", f"{name}={value}")]
        self.sh(ctx.buildah("from", "--pull-always", "--name", container, "--tls-verify=false", temp))
        try:
            if spec.get("entry_point"):  # the hello image's ENTRYPOINT + CMD, typed by hand
                config = json.loads(self.sh(ctx.buildah("inspect", "--type", "container", container)).stdout)
                entry = (config["OCIv1"]["config"].get("Entrypoint") or []) + (config["OCIv1"]["config"].get("Cmd") or [])
                self.sh(ctx.buildah("run", "--isolation", "chroot", *env, container, "--", *entry))
            for command in spec.get("commands") or []:
                self.sh(ctx.buildah("run", "--isolation", "chroot", *env, container, "--", "sh", "-c", command))
        finally:
            self.sh(ctx.buildah("rm", container))

    def publish(self, ctx) -> None:
        temp = ctx.payload["temp_image"]
        for target in ctx.payload["publish_targets"]:
            self.sh(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                     f"docker://{temp}", f"docker://{target}"])

    def cleanup(self, ctx) -> None:
        self.sh(["skopeo", "delete", "--tls-verify=false", f"docker://{ctx.payload['temp_image']}"])


# --------------------------------------------------------------------------------------------- main

def tool_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "missing"


def bench(work: Path, rounds: int, tags: int) -> dict:
    load_before = os.getloadavg()[0]
    registry = Registry(work / "registry")
    service = None
    try:
        progress("starting a throw-away registry and seeding busybox")
        registry.start()
        data = work / "data"
        storage = data / "buildah"  # the service's containers-storage, shared with the direct variant
        seed_busybox_image(registry.host, storage / "root", storage / "runroot")
        repo_url = git_repo_of(EXAMPLE, work / "hello")
        text = (EXAMPLE / "build.yaml").read_text().replace("__REPO_URL__", repo_url)
        config = yaml.safe_load(text.replace("__REGISTRY__", registry.host))
        config["owner"] = "bench"
        config["image_tags"] = [f"t{i}" for i in range(1, tags)]  # + the job id = `tags` tags
        # Phases as this user, like the direct run (the repository is this user's; git lets only its owner fetch).
        service = ServiceProcess(data, registry.host, LOG_LEVEL="warning", JOBFORGE_BUILD_USER="").start()
        direct = Direct(work / "direct", storage, registry.host, repo_url, config)
        naive = Naive(work / "naive", storage, registry.host, repo_url, config)
        runners = {"jobforge": lambda: asyncio.run(jobforge_run(service, config)),
                   "direct": lambda: direct.run(tags), "naive": lambda: naive.run(tags)}

        progress("warm-up: one run of each")
        for variant in VARIANTS:
            runners[variant]()
        results = {variant: [] for variant in VARIANTS}
        for number in range(rounds):
            order = VARIANTS[number % 3:] + VARIANTS[:number % 3]
            for variant in order:
                result = runners[variant]()
                results[variant].append(result)
                progress(f"round {number + 1}/{rounds} {variant}: {result['total']:.2f} s")
    finally:
        if service is not None:
            service.stop()
        registry.stop()

    jf, dr, nv = results["jobforge"], results["direct"], results["naive"]
    jf_total, dr_total, nv_total = [r["total"] for r in jf], [r["total"] for r in dr], [r["total"] for r in nv]
    transitions: dict[str, list[float]] = {}
    for run in jf:
        for name, ms in transition_ms(run["status"]).items():
            transitions.setdefault(name, []).append(ms)
    between_phases = [ms for name, values in transitions.items() if not name.startswith("job_start")
                      for ms in values]
    phases = {p: [r["status"]["metrics"][f"{p}_duration"] for r in jf] for p in ("build", "test", "publish")}
    ratio = statistics.median(jf_total) / statistics.median(dr_total)
    ratio_naive = statistics.median(jf_total) / statistics.median(nv_total)
    return {
        "benchmark": "pipeline_overhead",
        "workload": f"examples/hello: clone + bud + push temp + test (entry point + 1 command) + publish {tags} "
                    "tags + delete temp",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "buildah": tool_version(["buildah", "--version"]), "skopeo": tool_version(["skopeo", "--version"]),
                    "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "rounds": rounds, "warmup_runs_per_variant": 1, "order": "rotating (J D N, D N J, N J D, ...)",
        "cache": "warm, shared",
        "jobforge_s": {**stats(jf_total), "runs": [round(v, 3) for v in jf_total],
                       "to_succeeded_median": round(statistics.median(r["to_succeeded"] for r in jf), 3),
                       "phase_duration_median": {p: round(statistics.median(v), 3) for p, v in phases.items()}},
        "direct_s": {**stats(dr_total), "runs": [round(v, 3) for v in dr_total],
                     "to_succeeded_median": round(statistics.median(r["to_succeeded"] for r in dr), 3),
                     "step_median": {s: round(statistics.median(r[s] for r in dr), 3)
                                     for s in ("build", "test", "publish", "cleanup")}},
        "naive_s": {**stats(nv_total), "runs": [round(v, 3) for v in nv_total],
                    "step_median": {s: round(statistics.median(r[s] for r in nv), 3)
                                    for s in ("build", "test", "publish", "cleanup")}},
        "ratio_to_naive": {"ratio_of_medians": round(ratio_naive, 3),
                           "paired_ratio_median": round(statistics.median(j / n for j, n in zip(jf_total, nv_total)), 3),
                           "target_ratio": TARGET_RATIO_NAIVE, "within_target": ratio_naive <= TARGET_RATIO_NAIVE},
        "ratio_of_medians": round(ratio, 3),
        # Less sensitive to other load on the machine: each round's two runs are neighbours in time.
        "paired_ratio_median": round(statistics.median(j / d for j, d in zip(jf_total, dr_total)), 3),
        "ratio_of_medians_to_succeeded": round(statistics.median(r["to_succeeded"] for r in jf)
                                               / statistics.median(r["to_succeeded"] for r in dr), 3),
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "phase_transition_latency_ms": {
            "definition": "previous phase's end (its process exited, output drained) -> next phase's process "
                          "started, from getStatus metrics; job_start->build_start is submit -> build start",
            "median_between_phases": round(statistics.median(between_phases), 1) if between_phases else None,
            **{name: round(statistics.median(values), 1) for name, values in transitions.items()},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per variant (default 4)")
    parser.add_argument("--tags", type=int, default=3, help="published tags per build, job id included (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.rounds < 1 or args.tags < 1:
        parser.error("--rounds and --tags must be at least 1")
    for tool in ("jobforge-service",):
        if not (BIN / tool).exists():
            parser.error(f"{BIN / tool} not found: install the package first (make test / make demo do)")
    return run_in_scratch("jobforge-bench-", args.keep, lambda work: bench(work, args.rounds, args.tags))


if __name__ == "__main__":
    sys.exit(main())
