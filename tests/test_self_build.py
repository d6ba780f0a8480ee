"""Job Forge builds, tests and publishes its own service image through its own pipeline, and the image serves.

1. A Debian base with python3 is bootstrapped with `debootstrap` (tests/support/debian_base.py; the result is
   cached per machine) and pushed to the test registry: no public base image is reachable here.
2. A git copy of this checkout, plus its wheels (`make image-context`: the build itself needs no network), is
   submitted to a real `jobforge-service` (local backend): build from ./Containerfile with BASE_IMAGE = that base,
   test by running `jobforge-service --version` inside the built image, publish to the test registry.
3. The published image (`image_format: docker`, so the HEALTHCHECK survives) is pulled and its entry point run with
   buildah (chroot isolation shares the host's network), told to listen on loopback by SERVER_HOST (the image sets
   no address of its own): it answers /health, as the non-root user of the Containerfile, and the image's
   HEALTHCHECK command, run in the same container, passes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from jobforge.devinfra import free_port
from tests.support.debian_base import bootstrap_rootfs, push_base_image
from tests.support.gitrepo import GitRepo
from tests.support.service import ServiceProcess
from tests.test_e2e import watch

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("debootstrap") is None, reason="Debian package debootstrap missing")]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "jobforge-service"


@pytest.fixture(scope="session")
def debian_base_image(tmp_path_factory, registry, buildah_storage) -> str:
    """debootstrap'ed bookworm + python3, pushed to the test registry (once per session)."""
    base = tmp_path_factory.mktemp("debian")
    tar = bootstrap_rootfs(base / "rootfs")  # cached across runs (tests/support/debian_base.py)
    try:
        return push_base_image(tar, registry.host, buildah_storage.root, buildah_storage.runroot)
    finally:
        subprocess.run(["rm", "-rf", str(base / "rootfs")], check=False)


def checkout_copy(dest: Path) -> GitRepo:
    """A git repo of this checkout's files (tracked and untracked, not ignored) plus the image context wheels."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest.mkdir(parents=True)
    for rel in filter(None, files):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    result = subprocess.run(["make", "-s", "image-context", f"PY={sys.executable}"], cwd=dest,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    repo = GitRepo.create(dest)
    repo.git("add", "-A")
    repo.git("add", "-f", "wheels")  # ignored in the checkout, but the build context here
    repo.commit("self-build")
    return repo


def buildah(storage, *args: str) -> list[str]:
    return ["buildah", "--storage-driver", "vfs", "--root", str(storage.root), "--runroot", str(storage.runroot),
            *args]


def test_job_forge_builds_tests_and_publishes_its_own_image_which_serves(
        tmp_path, registry, buildah_storage, debian_base_image):
    repo = checkout_copy(tmp_path / "jobforge")
    assert any(p.name.startswith("jobforge-") and p.suffix == ".whl" for p in (repo.path / "wheels").iterdir())
    tag = f"self-{uuid.uuid4().hex[:8]}"
    config = {"owner": "self-build", "repo_url": str(repo.path), "image_name": IMAGE, "image_tags": [tag],
              "registry_url": registry.host, "dockerfile_path": "Containerfile",
              "build_args": {"BASE_IMAGE": debian_base_image}, "image_format": "docker",
              "test": {"commands": ["jobforge-service --version", "test \"$(id -u)\" = 10001"]}}
    with ServiceProcess(tmp_path / "service", registry.host) as svc:
        status, body = svc.post("/json/submitJob", {"job_config": config})
        assert status == 200, body
        job_id = body["job_id"]
        final = watch(svc.url, job_id)
        _, logs = svc.get(f"/json/job/{job_id}/logs")
    phases = logs["logs"]
    assert final["status"] == "SUCCEEDED", (final.get("error"), {k: v[-30:] for k, v in phases.items()})
    assert any(line.startswith("jobforge-service ") for line in phases["test"]), phases["test"]
    assert registry.has_manifest(IMAGE, tag) and registry.has_manifest(IMAGE, job_id)

    ref = f"{registry.host}/{IMAGE}:{tag}"
    # --raw: the config blob as pushed (without it skopeo converts it to OCI, which has no Healthcheck).
    inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config", "--raw", f"docker://{ref}"],
                               capture_output=True, text=True, check=True).stdout
    image_config = json.loads(inspected)["config"]
    manifest = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                                         capture_output=True, text=True, check=True).stdout)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"  # image_format: docker
    assert image_config["User"] == "10001:10001" and image_config["Entrypoint"] == ["jobforge-service"]
    healthcheck = image_config["Healthcheck"]
    assert healthcheck["Test"][0] == "CMD" and "/health" in healthcheck["Test"][-1], healthcheck
    assert healthcheck["Interval"] == 15 * 10**9 and healthcheck["Retries"] == 3
    assert not [e for e in image_config["Env"] if e.startswith("SERVER_HOST=")]  # the code's default: loopback

    container = subprocess.run(buildah(buildah_storage, "from", "--tls-verify=false", ref), check=True,
                               capture_output=True, text=True).stdout.strip()
    port = free_port()
    log_path = tmp_path / "image-service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(buildah(buildah_storage, "run", "--isolation", "chroot",
                                        "--env", "SERVER_HOST=127.0.0.1", "--env", f"SERVER_PORT={port}",
                                        "--env", "METRICS_PORT=0", container, "--", "jobforge-service"),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        answer = _health(f"http://127.0.0.1:{port}/health", proc, log_path)
        assert answer == {"status": "ok"}
        check = subprocess.run(buildah(buildah_storage, "run", "--isolation", "chroot", "--env",
                                       "SERVER_HOST=127.0.0.1", "--env", f"SERVER_PORT={port}", container, "--",
                                       *healthcheck["Test"][1:]), capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr  # the image's own HEALTHCHECK
        idle = subprocess.run(buildah(buildah_storage, "run", "--isolation", "chroot", "--env",
                                      f"SERVER_PORT={free_port()}", container, "--", *healthcheck["Test"][1:]),
                              capture_output=True, text=True, timeout=60)
        assert idle.returncode != 0  # and it fails where nothing answers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(buildah(buildah_storage, "rm", container), check=False, capture_output=True)


def _health(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> dict:
    """Poll the liveness endpoint against a deadline (a starting server offers no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the image's service exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.load(resp)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no /health answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
