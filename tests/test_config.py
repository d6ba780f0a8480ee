"""Tests for `jobforge.config`: the job config model, its rules, resolution helpers and error formatting.

Expected values are literals (or come from the reference README's examples); nothing here re-derives them with
the module's own patterns.
"""

from __future__ import annotations

import json
import string
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from jobforge import config
from jobforge.config import (
    JobConfig,
    Resources,
    TestNetwork,
    format_duration,
    format_validation_errors,
    parse_duration,
)
from tests.support.invalid_configs import INVALID, MINIMAL, with_, with_test, without  # noqa: F401


def cfg(**changes) -> JobConfig:
    return JobConfig.model_validate({**MINIMAL, **changes})


def errors_of(data: dict) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(data)
    return format_validation_errors(info.value)


# ================================================================================================ valid configs

def test_minimal_config_gets_the_reference_defaults():
    c = JobConfig.model_validate(MINIMAL)
    assert c.git_ref == "main"
    assert c.dockerfile_path == "Dockerfile"
    assert c.dockerfile_context == "."
    assert c.image_tags == []
    assert c.git_credentials_path is None and c.registry_credentials_path is None
    assert c.test is None and c.resource_limits is None
    assert c.build_timeout is None and c.build_timeout_seconds is None
    assert c.clear_cache is False and c.build_args == {} and c.target is None
    assert c.webhook_url is None and c.webhook_secret is None and c.webhook_headers == {}
    assert c.webhook_on_success is True and c.webhook_on_failure is True
    assert c.deploy_dir is None
    assert c.test_enabled is False


FULL = {
    "owner": "ai-team",
    "repo_url": "https://ci:tok-123@git.example.com/org/app.git",
    "git_ref": "refs/heads/feature/new-feature",
    "git_credentials_path": "secret/nomad/jobs/git-credentials",
    "dockerfile_path": "docker/Dockerfile.prod",
    "dockerfile_context": "services/app",
    "image_name": "team/app",
    "image_tags": ["latest", "v1.0.0"],
    "registry_url": "registry.cluster:5000/myapp",
    "registry_credentials_path": "secret/nomad/jobs/registry-credentials",
    "test": {
        "entry_point": True,
        "commands": ["/app/run-tests.sh", "pytest -q"],
        "env": {"TEST_MODE": "integration", "EMPTY": ""},
        "vault_policies": ["ml-secrets-policy"],
        "vault_secrets": [{"path": "secret/data/ml/api-keys", "fields": {"api_key": "ML_API_KEY"}}],
        "gpu_required": True,
        "gpu_count": 2,
        "constraints": [
            {"attribute": "${node.datacenter}", "value": "us-west-2", "operand": "="},
            {"attribute": "${meta.gpu-capable}", "operand": "is_set"},
        ],
        "resource_limits": {"cpu": "8000", "memory": "16384", "disk": "20480"},
        "timeout": "20m",
    },
    "resource_limits": {
        "cpu": 2000, "memory": 4096, "disk": 20480,
        "build": {"cpu": 4000}, "test": {"memory": 3072}, "publish": {"disk": 5120},
    },
    "build_timeout": "1h30m",
    "clear_cache": True,
    "build_args": {"GREETING": "hi", "PIP_INDEX": "https://pypi.example/simple"},
    "target": "runtime",
    "image_format": "docker",
    "webhook_url": "https://hooks.example.com/jobforge",
    "webhook_secret": "whsec-very-secret",
    "webhook_on_success": False,
    "webhook_on_failure": True,
    "webhook_headers": {"Authorization": "Bearer header-token-xyz", "X-Team": "ai"},
    "deploy_dir": "deploy",
}


def test_full_config_sets_every_field():
    c = JobConfig.model_validate(FULL)
    assert set(FULL) == set(JobConfig.model_fields)  # FULL really covers every field
    assert c.git_ref == "refs/heads/feature/new-feature"
    assert c.image_name == "team/app" and c.image_tags == ["latest", "v1.0.0"]
    assert c.test is not None
    assert c.test.gpu_count == 2 and c.test.gpu_required is True
    assert c.test.vault_secrets[0].fields == {"api_key": "ML_API_KEY"}
    assert c.test.constraints[1].value == "" and c.test.constraints[1].operand == "is_set"
    assert c.test.resource_limits is not None and c.test.resource_limits.cpu == 8000
    assert c.test.timeout == timedelta(minutes=20) and c.test.timeout_seconds == 1200.0
    assert c.build_timeout == timedelta(hours=1, minutes=30) and c.build_timeout_seconds == 5400.0
    assert c.resource_limits is not None and c.resource_limits.build is not None
    assert c.resource_limits.build.cpu == 4000
    assert c.target == "runtime" and c.clear_cache is True and c.image_format == "docker"
    assert c.webhook_secret is not None and c.webhook_secret.get_secret_value() == "whsec-very-secret"
    assert c.webhook_on_success is False


