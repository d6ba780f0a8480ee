"""Which Nomad job a phase of a job config runs on: the variant, keyed by a hash of what shapes the job spec.

Everything per build (repo, ref, tags, build args, test commands and env) travels in the dispatch payload and
meta, so most configs dispatch the plain pre-registered jobs (`jobforge-build`, `jobforge-test`, ...). What a
dispatch cannot change — resources, GPUs, placement constraints, Vault policies and secret paths, credential
paths — lives in the job spec. A config that needs any of those gets its own job, registered once under
`jobforge-<phase>-<12 hex>`: the hash of the canonical `VariantSpec`, so the same needs always map to the same
job and any change maps to a new one. This module is pure: no I/O, no settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from jobforge.config import DEFAULT_RESOURCES, JobConfig, Resources

__all__ = ["CLEANUP_RESOURCES", "NOMAD_PHASES", "ConstraintSpec", "NomadPhase", "SecretSpec", "VariantSpec",
           "default_spec", "job_name", "variant_id", "variant_spec"]

NomadPhase = Literal["build", "test", "publish", "cleanup"]
NOMAD_PHASES: tuple[NomadPhase, ...] = ("build", "test", "publish", "cleanup")
# Deleting the temp image is one skopeo call; no job config sets its resources.
CLEANUP_RESOURCES = Resources(cpu=200, memory=256, disk=300)
_HASH_HEX = 12


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConstraintSpec(_Spec):
    attribute: str
    operand: str
    value: str = ""


class SecretSpec(_Spec):
    """One Vault KV v2 secret; `fields` are (vault field, env var) pairs sorted by field."""

    path: str
    fields: tuple[tuple[str, str], ...]


class VariantSpec(_Spec):
    """The canonical, minimal set of job-spec-affecting values of one phase.

    Canonical: collections are sorted and de-duplicated, unset values are `None`/empty, so two configs that
    need the same job produce equal specs (and equal hashes). Minimal: a phase only carries what its job uses
    (git credentials only for build, GPUs/constraints/secrets only for test).
    """

    resources: Resources
    gpu_count: int = 0
    constraints: tuple[ConstraintSpec, ...] = ()
    vault_policies: tuple[str, ...] = ()
    vault_secrets: tuple[SecretSpec, ...] = ()
    git_credentials_path: str | None = None
    registry_credentials_path: str | None = None

    @property
    def needs_vault(self) -> bool:
        return bool(self.vault_secrets or self.git_credentials_path or self.registry_credentials_path)

    def digest(self) -> str:
        """sha256 of the canonical JSON form (sorted keys, no whitespace)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


def _check_phase(phase: str) -> NomadPhase:
    if phase not in NOMAD_PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(NOMAD_PHASES)}")
    return phase  # type: ignore[return-value]


def default_spec(phase: str) -> VariantSpec:
    """The spec of the plain `jobforge-<phase>` job: default resources, no GPU, no constraints, no Vault."""
    phase = _check_phase(phase)
    return VariantSpec(resources=CLEANUP_RESOURCES if phase == "cleanup" else DEFAULT_RESOURCES[phase])


def variant_spec(phase: str, config: JobConfig) -> VariantSpec:
    """What `phase` of `config` needs from its Nomad job (see `VariantSpec`)."""
    phase = _check_phase(phase)
    registry = config.registry_credentials_path
    if phase == "cleanup":
        return VariantSpec(resources=CLEANUP_RESOURCES, registry_credentials_path=registry)
    resources = config.resources_for(phase)
    if phase == "build":
        return VariantSpec(resources=resources, git_credentials_path=config.git_credentials_path,
                           registry_credentials_path=registry)
    if phase == "publish" or config.test is None:
        return VariantSpec(resources=resources, registry_credentials_path=registry)
    test = config.test
    constraints = {ConstraintSpec(attribute=c.attribute, operand=c.operand, value=c.value) for c in test.constraints}
    secrets = {SecretSpec(path=s.path, fields=tuple(sorted(s.fields.items()))) for s in test.vault_secrets}
    # Policies only matter to a job that reads Vault; without that they would split variants for nothing.
    policies = sorted(set(test.vault_policies)) if secrets or registry else []
    return VariantSpec(
        resources=resources,
        gpu_count=(test.gpu_count or 1) if test.gpu_required else 0,
        constraints=tuple(sorted(constraints, key=lambda c: (c.attribute, c.operand, c.value))),
        vault_policies=tuple(policies),
        vault_secrets=tuple(sorted(secrets, key=lambda s: (s.path, s.fields))),
        registry_credentials_path=registry,
    )


def variant_id(phase: str, spec: VariantSpec) -> str:
    """`jobforge-<phase>` for the default spec, else `jobforge-<phase>-<first 12 hex of spec.digest()>`."""
    phase = _check_phase(phase)
    if spec == default_spec(phase):
        return f"jobforge-{phase}"
    return f"jobforge-{phase}-{spec.digest()[:_HASH_HEX]}"


def job_name(phase: str, config: JobConfig) -> str:
    """The Nomad job to dispatch for `phase` of `config`."""
    return variant_id(phase, variant_spec(phase, config))
