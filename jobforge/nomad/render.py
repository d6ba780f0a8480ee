"""Render a phase's parameterized Nomad job (HCL) from `templates/nomad/job.nomad.hcl.j2`.

`render_job(phase, spec, params)` is pure apart from reading the template and the task scripts it embeds.
`python -m jobforge.nomad OUT_DIR` (`make nomad-jobs`) writes the default jobs users `nomad job run`.

Escaping: the Jinja environment finalizes every `{{ expression }}` through `escape.hcl_literal`, so values from a
job config reach the file only as escaped HCL literals; the task scripts are embedded as heredocs after Go-template
escaping (`escape.go_template_text`); Vault paths and field names sit inside Go string literals (`escape.go_string`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobforge.config import ENV_NAME_PATTERN
from jobforge.control import NONCE_META
from jobforge.nomad.escape import (
    Hcl,
    go_string,
    go_template_text,
    hcl_heredoc,
    hcl_literal,
)
from jobforge.nomad.service_job import (
    SERVICE_JOB_FILE,
    SERVICE_TEMPLATE,
    VAULT_FIELDS,
    ServiceJobParams,
    service_context,
)
from jobforge.nomad.variants import NOMAD_PHASES, VariantSpec, default_spec, variant_id
from jobforge.tasks import task_script, templates_dir

__all__ = ["DEFAULT_IMAGE", "META_OPTIONAL", "META_REQUIRED", "RenderParams", "default_job_files", "environment",
           "finalize", "render_job", "render_service_job", "write_default_jobs"]

# A runner image with python3, buildah, skopeo and git: templates/nomad/runner.Containerfile, pushed by the operator.
DEFAULT_IMAGE = "localhost:5000/jobforge-runner:latest"
TEMPLATE = "job.nomad.hcl.j2"
# Dispatch meta (the payload carries everything else). `attempt` makes dispatches of one phase distinguishable.
META_REQUIRED: dict[str, tuple[str, ...]] = {
    "build": ("job_id", "attempt"), "test": ("job_id", "attempt"), "publish": ("job_id", "attempt"),
    "cleanup": ("job_id",),
}
META_OPTIONAL: tuple[str, ...] = ("owner", NONCE_META)  # the phase's nonce for its control lines (jobforge.control)
# Reference client setup: GPU nodes carry `meta.gpu-capable = "true"`; the device block picks the GPUs.
GPU_CONSTRAINT = {"attribute": "${meta.gpu-capable}", "operator": "=", "value": "true"}
# A job's own Vault credentials, as (Vault field, env var): the task scripts bind them to the job's repo_url origin
# and publish host only (docs/security.md). Names distinct from the service-wide variables.
# `ssh_key` (and `known_hosts` for its host keys) serve a repo_url fetched over ssh, as the reference allows.
GIT_FIELDS = (("username", "JOBFORGE_JOB_GIT_USERNAME"), ("password", "JOBFORGE_JOB_GIT_PASSWORD"),
              ("ssh_key", "JOBFORGE_JOB_GIT_SSH_KEY"), ("known_hosts", "JOBFORGE_JOB_GIT_KNOWN_HOSTS"))
REGISTRY_FIELDS = (("username", "JOBFORGE_JOB_REGISTRY_USERNAME"), ("password", "JOBFORGE_JOB_REGISTRY_PASSWORD"))
# test.vault_secrets values reach test.py as JOBFORGE_SECRET_<container variable>: only they can be the source.
SECRET_ENV_PREFIX = "JOBFORGE_SECRET_"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)


class RenderParams(BaseModel):
    """Service-wide values of every rendered job. They do not enter the variant hash: changing one
    re-registers the same job IDs with a new spec version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(DEFAULT_IMAGE, min_length=1, description="runner image: python3, buildah, skopeo, git")
    datacenters: tuple[str, ...] = Field(("dc1",), min_length=1, description="a stock cluster's datacenter")
    cache_volume: str = Field("buildah-cache", min_length=1, description="client host volume for buildah storage")
    cache_mount: str = Field("/var/lib/jobforge/buildah", pattern=r"^/.*[^/]$",
                             description="where the host volume is mounted in the task")
    storage_driver: str = "vfs"
    isolation: str = "chroot"
    kill_timeout: str = Field("30s", pattern=r"^(?:[0-9]+(?:ms|s|m|h))+$",
                              description="SIGTERM grace: the scripts let buildah remove its container first")
    vault_auth: Literal["workload-identity", "token"] = Field(
        "workload-identity", description="Nomad >= 1.10 only has workload identity; 'token' writes `policies`")
    vault_role: str | None = Field(None, description="Vault JWT role (workload identity); None = client default")
    vault_policies: tuple[str, ...] = Field((), description="token auth: policies added to every Vault job, "
                                                            "e.g. one that reads the credential paths")

    @field_validator("datacenters")
    @classmethod
    def _datacenters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not dc.strip() for dc in value):
            raise ValueError("datacenter names must not be empty")
        return value

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RenderParams:
        """Values the service settings already hold (`NOMAD_DATACENTERS`), plus explicit overrides."""
        datacenters = tuple(dc.strip() for dc in settings.nomad.datacenters.split(",") if dc.strip())
        return cls(**{"datacenters": datacenters or ("dc1",), **overrides})