# The reference README's own examples, copied as data.
README_GPU_EXAMPLE = {
    "owner": "ai-team",
    "repo_url": "https://github.com/myorg/video-transcription.git",
    "git_ref": "main",
    "dockerfile_path": "Dockerfile",
    "image_name": "video-transcription-batch",
    "image_tags": ["latest"],
    "registry_url": "registry.cluster:5000",
    "test": {
        "entry_point": True,
        "gpu_required": True,
        "gpu_count": 1,
        "env": {"S3_TRANSCRIBER_BUCKET": "ai-storage", "OLLAMA_HOST": "http://10.0.1.12:11434",
                "NVIDIA_VISIBLE_DEVICES": "all"},
        "vault_policies": ["ml-secrets-policy"],
        "vault_secrets": [{"path": "secret/data/ml/api-keys", "fields": {"api_key": "ML_API_KEY"}}],
        "resource_limits": {"cpu": "8000", "memory": "16384", "disk": "20480"},
    },
}

README_VAULT_EXAMPLE_TEST = {
    "entry_point": True,
    "env": {"TEST_MODE": "integration"},
    "vault_policies": ["transcription-policy"],
    "vault_secrets": [
        {"path": "secret/data/aws/transcription",
         "fields": {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
                    "region": "AWS_DEFAULT_REGION"}},
        {"path": "secret/data/ml/tokens", "fields": {"hf_token": "HUGGING_FACE_HUB_TOKEN"}},
    ],
}

README_PER_PHASE_RESOURCES = {
    "build": {"cpu": "4000", "memory": "8192", "disk": "40960"},
    "test": {"cpu": "1500", "memory": "3072", "disk": "10240"},
    "publish": {"cpu": "800", "memory": "1536", "disk": "5120"},
}

README_MIXED_RESOURCES = {"cpu": "2000", "memory": "4096", "build": {"cpu": "6000"}, "test": {"memory": "2048"}}

README_CURL_EXAMPLE = {
    "owner": "developer",
    "repo_url": "https://github.com/user/app.git",
    "git_ref": "main",
    "git_credentials_path": "secret/nomad/jobs/git-credentials",
    "dockerfile_path": "Dockerfile",
    "image_name": "myapp",
    "image_tags": ["latest", "v1.0.0"],
    "registry_url": "docker.io/user",
    "registry_credentials_path": "secret/nomad/jobs/registry-credentials",
    "test": {"commands": ["/app/run-tests.sh", "/app/integration-tests.sh"],
             "env": {"TEST_ENVIRONMENT": "ci", "LOG_LEVEL": "debug"}},
}


def test_readme_gpu_example():
    c = JobConfig.model_validate(README_GPU_EXAMPLE)
    assert c.test_enabled
    assert c.resources_for("test") == Resources(cpu=8000, memory=16384, disk=20480)
    assert c.resources_for("build") == Resources(cpu=1000, memory=2048, disk=10240)


def test_readme_vault_example():
    c = cfg(test=README_VAULT_EXAMPLE_TEST)
    assert c.test is not None
    assert [s.path for s in c.test.vault_secrets] == ["secret/data/aws/transcription", "secret/data/ml/tokens"]
    assert c.test.vault_secrets[1].fields == {"hf_token": "HUGGING_FACE_HUB_TOKEN"}


def test_readme_per_phase_resources():
    c = cfg(resource_limits=README_PER_PHASE_RESOURCES)
    assert c.resources_for("build") == Resources(cpu=4000, memory=8192, disk=40960)
    assert c.resources_for("test") == Resources(cpu=1500, memory=3072, disk=10240)
    assert c.resources_for("publish") == Resources(cpu=800, memory=1536, disk=5120)


