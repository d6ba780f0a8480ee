"""Service defaults that may change while the service runs (Consul KV `jobforge-service/config/`), as pure values.

`parse_entries` turns the KV entries under the prefix into a `RuntimeConfig`, keeping the previous value of any
key whose new value is invalid (and saying so); `effective` lays the environment over it (a variable that is set
wins); `JobDefaults` pins the current timeouts and cpu/memory/disk into a submitted job where it names none.

Resources: `default_resource_limits/<phase>/<cpu|memory|disk>` (phase build, test or publish) beats the global
`default_resource_limits/<cpu|memory|disk>` for that phase; any value the job gives itself beats both.
The watcher that feeds this is `jobforge.consul_config`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from jobforge.config import PHASES, JobConfig, PhaseResources, ResourceLimits, ResourceValue
from jobforge.rules import parse_duration

_MAX_TIMEOUT = 24 * 3600
_TIMEOUT = TypeAdapter(Annotated[float, BeforeValidator(parse_duration), Field(ge=1, le=_MAX_TIMEOUT)])
_COUNT = TypeAdapter(Annotated[int, Field(ge=1, le=10_000)])
_RESOURCE = TypeAdapter(ResourceValue)
_FIELDS = ("cpu", "memory", "disk")

# key below the prefix -> (RuntimeConfig field, validator)
KEYS: dict[str, tuple[str, TypeAdapter]] = {
    "build_timeout": ("build_timeout", _TIMEOUT),
    "test_timeout": ("test_timeout", _TIMEOUT),
    "max_concurrent_jobs": ("max_concurrent_jobs", _COUNT),
    "default_resource_limits/cpu": ("cpu", _RESOURCE),
    "default_resource_limits/memory": ("memory", _RESOURCE),
    "default_resource_limits/disk": ("disk", _RESOURCE),
    **{f"default_resource_limits/{phase}/{field}": (f"{phase}_{field}", _RESOURCE)
       for phase in PHASES for field in _FIELDS},
}


class RuntimeConfig(BaseModel):
    """Values found in Consul; None: not set there (the environment's or the built-in default applies)."""

    model_config = ConfigDict(frozen=True)

    build_timeout: float | None = None
    test_timeout: float | None = None
    max_concurrent_jobs: int | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    build_cpu: int | None = None
    build_memory: int | None = None
    build_disk: int | None = None
    test_cpu: int | None = None
    test_memory: int | None = None
    test_disk: int | None = None
    publish_cpu: int | None = None
    publish_memory: int | None = None
    publish_disk: int | None = None

    def phase_resources(self, phase: str) -> PhaseResources | None:
        """`default_resource_limits/<phase>/…`, None when none of the three is set."""
        values = {f: getattr(self, f"{phase}_{f}") for f in _FIELDS}
        return PhaseResources(**values) if any(v is not None for v in values.values()) else None


def parse_entries(values: dict[str, str], previous: RuntimeConfig) -> tuple[RuntimeConfig, list[str]]:
    """`values`: key below the prefix -> text. An invalid value keeps `previous`'s; a key that is gone is unset.
    Returns the new config and one problem line per invalid value (naming the key and the rule, not the value
    when it is long). Unknown keys are ignored."""
    fields: dict[str, object] = {}
    problems = []
    for key, (name, adapter) in KEYS.items():
        if key not in values:
            continue
        text = values[key].strip()
        try:
            fields[name] = adapter.validate_python(text)
        except ValidationError as exc:
            fields[name] = getattr(previous, name)
            rule = "; ".join(e["msg"] for e in exc.errors())
            problems.append(f"{key}={text[:64]!r} is invalid ({rule}); keeping "
                            f"{'no value' if fields[name] is None else repr(fields[name])}")
    return RuntimeConfig(**fields), problems


def effective(found: RuntimeConfig, env: dict[str, object]) -> RuntimeConfig:
    """`env`: the fields whose environment variable is set, with their values; they win over Consul."""
    return found.model_copy(update={k: v for k, v in env.items() if k in RuntimeConfig.model_fields})


class JobDefaults(BaseModel):
    """What a job submitted now gets where its config says nothing, pinned into its record at submit: so a later
    change applies to jobs submitted afterwards only, on whichever replica drives them."""

    model_config = ConfigDict(frozen=True)

    build_timeout: float | None = None
    test_timeout: float | None = None
    resources: PhaseResources | None = None
    phase_resources: dict[str, PhaseResources] = Field(default_factory=dict)

    @classmethod
    def of(cls, config: RuntimeConfig) -> JobDefaults:
        has_resources = any(v is not None for v in (config.cpu, config.memory, config.disk))
        phases = {phase: found for phase in PHASES if (found := config.phase_resources(phase)) is not None}
        return cls(build_timeout=config.build_timeout, test_timeout=config.test_timeout,
                   resources=PhaseResources(cpu=config.cpu, memory=config.memory, disk=config.disk)
                   if has_resources else None, phase_resources=phases)

    def apply(self, job: JobConfig) -> JobConfig:
        """The job's own values (timeouts; cpu/memory/disk global or per phase) still win."""
        update: dict[str, object] = {}
        if self.build_timeout is not None and job.build_timeout is None:
            update["build_timeout"] = timedelta(seconds=self.build_timeout)
        if self.test_timeout is not None and job.test is not None and job.test.timeout is None:
            update["test"] = job.test.model_copy(update={"timeout": timedelta(seconds=self.test_timeout)})
        own = job.resource_limits or ResourceLimits()
        fill: dict[str, object] = {}
        for phase, defaults in self.phase_resources.items():
            # Decided on the job's own values: its global cpu/memory/disk beat a phase default too.
            layers = [own, getattr(own, phase)] + ([job.test.resource_limits] if phase == "test" and job.test else [])
            values = {f: getattr(defaults, f) for f in _FIELDS if getattr(defaults, f) is not None
                      and all(layer is None or getattr(layer, f) is None for layer in layers)}
            if values:
                fill[phase] = (getattr(own, phase) or PhaseResources()).model_copy(update=values)
        if self.resources is not None:
            fill.update({f: getattr(self.resources, f) for f in _FIELDS
                         if getattr(own, f) is None and getattr(self.resources, f) is not None})
        if fill:
            update["resource_limits"] = own.model_copy(update=fill)
        return job.model_copy(update=update) if update else job