# ------------------------------------------------------------------------------------------------ context


def _env_template(path: str, fields: Sequence[tuple[str, str]]) -> str:
    """consul-template text that writes `ENV=<json value>` for each (field, env) of the KV v2 secret at `path`.

    A field that is missing (or empty) in Vault leaves its variable unset: the scripts then report it by name.
    `toJSON` keeps quotes, `#` and newlines intact through Nomad's env-file parser (go-envparse).
    """
    lines = [f"{{{{ with secret {go_string(path)} }}}}"]
    for field, env in fields:
        if not _ENV_NAME.match(env):
            raise ValueError(f"invalid environment variable name {env!r}")
        lines.append(f"{{{{- with index .Data.data {go_string(field)} }}}}\n{env}={{{{ . | toJSON }}}}\n{{{{- end }}}}")
    lines.append("{{ end }}\n")
    return "\n".join(lines)


def _env_templates(spec: VariantSpec) -> list[dict[str, str]]:
    templates = []
    if spec.git_credentials_path:
        templates.append({"destination": "secrets/git.env",
                          "data": _env_template(spec.git_credentials_path, GIT_FIELDS)})
    if spec.registry_credentials_path:
        templates.append({"destination": "secrets/registry.env",
                          "data": _env_template(spec.registry_credentials_path, REGISTRY_FIELDS)})
    for number, secret in enumerate(spec.vault_secrets, start=1):
        fields = [(field, SECRET_ENV_PREFIX + env) for field, env in secret.fields]
        templates.append({"destination": f"secrets/vault-{number}.env", "data": _env_template(secret.path, fields)})
    return templates


def _vault(spec: VariantSpec, params: RenderParams) -> dict[str, Any] | None:
    if not spec.needs_vault:
        return None
    if params.vault_auth == "token":
        policies = sorted({*spec.vault_policies, *params.vault_policies})
        if not policies:
            raise ValueError("token-based Vault auth needs policies: set vault_policies for the credential paths")
        return {"role": None, "policies": policies}
    return {"role": params.vault_role, "policies": None}


def _constraints(spec: VariantSpec) -> list[dict[str, str | None]]:
    constraints = [{"attribute": c.attribute, "operator": c.operand,
                    "value": None if c.operand in ("is_set", "is_not_set") else c.value}
                   for c in spec.constraints]
    if spec.gpu_count:
        constraints.append(dict(GPU_CONSTRAINT))
    return constraints


PHASE_HELPERS = {"build": ("_cache", "_relay")}  # helper modules a phase script imports besides _common


