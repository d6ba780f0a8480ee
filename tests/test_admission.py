"""The submit policy (jobforge.admission): local repositories and Vault paths a job may name, checked before
anything is stored or dispatched; plus the one URL-password mask (jobforge.rules.mask_url_passwords)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jobforge.admission import SubmitPolicy, VaultPathRule, parse_vault_path_rules
from jobforge.config import JobConfig
from jobforge.errors import ConfigError
from jobforge.models import HistoryParams, SubmitJobParams
from jobforge.pipeline import Policy
from jobforge.rules import mask_url_passwords
from jobforge.server.app import create_app
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.support.fake_backend import FakeBackend

BASE = {"owner": "team-a", "repo_url": "https://git.example/app.git", "image_name": "app",
        "registry_url": "registry.example:5000"}
SECRETS = {"vault_policies": ["p"], "entry_point": True,
           "vault_secrets": [{"path": "secret/data/team-a/app", "fields": {"token": "TOKEN"}}]}


def cfg(**changes) -> JobConfig:
    return JobConfig.model_validate({**BASE, **changes})


def refused(policy: SubmitPolicy, config: JobConfig) -> list[dict[str, str]]:
    with pytest.raises(ConfigError) as info:
        policy.check(config)
    assert info.value.http_status == 400
    return info.value.errors


@pytest.mark.parametrize("url", ["file:///srv/git/app.git", "/srv/git/app.git", "file://localhost/srv/x"])
def test_local_repositories_are_refused_by_default(url):
    (error,) = refused(SubmitPolicy(), cfg(repo_url=url))
    assert error["field"] == "job_config.repo_url"
    assert "JOBFORGE_ALLOW_FILE_REPOS" in error["rule"]
    SubmitPolicy(allow_file_repos=True).check(cfg(repo_url=url))


@pytest.mark.parametrize("url", ["https://git.example/a.git", "ssh://git@git.example/a.git", "git@git.example:a.git"])
def test_remote_repositories_pass(url):
    SubmitPolicy().check(cfg(repo_url=url))


def test_no_rules_means_no_vault_path():
    errors = refused(SubmitPolicy(), cfg(git_credentials_path="secret/data/team-a/git",
                                         registry_credentials_path="secret/data/team-a/reg", test=SECRETS))
    assert [e["field"] for e in errors] == ["job_config.git_credentials_path", "job_config.registry_credentials_path",
                                            "job_config.test.vault_secrets[0].path"]
    assert all("JOBFORGE_VAULT_ALLOWED_PATHS" in e["rule"] for e in errors)


def test_prefixes_match_whole_segments_per_owner():
    policy = SubmitPolicy(vault_paths=parse_vault_path_rules(
        "secret/data/shared, team-a=secret/data/team-a/, secret/data/jobs/{owner}"))
    ok = ["secret/data/shared", "secret/data/shared/x", "secret/data/team-a/app", "secret/data/jobs/team-a/x"]
    for path in ok:
        policy.check(cfg(git_credentials_path=path))
    for path in ["secret/data/shared-other", "secret/data/team-b/app", "secret/data/jobs/team-b/x", "secret/data"]:
        (error,) = refused(policy, cfg(git_credentials_path=path))
        assert error["field"] == "job_config.git_credentials_path"
    # another owner: the team-a rule does not apply, and its prefix is not revealed
    (error,) = refused(policy, cfg(owner="team-b", git_credentials_path="secret/data/team-a/app"))
    assert "team-a/" not in error["rule"].replace("jobs/{owner}", "")
    policy.check(cfg(owner="team-b", git_credentials_path="secret/data/jobs/team-b/git"))


def test_owner_placeholder_needs_a_plain_segment_owner():
    rule = VaultPathRule(prefix="secret/data/jobs/{owner}")
    assert rule.allows("team-a", "secret/data/jobs/team-a/x")
    assert not rule.allows("team-a/x", "secret/data/jobs/team-a/x/y")
    assert not rule.allows("a b", "secret/data/jobs/a b")


@pytest.mark.parametrize("text", ["=secret/x", "secret//x", "a=b=../x", "secret/{owner}x", "se cret"])
def test_malformed_rules_are_refused_at_startup(text, monkeypatch):
    with pytest.raises(ValueError):
        parse_vault_path_rules(text)
    monkeypatch.setenv("JOBFORGE_VAULT_ALLOWED_PATHS", text)
    with pytest.raises(ValueError, match="JOBFORGE_VAULT_ALLOWED_PATHS"):
        Settings()


def test_settings_build_the_policy(monkeypatch):
    monkeypatch.setenv("JOBFORGE_VAULT_ALLOWED_PATHS", "team-a=secret/data/team-a")
    monkeypatch.setenv("JOBFORGE_ALLOW_FILE_REPOS", "true")
    policy = Settings().submit_policy
    assert policy == SubmitPolicy(allow_file_repos=True, vault_paths=(VaultPathRule("secret/data/team-a", "team-a"),))
    assert Settings.model_fields["allow_file_repos"].default is False


def test_git_credentials_need_their_host(monkeypatch):
    monkeypatch.setenv("GIT_USERNAME", "bot")
    monkeypatch.setenv("GIT_PASSWORD", "pw")
    with pytest.raises(ValueError, match="JOBFORGE_GIT_CREDENTIAL_HOST"):
        Settings()
    monkeypatch.setenv("JOBFORGE_GIT_CREDENTIAL_HOST", "git.example:8443")
    assert Settings().git_username == "bot"


def test_credential_files_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="REGISTRY_AUTH_FILE"):
        Settings()
    (tmp_path / "missing.json").write_text('{"auths": {}}')
    monkeypatch.setenv("JOBFORGE_GIT_CREDENTIALS", str(tmp_path))
    with pytest.raises(ValueError, match="JOBFORGE_GIT_CREDENTIALS"):
        Settings()


def test_tls_verification_is_off_only_for_the_service_registry_and_listed_hosts(monkeypatch):
    monkeypatch.setenv("REGISTRY_URL", "127.0.0.1:5000/team")
    assert Settings().insecure_registry_hosts == ()
    monkeypatch.setenv("REGISTRY_TLS_VERIFY", "false")
    monkeypatch.setenv("JOBFORGE_INSECURE_REGISTRIES", " mirror.example:5001 ,")
    assert Settings().insecure_registry_hosts == ("127.0.0.1:5000", "mirror.example:5001")


async def test_a_refused_config_is_neither_stored_nor_dispatched(tmp_path):
    backend = FakeBackend()
    store = SqliteStore(tmp_path / "jobs.db")
    policy = SubmitPolicy(vault_paths=parse_vault_path_rules("secret/data/shared"))
    service = JobService(store, backend, policy=Policy(), max_concurrent_jobs=2,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000"), admission=policy)
    await service.start()
    client = TestClient(TestServer(create_app(service)))
    await client.start_server()
    try:
        bad = {**BASE, "test": {**SECRETS, "vault_secrets": [{"path": "secret/data/other", "fields": {"a": "A"}}]}}
        resp = await client.post("/json/submitJob", json={"job_config": bad})
        body = await resp.json()
        assert resp.status == 400
        assert body["error"]["data"][0]["field"] == "job_config.test.vault_secrets[0].path"
        resp = await client.post("/json", json={"jsonrpc": "2.0", "id": 1, "method": "submitJob",
                                                "params": {"job_config": {**BASE, "repo_url": "file:///etc"}}})
        body = await resp.json()
        assert body["error"]["code"] == -32602 and body["error"]["data"][0]["field"] == "job_config.repo_url"
        assert backend.dispatched == []
        assert (await service.get_history(HistoryParams())).total == 0
        await service.submit_job(SubmitJobParams(job_config=cfg(git_credentials_path="secret/data/shared/git")))
        assert len(backend.dispatched) == 1
    finally:
        await client.close()
        await service.aclose()
        await store.aclose()


@pytest.mark.parametrize(("text", "expected"), [
    ("https://user:pw@host/x", "https://user:***@host/x"),
    ("clone http://u:p@ss:w@127.0.0.1:8/r.git failed", "clone http://u:***@127.0.0.1:8/r.git failed"),
    ("two: https://a:b@h1/ and ssh://c:d@h2/p", "two: https://a:***@h1/ and ssh://c:***@h2/p"),
    ("https://:tok@h/x", "https://:***@h/x"),
    ("https://user@host/x git@host:a/b.git", "https://user@host/x git@host:a/b.git"),
    ("no url here: a:b@c", "no url here: a:b@c"),
])
def test_url_passwords_are_masked_wherever_they_appear(text, expected):
    assert mask_url_passwords(text) == expected
