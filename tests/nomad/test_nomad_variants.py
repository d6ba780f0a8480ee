"""jobforge.nomad.variants: same needs -> same job, any spec change -> another job, per-build values -> no change."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobforge.config import Resources
from jobforge.nomad.variants import (NOMAD_PHASES, ConstraintSpec, SecretSpec, VariantSpec, default_spec, job_name,
                                     variant_id, variant_spec)
from tests.nomad.helpers import make_config

PLAIN = {"build": "jobforge-build", "test": "jobforge-test", "publish": "jobforge-publish",
         "cleanup": "jobforge-cleanup"}


def names(config) -> dict[str, str]:
    return {phase: job_name(phase, config) for phase in NOMAD_PHASES}


def test_a_plain_config_uses_the_plain_jobs():
    assert names(make_config()) == PLAIN
    assert names(make_config(test={"entry_point": True, "commands": ["make test"]})) == PLAIN


def test_resources_equal_to_the_defaults_are_the_default_variant():
    config = make_config(resource_limits={"build": {"cpu": 1000, "memory": "2048"}, "publish": {"disk": 2048}})
    assert names(config) == PLAIN


def test_variant_ids_name_the_phase_and_12_hex():
    config = make_config(resource_limits={"cpu": 4000})
    for phase in ("build", "test", "publish"):
        assert re.fullmatch(rf"jobforge-{phase}-[0-9a-f]{{12}}", job_name(phase, config))
    assert job_name("cleanup", config) == "jobforge-cleanup"


def test_known_digest_is_stable():
    """Pinned so an accidental change of the canonical form (which would orphan registered jobs) is noticed."""
    spec = VariantSpec(resources=Resources(cpu=4000, memory=2048, disk=10240))
    assert spec.digest()[:12] == variant_id("build", spec).rsplit("-", 1)[1]
    assert variant_id("build", spec) == "jobforge-build-" + spec.digest()[:12]
    assert spec.model_dump(mode="json") == {
        "resources": {"cpu": 4000, "memory": 2048, "disk": 10240}, "gpu_count": 0, "constraints": [],
        "vault_policies": [], "vault_secrets": [], "git_credentials_path": None, "registry_credentials_path": None,
    }


# ------------------------------------------------------------------------------------------------ what matters


SPEC_CHANGES = [
    # (overrides, phases whose job changes)
    ({"resource_limits": {"cpu": 4000}}, {"build", "test", "publish"}),
    ({"resource_limits": {"build": {"memory": 4096}}}, {"build"}),
    ({"resource_limits": {"publish": {"disk": 9999}}}, {"publish"}),
    ({"test": {"entry_point": True, "resource_limits": {"cpu": 8000}}}, {"test"}),
    ({"test": {"entry_point": True, "gpu_required": True}}, {"test"}),
    ({"test": {"entry_point": True, "constraints": [{"attribute": "${node.class}", "value": "ssd"}]}}, {"test"}),
    ({"test": {"entry_point": True, "vault_policies": ["p"],
               "vault_secrets": [{"path": "secret/data/a", "fields": {"k": "K"}}]}}, {"test"}),
    ({"git_credentials_path": "secret/nomad/jobs/git-credentials"}, {"build"}),
    ({"registry_credentials_path": "secret/nomad/jobs/registry-credentials"},
     {"build", "test", "publish", "cleanup"}),
]


@pytest.mark.parametrize("overrides, changed", SPEC_CHANGES)
def test_each_spec_need_changes_exactly_the_phases_that_use_it(overrides, changed):
    after = names(make_config(**overrides))
    assert {phase for phase in NOMAD_PHASES if after[phase] != PLAIN[phase]} == changed


def test_every_spec_value_changes_the_id(gpu_vault_config):
    base = gpu_vault_config.model_dump(mode="json")
    reference = job_name("test", gpu_vault_config)
    test = base["test"]
    edits = [
        {"gpu_count": 3},
        {"gpu_required": False},
        {"constraints": test["constraints"][:-1]},
        {"constraints": [*test["constraints"][:-1], {**test["constraints"][-1], "attribute": "${meta.other}"}]},
        {"constraints": [{**test["constraints"][0], "value": "us-east-1"}, *test["constraints"][1:]]},
        {"constraints": [{**test["constraints"][0], "operand": "!="}, *test["constraints"][1:]]},
        {"vault_policies": ["ml-secrets-policy"]},
        {"vault_secrets": test["vault_secrets"][:1]},
        {"vault_secrets": [{**test["vault_secrets"][0], "path": "secret/data/aws/other"}, test["vault_secrets"][1]]},
        {"vault_secrets": [{**test["vault_secrets"][0], "fields": {"access_key_id": "OTHER_NAME"}},
                           test["vault_secrets"][1]]},
        {"resource_limits": {"cpu": "8001", "memory": "16384", "disk": "20480"}},
    ]
    seen = {reference}
    for edit in edits:
        config = make_config(**{**base, "test": {**test, **edit}})
        name = job_name("test", config)
        assert name not in seen, edit
        seen.add(name)
    registry = make_config(**{**base, "registry_credentials_path": "secret/other"})
    assert job_name("test", registry) not in seen


def test_canonical_form_ignores_order_and_duplicates(gpu_vault_config):
    data = gpu_vault_config.model_dump(mode="json")
    test = data["test"]
    shuffled = {
        **test,
        "constraints": list(reversed(test["constraints"])),
        "vault_policies": list(reversed(test["vault_policies"])) + [test["vault_policies"][0]],
        "vault_secrets": [{"path": s["path"], "fields": dict(reversed(list(s["fields"].items())))}
                          for s in reversed(test["vault_secrets"])],
    }
    assert names(make_config(**{**data, "test": shuffled})) == names(gpu_vault_config)


def test_gpu_count_zero_means_one_gpu():
    zero = make_config(test={"entry_point": True, "gpu_required": True, "gpu_count": 0})
    one = make_config(test={"entry_point": True, "gpu_required": True, "gpu_count": 1})
    assert job_name("test", zero) == job_name("test", one)
    assert variant_spec("test", zero).gpu_count == 1
    ignored = make_config(test={"entry_point": True, "gpu_required": False, "gpu_count": 4})
    assert job_name("test", ignored) == "jobforge-test"


def test_policies_without_anything_to_read_do_not_split_variants():
    config = make_config(test={"entry_point": True, "vault_policies": ["unused"]})
    assert job_name("test", config) == "jobforge-test"


def test_spec_is_minimal_per_phase(gpu_vault_config):
    build = variant_spec("build", gpu_vault_config)
    assert (build.gpu_count, build.constraints, build.vault_secrets, build.vault_policies) == (0, (), (), ())
    assert build.git_credentials_path == "secret/nomad/jobs/git-credentials"
    test = variant_spec("test", gpu_vault_config)
    assert test.git_credentials_path is None
    assert test.resources == Resources(cpu=8000, memory=16384, disk=20480)
    assert test.vault_secrets[1] == SecretSpec(path="secret/data/ml/api-keys",
                                               fields=(("hf-token", "HUGGING_FACE_HUB_TOKEN"),))
    cleanup = variant_spec("cleanup", gpu_vault_config)
    assert cleanup == default_spec("cleanup").model_copy(
        update={"registry_credentials_path": "secret/nomad/jobs/registry-credentials"})


def test_unknown_phase_is_an_error():
    with pytest.raises(ValueError, match="unknown phase"):
        variant_id("deploy", default_spec("build"))


# ------------------------------------------------------------------------------------------------ properties

tags = st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True), max_size=3)
env_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True)
free_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10)
per_build = st.fixed_dictionaries({
    "owner": st.sampled_from(["team", "someone else"]),
    "repo_url": st.sampled_from(["http://127.0.0.1:9418/a.git", "https://git.invalid/b.git", "/srv/git/c"]),
    "git_ref": st.sampled_from(["main", "feature/x", "v1.2.3", "0123abcd"]),
    "image_name": st.sampled_from(["hello", "team/app"]),
    "image_tags": tags,
    "registry_url": st.sampled_from(["127.0.0.1:5000", "registry.invalid:5000/team"]),
    "dockerfile_path": st.sampled_from(["Dockerfile", "docker/Dockerfile.ci"]),
    "build_args": st.dictionaries(env_names, free_text, max_size=3),
    "target": st.none() | st.sampled_from(["base", "final"]),
    "clear_cache": st.booleans(),
    "webhook_url": st.none() | st.just("http://127.0.0.1:8000/hook"),
})
test_per_build = st.fixed_dictionaries({
    "entry_point": st.booleans(),
    "commands": st.lists(st.sampled_from(["make test", "./run.sh --all", "echo ${HOME}"]), max_size=3),
    "env": st.dictionaries(env_names, free_text, max_size=3),
})


@settings(max_examples=60)
@given(per_build, test_per_build)
def test_per_build_values_never_change_the_job(build_values, test_values):
    spec_needs = {
        "git_credentials_path": "secret/nomad/jobs/git-credentials",
        "resource_limits": {"cpu": 3000},
        "test": {"gpu_required": True, "vault_policies": ["p"],
                 "vault_secrets": [{"path": "secret/data/x", "fields": {"f": "F"}}]},
    }
    first = make_config(**spec_needs)
    second = make_config(**{**spec_needs, **build_values, "test": {**spec_needs["test"], **test_values}})
    assert names(first) == names(second)


resources = st.builds(Resources, cpu=st.integers(1, 10**5), memory=st.integers(1, 10**6), disk=st.integers(1, 10**6))
specs = st.builds(
    VariantSpec,
    resources=resources,
    gpu_count=st.integers(0, 8),
    constraints=st.lists(st.builds(ConstraintSpec, attribute=st.sampled_from(["${node.class}", "${meta.a}"]),
                                   operand=st.sampled_from(["=", "!=", "is_set"]), value=st.text(max_size=4)),
                         max_size=2).map(tuple),
    vault_policies=st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True).map(tuple),
    git_credentials_path=st.none() | st.sampled_from(["secret/git", "secret/git2"]),
    registry_credentials_path=st.none() | st.sampled_from(["secret/reg", "secret/reg2"]),
)


@given(st.sampled_from(NOMAD_PHASES), specs, specs)
def test_the_id_is_a_function_of_the_spec_and_nothing_else(phase, a, b):
    assert variant_id(phase, a) == variant_id(phase, a.model_copy())
    assert (variant_id(phase, a) == variant_id(phase, b)) == (a == b)