def test_readme_mixed_resources():
    c = cfg(resource_limits=README_MIXED_RESOURCES)
    assert c.resources_for("build") == Resources(cpu=6000, memory=4096, disk=10240)
    assert c.resources_for("test") == Resources(cpu=2000, memory=2048, disk=2048)
    assert c.resources_for("publish") == Resources(cpu=2000, memory=4096, disk=2048)


def test_readme_submit_example_and_yaml_global_plus_build():
    c = JobConfig.model_validate(README_CURL_EXAMPLE)
    assert c.test_enabled and c.registry_url == "docker.io/user"
    merged = {  # deploy/global.yaml with build.yaml on top, as the CLI merges them
        "owner": "myteam", "repo_url": "https://github.com/myorg/myservice.git",
        "git_credentials_path": "secret/nomad/jobs/git-credentials", "dockerfile_path": "Dockerfile",
        "image_name": "myservice", "registry_url": "registry.cluster:5000/myapp",
        "registry_credentials_path": "secret/nomad/jobs/registry-credentials",
        "git_ref": "feature/new-feature", "image_tags": ["test", "dev"],
        "test": {"entry_point": True, "env": {"TEST_MODE": "integration"}},
    }
    assert JobConfig.model_validate(merged).git_ref == "feature/new-feature"


@pytest.mark.parametrize("value, expected", [
    (2000, 2000), ("2000", 2000), ("0100", 100), (2000.0, 2000), (1, 1), (2**31 - 1, 2**31 - 1),
], ids=["int", "numeric-string", "leading-zero", "whole-float", "one", "int32-max"])
def test_resource_values_accept_ints_and_numeric_strings(value, expected):
    assert cfg(resource_limits={"cpu": value}).resource_limits.cpu == expected


@pytest.mark.parametrize("field, value", [
    ("git_ref", "0123abcd"), ("git_ref", "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3"), ("git_ref", "v1.2.3"),
    ("git_ref", "refs/tags/v1.0"), ("git_ref", "release/2024-01_hotfix"), ("git_ref", "HEAD"),
    ("repo_url", "git@github.com:myorg/app.git"), ("repo_url", "ssh://git@git.example:2222/org/app.git"),
    ("repo_url", "git://git.example/app.git"), ("repo_url", "file:///srv/git/app.git"),
    ("repo_url", "/srv/git/app.git"), ("repo_url", "http://127.0.0.1:9418/hello.git"),
    ("repo_url", "https://[::1]:8443/hello.git"),
    ("registry_url", "localhost:5000"), ("registry_url", "127.0.0.1:5000"), ("registry_url", "[::1]:5000/a/b"),
    ("registry_url", "ghcr.io/my-org/team_x"), ("registry_url", "Registry.Example.COM"),
    ("image_name", "a"), ("image_name", "my-app"), ("image_name", "my__app"), ("image_name", "my.app/sub---x"),
    ("image_name", "a" * 255),
    ("dockerfile_path", "./docker/Dockerfile"), ("dockerfile_context", "."), ("dockerfile_context", "a/b..c"),
    ("image_tags", ["_x", "9", "v1.0-rc.1", "A" * 128]),
    ("target", "build-stage.2"), ("webhook_url", "http://10.0.0.5:8080/hook?x=1"),
    ("webhook_headers", {"X-Api-Key": "a\tb", "x_custom!#": "v"}),
    ("build_args", {"_PRIVATE": "", "HTTP_PROXY": "http://proxy:3128"}),
    ("build_timeout", 1), ("build_timeout", "24h"), ("build_timeout", "1.5s"), ("build_timeout", 86400),
    ("deploy_dir", "/home/me/deploy"),
])
def test_accepted_values(field, value):
    assert getattr(cfg(**{field: value}), field) is not None


def test_registry_url_drops_one_trailing_slash():
    assert cfg(registry_url="registry.cluster:5000/myapp/").registry_url == "registry.cluster:5000/myapp"


# ================================================================================================ resources

D_BUILD, D_SMALL = (1000, 2048, 10240), (500, 1024, 2048)


