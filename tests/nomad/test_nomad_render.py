"""jobforge.nomad.render: the rendered jobs parse, have the shape the task-script contract and Nomad expect,
and carry job-config values only as escaped literals."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pytest

from jobforge.models import JobRecord
from jobforge.nomad.escape import hcl_string
from jobforge.nomad.render import (META_OPTIONAL, META_REQUIRED, TEMPLATE, RenderParams, environment, finalize,
                                   render_job)
from jobforge.nomad.variants import NOMAD_PHASES, ConstraintSpec, SecretSpec, VariantSpec, default_spec, variant_spec
from jobforge.nomad.service_job import SERVICE_TEMPLATE
from jobforge.tasks import RegistryTarget, build_payload, task_script, templates_dir
from tests.nomad.helpers import parse_job, untemplate

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "reference" / "nomad-samples"
ESCAPED_ACTION = '{{"{{"}}'


def script_of(parsed, destination: str) -> str:
    """A script template's data as consul-template will write it (python-hcl2 drops the heredoc's last newline)."""
    data = untemplate(parsed.templates()[destination]["data"]) + "\n"
    assert "{{" not in data.replace(ESCAPED_ACTION, ""), "a Go-template action other than the escape"
    return data.replace(ESCAPED_ACTION, "{{")


# ------------------------------------------------------------------------------------------------ default jobs


@pytest.mark.parametrize("phase", NOMAD_PHASES)
def test_default_job_shape(phase):
    job = parse_job(render_job(phase))
    assert job.name == f"jobforge-{phase}"
    assert job.job["type"] == "batch"
    assert job.job["datacenters"] == ["dc1"]
    assert job.job["meta"] == [{"jobforge_phase": phase, "jobforge_variant": "default"}]
    (parameterized,) = job.job["parameterized"]
    assert parameterized == {"payload": "required", "meta_required": list(META_REQUIRED[phase]),
                             "meta_optional": list(META_OPTIONAL)}
    assert "job_id" in parameterized["meta_required"]
    assert not set(parameterized["meta_required"]) & set(parameterized["meta_optional"])  # Nomad requires disjoint
    assert (job.group_name, job.task_name) == (phase, phase)
    assert job.group["count"] == 1
    assert job.group["restart"] == [{"attempts": 0, "mode": "fail"}]
    assert job.group["reschedule"] == [{"attempts": 0, "unlimited": False}]
    assert "constraint" not in job.group
    assert job.task["driver"] == "docker"
    assert "vault" not in job.task
    assert "device" not in job.task["resources"][0]


@pytest.mark.parametrize("phase", NOMAD_PHASES)
def test_task_script_contract(phase):
    """docs/architecture.md "Task scripts": the payload file and every JOBFORGE_* input."""
    job = parse_job(render_job(phase))
    env = job.env()
    (payload,) = job.task["dispatch_payload"]
    assert payload == {"file": "payload.json"}
    assert env["JOBFORGE_PAYLOAD"] == "${NOMAD_TASK_DIR}/" + payload["file"]
    assert env["JOBFORGE_WORKDIR"].startswith("${NOMAD_ALLOC_DIR}/")
    assert env["JOBFORGE_ISOLATION"] == "chroot"
    assert env["JOBFORGE_STORAGE_DRIVER"] == "vfs"
    section = (ROOT / "docs" / "architecture.md").read_text().split("## Task scripts", 1)[1].split("**Payload**")[0]
    assert set(re.findall(r"`(JOBFORGE_[A-Z_]+)`", section)) <= set(env)


@pytest.mark.parametrize("phase", NOMAD_PHASES)
def test_buildah_storage_lives_on_the_host_volume(phase):
    job = parse_job(render_job(phase))
    ((volume_name, volume),) = job.group["volume"][0].items()
    assert volume_name == "buildah-cache"
    assert volume == {"type": "host", "source": "buildah-cache", "read_only": False}
    (mount,) = job.task["volume_mount"]
    assert mount["volume"] == volume_name and mount["read_only"] is False
    env = job.env()
    for name in ("JOBFORGE_BUILDAH_ROOT", "JOBFORGE_BUILDAH_RUNROOT"):
        assert env[name].startswith(mount["destination"] + "/")
    assert env["JOBFORGE_BUILDAH_ROOT"] != env["JOBFORGE_BUILDAH_RUNROOT"]


@pytest.mark.parametrize("phase", NOMAD_PHASES)
def test_the_task_runs_the_embedded_scripts_verbatim(phase):
    job = parse_job(render_job(phase))
    (config,) = job.task["config"]
    assert config["command"] == "python3"
    assert config["cap_add"] == ["sys_admin"]  # buildah's chroot isolation; reference client allows SYS_ADMIN
    assert [untemplate(a) for a in config["args"]] == [f"${{NOMAD_TASK_DIR}}/{phase}.py"]
    templates = job.templates()
    scripts = ["_common", phase] + (["_cache", "_relay"] if phase == "build" else [])  # the build imports both
    assert set(templates) == {f"local/{name}.py" for name in scripts}
    for name in scripts:
        assert script_of(job, f"local/{name}.py") == task_script(name).read_text()
        assert templates[f"local/{name}.py"]["change_mode"] == "noop"
        assert "env" not in templates[f"local/{name}.py"]


@pytest.mark.parametrize("phase", NOMAD_PHASES)
def test_default_resources(phase):
    job = parse_job(render_job(phase))
    expected = default_spec(phase).resources
    assert job.task["resources"] == [{"cpu": expected.cpu, "memory": expected.memory}]
    assert job.group["ephemeral_disk"] == [{"size": expected.disk}]


def test_reference_defaults_for_the_three_phases():
    """The reference README's defaults: build 1000 MHz / 2048 MB / 10240 MB, test and publish 500 / 1024 / 2048."""
    sizes = {}
    for phase in ("build", "test", "publish"):
        job = parse_job(render_job(phase))
        sizes[phase] = (job.task["resources"][0]["cpu"], job.task["resources"][0]["memory"],
                        job.group["ephemeral_disk"][0]["size"])
    assert sizes == {"build": (1000, 2048, 10240), "test": (500, 1024, 2048), "publish": (500, 1024, 2048)}


