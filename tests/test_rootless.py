"""Rootless Buildah: the task scripts build, test and publish as an unprivileged user with sub-uids.

Run as root (CI), the test creates a dedicated build user with /etc/subuid and /etc/subgid ranges, as a Nomad
client is set up in the reference; run as an ordinary user, it runs the scripts as that user. Either way no
phase runs as root. The scripts are stdlib-only, so they run under the system python3 from a copy the user
can read.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from jobforge.devinfra import build_network_here
from tests.support.gitrepo import GitRepo

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BUILD_USER = "jobforge-build"
SUBID_START, SUBID_COUNT = 300000, 65536


def _ensure_subids(path: str, user: str) -> None:
    with open(path, encoding="utf-8") as fh:
        if any(line.split(":", 1)[0] == user for line in fh):
            return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{user}:{SUBID_START}:{SUBID_COUNT}\n")


@pytest.fixture(scope="module")
def build_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        pwd.getpwnam(BUILD_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/usr/sbin/nologin", BUILD_USER],
                       check=True)
    _ensure_subids("/etc/subuid", BUILD_USER)
    _ensure_subids("/etc/subgid", BUILD_USER)
    return pwd.getpwnam(BUILD_USER)


@pytest.fixture
def workspace(build_user):
    """A directory the build user owns, outside root's private tmp, holding the scripts, repo and storage."""
    path = Path(tempfile.mkdtemp(prefix="jobforge-rootless-"))
    shutil.copytree(ROOT / "templates" / "tasks", path / "tasks")
    GitRepo.from_dir(path / "hello", ROOT / "examples" / "hello")
    for sub in ("storage", "runroot"):
        (path / sub).mkdir()
    subprocess.run(["chown", "-R", f"{build_user.pw_uid}:{build_user.pw_gid}", str(path)], check=True)
    path.chmod(0o755)
    yield path
    subprocess.run(["buildah", "unshare", "rm", "-rf", str(path)], check=False, capture_output=True,
                   env={"PATH": os.environ["PATH"], "HOME": build_user.pw_dir}, **as_user(build_user))
    shutil.rmtree(path, ignore_errors=True)


def run_phase(user: pwd.struct_passwd, workspace: Path, phase: str, payload: dict) -> subprocess.CompletedProcess:
    payload_file = workspace / f"{phase}-{uuid.uuid4().hex[:6]}.json"
    payload_file.write_text(json.dumps({**payload, "phase": phase}))
    os.chown(payload_file, user.pw_uid, user.pw_gid)
    workdir = workspace / f"work-{phase}-{uuid.uuid4().hex[:6]}"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8",
        "JOBFORGE_PAYLOAD": str(payload_file), "JOBFORGE_WORKDIR": str(workdir),
        "JOBFORGE_BUILDAH_ROOT": str(workspace / "storage"), "JOBFORGE_BUILDAH_RUNROOT": str(workspace / "runroot"),
        "JOBFORGE_BUILD_NETWORK": build_network_here(),
    }
    return subprocess.run(["/usr/bin/python3", str(workspace / "tasks" / f"{phase}.py")], env=env, cwd=workspace,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, **as_user(user))


def as_user(user: pwd.struct_passwd) -> dict:
    """Popen arguments that drop to `user` (only root may switch; an ordinary user already is `user`)."""
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if os.geteuid() == 0 else {}


def test_build_test_publish_as_an_unprivileged_user(build_user, workspace, registry, base_image):
    assert build_user.pw_uid != 0
    job_id = uuid.uuid4().hex
    name = f"rootless-{job_id[:8]}"
    payload = {
        "job_id": job_id, "repo_url": f"file://{workspace / 'hello'}", "git_ref": "main",
        "dockerfile_path": "Dockerfile", "dockerfile_context": ".",
        "build_args": {"BASE_IMAGE": base_image}, "target": None, "clear_cache": False,
        "temp_image": f"{registry.host}/temp-{name}:{job_id}", "tls_verify": False,
        "test": {"entry_point": True, "commands": ["id -u", "/app/run-tests.sh"], "env": {}, "secret_env": []},
        "publish_targets": [f"{registry.host}/{name}:{job_id}", f"{registry.host}/{name}:rootless"],
    }
    for phase in ("build", "test", "publish"):
        result = run_phase(build_user, workspace, phase, payload)
        assert result.returncode == 0, (phase, result.stdout[-3000:], result.stderr[-3000:])
        if phase == "test":
            lines = result.stdout.splitlines()
            assert "Hello, world!" in lines and "0" in lines  # root inside the container, not on the host
    digests = {registry.manifest_digest(name, tag) for tag in (job_id, "rootless")}
    assert len(digests) == 1 and None not in digests
    owners = {p.stat().st_uid for p in (workspace / "storage").iterdir()}
    assert owners == {build_user.pw_uid}  # the layer cache belongs to the build user, not root


async def test_reap_removes_the_build_users_leftover_containers_as_that_user(build_user, tmp_path):
    """A SIGKILLed service leaves a killed build's working container in the build user's rootless storage; the
    next start removes it, and the storage stays the build user's (root never writes into it)."""
    from jobforge.backends.local import LocalBackend

    if os.geteuid() == 0:  # the build user's own storage, where the service's phases run their buildah
        storage = Path(build_user.pw_dir) / ".local" / "share" / "jobforge"
        root, runroot = storage / "buildah", storage / "buildah-run"
    else:
        root, runroot = tmp_path / "buildah" / "root", tmp_path / "buildah" / "runroot"
    buildah = ["buildah", "--storage-driver", "vfs", "--root", str(root), "--runroot", str(runroot)]
    env = {"PATH": os.environ["PATH"], "HOME": build_user.pw_dir}
    name = f"killed-bud-{uuid.uuid4().hex[:8]}"
    subprocess.run([*buildah, "from", "--name", name, "scratch"], env=env, check=True, capture_output=True,
                   **as_user(build_user))
    backend = LocalBackend(work_dir=tmp_path / "data" / "work", storage_root=tmp_path / "data" / "buildah" / "root",
                           storage_runroot=tmp_path / "data" / "buildah" / "runroot", registry_url="127.0.0.1:1",
                           tls_verify=False, build_user=build_user.pw_name)
    await backend.reap()
    left = subprocess.run([*buildah, "containers", "--format", "{{.ContainerName}}"], env=env, check=True,
                          capture_output=True, text=True, **as_user(build_user)).stdout.split()
    assert name not in left
    written = [*root.iterdir(), *(root / "vfs-containers").iterdir()]  # the lock file, containers.json, ...
    assert {path.lstat().st_uid for path in written} == {build_user.pw_uid}