@pytest.mark.parametrize("resource_limits, test_limits, phase, expected", [
    (None, None, "build", D_BUILD),
    (None, None, "test", D_SMALL),
    (None, None, "publish", D_SMALL),
    ({"cpu": 3000}, None, "build", (3000, 2048, 10240)),
    ({"cpu": 3000}, None, "publish", (3000, 1024, 2048)),
    ({"memory": 512, "build": {"memory": 8192}}, None, "build", (1000, 8192, 10240)),
    ({"memory": 512, "build": {"memory": 8192}}, None, "test", (500, 512, 2048)),
    ({"publish": {"disk": 100}}, None, "publish", (500, 1024, 100)),
    ({"publish": {"disk": 100}}, None, "build", D_BUILD),
    ({"cpu": 2000, "disk": 999, "test": {"cpu": 1500}}, None, "test", (1500, 1024, 999)),
    ({"cpu": 2000, "test": {"cpu": 1500, "memory": 3000}}, {"cpu": 8000}, "test", (8000, 3000, 2048)),
    (None, {"cpu": 8000, "memory": 16384, "disk": 20480}, "test", (8000, 16384, 20480)),
    (None, {"cpu": 8000}, "build", D_BUILD),
    ({"disk": 50}, {"memory": 4000}, "test", (500, 4000, 50)),
], ids=[
    "defaults-build", "defaults-test", "defaults-publish", "global-cpu-build", "global-cpu-publish",
    "phase-beats-global", "global-on-other-phase", "publish-only", "publish-only-not-build",
    "phase-then-global-then-default", "test-block-beats-phase-and-global", "test-block-only",
    "test-block-ignored-for-build", "test-block-plus-global",
])
def test_resources_for_resolution(resource_limits, test_limits, phase, expected):
    test = {"entry_point": True, "resource_limits": test_limits} if test_limits else None
    c = cfg(resource_limits=resource_limits, test=test)
    assert c.resources_for(phase) == Resources(cpu=expected[0], memory=expected[1], disk=expected[2])


def test_resources_for_accepts_str_enum_and_rejects_unknown_phase():
    from enum import Enum

    class Phase(str, Enum):
        BUILD = "build"

    assert cfg().resources_for(Phase.BUILD) == Resources(cpu=1000, memory=2048, disk=10240)
    with pytest.raises(ValueError, match="unknown phase"):
        cfg().resources_for("deploy")


def test_resources_is_frozen():
    r = cfg().resources_for("build")
    with pytest.raises(ValidationError):
        r.cpu = 1  # type: ignore[misc]


# ================================================================================================ helpers

@pytest.mark.parametrize("tags, expected", [
    ([], ["job1"]),
    (["latest", "v1"], ["job1", "latest", "v1"]),
    (["v1", "latest", "v1"], ["job1", "v1", "latest"]),
    (["latest", "job1"], ["job1", "latest"]),
], ids=["no-tags", "in-order", "dedup-tags", "dedup-job-id"])
def test_image_tags_for(tags, expected):
    assert cfg(image_tags=tags).image_tags_for("job1") == expected


def test_image_tags_for_rejects_a_job_id_that_is_no_tag():
    with pytest.raises(ValueError):
        cfg().image_tags_for("-bad id")


@pytest.mark.parametrize("test, enabled", [
    (None, False),
    ({}, False),
    ({"entry_point": False, "commands": []}, False),
    ({"env": {"A": "1"}, "gpu_required": True}, False),
    ({"entry_point": True}, True),
    ({"commands": ["make test"]}, True),
    ({"entry_point": True, "commands": ["x"]}, True),
], ids=["no-block", "empty-block", "explicitly-off", "env-only", "entry-point", "commands", "both"])
def test_test_enabled(test, enabled):
    assert cfg(test=test).test_enabled is enabled


SECRETS = ("whsec-very-secret", "header-token-xyz", "tok-123")


def test_redacted_hides_secrets_and_changes_nothing_else():
    c = JobConfig.model_validate({**FULL, "webhook_url": "https://hook:pw-456@hooks.example.com/x?y=1"})
    red = c.redacted()
    text = json.dumps(red)
    for secret in (*SECRETS, "pw-456"):
        assert secret not in text
    assert red["webhook_secret"] == "***"
    assert red["webhook_headers"] == {"Authorization": "***", "X-Team": "***"}
    assert red["repo_url"] == "https://ci:***@git.example.com/org/app.git"
    assert red["webhook_url"] == "https://hook:***@hooks.example.com/x?y=1"
    assert red["build_timeout"] == "1h30m" and red["test"]["timeout"] == "20m"
    unchanged = {k: v for k, v in red.items() if k not in ("repo_url", "webhook_url", "webhook_secret",
                                                           "webhook_headers")}
    assert unchanged == {k: v for k, v in c.model_dump(mode="json").items() if k in unchanged}


