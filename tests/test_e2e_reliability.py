"""Real faults around real builds (local backend, buildah, skopeo, docker-registry, git on 127.0.0.1): kills at
any moment, SIGKILL of the service during a phase, and a registry that stops during publish. Every job ends with
a specific error, and nothing of it is left behind: no process, no buildah container, no workspace, no tag."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from jobforge.devinfra import Registry
from tests.support.gitrepo import GitRepo
from tests.support.registry_gate import RegistryGate
from tests.support.service import ServiceProcess
from tests.test_e2e import EXAMPLE, submit, watch

pytestmark = pytest.mark.e2e


def containers(data_dir: Path) -> list[str]:
    """Buildah containers in the service's own storage."""
    storage = data_dir / "buildah"
    if not (storage / "root").exists():
        return []
    out = subprocess.run(["buildah", "--storage-driver", "vfs", "--root", str(storage / "root"), "--runroot",
                          str(storage / "runroot"), "containers", "--format", "{{.ContainerName}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def job_processes(data_dir: Path, job_id: str) -> list[int]:
    """Processes still running with one of the job's workspaces (their JOBFORGE_WORKDIR)."""
    marker = f"JOBFORGE_WORKDIR={data_dir / 'work' / job_id}/".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
            found.append(int(pid))
    return found


def sleeping(naptime: int) -> str:
    return subprocess.run(["pgrep", "-f", f"sleep {naptime}"], capture_output=True, text=True).stdout.strip()


def slow_repo(tmp_path: Path, naptime: int) -> GitRepo:
    repo = GitRepo.from_dir(tmp_path / f"slow-{naptime}", EXAMPLE)
    repo.commit("slow build", {"Dockerfile": "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
                                             f"RUN echo slow-step-begins && sleep {naptime}\n"})
    return repo


def config_for(repo: GitRepo, registry_host: str, base_image: str, **changes) -> dict:
    return {"owner": "e2e", "repo_url": str(repo.path), "image_name": f"rel-{uuid.uuid4().hex[:8]}",
            "registry_url": registry_host, "build_args": {"BASE_IMAGE": base_image},
            "test": {"commands": ["true"]}, **changes}


def assert_nothing_left(svc: ServiceProcess, job_id: str, naptime: int) -> None:
    assert sleeping(naptime) == "", "the phase's processes must be gone"
    left = job_processes(svc.data_dir, job_id)
    assert left == [], [(Path(f"/proc/{p}/cmdline").read_bytes(), Path(f"/proc/{p}/stat").read_text()) for p in left]
    assert containers(svc.data_dir) == []
    assert not (svc.data_dir / "work" / job_id).exists(), "the job's workspace must be removed"


@pytest.fixture(scope="module")
def service(tmp_path_factory, registry, base_image):
    with ServiceProcess(tmp_path_factory.mktemp("reliability"), registry.host, MAX_CONCURRENT_JOBS="2") as svc:
        yield svc


# ---------------------------------------------------------------- (2) a kill is honoured at every moment

@pytest.mark.parametrize("delay_ms", [0, 5, 50, 500])
def test_a_kill_at_any_moment_after_submit_ends_the_job_and_leaves_nothing(service, registry, base_image, tmp_path,
                                                                           delay_ms):
    naptime = random.randint(10000, 19999)
    job_id = submit(service, config_for(slow_repo(tmp_path, naptime), registry.host, base_image))
    time.sleep(delay_ms / 1000)  # the fault's timing is the test's input, not a synchronisation
    status, body = service.post("/json/killJob", {"job_id": job_id})
    assert (status, body["status"]) == (200, "FAILED")
    final = watch(service.url, job_id)
    assert (final["status"], final["error"]) == ("FAILED", "killed by user")
    assert final["temp_image_deleted"] is True
    assert_nothing_left(service, job_id, naptime)


# ---------------------------------------------------------------- (4) SIGKILL of the service during a phase

@pytest.mark.parametrize("phase", ["build", "test"])
def test_sigkill_of_the_service_during_a_phase_then_restart(tmp_path, registry, base_image, phase):
    naptime = random.randint(20000, 29999)
    if phase == "build":
        repo, marker, test = slow_repo(tmp_path, naptime), "slow-step-begins", {"commands": ["true"]}
    else:
        repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
        marker, test = "test-begins", {"commands": [f"echo test-begins; sleep {naptime}"]}
    with ServiceProcess(tmp_path / "data", registry.host) as svc:
        cfg = config_for(repo, registry.host, base_image, test=test)
        job_id = submit(svc, cfg)
        assert watch(svc.url, job_id, until_line=marker)["current_phase"] == phase
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait()
        svc.start()  # same data dir and port: reaps leftovers before it answers
        assert sleeping(naptime) == "", "the phase's processes must be gone"
        final = watch(svc.url, job_id)
        assert_nothing_left(svc, job_id, naptime)
        assert (final["status"], final["failed_phase"]) == ("FAILED", phase)
        assert final["error"] == (f"the server restarted while the {phase} phase was running; "
                                  "the local backend cannot resume it")
        assert final["temp_image_deleted"] is True
        assert not registry.has_manifest(f"temp-{cfg['image_name']}", job_id)


# ---------------------------------------------------------------- (1, 8) the registry stops during publish

def test_a_registry_outage_during_publish_fails_the_job_by_tag_and_leaves_no_tag(tmp_path, base_image):
    with Registry(tmp_path / "registry") as reg, RegistryGate(reg.host) as gate, \
            ServiceProcess(tmp_path / "data", gate.host, JOBFORGE_CLEANUP_BACKOFF="1s",
                           JOBFORGE_INSECURE_REGISTRIES=base_image.split("/")[0]) as svc:
        tags = [f"t{i}" for i in range(4)]
        cfg = config_for(GitRepo.from_dir(tmp_path / "hello", EXAMPLE), gate.host, base_image, image_tags=tags)
        name = cfg["image_name"]
        gate.on("PUT", f"/{name}/manifests/t1", reg.stop)  # the registry goes down while t1 is being pushed
        job_id = submit(svc, cfg)
        final = watch(svc.url, job_id)  # watchers get their end message while the registry is down
        assert (final["status"], final["failed_phase"]) == ("FAILED", "publish"), final["error"]
        assert f"publish stopped at {gate.host}/{name}:t1: copy to {gate.host}/{name}:t1 failed" in final["error"]
        assert f"not rolled back yet (the cleanup removes them once the registry is back): " \
               f"{gate.host}/{name}:{job_id}, {gate.host}/{name}:t0, {gate.host}/{name}:t1" in final["error"]
        assert final["temp_image_deleted"] is False and final["cleanup_error"]
        reg.start(port=reg.port)
        deadline = time.monotonic() + 120
        while svc.get(f"/json/job/{job_id}/status")[1]["temp_image_deleted"] is not True:
            assert time.monotonic() < deadline, "the background cleanup never deleted the temp image"
            time.sleep(0.5)  # waiting for the service's own retry schedule (JOBFORGE_CLEANUP_BACKOFF)
        assert reg.tags(name) == [], "no tag of the failed job may stay published"
        assert not reg.has_manifest(f"temp-{name}", job_id)
        assert svc.get(f"/json/job/{job_id}/status")[1]["cleanup_error"] is None
        # The queue goes on: the next job succeeds.
        nxt = submit(svc, config_for(GitRepo.from_dir(tmp_path / "hello2", EXAMPLE), gate.host, base_image))
        assert watch(svc.url, nxt)["status"] == "SUCCEEDED"


# ---------------------------------------------------------------- (6) a full data disk

@pytest.fixture
def small_disk(tmp_path):
    """The service's data dir on its own tmpfs (we run as root in CI)."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(data)], check=True)
    yield data
    subprocess.run(["umount", "-l", str(data)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all free space of `disk` but `leave` bytes."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, stat.f_bavail * stat.f_frsize - leave)
    return filler


def test_a_full_data_disk_fails_the_job_keeps_the_service_up_and_loses_nothing_earlier(small_disk, tmp_path,
                                                                                      registry, base_image):
    with ServiceProcess(small_disk, registry.host) as svc:
        repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
        earlier = submit(svc, config_for(repo, registry.host, base_image))
        assert watch(svc.url, earlier)["status"] == "SUCCEEDED"
        logs_before = svc.get(f"/json/job/{earlier}/logs")[1]
        filler = fill(small_disk, leave=60 * 1024 * 1024)  # room for the build and the test container
        chatty = {"commands": ["i=0; while [ $i -lt 2000000 ]; do echo \"line $i of a test that talks a lot\"; "
                               "i=$((i+1)); done; sleep 600"]}  # then it holds the space
        job_id = submit(svc, config_for(repo, registry.host, base_image, test=chatty))
        final = watch(svc.url, job_id)
        assert svc.get("/health")[0] == 200
        assert final["status"] == "FAILED" and "no space left on device" in final["error"].lower(), final["error"]
        logs = svc.logs(job_id)  # every page: the marker follows the lines that were stored
        assert any(line.startswith("[log lines lost: ") for phase in logs.values() for line in phase), final["error"]
        assert svc.get(f"/json/job/{earlier}/logs")[1] == logs_before
        filler.unlink()
        assert watch(svc.url, submit(svc, config_for(repo, registry.host, base_image)))["status"] == "SUCCEEDED"
