"""Issue 10, Vault through hvac (acceptance 5): the real service with the local backend reads the jobs' KV v2
secrets from the Vault double itself (buildah, skopeo, git, docker-registry on 127.0.0.1):

- `registry_credentials_path` holds the htpasswd registry's user and password: the job publishes there, and the
  service itself has no credential for that registry;
- a `test.vault_secrets` value reaches the test container (the test prints its sha256 and, to prove the masking,
  the value itself) and appears nowhere else: logs, status, history, the service log;
- a mapping naming a service variable gets nothing, even with Vault configured;
- a path Vault refuses fails the phase with an error naming the path;
- `git_credentials_path` holding an `ssh_key` (and `known_hosts`): the job's repository is cloned from a real sshd
  on loopback with that key, which appears nowhere.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.doubles.vault import FakeVault
from tests.support.gitrepo import GitRepo
from tests.support.service import ServiceProcess
from tests.support.sshd import Sshd, fingerprint, keygen
from tests.test_e2e import run_job

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"
TOKEN = uuid.uuid4().hex[:10]
APP_SECRET = f"app-secret-{TOKEN}"
SERVICE_PW = f"svc-registry-pw-{TOKEN}"
VAULT_TOKEN = f"vault-token-{TOKEN}"
SECRETS = (APP_SECRET, SERVICE_PW, AUTH_PASSWORD, VAULT_TOKEN)


@pytest.fixture(scope="module")
def vault():
    fake = FakeVault()
    fake.put("e2e-vault/ok/registry", {"username": AUTH_USER, "password": AUTH_PASSWORD})
    fake.put("e2e-vault/ok/app", {"token": APP_SECRET, "other": "x"})
    fake.add_token(VAULT_TOKEN, {"secret/data/e2e-vault/ok/*": ["read"]})
    with fake.in_thread() as url:
        yield fake, url


@pytest.fixture(scope="module")
def svc(tmp_path_factory, registry, base_image, auth_registry, vault):
    _, url = vault
    data = tmp_path_factory.mktemp("vault-svc")
    token_file = data / "vault-token"
    token_file.write_text(VAULT_TOKEN + "\n")
    token_file.chmod(0o600)
    env = {"VAULT_ADDR": url, "VAULT_TOKEN_FILE": str(token_file),
           "REGISTRY_USERNAME": "svc-registry", "REGISTRY_PASSWORD": SERVICE_PW,
           "JOBFORGE_INSECURE_REGISTRIES": auth_registry.host,
           "JOBFORGE_VAULT_ALLOWED_PATHS": "secret/data/e2e-vault"}
    with ServiceProcess(data, registry.host, **env) as service:
        yield service


@pytest.fixture(scope="module")
def repo(git_http_server, tmp_path_factory) -> str:
    source = GitRepo.from_dir(tmp_path_factory.mktemp("vault-src") / "hello", EXAMPLE)
    return git_http_server.serve(source, f"hello-vault-{TOKEN}")


@pytest.fixture
def config(registry, base_image, repo):
    def make(**changes) -> dict:
        return {"owner": "e2e", "repo_url": repo, "image_name": f"hello-{uuid.uuid4().hex[:8]}",
                "registry_url": registry.host, "build_args": {"BASE_IMAGE": base_image},
                "test": {"commands": ["/app/run-tests.sh"]}, **changes}
    return make


def everything(svc: ServiceProcess, job_ids: list[str]) -> str:
    parts = [svc.post("/json/getHistory", {"limit": 100})[1], svc.log_path.read_text(errors="replace")]
    for job_id in job_ids:
        parts += [svc.get(f"/json/job/{job_id}/status")[1], svc.get(f"/json/job/{job_id}/logs")[1]]
    return json.dumps(parts)


def test_vault_credentials_publish_and_a_vault_secret_reaches_only_the_test(svc, config, auth_registry, vault):
    fake, _ = vault
    cfg = config(registry_url=auth_registry.host, image_tags=["stable"],
                 registry_credentials_path="secret/data/e2e-vault/ok/registry",
                 test={"commands": ['echo "sha:$(printf %s "$APP_TOKEN" | sha256sum | cut -d" " -f1)"',
                                    'echo "raw:$APP_TOKEN"'],
                       "vault_policies": ["e2e"],
                       "vault_secrets": [{"path": "secret/data/e2e-vault/ok/app", "fields": {"token": "APP_TOKEN"}}]})
    job_id, final, logs = run_job(svc, cfg)
    assert final["status"] == "SUCCEEDED", (final["error"], logs)
    assert sorted(auth_registry.tags(cfg["image_name"])) == sorted([job_id, "stable"])
    assert f"sha:{hashlib.sha256(APP_SECRET.encode()).hexdigest()}" in logs["test"]
    assert "raw:***" in logs["test"]  # printed by the test itself, masked
    assert {s.path for s in fake.seen if s.token == VAULT_TOKEN} >= {"secret/data/e2e-vault/ok/registry",
                                                                     "secret/data/e2e-vault/ok/app"}
    text = everything(svc, [job_id])
    assert not [s for s in SECRETS if s in text]


def test_a_secret_mapping_naming_service_variables_gets_nothing(svc, config):
    cfg = config(test={"commands": ['echo "leak:$REGISTRY_PASSWORD"'], "vault_policies": ["e2e"],
                       "vault_secrets": [{"path": "secret/data/e2e-vault/ok/app",
                                          "fields": {"missing": "REGISTRY_PASSWORD"}}]})
    job_id, final, logs = run_job(svc, cfg)
    assert (final["status"], final["failed_phase"]) == ("FAILED", "test"), final
    assert "was not fetched for this job" in final["error"]
    assert not any(line.startswith("leak:") for line in logs["test"])
    assert not [s for s in SECRETS if s in everything(svc, [job_id])]


def test_a_path_vault_refuses_fails_the_phase_naming_the_path(svc, config):
    cfg = config(registry_credentials_path="secret/data/e2e-vault/denied/registry")
    job_id, final, logs = run_job(svc, cfg)
    assert (final["status"], final["failed_phase"]) == ("FAILED", "build"), final
    assert final["error"] == ("build phase could not read its Vault secrets: Vault refused to read "
                              "secret/data/e2e-vault/denied/registry: permission denied")
    assert not [s for s in SECRETS if s in everything(svc, [job_id])]


def test_a_repository_over_ssh_is_cloned_with_the_jobs_vault_key(svc, config, vault, tmp_path):
    fake, _ = vault
    (tmp_path / "keys").mkdir()
    private, public = keygen(tmp_path / "keys" / "job")
    source = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
    with Sshd(tmp_path / "sshd", public) as sshd:
        fake.put("e2e-vault/ok/git", {"ssh_key": private, "known_hosts": sshd.known_hosts_line})
        url = f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}{source.path}"
        job_id, final, logs = run_job(svc, config(repo_url=url, git_credentials_path="secret/data/e2e-vault/ok/git"))
        sshd_log = sshd.log()
    assert final["status"] == "SUCCEEDED", (final["error"], logs)
    assert f"commit: {source.head()}" in logs["build"]
    assert fingerprint(public) in sshd_log  # the job's key, from Vault, was the one sshd accepted
    body = [line for line in private.splitlines() if "PRIVATE KEY" not in line]
    text = everything(svc, [job_id])
    assert not [line for line in body if line in text]