def test_redacted_keeps_urls_without_password_and_absent_secret():
    red = cfg(repo_url="git@github.com:org/app.git", webhook_url="https://user@h.example/x").redacted()
    assert red["repo_url"] == "git@github.com:org/app.git"
    assert red["webhook_url"] == "https://user@h.example/x"
    assert red["webhook_secret"] is None and red["webhook_headers"] == {}


def test_json_dumps_and_repr_never_show_the_webhook_secret_or_header_values():
    c = JobConfig.model_validate(FULL)
    assert "whsec-very-secret" not in c.model_dump_json()
    assert "whsec-very-secret" not in json.dumps(c.model_dump(mode="json"))
    for secret in SECRETS:
        assert secret not in repr(c)


def test_dump_with_secrets_round_trips():
    c = JobConfig.model_validate(FULL)
    dumped = c.dump_with_secrets()
    assert dumped["webhook_secret"] == "whsec-very-secret"
    assert JobConfig.model_validate(dumped) == c


def test_secrets_context_reaches_a_config_embedded_in_another_model():
    class Record(BaseModel):  # the shape of a store record holding the config
        config: JobConfig

    record = Record(config=JobConfig.model_validate(FULL))
    assert "whsec-very-secret" not in record.model_dump_json()
    stored = record.model_dump_json(context=dict(config.SECRETS_CONTEXT))
    assert Record.model_validate_json(stored) == record


def test_a_masked_secret_fed_back_is_rejected():
    masked = JobConfig.model_validate(FULL).model_dump(mode="json")
    assert errors_of(masked) == [{"field": "webhook_secret",
                                  "rule": "is a masked placeholder ('***' or '**********'), not the real secret"}]


def test_config_is_immutable():
    c = cfg()
    with pytest.raises(ValidationError):
        c.git_ref = "main; touch /tmp/pwned"  # type: ignore[misc]


# ================================================================================================ invalid configs