def test_field_names_match_the_reference_json_job():
    """Our HCL blocks are the ones that become these API fields (json-jobs / api/tasks.go names), and where the
    constructed parameterized sample makes the same choice, the same value."""
    sample = json.loads((SAMPLES / "parameterized-job.json").read_text())["Job"]
    group = sample["TaskGroups"][0]
    task = group["Tasks"][0]
    assert sample["Type"] == "batch"
    assert set(sample["ParameterizedJob"]) == {"Payload", "MetaRequired", "MetaOptional"}
    assert group["RestartPolicy"] == {"Attempts": 0, "Mode": "fail"}
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}
    assert set(task["DispatchPayload"]) == {"File"}
    assert {"EmbeddedTmpl", "DestPath", "Envvars", "ChangeMode"} <= set(task["Templates"][0])
    assert task["Templates"][0]["Envvars"] is True and task["Templates"][0]["DestPath"].startswith("secrets/")
    assert {"CPU", "MemoryMB"} <= set(task["Resources"])
    assert "Role" in task["Vault"]
    constraint = json.loads((SAMPLES / "job-read.json").read_text())["Constraints"][0]
    assert set(constraint) == {"LTarget", "RTarget", "Operand"}  # HCL attribute / value / operator


# ------------------------------------------------------------------------------------------------ variants


def test_gpu_vault_constraints_variant(gpu_vault_config):
    spec = variant_spec("test", gpu_vault_config)
    job = parse_job(render_job("test", spec))
    assert re.fullmatch(r"jobforge-test-[0-9a-f]{12}", job.name)
    (meta,) = job.job["meta"]
    assert meta["jobforge_variant"] == job.name.rsplit("-", 1)[1]
    assert meta["jobforge_vault_policies"] == "ml-secrets-policy,transcription-policy"

    resources = job.task["resources"][0]
    assert (resources["cpu"], resources["memory"]) == (8000, 16384)
    assert resources["device"] == [{"nvidia/gpu": {"count": 2}}]
    assert job.group["ephemeral_disk"] == [{"size": 20480}]

    constraints = [{k: untemplate(v) for k, v in c.items()} for c in job.group["constraint"]]
    assert constraints == [
        {"attribute": "${attr.kernel.version}", "operator": "version", "value": "> 3.19"},
        {"attribute": "${meta.scratch}", "operator": "is_not_set"},
        {"attribute": "${meta.storage-type}", "operator": "is_set"},
        {"attribute": "${node.datacenter}", "operator": "=", "value": "us-west-2"},
        {"attribute": "${meta.gpu-capable}", "operator": "=", "value": "true"},  # reference client setup
    ]

    (vault,) = job.task["vault"]
    assert vault == {"change_mode": "noop", "env": False, "disable_file": True}  # workload identity, client role


