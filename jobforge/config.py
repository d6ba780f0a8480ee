"""The job config: one pydantic v2 model holding every validation rule.

JSON-RPC, REST, the CLI's YAML loader and MCP (through `JobConfig.model_json_schema()`) all validate a job
config with `JobConfig.model_validate(data)` and report failures with `format_validation_errors(exc)`, so each
rule exists exactly once, here. This module does no I/O and imports only `jobforge.rules` and `jobforge.errors`.

How rules are written: the patterns, limits and one small check function per rule live in `jobforge.rules`;
each check raises `PydanticCustomError(<rule id>, <message>)`. So `ValidationError.errors()` carries a stable rule id
in `type` and a human message in `msg`. Messages never echo the rejected value (it may be a secret), and
`hide_input_in_errors` keeps inputs out of `str(ValidationError)`. Every model forbids unknown fields: a typo
is an error, never a silently ignored setting.

Shape::

    JobConfig                                    (owner, repo_url, git_ref, image_name, registry_url, ...)
    ├── test: TestConfig | None
    │   ├── network: TestNetwork                 (none | outbound)
    │   ├── vault_secrets: list[VaultSecret]     (path, fields: vault field -> env var name)
    │   ├── constraints: list[Constraint]        (attribute, operand, value)
    │   └── resource_limits: PhaseResources | None
    └── resource_limits: ResourceLimits | None   (global cpu/memory/disk + build/test/publish: PhaseResources)

Secrets: `webhook_secret` is a `SecretStr`; JSON dumps show it masked unless the caller asks explicitly
(`dump_with_secrets()` or `model_dump(mode="json", context=SECRETS_CONTEXT)` on any model embedding the
config). `redacted()` is the view for status and history (webhook payloads carry no config).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from enum import Enum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    FieldSerializationInfo,
    PlainSerializer,
    SecretStr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_serializer,
    field_validator,
)

from jobforge.errors import ConfigError
from jobforge.rules import (  # noqa: F401 - names re-exported in __all__ too
    COMMIT_SHA_PATTERN,
    DURATION_SCHEMA_PATTERN,
    GIT_REF_SCHEMA_PATTERN,
    HEADER_VALUE_PATTERN,
    NO_NUL_PATTERN,
    NON_EMPTY_LINE_PATTERN,
    NON_EMPTY_TEXT_PATTERN,
    ONE_LINE_PATTERN,
    REGISTRY_URL_SCHEMA_PATTERN,
    RELATIVE_PATH_PATTERN,
    REPO_URL_SCHEMA_PATTERN,
    RESOURCE_STRING_PATTERN,
    WEBHOOK_URL_SCHEMA_PATTERN,
    CONSTRAINT_OPERANDS,
    DURATION_PATTERN,
    ENV_NAME_PATTERN,
    FREE_TEXT_MAX_LENGTH,
    HEADER_NAME_PATTERN,
    IMAGE_NAME_MAX_LENGTH,
    IMAGE_NAME_PATTERN,
    IMAGE_TAG_PATTERN,
    OWNER_MAX_LENGTH,
    REDACTED,
    RESERVED_WEBHOOK_HEADERS,
    RESOURCE_MAX,
    SECRET_MASK,
    SECRETS_CONTEXT,
    STAGE_NAME_PATTERN,
    TEXT_MAX_LENGTH,
    TIMEOUT_MAX_SECONDS,
    TIMEOUT_MIN_SECONDS,
    VALUELESS_OPERANDS,
    VAULT_NAME_PATTERN,
    VAULT_PATH_PATTERN,
    WEBHOOK_HEADER_NAME_PATTERN,
    ConstraintOperand,
    check_git_ref,
    check_header_value,
    check_image_name,
    check_registry_url,
    check_relative_path,
    check_repo_url,
    check_vault_fields,
    check_webhook_header_name,
    check_webhook_url,
    fail,
    format_duration,
    json_integer,
    mask_url_passwords,
    no_nul,
    not_blank,
    parse_duration,
    pattern_type,
    reject_bool,
    single_line,
    string_schema,
    to_resource_value,
    to_timeout,
)

__all__ = [
    "COMMIT_SHA_PATTERN", "CONSTRAINT_OPERANDS", "DEFAULT_RESOURCES", "ENV_NAME_PATTERN", "HEADER_NAME_PATTERN",
    "IMAGE_NAME_PATTERN", "IMAGE_TAG_PATTERN", "PHASES", "REDACTED", "SECRETS_CONTEXT", "STAGE_NAME_PATTERN",
    "Constraint", "JobConfig", "PhaseResources", "ResourceLimits", "Resources", "TestConfig", "TestNetwork",
    "VaultSecret", "format_duration", "format_validation_errors", "parse_duration", "validation_error",
]

# ------------------------------------------------------------------------------------------------ field types

JsonInt = Annotated[int, BeforeValidator(json_integer)]
"""An integer as JSON Schema means it (whole floats too), never a boolean or a numeric string."""
OneLine = Annotated[str, AfterValidator(single_line), string_schema(None, ONE_LINE_PATTERN)]
NonEmptyLine = Annotated[str, AfterValidator(not_blank), AfterValidator(single_line),
                         string_schema(None, NON_EMPTY_LINE_PATTERN, min_length=1)]
_LongText = StringConstraints(max_length=FREE_TEXT_MAX_LENGTH)
FreeText = Annotated[str, _LongText, AfterValidator(no_nul), string_schema(None, NO_NUL_PATTERN, FREE_TEXT_MAX_LENGTH)]
Command = Annotated[str, _LongText, AfterValidator(not_blank), AfterValidator(no_nul),
                    string_schema(None, NON_EMPTY_TEXT_PATTERN, FREE_TEXT_MAX_LENGTH, min_length=1)]

EnvName = pattern_type("env_name", ENV_NAME_PATTERN,
                        "must be a variable name: letters, digits and '_', not starting with a digit",
                        "environment variable name")
ImageTag = pattern_type("image_tag", IMAGE_TAG_PATTERN,
                         "must be 1-128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'",
                         "image tag")
ImageName = Annotated[
    str,
    AfterValidator(check_image_name),
    WithJsonSchema({"type": "string", "pattern": IMAGE_NAME_PATTERN, "maxLength": IMAGE_NAME_MAX_LENGTH,
                    "description": "OCI repository name, e.g. 'myapp' or 'team/myapp'"}),
]
StageName = pattern_type("target", STAGE_NAME_PATTERN,
                          "must be a build stage name: letters, digits, '_', '.' and '-', starting with a letter "
                          "or digit", "Dockerfile build stage to build")
HeaderName = pattern_type("header_name", HEADER_NAME_PATTERN, "must be an HTTP header name (RFC 7230 token)",
                           "HTTP header name")
WebhookHeaderName = Annotated[
    HeaderName,
    AfterValidator(check_webhook_header_name),
    string_schema("HTTP header name, not one Job Forge sets itself (" + ", ".join(RESERVED_WEBHOOK_HEADERS) + ")",
                  WEBHOOK_HEADER_NAME_PATTERN),
]
HeaderValue = Annotated[str, AfterValidator(check_header_value), string_schema(None, HEADER_VALUE_PATTERN)]
VaultPath = pattern_type("vault_path", VAULT_PATH_PATTERN,
                          "must be a Vault path: '/'-separated segments of letters, digits, '_', '.' and '-', "
                          "no segment starting with '.'", "Vault secret path, e.g. 'secret/data/team/app'")
VaultName = pattern_type("vault_name", VAULT_NAME_PATTERN,
                          "must be letters, digits, '_', '.' and '-', not starting with '.'",
                          "Vault field or policy name")
RelativePath = Annotated[
    str,
    AfterValidator(check_relative_path),
    string_schema("path relative to the repository root (no '..', not absolute)", RELATIVE_PATH_PATTERN,
                  min_length=1),
]
GitRef = Annotated[
    str,
    AfterValidator(check_git_ref),
    string_schema("branch, tag or ref name (git check-ref-format rules, not starting with '-') or a hex commit id; "
                  "the pattern is the ASCII subset", GIT_REF_SCHEMA_PATTERN, min_length=1),
]
RepoUrl = Annotated[
    str,
    AfterValidator(check_repo_url),
    string_schema("git URL (http, https, ssh, git, file), scp-like 'user@host:path', or an absolute path; the "
                  "pattern is the common subset", REPO_URL_SCHEMA_PATTERN, min_length=1),
]
RegistryUrl = Annotated[
    str,
    AfterValidator(check_registry_url),
    string_schema("registry 'host[:port][/path]' without a scheme, e.g. 'registry.example:5000/team'",
                  REGISTRY_URL_SCHEMA_PATTERN, min_length=1),
]
WebhookUrl = Annotated[str, AfterValidator(check_webhook_url),
                       string_schema("http(s) URL to notify", WEBHOOK_URL_SCHEMA_PATTERN, min_length=1)]
ResourceValue = Annotated[
    int,
    BeforeValidator(to_resource_value),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": RESOURCE_MAX},
                              {"type": "string", "pattern": RESOURCE_STRING_PATTERN}]}),
]
Timeout = Annotated[
    timedelta,
    BeforeValidator(to_timeout),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": DURATION_SCHEMA_PATTERN},
                              {"type": "number", "minimum": TIMEOUT_MIN_SECONDS, "maximum": TIMEOUT_MAX_SECONDS}],
                    "description": "Go-style duration ('30m', '1h30m', '90s') or seconds; 1s to 24h"}),
]


# ------------------------------------------------------------------------------------------------ models

_ONLY_PATTERN_KEYS = {"additionalProperties": False}
"""pydantic moves a key pattern into `patternProperties`; without this the schema would allow any other key."""

class _Model(BaseModel):
    # str_max_length bounds every string (keys too) that has no tighter limit of its own.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, str_max_length=TEXT_MAX_LENGTH)


class Resources(_Model):
    """Resolved resources of one phase, in Nomad units."""

    cpu: int = Field(gt=0, description="MHz")
    memory: int = Field(gt=0, description="MB")
    disk: int = Field(gt=0, description="MB")


PHASES: tuple[str, ...] = ("build", "test", "publish")
# The reference service's defaults, used for any value a config leaves out.
DEFAULT_RESOURCES: Mapping[str, Resources] = MappingProxyType({
    "build": Resources(cpu=1000, memory=2048, disk=10240),
    "test": Resources(cpu=500, memory=1024, disk=2048),
    "publish": Resources(cpu=500, memory=1024, disk=2048),
})


class PhaseResources(_Model):
    """Optional limits of one phase; integers or numeric strings ("2000") as in the reference."""

    cpu: ResourceValue | None = Field(None, description="CPU in MHz")
    memory: ResourceValue | None = Field(None, description="memory in MB")
    disk: ResourceValue | None = Field(None, description="disk in MB")


class ResourceLimits(PhaseResources):
    """Global `cpu`/`memory`/`disk` (fallback for every phase) plus per-phase overrides."""

    build: PhaseResources | None = None
    test: PhaseResources | None = None
    publish: PhaseResources | None = None


class VaultSecret(_Model):
    """One Vault KV v2 secret whose fields become environment variables of the test container."""

    path: VaultPath
    fields: Annotated[dict[VaultName, EnvName], AfterValidator(check_vault_fields)] = Field(
        description="Vault field name -> environment variable name", json_schema_extra={"minProperties": 1, **_ONLY_PATTERN_KEYS})


class Constraint(_Model):
    """A Nomad constraint on the node that runs the test phase."""

    # `_value_required` as JSON Schema: a value unless the operand is valueless.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["operand"], "properties": {"operand": {"enum": sorted(VALUELESS_OPERANDS)}}},
        {"required": ["value"], "properties": {"value": {"minLength": 1}}}]})

    attribute: NonEmptyLine = Field(description="e.g. '${node.datacenter}' or '${meta.gpu-capable}'")
    operand: ConstraintOperand = "="
    value: OneLine = Field("", validate_default=True, description="empty only for is_set / is_not_set")

    @field_validator("value")
    @classmethod
    def _value_required(cls, value: str, info: ValidationInfo) -> str:
        operand = info.data.get("operand")  # absent when the operand itself was invalid
        if not value and operand is not None and operand not in VALUELESS_OPERANDS:
            fail("constraint_value", f"must not be empty for operand '{operand}' "
                                      "(only is_set and is_not_set take no value)")
        return value


class TestNetwork(str, Enum):
    """What the test container's network namespace holds: only its own loopback, or also outbound access
    (through slirp4netns, without a route to the host's loopback)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    NONE = "none"
    OUTBOUND = "outbound"


class TestConfig(_Model):
    """The optional test phase: run the image's entry point and/or commands inside the built image."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    # `_policies_for_secrets` as JSON Schema.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"vault_secrets": {"maxItems": 0}}},
        {"required": ["vault_policies"], "properties": {"vault_policies": {"minItems": 1}}}]})

    entry_point: StrictBool = Field(False, description="run the image's entry point as the test")
    commands: list[Command] = Field(default_factory=list, description="commands run in the built image")
    env: dict[EnvName, FreeText] = Field(default_factory=dict, json_schema_extra=_ONLY_PATTERN_KEYS)
    network: TestNetwork = Field(TestNetwork.NONE, description="'none' (default): only the container's own "
                                 "loopback; 'outbound': also outbound access, never the host's loopback")
    vault_secrets: list[VaultSecret] = Field(default_factory=list)
    vault_policies: list[VaultName] = Field(default_factory=list, validate_default=True,
                                            description="required when vault_secrets are given")
    gpu_required: StrictBool = False
    gpu_count: JsonInt = Field(0, ge=0, description="0 = one GPU")
    constraints: list[Constraint] = Field(default_factory=list)
    resource_limits: PhaseResources | None = Field(
        None, description="test-phase resources; take priority over resource_limits.test")
    timeout: Timeout | None = None

    @field_validator("vault_policies")
    @classmethod
    def _policies_for_secrets(cls, policies: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("vault_secrets") and not policies:
            fail("vault_policies", "at least one Vault policy is required when vault_secrets are given")
        return policies

    @property
    def timeout_seconds(self) -> float | None:
        return None if self.timeout is None else self.timeout.total_seconds()


def _short_secret(value: object) -> object:
    # Before SecretStr's own check: with str_max_length pydantic would call a long secret "not a valid string".
    if isinstance(value, str) and len(value) > TEXT_MAX_LENGTH:
        fail("string_too_long", f"String should have at most {TEXT_MAX_LENGTH} characters")
    return value


class JobConfig(_Model):
    """Build `repo_url` at `git_ref` into `registry_url/image_name`, optionally test it, then publish it.

    Resources: `resources_for(phase)` resolves each of cpu/memory/disk separately, first value found wins:
    `test.resource_limits` (test phase only; the reference's GPU example puts them there) →
    `resource_limits.<phase>` → global `resource_limits` → `DEFAULT_RESOURCES[phase]`.

    Timeouts: `build_timeout` and `test.timeout` are `timedelta`s (None = the service default); read them as
    `build_timeout_seconds` / `test.timeout_seconds`. JSON dumps write them as Go-style text ("1h30m").
    """

    owner: NonEmptyLine = Field(max_length=OWNER_MAX_LENGTH, json_schema_extra={"maxLength": OWNER_MAX_LENGTH})
    repo_url: RepoUrl
    git_ref: GitRef = "main"
    git_credentials_path: VaultPath | None = None
    dockerfile_path: RelativePath = "Dockerfile"
    dockerfile_context: RelativePath = "."
    image_name: ImageName
    image_tags: list[ImageTag] = Field(default_factory=list,
                                       description="extra tags; the job id is always the first tag")
    registry_url: RegistryUrl
    registry_credentials_path: VaultPath | None = None
    test: TestConfig | None = None
    resource_limits: ResourceLimits | None = None
    build_timeout: Timeout | None = None
    clear_cache: StrictBool = False
    build_args: dict[EnvName, FreeText] = Field(default_factory=dict, json_schema_extra=_ONLY_PATTERN_KEYS)
    target: StageName | None = None
    image_format: Literal["oci", "docker"] = Field(
        "oci", description="manifest format of the built image: 'docker' keeps a Dockerfile's HEALTHCHECK, SHELL and "
                           "ONBUILD, which the OCI format has no field for")
    webhook_url: WebhookUrl | None = None
    webhook_secret: Annotated[SecretStr | None, BeforeValidator(_short_secret)] = Field(
        None, description="HMAC-SHA256 key that signs webhook bodies",
        json_schema_extra={"maxLength": TEXT_MAX_LENGTH, "not": {"enum": [SECRET_MASK, REDACTED]}})
    webhook_on_success: StrictBool = True
    webhook_on_failure: StrictBool = True
    webhook_headers: dict[WebhookHeaderName, HeaderValue] = Field(default_factory=dict,
                                                                  json_schema_extra=_ONLY_PATTERN_KEYS)
    deploy_dir: NonEmptyLine | None = Field(None, description="CLI build-history directory")

    @field_validator("git_credentials_path")
    @classmethod
    def _credentials_usable(cls, path: str | None, info: ValidationInfo) -> str | None:
        # git:// has no authentication: the credentials would be read from Vault and never used.
        if path is not None and str(info.data.get("repo_url", "")).lower().startswith("git://"):
            fail("git_credentials_path", "a git:// repo_url takes no credentials (git:// has no authentication): "
                                         "use an https:// URL (username/password) or an ssh one (ssh_key)")
        return path

    @field_validator("webhook_secret")
    @classmethod
    def _secret_not_masked(cls, secret: SecretStr | None) -> SecretStr | None:
        # A masked dump fed back in would silently replace the real key with the mask: fail loudly instead.
        if secret is not None and secret.get_secret_value() in (SECRET_MASK, REDACTED):
            fail("webhook_secret", "is a masked placeholder ('***' or '**********'), not the real secret")
        return secret

    @field_serializer("webhook_secret", when_used="json")
    def _dump_secret(self, secret: SecretStr | None, info: FieldSerializationInfo) -> str | None:
        if secret is None:
            return None
        if isinstance(info.context, Mapping) and info.context.get("reveal_secrets"):
            return secret.get_secret_value()
        return SECRET_MASK

    # -------------------------------------------------------------------- derived views

    @property
    def test_enabled(self) -> bool:
        """False when there is no test block, or it has neither `entry_point: true` nor commands."""
        return self.test is not None and (self.test.entry_point or bool(self.test.commands))

    @property
    def build_timeout_seconds(self) -> float | None:
        return None if self.build_timeout is None else self.build_timeout.total_seconds()

    def resources_for(self, phase: str) -> Resources:
        """Resources of `phase` ("build", "test" or "publish"); see the class docstring for the order."""
        name = phase.value if isinstance(phase, Enum) else phase
        if name not in DEFAULT_RESOURCES:
            raise ValueError(f"unknown phase {name!r}; expected one of {', '.join(PHASES)}")
        limits = self.resource_limits
        layers = [
            self.test.resource_limits if name == "test" and self.test is not None else None,
            getattr(limits, name) if limits is not None else None,
            limits,
        ]
        default = DEFAULT_RESOURCES[name]
        resolved = {}
        for field in ("cpu", "memory", "disk"):
            values = (getattr(layer, field) for layer in layers if layer is not None)
            resolved[field] = next((v for v in values if v is not None), getattr(default, field))
        return Resources(**resolved)

    def image_tags_for(self, job_id: str) -> list[str]:
        """The tags to publish: the job id first, then `image_tags` in order, without duplicates."""
        if not re.fullmatch(IMAGE_TAG_PATTERN, job_id):
            raise ValueError("job_id is not a valid image tag")
        return list(dict.fromkeys([job_id, *self.image_tags]))

    def redacted(self) -> dict[str, Any]:
        """JSON-mode dump for status and history: `webhook_secret` and every
        `webhook_headers` value become "***", and so does a password in `repo_url`/`webhook_url`."""
        data = self.model_dump(mode="json")
        data["repo_url"] = _redact_url(self.repo_url)
        if self.webhook_url is not None:
            data["webhook_url"] = _redact_url(self.webhook_url)
        if self.webhook_secret is not None:
            data["webhook_secret"] = REDACTED
        data["webhook_headers"] = {name: REDACTED for name in self.webhook_headers}
        return data

    def dump_with_secrets(self) -> dict[str, Any]:
        """JSON-mode dump carrying the real `webhook_secret`: only for trusted persistence (the store)."""
        return self.model_dump(mode="json", context=dict(SECRETS_CONTEXT))

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Keep credentials out of logs: repr shows what redacted() shows.
        for name, value in super().__repr_args__():
            if name in ("repo_url", "webhook_url") and isinstance(value, str):
                value = _redact_url(value)
            elif name == "webhook_headers":
                value = {header: REDACTED for header in value}
            yield name, value


def _redact_url(url: str) -> str:
    """`scheme://user:***@host/...` for a URL with a password in its userinfo; anything else unchanged."""
    return mask_url_passwords(url)


# ------------------------------------------------------------------------------------------------ errors

# Friendlier wording for pydantic's built-in error types.
_MESSAGES = {
    "extra_forbidden": "unknown field (not part of the schema; check the spelling)",
    "missing": "required field is missing",
}
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def format_validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """`[{"field": "test.env.A=B", "rule": "<human message>"}, ...]`, one entry per error, in pydantic's order.

    `field` is a dotted path with list indexes as `image_tags[2]`; a mapping key that is empty or holds '.',
    '[', ']', '"' or whitespace is written as `["key"]`; "" means the whole config. Inputs are never included.
    """
    errors = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        rule = _MESSAGES.get(error["type"], error["msg"])
        for prefix in _PYDANTIC_PREFIXES:
            rule = rule.removeprefix(prefix)
        errors.append({"field": _format_loc(error["loc"]), "rule": rule})
    return errors


_LOC_PART_MAX = 64  # a rejected mapping key is shown only this far (it may be megabytes long)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the key itself was invalid"
            continue
        elif len(part) > _LOC_PART_MAX:
            path += f'["{part[:_LOC_PART_MAX]}..."]'
        elif part == "" or any(c in '.[]"' or c.isspace() for c in part):
            path += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
        else:
            path += f".{part}" if path else part
    return path


def validation_error(exc: ValidationError, what: str = "invalid params") -> ConfigError:
    """The one mapping from a pydantic error to the field-named `ConfigError` the service and client raise:
    the message summarises the first few fields, `errors` lists them all."""
    errors = format_validation_errors(exc)
    shown = "; ".join(f"{e['field']}: {e['rule']}" for e in errors[:5])
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return ConfigError(f"{what}: {shown}{more}", errors)
