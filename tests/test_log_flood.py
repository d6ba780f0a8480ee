"""Floods of output (issue 8, acceptance 3): a phase printing 100 MB without a newline, or 5 MB of binary, goes
through the service stack (local backend, service, SQLite, HTTP) in its own process. Its peak RSS (VmHWM) stays
under 300 MB, /health answers throughout, and the stored log ends with the truncation marker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobforge.client import Client
from tests.support.gitrepo import GitRepo
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello"
CONFIG = {"owner": "flood", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000"}
MIB = 1024 * 1024


def program(tmp_path: Path, build_output: str) -> str:
    """Stands in for the task interpreter: the build phase runs `build_output`, every other phase succeeds."""
    path = tmp_path / "phase.sh"
    path.write_text(f'#!/bin/sh\ncase "$1" in\n  */build.py) {build_output} ;;\nesac\nexit 0\n')
    path.chmod(0o755)
    return str(path)


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def run_flood(tmp_path: Path, build_output: str, **env: str) -> tuple[dict, dict, float, float]:
    """Submit one job; probe /health until it ends. Returns (final status, all logs, peak RSS MiB, max probe s)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.flood_service", str(tmp_path / "data"),
                             program(tmp_path, build_output)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().split()[1]}"
        with Client(url, timeout=60) as client:
            job_id = client.submit_job(CONFIG).job_id
            probes = []
            while True:
                start = time.perf_counter()
                status, body = get(f"{url}/health")
                probes.append(time.perf_counter() - start)
                assert (status, body) == (200, {"status": "ok"})
                job = client.get_status(job_id)
                if job.status.terminal:
                    break
            logs = client.get_logs(job_id)
        return job.model_dump(mode="json"), logs.logs, hwm_mib(proc.pid), max(probes)
    finally:
        proc.terminate()
        proc.wait(30)


def test_100_mb_without_a_newline_is_split_capped_and_marked(tmp_path):
    final, logs, rss, slowest = run_flood(tmp_path, "head -c 104857600 /dev/zero | tr '\\000' x")
    print(f"100 MB line: service VmHWM {rss:.0f} MiB, slowest /health {slowest * 1000:.0f} ms")
    assert final["status"] == "SUCCEEDED", final
    build = logs["build"]
    assert build[-1].startswith("[log truncated: over 67108864 bytes")
    pieces = build[:-1]
    assert len(pieces) == 63  # 64 MiB of 1 MiB pieces (each with its marker), then the truncation marker
    assert all(p.endswith("[line split: longer than 1048576 bytes, continued on the next line]") for p in pieces)
    assert all(len(p.encode()) <= MIB + 100 and set(p.split(" [line split")[0]) == {"x"} for p in pieces)
    assert rss < 300
    assert slowest < 5  # generous; the measured value is printed above


def test_5_mb_of_binary_is_stored_as_text_and_capped(tmp_path):
    final, logs, rss, slowest = run_flood(tmp_path, "head -c 5242880 /dev/urandom", JOBFORGE_MAX_LOG_BYTES=str(4 * MIB))
    print(f"5 MB binary: service VmHWM {rss:.0f} MiB, slowest /health {slowest * 1000:.0f} ms")
    assert final["status"] == "SUCCEEDED", final
    build = logs["build"]
    assert build[-1].startswith("[log truncated: over 4194304 bytes")
    assert sum(len(line.encode()) for line in build) > 3 * MIB
    assert rss < 300
    assert slowest < 5


# ---------------------------------------------------------------- the same through the real service and buildah

@pytest.fixture(scope="module")
def real_service(tmp_path_factory, registry, base_image):
    with ServiceProcess(tmp_path_factory.mktemp("flood-service"), registry.host) as svc:
        yield svc


@pytest.mark.e2e
@pytest.mark.parametrize("command, marker", [
    ("yes x | tr -d '\\n' | head -c 104857600", "[log truncated: over 67108864 bytes"),
    ("head -c 5242880 /dev/urandom; echo; echo after-binary", "after-binary"),
], ids=["100-mb-line", "5-mb-binary"])
def test_a_flooding_test_command_through_the_real_service(real_service, registry, base_image, tmp_path, command,
                                                          marker):
    repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
    cfg = {**CONFIG, "repo_url": str(repo.path), "registry_url": registry.host, "image_name": "flood",
           "build_args": {"BASE_IMAGE": base_image}, "test": {"commands": [command]}}
    url = real_service.url
    with Client(url, timeout=60) as client:
        job_id = client.submit_job(cfg).job_id
        probes = []
        while True:
            start = time.perf_counter()
            assert get(f"{url}/health") == (200, {"status": "ok"})
            probes.append(time.perf_counter() - start)
            job = client.get_status(job_id)
            if job.status.terminal:
                break
        test_log = client.get_logs(job_id, phase="test").logs["test"]
    rss = hwm_mib(real_service.proc.pid)
    print(f"{command!r}: service VmHWM {rss:.0f} MiB, slowest /health {max(probes) * 1000:.0f} ms "
          f"over {len(probes)} probes, {len(test_log)} test log lines")
    assert job.status.value == "SUCCEEDED", job.error
    assert any(line.startswith(marker) for line in test_log)  # the truncation marker, or the line after 5 MB
    if marker.startswith("[log truncated"):
        assert test_log[-1].startswith(marker)  # nothing of the task after it
    assert all(len(line.encode()) <= MIB + 100 for line in test_log)
    assert rss < 300
    assert max(probes) < 5