def test_secret_templates_read_kv2_fields_into_the_named_variables(gpu_vault_config):
    job = parse_job(render_job("test", variant_spec("test", gpu_vault_config)))
    secrets = {d: t for d, t in job.templates().items() if d.startswith("secrets/")}
    assert set(secrets) == {"secrets/registry.env", "secrets/vault-1.env", "secrets/vault-2.env"}
    for template in secrets.values():
        assert template["env"] is True
        assert template["change_mode"] == "noop"
        assert template["perms"] == "600"
    registry = secrets["secrets/registry.env"]["data"]
    assert registry.startswith('{{ with secret "secret/nomad/jobs/registry-credentials" }}')
    assert '{{- with index .Data.data "username" }}\nJOBFORGE_JOB_REGISTRY_USERNAME={{ . | toJSON }}' in registry
    assert '{{- with index .Data.data "password" }}\nJOBFORGE_JOB_REGISTRY_PASSWORD={{ . | toJSON }}' in registry
    aws = secrets["secrets/vault-1.env"]["data"]
    assert '{{ with secret "secret/data/aws/transcription" }}' in aws
    assert 'index .Data.data "secret_access_key" }}\nJOBFORGE_SECRET_AWS_SECRET_ACCESS_KEY={{ . | toJSON }}' in aws
    hf = secrets["secrets/vault-2.env"]["data"]
    assert 'index .Data.data "hf-token" }}\nJOBFORGE_SECRET_HUGGING_FACE_HUB_TOKEN=' in hf  # `index`: field names with '-'