def _context(phase: str, spec: VariantSpec, params: RenderParams) -> dict[str, Any]:
    name = variant_id(phase, spec)
    return {
        "name": name,
        "phase": phase,
        "variant": "default" if name == f"jobforge-{phase}" else name.rsplit("-", 1)[1],
        "vault_policies_meta": ",".join(spec.vault_policies),
        "meta_required": list(META_REQUIRED[phase]),
        "meta_optional": list(META_OPTIONAL),
        "resources": spec.resources,
        "gpu_count": spec.gpu_count,
        "constraints": _constraints(spec),
        "vault": _vault(spec, params),
        "env_templates": _env_templates(spec),
        "script_path": f"${{NOMAD_TASK_DIR}}/{phase}.py",
        "scripts": [{"destination": f"local/{script}.py", "text": go_template_text(_script(script))}
                    for script in ("_common", *PHASE_HELPERS.get(phase, ()), phase)],
        "env": {
            "JOBFORGE_PAYLOAD": "${NOMAD_TASK_DIR}/payload.json",
            "JOBFORGE_WORKDIR": "${NOMAD_ALLOC_DIR}/work",
            "JOBFORGE_BUILDAH_ROOT": f"{params.cache_mount}/root",
            "JOBFORGE_BUILDAH_RUNROOT": f"{params.cache_mount}/runroot",
            "JOBFORGE_STORAGE_DRIVER": params.storage_driver,
            "JOBFORGE_ISOLATION": params.isolation,
            # The runner container's own network (Nomad's bridge, no route to the client's loopback) is the
            # build steps' boundary; test commands still get a namespace without network unless `outbound`.
            "JOBFORGE_BUILD_NETWORK": "runner",
            # The dispatch's nonce for the task's control lines (jobforge.control); the script unsets it at once.
            "JOBFORGE_CONTROL_NONCE": f"${{NOMAD_META_{NONCE_META}}}",
        },
    }


def _script(name: str) -> str:
    return task_script(name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ rendering


def finalize(value: object) -> Hcl:
    """Every `{{ expression }}`'s output: an escaped HCL literal (an undefined name raises, as StrictUndefined)."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError here
    return hcl_literal(value)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """autoescape off (it is HTML escaping); `finalize` is the HCL escaping instead, applied to every output."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "nomad")),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.clear()  # no `safe`, `format`, `join`...: nothing may produce unescaped text
    env.filters["heredoc"] = hcl_heredoc
    return env


def render_job(phase: str, spec: VariantSpec | None = None, params: RenderParams | None = None) -> str:
    """HCL of the parameterized job for `phase` ("build", "test", "publish", "cleanup") and variant `spec`
    (default: the plain `jobforge-<phase>` job)."""
    if phase not in NOMAD_PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(NOMAD_PHASES)}")
    spec = default_spec(phase) if spec is None else spec
    params = RenderParams() if params is None else params
    return environment().get_template(TEMPLATE).render(job=_context(phase, spec, params), params=params)


def render_service_job(params: ServiceJobParams | None = None) -> str:
    """HCL of the service's own job (`jobforge-service`, N replicas); see jobforge/nomad/service_job.py."""
    params = ServiceJobParams() if params is None else params
    svc = {**service_context(params), "vault_template": _env_template(params.secrets_path, VAULT_FIELDS)}
    return environment().get_template(SERVICE_TEMPLATE).render(svc=svc)


def default_job_files(params: RenderParams | None = None) -> dict[str, str]:
    """`{"jobforge-build.nomad.hcl": <hcl>, ...}`: the default job of every phase, and the service's job."""
    files = {f"jobforge-{phase}.nomad.hcl": render_job(phase, params=params) for phase in NOMAD_PHASES}
    runner = {"runner_image": params.image, "datacenters": params.datacenters} if params else {}
    return {**files, SERVICE_JOB_FILE: render_service_job(ServiceJobParams(**runner))}


def write_default_jobs(out_dir: Path, params: RenderParams | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in default_job_files(params).items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobforge.nomad",
                                     description="Render the default Job Forge Nomad jobs.")
    parser.add_argument("out_dir", type=Path, help="directory for jobforge-<phase>.nomad.hcl")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"runner image (default {DEFAULT_IMAGE})")
    parser.add_argument("--datacenter", action="append", dest="datacenters",
                        help="datacenter (repeatable; default dc1)")
    args = parser.parse_args(argv)
    params = RenderParams(image=args.image, **({"datacenters": tuple(args.datacenters)} if args.datacenters else {}))
    for path in write_default_jobs(args.out_dir, params):
        print(path)
    return 0
