"""Layer cache: the build phase's first build vs a rebuild on a warm node vs a rebuild on a cold node.

    .venv/bin/python bench/cache.py [--rounds 5] [--sleep 3] [--keep]

Each round makes a new Dockerfile (a `RUN sleep 3` step with a fresh stamp, so nothing is cached yet) and runs
the real build phase script (templates/tasks/build.py, as the local backend runs it: clone, pull of the base
image, sandboxed `buildah bud --layers --cache-from/--cache-to <registry>/cache/<image>`, push) three times:

* **first**: empty cache for this Dockerfile (the base image is already in the local store);
* **warm**: the same node again (the local `--layers` store has every layer);
* **cold**: a node whose local storage was wiped (a fresh containers-storage): only the registry cache helps.

Prints one JSON object on stdout (progress on stderr): medians per variant of the whole phase and of the `bud`
step alone (from the phase's `==> building` line to its `==> pushing` line), and their ratios to the first
build. Goals (issue 11): warm <= 0.2x, cold <= 0.35x of the first build. No assertion is made on the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from jobforge.devinfra import Registry, git_repo_of, progress, remove_tree, run_in_scratch, seed_busybox_image

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "templates" / "tasks" / "build.py"
GOALS = {"warm": 0.2, "cold": 0.35}
VARIANTS = ("first", "warm", "cold")


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def build_phase(work: Path, storage: Path, payload: dict) -> dict:
    """One run of the build phase script; wall time of the phase and of its bud step."""
    workdir = work / f"build-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    payload_path = workdir.with_suffix(".json")
    payload_path.write_text(json.dumps(payload))
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "JOBFORGE_PAYLOAD": str(payload_path), "JOBFORGE_WORKDIR": str(workdir),
           "JOBFORGE_BUILDAH_ROOT": str(storage / "root"), "JOBFORGE_BUILDAH_RUNROOT": str(storage / "runroot")}
    marks: dict[str, float] = {}
    lines: list[str] = []
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(BUILD)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for key, prefix in (("bud", "==> building"), ("push", "==> pushing")):
            if line.startswith(prefix):
                marks[key] = time.perf_counter()
    code = proc.wait()
    ended = time.perf_counter()
    shutil.rmtree(workdir, ignore_errors=True)
    if code != 0 or "bud" not in marks or "push" not in marks:
        raise RuntimeError(f"build phase failed ({code}):\n{''.join(lines[-40:])}")
    text = "".join(lines)
    return {"phase": ended - started, "bud": marks["push"] - marks["bud"],
            "cache_lines": {"used": text.count("--> Using cache"),
                            "pulled_from_registry": text.count("--> Cache pulled from remote")}}


def tool_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "missing"


def bench(work: Path, rounds: int, sleep: float) -> dict:
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with Registry(work / "registry") as registry:
        progress("seeding busybox into a throw-away registry")
        warm_storage = work / "warm"
        base = seed_busybox_image(registry.host, warm_storage / "root", warm_storage / "runroot")
        for number in range(rounds):
            stamp = uuid.uuid4().hex
            source = work / f"src-{number}"
            source.mkdir()
            (source / "Dockerfile").write_text(
                f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN sleep {sleep:g} && echo {stamp} > /stamp\n"
                "RUN echo built > /built\nCMD [\"cat\", \"/stamp\"]\n")
            repo_url = git_repo_of(source, work / f"repo-{number}")
            job_payload = {
                "repo_url": repo_url, "git_ref": "main", "dockerfile_path": "Dockerfile", "dockerfile_context": ".",
                "build_args": {"BASE_IMAGE": base}, "target": None, "clear_cache": False, "tls_verify": False,
                "cache_repo": f"{registry.host}/cache/bench-{number}", "cache_ttl": 7 * 24 * 3600,
                "cache_max_bytes": None, "insecure_registries": [], "publish_targets": [],
            }
            for variant in VARIANTS:
                job_id = uuid.uuid4().hex
                payload = {**job_payload, "job_id": job_id, "phase": "build",
                           "temp_image": f"{registry.host}/temp-bench-{number}:{job_id}"}
                storage = warm_storage if variant != "cold" else work / f"cold-{number}"
                result = build_phase(work, storage, payload)
                results[variant].append(result)
                progress(f"round {number + 1}/{rounds} {variant}: phase {result['phase']:.2f} s, "
                         f"bud {result['bud']:.2f} s")
                if variant == "cold":
                    remove_tree(storage)

    medians = {v: {"phase_s": median([r["phase"] for r in results[v]]), "bud_s": median([r["bud"] for r in results[v]]),
                   "phase_runs": [round(r["phase"], 3) for r in results[v]],
                   "cache_lines_last_run": results[v][-1]["cache_lines"]} for v in VARIANTS}
    ratios = {v: {"phase": round(medians[v]["phase_s"] / medians["first"]["phase_s"], 3),
                  "bud": round(medians[v]["bud_s"] / medians["first"]["bud_s"], 3),
                  "goal": GOALS[v]} for v in ("warm", "cold")}
    for ratio in ratios.values():
        ratio["phase_within_goal"] = ratio["phase"] <= ratio["goal"]
        ratio["bud_within_goal"] = ratio["bud"] <= ratio["goal"]
    return {
        "benchmark": "cache",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "buildah": tool_version(["buildah", "--version"]),
                    "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "inputs": {"rounds": rounds, "dockerfile": f"FROM busybox; RUN sleep {sleep:g} (+ fresh stamp); RUN echo; CMD",
                   "phase": "templates/tasks/build.py: clone, base pull, sandboxed bud with the registry cache, push",
                   "cold": "a fresh containers-storage per run (base image pulled by the phase itself)",
                   "storage_driver": "vfs"},
        "medians": medians,
        "ratios_to_first": ratios,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each a first, warm and cold build (default 5)")
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds of the Dockerfile's RUN step (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.rounds < 1 or args.sleep < 0:
        parser.error("--rounds must be at least 1 and --sleep not negative")
    return run_in_scratch("jobforge-bench-cache-", args.keep, lambda work: bench(work, args.rounds, args.sleep))


if __name__ == "__main__":
    sys.exit(main())
