"""jobforge.vault against the Vault double, with hvac as the client: which phase gets which secret (the rule the
Nomad templates follow), the variables they land in, and failures that name the path and never a value."""

from __future__ import annotations

import pytest

from jobforge.config import JobConfig
from jobforge.errors import SecretReadError
from jobforge.settings import VaultSettings
from jobforge.vault import VaultReader, no_vault
from tests.doubles.vault import FakeVault

BASE = {"owner": "team-a", "repo_url": "https://git.example/app.git", "image_name": "app",
        "registry_url": "registry.example:5000", "git_credentials_path": "secret/data/team-a/git",
        "registry_credentials_path": "secret/data/team-a/registry",
        "test": {"commands": ["true"], "vault_policies": ["p"],
                 "vault_secrets": [{"path": "secret/data/team-a/app", "fields": {"token": "APP_TOKEN",
                                                                                 "port": "APP_PORT",
                                                                                 "absent": "APP_ABSENT"}}]}}
REGISTRY = {"JOBFORGE_JOB_REGISTRY_USERNAME": "reg-user", "JOBFORGE_JOB_REGISTRY_PASSWORD": "reg-pw"}


def cfg(**changes) -> JobConfig:
    return JobConfig.model_validate({**BASE, **changes})


@pytest.fixture
async def vault():
    fake = FakeVault()
    fake.put("team-a/git", {"username": "git-user", "password": "git-pw"})
    fake.put("team-a/registry", {"username": "reg-user", "password": "reg-pw"})
    fake.put("team-a/app", {"token": "t0k", "port": 8080})
    fake.add_token("reader", {"secret/data/team-a/*": ["read"]})
    await fake.start()
    yield fake
    await fake.stop()


def reader(fake: FakeVault, **settings) -> VaultReader:
    return VaultReader(VaultSettings.model_validate({"VAULT_ADDR": fake.url, "VAULT_TOKEN": "reader", **settings}))


async def test_each_phase_gets_exactly_what_its_nomad_job_would(vault):
    r = reader(vault)
    assert await r.phase_env("build", cfg()) == {"JOBFORGE_JOB_GIT_USERNAME": "git-user",
                                                 "JOBFORGE_JOB_GIT_PASSWORD": "git-pw", **REGISTRY}
    # Missing fields stay unset (the scripts name the variable); non-strings as JSON, like the templates' toJSON.
    assert await r.phase_env("test", cfg()) == {"JOBFORGE_SECRET_APP_TOKEN": "t0k", "JOBFORGE_SECRET_APP_PORT": "8080",
                                                **REGISTRY}
    assert await r.phase_env("publish", cfg()) == REGISTRY
    assert await r.phase_env("cleanup", cfg()) == REGISTRY
    assert await r.phase_env("build", cfg(git_credentials_path=None, registry_credentials_path=None)) == {}
    assert {s.token for s in vault.seen if s.method == "GET"} == {"reader"}  # the writes were the setup's


async def test_a_token_file_is_read_at_login(vault, tmp_path):
    path = tmp_path / "token"
    path.write_text("reader\n")
    r = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": vault.url, "VAULT_TOKEN_FILE": str(path)}))
    assert (await r.phase_env("publish", cfg()))["JOBFORGE_JOB_REGISTRY_USERNAME"] == "reg-user"


@pytest.mark.parametrize("change, message", [
    ({"registry_credentials_path": "secret/data/team-b/registry"},
     "Vault refused to read secret/data/team-b/registry: permission denied"),
    ({"registry_credentials_path": "secret/data/team-a/nothing"},
     "no Vault secret at secret/data/team-a/nothing (KV v2 paths read like 'secret/data/<name>')"),
])
async def test_failures_name_the_path_and_never_a_value(vault, change, message):
    with pytest.raises(SecretReadError) as err:
        await reader(vault).phase_env("publish", cfg(**change))
    assert err.value.message == message


async def test_a_sealed_or_unreachable_vault_names_the_path(vault):
    vault.sealed = True
    with pytest.raises(SecretReadError, match="Vault is sealed or down; could not read secret/data/team-a/registry"):
        await reader(vault).phase_env("publish", cfg())
    r = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "reader",
                                                  "JOBFORGE_VAULT_TIMEOUT": "2"}))
    with pytest.raises(SecretReadError, match=r"unreachable reading secret/data/team-a/registry"):
        await r.phase_env("publish", cfg())


async def test_without_a_vault_login_a_job_naming_vault_fails_only_where_it_needs_it():
    with pytest.raises(SecretReadError, match="secret/data/team-a/registry, but the service has no Vault login"):
        await no_vault("publish", cfg())
    assert await no_vault("build", cfg(git_credentials_path=None, registry_credentials_path=None)) == {}


def test_approle_needs_both_halves():
    with pytest.raises(ValueError, match="VAULT_ROLE_ID and VAULT_SECRET_ID go together"):
        VaultSettings.model_validate({"VAULT_ROLE_ID": "r"})
    assert not VaultSettings.model_validate({}).enabled
    assert VaultSettings.model_validate({"VAULT_ROLE_ID": "r", "VAULT_SECRET_ID": "s"}).enabled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def logins(fake: FakeVault) -> list[str]:
    return [s.path for s in fake.seen if s.path.startswith("auth/")]


async def test_approle_login_is_renewed_before_expiry(vault):
    vault.add_approle("role-1", "secret-1", {"secret/data/team-a/*": ["read"]}, ttl=30)
    clock = Clock()
    r = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": vault.url, "VAULT_ROLE_ID": "role-1",
                                                  "VAULT_SECRET_ID": "secret-1"}), clock=clock)
    assert await r.phase_env("publish", cfg()) == REGISTRY
    clock.now += 15  # half the TTL left: no renewal yet
    await r.phase_env("publish", cfg())
    assert logins(vault) == ["auth/approle/login"]
    clock.now += 6  # less than a third left
    assert await r.phase_env("publish", cfg()) == REGISTRY
    assert logins(vault) == ["auth/approle/login", "auth/token/renew-self"]


async def test_a_token_that_cannot_be_renewed_is_replaced_by_a_new_login(vault):
    vault.add_approle("role-2", "secret-2", {"secret/data/team-a/*": ["read"]}, ttl=30, renewable=False)
    clock = Clock()
    r = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": vault.url, "VAULT_ROLE_ID": "role-2",
                                                  "VAULT_SECRET_ID": "secret-2"}), clock=clock)
    await r.phase_env("publish", cfg())
    clock.now += 25
    assert await r.phase_env("publish", cfg()) == REGISTRY
    assert logins(vault) == ["auth/approle/login", "auth/approle/login"]


async def test_a_wrong_secret_id_fails_naming_the_path_not_the_secret(vault):
    vault.add_approle("role-3", "secret-3", {"secret/data/team-a/*": ["read"]})
    r = VaultReader(VaultSettings.model_validate({"VAULT_ADDR": vault.url, "VAULT_ROLE_ID": "role-3",
                                                  "VAULT_SECRET_ID": "wrong-secret"}))
    with pytest.raises(SecretReadError) as err:
        await r.phase_env("publish", cfg())
    assert "secret/data/team-a/registry" in err.value.message and "wrong-secret" not in err.value.message