@pytest.mark.parametrize("data, field, fragment", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_config_reports_field_and_rule(data, field, fragment):
    errors = errors_of(data)
    assert [e["field"] for e in errors] == [field]
    assert fragment in errors[0]["rule"]


def test_every_invalid_error_lists_each_bad_field_once():
    errors = errors_of({"owner": "", "repo_url": "-x", "image_name": "A", "registry_url": "http://r", "typo": 1})
    assert [e["field"] for e in errors] == ["owner", "repo_url", "image_name", "registry_url", "typo"]


def test_non_object_config_reports_the_root():
    assert errors_of([]) == [{"field": "", "rule": "Input should be a valid dictionary or instance of JobConfig"}]


def test_error_output_never_echoes_the_input():
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(with_(webhook_secret=["not-a-str-but-secret-ish"]))
    assert "secret-ish" not in json.dumps(format_validation_errors(info.value))
    assert "secret-ish" not in str(info.value)


# ================================================================================================ durations

@pytest.mark.parametrize("value, seconds", [
    ("30m", 1800.0), ("1h30m", 5400.0), ("90s", 90.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2h0m5s", 7205.0),
    ("1500us", 0.0015), ("0", 0.0), ("45", 45.0), (90, 90.0), (1.5, 1.5), (timedelta(minutes=2), 120.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10x", "", "m", "1 h", "-5m", "1h-5m", "1e3s", "1.5", True, None, [], -1,
                                   float("nan"), float("inf")])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [(5400, "1h30m"), (3600, "1h"), (90, "1m30s"), (1.5, "1.5s"),
                                           (86400, "24h"), (0, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert format_duration(timedelta(seconds=seconds)) == text


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=999_999))
def test_format_then_parse_duration_round_trips(whole, micros):
    td = timedelta(seconds=whole, microseconds=micros)
    assert timedelta(seconds=parse_duration(format_duration(td))) == td


# ================================================================================================ error formatting

def test_field_paths_use_dots_and_list_indexes():
    errors = errors_of(with_test(vault_policies=["p"], vault_secrets=[
        {"path": "secret/data/a", "fields": {"k": "K"}},
        {"path": "secret/data/b", "fields": {"k": "1BAD"}},
    ]))
    assert errors == [{"field": "test.vault_secrets[1].fields.k",
                       "rule": "must be a variable name: letters, digits and '_', not starting with a digit"}]


def test_test_network_defaults_to_none_and_accepts_only_none_or_outbound():
    assert JobConfig.model_validate(with_test()).test.network is TestNetwork.NONE
    assert JobConfig.model_validate(with_test(network="outbound")).test.network is TestNetwork.OUTBOUND
    errors = errors_of(with_test(network="host"))
    assert [e["field"] for e in errors] == ["test.network"] and "'none' or 'outbound'" in errors[0]["rule"]


def test_odd_mapping_keys_are_quoted():
    errors = errors_of(with_test(env={"": "x", "A.B": "y"}))
    assert [e["field"] for e in errors] == ['test.env[""]', 'test.env["A.B"]']


# ================================================================================================ properties

ENV_NAME_FIRST = string.ascii_letters + "_"
ENV_NAME_REST = ENV_NAME_FIRST + string.digits
TAG_FIRST = string.ascii_letters + string.digits + "_"
TAG_REST = TAG_FIRST + ".-"


@given(
    tags=st.lists(st.builds(lambda a, b: a + b, st.sampled_from(TAG_FIRST),
                            st.text(alphabet=TAG_REST, max_size=127)), max_size=5),
    env=st.dictionaries(st.builds(lambda a, b: a + b, st.sampled_from(ENV_NAME_FIRST),
                                  st.text(alphabet=ENV_NAME_REST, max_size=30)),
                        st.text().filter(lambda s: "\x00" not in s), max_size=5),
)
def test_valid_tags_and_env_names_round_trip(tags, env):
    c = cfg(image_tags=tags, build_args=env, test={"env": env})
    assert c.image_tags == tags and c.build_args == env and c.test.env == env
    assert JobConfig.model_validate(c.model_dump(mode="json")) == c


@given(st.text())
def test_random_git_refs_never_start_with_dash_or_hold_whitespace(ref):
    try:
        c = cfg(git_ref=ref)
    except ValidationError as exc:
        assert [e["field"] for e in format_validation_errors(exc)] == ["git_ref"]
        return
    assert c.git_ref == ref
    assert not ref.startswith("-")
    assert not any(ch.isspace() for ch in ref)


URL_PREFIXES = ["", "-", "--upload-pack=", "ext::", "fd::", "x+y.z::", "https://", "ssh://", "ssh://-", "git://",
                "file://", "ftp://", "git@", "-git@", "/", "user@host:", "user@host:-"]


@given(st.builds(lambda prefix, tail: prefix + tail, st.sampled_from(URL_PREFIXES), st.text(max_size=30)))
def test_random_repo_urls_never_accept_options_helpers_or_whitespace(url):
    try:
        c = cfg(repo_url=url)
    except ValidationError as exc:
        assert [e["field"] for e in format_validation_errors(exc)] == ["repo_url"]
        return
    assert c.repo_url == url
    assert not url.startswith("-")
    assert not any(ch.isspace() for ch in url)
    # git treats `<scheme chars>::<rest>` as "run the remote helper git-remote-<scheme>"
    transport, helper_sep, _ = url.partition("::")
    assert not (helper_sep and transport and all(c.isascii() and (c.isalnum() or c in "+.-") for c in transport))
    if url.startswith("ssh://"):
        assert not url.removeprefix("ssh://").startswith("-")


# ================================================================================================ JSON Schema + API

def test_json_schema_forbids_unknown_fields_and_lists_required_ones():
    schema = JobConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["image_name", "owner", "registry_url", "repo_url"]
    for name in ("TestConfig", "VaultSecret", "Constraint", "PhaseResources", "ResourceLimits"):
        assert schema["$defs"][name]["additionalProperties"] is False
    json.dumps(schema)  # serialisable as is


def test_public_api_is_pinned():
    assert set(config.__all__) == {
        "COMMIT_SHA_PATTERN", "CONSTRAINT_OPERANDS", "DEFAULT_RESOURCES", "ENV_NAME_PATTERN", "HEADER_NAME_PATTERN",
        "IMAGE_NAME_PATTERN", "IMAGE_TAG_PATTERN", "PHASES", "REDACTED", "SECRETS_CONTEXT", "STAGE_NAME_PATTERN",
        "Constraint", "JobConfig", "PhaseResources", "ResourceLimits", "Resources", "TestConfig", "TestNetwork",
        "VaultSecret", "format_duration", "format_validation_errors", "parse_duration", "validation_error",
    }
    assert all(hasattr(config, name) for name in config.__all__)
