"""Git over ssh with the job's own key (issue 10): the key from the job's `git_credentials_path` (Vault KV v2 field
`ssh_key`, `known_hosts` for the host keys) read by the service through hvac from the Vault double, handed to the
real build script, which clones from a real OpenSSH server on loopback.

Observable: the clone's commit, which key sshd accepted (its log), the host-key check, and that the key appears
in no output and no file is left behind.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobforge.config import JobConfig
from jobforge.settings import VaultSettings
from jobforge.tasks import templates_dir
from jobforge.vault import VaultReader
from tests.doubles.vault import FakeVault
from tests.support.gitrepo import GitRepo
from tests.support.sshd import Sshd, fingerprint, keygen

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = templates_dir() / "tasks" / "build.py"


@pytest.fixture
def keys(tmp_path):
    """(authorized private key, its public line, another private key)."""
    (tmp_path / "keys").mkdir()
    private, public = keygen(tmp_path / "keys" / "job")
    other, _ = keygen(tmp_path / "keys" / "other")
    return private, public, other


@pytest.fixture
def server(tmp_path, keys):
    with Sshd(tmp_path / "sshd", keys[1]) as sshd:
        yield sshd


@pytest.fixture
def repo(tmp_path) -> GitRepo:
    return GitRepo.from_dir(tmp_path / "hello", ROOT / "examples" / "hello")


async def vault_env(secret: dict[str, str], repo_url: str) -> dict[str, str]:
    """What the service hands the build phase for a job naming `secret` (jobforge.vault, hvac, the double)."""
    fake = FakeVault()
    fake.put("team-a/git", secret)
    fake.add_token("reader", {"secret/data/team-a/*": ["read"]})
    await fake.start()
    try:
        reader = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": fake.url, "VAULT_TOKEN": "reader"}))
        config = JobConfig.model_validate({"owner": "team-a", "repo_url": repo_url, "image_name": "app",
                                           "registry_url": "127.0.0.1:5000",
                                           "git_credentials_path": "secret/data/team-a/git"})
        return await reader.phase_env("build", config)
    finally:
        await fake.stop()


def run_build(tmp_path: Path, repo_url: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    """The build script up to the clone: the repository has no `missing/Dockerfile`, so it stops right after."""
    workdir = tmp_path / f"build-{uuid.uuid4().hex[:6]}"
    payload = workdir.with_suffix(".json")
    payload.write_text(json.dumps({"job_id": "j1", "phase": "build", "repo_url": repo_url, "git_ref": "main",
                                   "dockerfile_path": "missing/Dockerfile", "temp_image": "127.0.0.1:5000/t:j1"}))
    proc = subprocess.run([sys.executable, str(BUILD)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
                               "JOBFORGE_PAYLOAD": str(payload), "JOBFORGE_WORKDIR": str(workdir), **env})
    return proc, workdir


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def assert_key_hidden(private: str, proc: subprocess.CompletedProcess, workdir: Path) -> None:
    output = proc.stdout + proc.stderr
    body = [line for line in private.splitlines() if "PRIVATE KEY" not in line]
    assert not any(line in output for line in body)
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(".git-ssh") or p.name.startswith(".git-known")]


async def test_a_clone_over_ssh_uses_the_jobs_vault_key_and_checks_the_host_key(tmp_path, keys, server, repo):
    private, public, _ = keys
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{server.port}{repo.path}"
    env = await vault_env({"username": "ignored", "ssh_key": private, "known_hosts": server.known_hosts_line}, url)
    assert env["JOBFORGE_JOB_GIT_SSH_KEY"] == private
    assert env["JOBFORGE_JOB_GIT_KNOWN_HOSTS"] == server.known_hosts_line

    proc, workdir = run_build(tmp_path, url, env)
    assert f"commit: {repo.head()}" in proc.stdout, proc.stdout + proc.stderr
    assert "missing/Dockerfile' does not exist" in proc.stderr  # it went on past the clone
    assert f"Accepted publickey for {getpass.getuser()}" in server.log()
    assert fingerprint(public) in server.log()  # the job's key, not one of the runner's
    assert "accepted on first use" not in proc.stdout
    assert_key_hidden(private, proc, workdir)


async def test_a_wrong_host_key_or_a_key_the_server_refuses_fails_clearly(tmp_path, keys, server, repo):
    private, _, other = keys
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{server.port}{repo.path}"
    shown = f"ssh://127.0.0.1:{server.port}{repo.path}"  # messages name the URL without its user
    _, impostor = keygen(tmp_path / "impostor")
    env = await vault_env({"ssh_key": private, "known_hosts": f"[127.0.0.1]:{server.port} {impostor}"}, url)
    spoofed, workdir = run_build(tmp_path, url, env)
    assert spoofed.returncode == 1 and "commit:" not in spoofed.stdout
    assert last_line(spoofed).startswith(
        f"ERROR: git fetch of {shown} failed: the ssh server's host key is not one of the known hosts"), spoofed.stderr
    assert_key_hidden(private, spoofed, workdir)

    # No known_hosts in Vault: the host key is taken on first use (and said so); an unauthorized key is refused.
    env = await vault_env({"ssh_key": other}, url)
    refused, workdir = run_build(tmp_path, url, env)
    assert "accepted on first use" in refused.stdout
    assert last_line(refused) == f"ERROR: repository not found or not readable: {shown}"
    assert_key_hidden(other, refused, workdir)


async def test_the_key_is_not_used_for_a_repository_fetched_otherwise(tmp_path, keys, repo):
    """A key is offered over ssh only: for any other URL it never reaches a file (nor ssh)."""
    private, _, _ = keys
    env = await vault_env({"ssh_key": private}, f"file://{repo.path}")
    proc, workdir = run_build(tmp_path, f"file://{repo.path}", env)
    assert f"commit: {repo.head()}" in proc.stdout
    assert "accepted on first use" not in proc.stdout
    assert_key_hidden(private, proc, workdir)


async def test_without_a_job_key_ssh_offers_none_of_the_runners_keys(tmp_path, keys, server, repo):
    """The runner's own default key is authorized on the server a job names, yet a job with no key of its own
    gets in with nothing: ssh neither reads ~/.ssh nor asks an agent."""
    private, public, _ = keys
    ssh_dir = tmp_path / ".ssh"  # run_build's HOME
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "id_ed25519").write_text(private)
    (ssh_dir / "id_ed25519").chmod(0o600)
    (ssh_dir / "id_ed25519.pub").write_text(public + "\n")
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{server.port}{repo.path}"
    proc, _ = run_build(tmp_path, url, {"SSH_AUTH_SOCK": str(tmp_path / "agent.sock")})
    assert proc.returncode == 1 and "commit:" not in proc.stdout
    assert last_line(proc) == f"ERROR: repository not found or not readable: ssh://127.0.0.1:{server.port}{repo.path}"
    assert "Accepted publickey" not in server.log()
    assert fingerprint(public) not in server.log()