def test_every_secret_the_payload_names_is_written_by_a_template(gpu_vault_config):
    record = JobRecord(job_id="8f1c", config=gpu_vault_config, image_tags=["8f1c"],
                       submitted_at=datetime(2025, 1, 1, tzinfo=UTC))
    payload = build_payload(record, "test", RegistryTarget(registry_url="127.0.0.1:5000"))
    job = parse_job(render_job("test", variant_spec("test", gpu_vault_config)))
    written = {name for t in job.templates().values() if t.get("env")
               for name in re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", t["data"], re.MULTILINE)}
    # test.py reads a secret only from JOBFORGE_SECRET_<name>: never from a variable of the service or runner.
    assert {"JOBFORGE_SECRET_" + name for name in payload["test"]["secret_env"]} <= written
    assert {"JOBFORGE_JOB_REGISTRY_USERNAME", "JOBFORGE_JOB_REGISTRY_PASSWORD"} <= written
    assert not written & set(payload["test"]["secret_env"])


def test_build_reads_git_and_registry_credentials(gpu_vault_config):
    job = parse_job(render_job("build", variant_spec("build", gpu_vault_config)))
    templates = job.templates()
    git = templates["secrets/git.env"]["data"]
    assert git.startswith('{{ with secret "secret/nomad/jobs/git-credentials" }}')
    assert "\nJOBFORGE_JOB_GIT_USERNAME={{ . | toJSON }}" in git and "\nJOBFORGE_JOB_GIT_PASSWORD={{ . | toJSON }}" in git
    assert "secrets/registry.env" in templates
    assert "constraint" not in job.group and "device" not in job.task["resources"][0]
    assert job.task["vault"]


def test_vault_role_and_token_auth():
    spec = VariantSpec(resources=default_spec("publish").resources, registry_credentials_path="secret/reg")
    role = parse_job(render_job("publish", spec, RenderParams(vault_role="jobforge")))
    assert role.task["vault"][0]["role"] == "jobforge"
    assert "policies" not in role.task["vault"][0]
    token = parse_job(render_job("publish", spec.model_copy(update={"vault_policies": ("b", "a")}),
                                 RenderParams(vault_auth="token", vault_policies=("registry-read", "a"))))
    assert token.task["vault"][0]["policies"] == ["a", "b", "registry-read"]
    assert "role" not in token.task["vault"][0]
    with pytest.raises(ValueError, match="needs policies"):
        render_job("publish", spec, RenderParams(vault_auth="token"))


def test_render_params_reach_the_job():
    params = RenderParams(image="127.0.0.1:5000/runner:1", datacenters=("dc1", "dc2"), cache_volume="cache",
                          cache_mount="/cache", kill_timeout="1m")
    job = parse_job(render_job("build", params=params))
    assert job.job["datacenters"] == ["dc1", "dc2"]
    assert job.task["config"][0]["image"] == "127.0.0.1:5000/runner:1"
    assert job.task["kill_timeout"] == "1m"
    assert job.group["volume"] == [{"cache": {"type": "host", "source": "cache", "read_only": False}}]
    assert job.env()["JOBFORGE_BUILDAH_ROOT"] == "/cache/root"


def test_render_params_are_validated():
    for bad in ({"kill_timeout": "30"}, {"datacenters": ()}, {"datacenters": (" ",)}, {"cache_mount": "rel/path"},
                {"cache_mount": "/trailing/"}, {"vault_auth": "other"}, {"unknown": 1}):
        with pytest.raises(ValueError):
            RenderParams(**bad)


def test_render_params_from_settings():
    class Nomad:
        datacenters = "dc1, dc2,"

    class Settings:
        nomad = Nomad()

    assert RenderParams.from_settings(Settings(), image="x").datacenters == ("dc1", "dc2")


# ------------------------------------------------------------------------------------------------ escaping

HOSTILE = ['x" }\njob "evil" {', "${env}", "%{if true}y%{endif}", "}} {{ .Data }}", "a\\\"b\\", "tab\there"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_literals_in_the_job(value):
    spec = VariantSpec(
        resources=default_spec("test").resources,
        constraints=(ConstraintSpec(attribute=value, operand="=", value=value),),
        vault_policies=(value,),
    )
    params = RenderParams(image=value, datacenters=(value,), vault_auth="token", vault_policies=(value,))
    job = parse_job(render_job("test", spec.model_copy(update={"registry_credentials_path": "secret/r"}), params))
    assert job.name.startswith("jobforge-test-")
    (constraint,) = job.group["constraint"]
    assert untemplate(constraint["attribute"]) == value and untemplate(constraint["value"]) == value
    assert [untemplate(v) for v in job.task["vault"][0]["policies"]] == [value]
    assert untemplate(job.task["config"][0]["image"]) == value
    assert [untemplate(v) for v in job.job["datacenters"]] == [value]


def test_hostile_vault_path_and_field_stay_inside_go_string_literals():
    path, field = 'secret/x" }}{{ env "HOME" }}{{ "', 'f"}}'
    spec = VariantSpec(resources=default_spec("test").resources, vault_policies=("p",),
                       vault_secrets=(SecretSpec(path=path, fields=((field, "NAME"),)),))
    job = parse_job(render_job("test", spec))
    data = untemplate(job.templates()["secrets/vault-1.env"]["data"])
    assert data.startswith("{{ with secret " + json.dumps(path) + " }}")
    assert "{{- with index .Data.data " + json.dumps(field) + " }}\nJOBFORGE_SECRET_NAME=" in data


def test_invalid_env_name_is_refused():
    spec = VariantSpec(resources=default_spec("test").resources, vault_policies=("p",),
                       vault_secrets=(SecretSpec(path="secret/a", fields=(("f", "BAD=NAME\nX"),)),))
    with pytest.raises(ValueError, match="environment variable name"):
        render_job("test", spec)


def test_unknown_phase():
    with pytest.raises(ValueError, match="unknown phase"):
        render_job("deploy")


# ------------------------------------------------------------------------------------------------ the template


def test_every_template_expression_is_finalized_through_the_hcl_escape():
    """No `{{ }}` in templates/nomad may opt out: the only filter is `heredoc` (which produces a checked heredoc),
    and the environment has no other filters to reach for."""
    env = environment()
    assert env.finalize is finalize
    assert env.autoescape is False and env.undefined is jinja2.StrictUndefined
    assert set(env.filters) == {"heredoc"}
    sources = sorted((templates_dir() / "nomad").glob("*.j2"))
    assert [p.name for p in sources] == [TEMPLATE, SERVICE_TEMPLATE]
    for path in sources:
        tokens = list(env.lex(path.read_text()))
        filters, inside, previous = set(), False, None
        for _line, kind, value in tokens:
            if kind == "variable_begin":
                inside = True
            elif kind == "variable_end":
                inside = False
            elif inside and kind == "name" and previous == "pipe":
                filters.add(value)
            previous = kind if kind != "whitespace" else previous
        assert filters <= {"heredoc"}, path


def test_a_plain_interpolation_cannot_emit_raw_hcl():
    env = environment()
    for value in HOSTILE:
        assert env.from_string("{{ x }}").render(x=value) == hcl_string(value)
    with pytest.raises(jinja2.TemplateAssertionError):
        env.from_string("{{ x | safe }}")
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ missing }}").render()
    with pytest.raises(TypeError):
        env.from_string("{{ x }}").render(x=None)
