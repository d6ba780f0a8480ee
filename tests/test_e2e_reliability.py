"""Real faults around real builds (local backend, buildah, skopeo, docker-registry, git on 127.0.0.1): kills at
any moment, SIGKILL of the service during a phase, and a registry that stops during publish. Every job ends with
a specific error, and nothing of it is left behind: no process, no buildah container, no workspace, no tag."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
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


def test_sigkill_of_the_service_during_publish_then_restart(tmp_path, base_image):
    """The service dies while the publish phase pushes a tag (a registry gate kills it right when that manifest
    arrives, after the job's own id tag was published); after the restart the job is FAILED in publish, what it published is rolled back by
    the cleanup, and nothing of it is left."""
    killed = threading.Event()
    with Registry(tmp_path / "registry") as reg, RegistryGate(reg.host) as gate, \
            ServiceProcess(tmp_path / "data", gate.host,
                           JOBFORGE_INSECURE_REGISTRIES=base_image.split("/")[0]) as svc:
        cfg = config_for(GitRepo.from_dir(tmp_path / "hello", EXAMPLE), gate.host, base_image, image_tags=["t0"])
        name = cfg["image_name"]

        def sigkill() -> None:
            svc.proc.send_signal(signal.SIGKILL)
            svc.proc.wait()
            killed.set()
        gate.on("PUT", f"/{name}/manifests/t0", sigkill)  # the job's id tag is published already
        job_id = submit(svc, cfg)
        assert killed.wait(300), "the publish phase never pushed a manifest"
        svc.start()  # same data dir and port: reaps leftovers before it answers
        final = watch(svc.url, job_id)
        assert (final["status"], final["failed_phase"]) == ("FAILED", "publish"), final
        assert final["error"] == ("the server restarted while the publish phase was running; "
                                  "the local backend cannot resume it")
        assert final["temp_image_deleted"] is True and final["cleanup_error"] is None
        assert job_processes(svc.data_dir, job_id) == [] and containers(svc.data_dir) == []
        assert not (svc.data_dir / "work" / job_id).exists()
        assert reg.tags(name) == [], "what the killed publish pushed is rolled back"
        assert not reg.has_manifest(f"temp-{name}", job_id)


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


# ---------------------------------------------------------------- (6) a full disk, whatever fills it first

def tmpfs(path: Path, size: str) -> Path:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)  # root in CI
    return path


@pytest.fixture
def disks(tmp_path):
    """Mount points of small tmpfs disks, unmounted at the end: `disks("data", "2m")`."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        mounted.append(tmpfs(tmp_path / name, size))
        return mounted[-1]
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all free space of `disk` but `leave` bytes."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(stat.f_bavail * stat.f_frsize - leave, 1))
    return filler


CHATTY = {"commands": ["i=0; while [ $i -lt 2000000 ]; do echo \"line $i of a test that talks a lot\"; "
                       "i=$((i+1)); done; sleep 600"]}  # then it holds the space
ENDLESS = {"commands": [f"while :; do echo '{'a line of a test that never stops talking; ' * 5}'; done"]}


def lost_lines_markers(svc: ServiceProcess, job_id: str) -> list[str]:
    return [line for phase in svc.logs(job_id).values() for line in phase if line.startswith("[log lines lost: ")]


def test_a_2mib_data_disk_filled_by_a_jobs_log_fails_that_job_only(disks, tmp_path, registry, base_image):
    """Acceptance 6: the data dir (store and logs) on a 2 MiB tmpfs, phase workspaces and buildah's storage on
    another disk (JOBFORGE_SCRATCH_DIR). The job's log lines fill the data disk up to the reserve kept for job
    records, so the job's failure is recorded while the disk is still full."""
    data = disks("data", "2m")
    svc = ServiceProcess(data, registry.host, JOBFORGE_SCRATCH_DIR=str(tmp_path / "scratch"))
    svc.log_path = tmp_path / "service.log"  # the service's own log is not the point here
    with svc:
        repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
        earlier = submit(svc, config_for(repo, registry.host, base_image))
        assert watch(svc.url, earlier)["status"] == "SUCCEEDED"
        logs_before = svc.logs(earlier)
        assert not (data / "work").exists() and not (data / "buildah").exists()
        filler = fill(data, leave=1024 * 1024)  # the reserve (512 KiB) and room for some lines
        job_id = submit(svc, config_for(repo, registry.host, base_image, test=CHATTY))
        final = watch(svc.url, job_id)
        assert svc.get("/health")[0] == 200 and svc.proc.poll() is None
        assert (final["status"], final["failed_phase"]) == ("FAILED", "test"), final["error"]
        assert final["error"].startswith("no space left on device: log lines of the test phase could not be "
                                         "stored"), final["error"]
        assert any(line.startswith("line ") for line in svc.logs(job_id)["test"]), "lines were stored up to the reserve"
        markers = lost_lines_markers(svc, job_id)
        assert markers and "lines could not be stored (no space left on device)" in markers[0], markers
        assert svc.logs(earlier) == logs_before
        assert sleeping(600) == "" and job_processes(tmp_path / "scratch", job_id) == []
        filler.unlink()
        after = watch(svc.url, submit(svc, config_for(repo, registry.host, base_image)))
        assert after["status"] == "SUCCEEDED", after["error"]


@pytest.mark.parametrize("max_log_lines", ["1000000", "1000"])
def test_a_full_workspace_disk_fails_the_phase_even_when_its_output_is_lost_silently(disks, tmp_path, registry,
                                                                                     base_image, max_log_lines):
    """A test container's output goes to a file in the phase's workspace; when that disk fills, the writes fail
    with nothing read back to say so (the shell's error goes to the same file), and the store, on another
    disk, has room. With a 1000-line log cap the service stored nothing of it for long already. Either way
    the phase fails at once with "no space left on device" instead of running on."""
    scratch = disks("scratch", "300m")
    with ServiceProcess(tmp_path / "data", registry.host, JOBFORGE_SCRATCH_DIR=str(scratch),
                        JOBFORGE_MAX_LOG_LINES=max_log_lines) as svc:
        repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
        earlier = submit(svc, config_for(repo, registry.host, base_image))
        assert watch(svc.url, earlier)["status"] == "SUCCEEDED"
        filler = fill(scratch, leave=60 * 1024 * 1024)  # room for the build and the test container
        job_id = submit(svc, config_for(repo, registry.host, base_image, test=ENDLESS))
        final = watch(svc.url, job_id)
        assert (final["status"], final["failed_phase"]) == ("FAILED", "test"), final["error"]
        assert final["error"].startswith(f"test phase failed: no space left on device: the disk of {scratch}/"), \
            final["error"]
        markers = lost_lines_markers(svc, job_id)
        assert markers and markers[-1].startswith(f"[log lines lost: the disk of {scratch}/"), markers
        assert job_processes(scratch, job_id) == [] and containers(scratch) == []
        assert not (scratch / "work" / job_id).exists()
        filler.unlink()
        after = watch(svc.url, submit(svc, config_for(repo, registry.host, base_image)))
        assert after["status"] == "SUCCEEDED", after["error"]


def test_one_full_disk_for_everything_fails_the_job_whichever_write_fails_first(disks, tmp_path, registry,
                                                                                base_image):
    """Store, workspaces and buildah storage on one disk (the default layout): the output file and the log
    lines compete for the last bytes; whichever loses, the job fails with "no space left on device"."""
    data = disks("data", "300m")
    with ServiceProcess(data, registry.host) as svc:
        repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
        earlier = submit(svc, config_for(repo, registry.host, base_image))
        assert watch(svc.url, earlier)["status"] == "SUCCEEDED"
        logs_before = svc.get(f"/json/job/{earlier}/logs")[1]
        filler = fill(data, leave=60 * 1024 * 1024)  # room for the build and the test container
        job_id = submit(svc, config_for(repo, registry.host, base_image, test=CHATTY))
        final = watch(svc.url, job_id)
        assert svc.get("/health")[0] == 200
        assert final["status"] == "FAILED" and "no space left on device" in final["error"].lower(), final["error"]
        assert lost_lines_markers(svc, job_id), final["error"]
        assert svc.get(f"/json/job/{earlier}/logs")[1] == logs_before
        filler.unlink()
        after = watch(svc.url, submit(svc, config_for(repo, registry.host, base_image)))
        assert after["status"] == "SUCCEEDED", after["error"]
