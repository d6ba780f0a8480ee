"""The job config: one pydantic v2 model holding every validation rule.

JSON-RPC, REST, the CLI's YAML loader and MCP (through `JobConfig.model_json_schema()`) all validate a job
config with `JobConfig.model_validate(data)` and report failures with `format_validation_errors(exc)`, so each
rule exists exactly once, here. This module does no I/O and imports nothing of ours.

How rules are written: the patterns and limits are module constants; each rule is one small check function
that raises `PydanticCustomError(<rule id>, <message>)`. So `ValidationError.errors()` carries a stable rule id
in `type` and a human message in `msg`. Messages never echo the rejected value (it may be a secret), and
`hide_input_in_errors` keeps inputs out of `str(ValidationError)`. Every model forbids unknown fields: a typo
is an error, never a silently ignored setting.

Shape::

    JobConfig                                    (owner, repo_url, git_ref, image_name, registry_url, ...)
    ├── test: TestConfig | None
    │   ├── vault_secrets: list[VaultSecret]     (path, fields: vault field -> env var name)
    │   ├── constraints: list[Constraint]        (attribute, operand, value)
    │   └── resource_limits: PhaseResources | None
    └── resource_limits: ResourceLimits | None   (global cpu/memory/disk + build/test/publish: PhaseResources)

Secrets: `webhook_secret` is a `SecretStr`; JSON dumps show it masked unless the caller asks explicitly
(`dump_with_secrets()` or `model_dump(mode="json", context=SECRETS_CONTEXT)` on any model embedding the
config). `redacted()` is the view for status, history and webhook payloads.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Iterator, Mapping
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from enum import Enum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, NoReturn, get_args
from urllib.parse import SplitResult, urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, FieldSerializationInfo,
                      PlainSerializer, SecretStr, ValidationError, ValidationInfo, WithJsonSchema, field_serializer,
                      field_validator)
from pydantic_core import PydanticCustomError

__all__ = [
    "COMMIT_SHA_PATTERN", "CONSTRAINT_OPERANDS", "DEFAULT_RESOURCES", "ENV_NAME_PATTERN", "HEADER_NAME_PATTERN",
    "IMAGE_NAME_PATTERN", "IMAGE_TAG_PATTERN", "PHASES", "REDACTED", "SECRETS_CONTEXT", "STAGE_NAME_PATTERN",
    "Constraint", "JobConfig", "PhaseResources", "ResourceLimits", "Resources", "TestConfig", "VaultSecret",
    "format_duration", "format_validation_errors", "parse_duration",
]

# ------------------------------------------------------------------------------------------------ rules as data
# Patterns are ECMA-262 compatible: they also go into the JSON Schema. Python checks them with `re.fullmatch`.

# OCI distribution-spec path component: lowercase alphanumerics joined by '.', '_', '__' or a run of '-'.
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
IMAGE_NAME_PATTERN = rf"^{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*$"
IMAGE_NAME_MAX_LENGTH = 255
# OCI tag: 1-128 characters, not starting with '.' or '-'.
IMAGE_TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
# Environment variable and build-arg names (POSIX shell identifiers).
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Dockerfile build stage (`FROM ... AS <name>`), for `target`.
STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# RFC 7230 token: an HTTP header field name.
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
# An abbreviated or full hex commit id (also a valid ref name, so git_ref accepts it either way).
COMMIT_SHA_PATTERN = r"^[0-9a-fA-F]{4,40}$"
# Vault paths, field names and policy names end up inside Nomad template text
# (`{{ with secret "<path>" }}{{ index .Data.data "<field>" }}`), so they use a plain charset: no quotes,
# braces or whitespace, no segment starting with '.' (which also rules out '..').
_VAULT_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
VAULT_PATH_PATTERN = rf"^{_VAULT_SEGMENT}(?:/{_VAULT_SEGMENT})*$"
VAULT_NAME_PATTERN = rf"^{_VAULT_SEGMENT}$"
# DNS-style host name (also matches dotted IPv4); a label never starts or ends with '-'.
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOSTNAME = rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*"
HOSTNAME_PATTERN = rf"^{_HOSTNAME}$"

# git check-ref-format, plus the `--branch` rule that a ref must not start with '-'.
GIT_REF_FORBIDDEN_CHARS = "~^:?*[\\"
GIT_REF_FORBIDDEN_SEQUENCES = ("..", "@{", "//")

# repo_url: accepted URL schemes, and git's `<transport>::<address>` remote-helper syntax (ext:: runs a command).
GIT_URL_SCHEMES = ("http", "https", "ssh", "git", "file")
_REMOTE_HELPER_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::.*", re.DOTALL)
# scp-like `user@host:path` (user and path must not start with '-': they become ssh arguments).
_SCP_LIKE_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.+-]*@(?:{_HOSTNAME}|\[[0-9A-Fa-f:.]+\]):[^-].*")
WEBHOOK_URL_SCHEMES = ("http", "https")

# Durations: Go's time.ParseDuration syntax ("1h30m", "90s", "1.5h"), or bare digits meaning seconds.
_DURATION_UNITS: Mapping[str, Decimal] = MappingProxyType({
    "ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"), "μs": Decimal("1e-6"),
    "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
})
_DURATION_SEGMENT = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h)"
DURATION_PATTERN = rf"^(?:(?:{_DURATION_SEGMENT})+|[0-9]+)$"
_DURATION_SEGMENT_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
TIMEOUT_MIN_SECONDS = 1
TIMEOUT_MAX_SECONDS = 24 * 3600

# Resources (Nomad units: CPU in MHz, memory and disk in MB). The cap keeps values int32-safe for Nomad.
RESOURCE_MAX = 2**31 - 1
_RESOURCE_DIGITS_RE = re.compile(r"[0-9]{1,18}")

ConstraintOperand = Literal["=", "!=", "regexp", ">=", "<=", ">", "<", "version", "is_set", "is_not_set"]
CONSTRAINT_OPERANDS: tuple[str, ...] = get_args(ConstraintOperand)
# Operands that test an attribute's presence only, so they take no value.
VALUELESS_OPERANDS = frozenset({"is_set", "is_not_set"})

# What `redacted()` puts in place of a secret; pydantic's own mask for a SecretStr in a JSON dump.
REDACTED = "***"
_SECRET_MASK = "**********"
# Serialisation context that makes JSON dumps carry the real `webhook_secret` (for trusted persistence only).
SECRETS_CONTEXT: Mapping[str, bool] = MappingProxyType({"reveal_secrets": True})


# ------------------------------------------------------------------------------------------------ rule checks

def _fail(rule: str, message: str) -> NoReturn:
    raise PydanticCustomError(rule, message)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def _is_invisible(char: str) -> bool:
    """Whitespace of any kind, control and format characters: nothing that may hide inside a ref or URL."""
    return char.isspace() or not char.isprintable()


def _no_nul(value: str) -> str:
    if "\x00" in value:
        _fail("no_nul", "must not contain NUL characters")
    return value


def _single_line(value: str) -> str:
    if any(_is_control(c) for c in value):
        _fail("single_line", "must not contain control characters (including newlines)")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        _fail("not_empty", "must not be empty")
    return value


def _pattern_type(rule: str, pattern: str, message: str, description: str) -> Any:
    """A string type that must be non-empty and fully match `pattern`; the pattern goes into the JSON Schema."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not value:
            _fail(rule, "must not be empty")
        if not compiled.fullmatch(value):
            _fail(rule, message)
        return value

    return Annotated[str, AfterValidator(check), _string_schema(description, pattern)]


def _string_schema(description: str, pattern: str | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "description": description}
    if pattern is not None:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


def _check_image_name(value: str) -> str:
    if not value:
        _fail("image_name", "must not be empty")
    if len(value) > IMAGE_NAME_MAX_LENGTH:
        _fail("image_name", f"must be at most {IMAGE_NAME_MAX_LENGTH} characters")
    if value != value.lower():
        _fail("image_name", "must be lowercase")
    if not re.fullmatch(IMAGE_NAME_PATTERN, value):
        _fail("image_name", "must be an OCI repository name: lowercase letters and digits, separated by '.', "
                            "'_', '__' or '-' within a component and by '/' between components")
    return value


def _check_relative_path(value: str) -> str:
    if not value:
        _fail("relative_path", "must not be empty")
    if any(_is_control(c) for c in value):
        _fail("relative_path", "must not contain control characters (NUL, newlines)")
    if value.startswith("/"):
        _fail("relative_path", "must be relative to the repository root, not an absolute path")
    if ".." in value.split("/"):
        _fail("relative_path", "must not contain '..' segments")
    return value


def _check_git_ref(value: str) -> str:
    """git check-ref-format rules (one-level names allowed), or a hex commit id."""
    if re.fullmatch(COMMIT_SHA_PATTERN, value):
        return value
    if not value:
        _fail("git_ref", "must not be empty")
    if any(_is_invisible(c) for c in value):
        _fail("git_ref", "must not contain whitespace or control characters")
    if value.startswith("-"):
        _fail("git_ref", "must not start with '-'")
    if value.startswith("/") or value.endswith("/"):
        _fail("git_ref", "must not start or end with '/'")
    if any(c in GIT_REF_FORBIDDEN_CHARS for c in value):
        _fail("git_ref", "must not contain any of ~ ^ : ? * [ \\")
    if any(seq in value for seq in GIT_REF_FORBIDDEN_SEQUENCES):
        _fail("git_ref", "must not contain '..', '@{' or '//'")
    if value == "@" or value.endswith("."):
        _fail("git_ref", "must not be '@' or end with '.'")
    for component in value.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            _fail("git_ref", "no '/'-separated component may start with '.' or end with '.lock'")
    return value


def _check_url_authority(parts: SplitResult) -> None:
    host = parts.hostname
    if not host:
        _fail("url", "must include a host")
    if not re.fullmatch(HOSTNAME_PATTERN, host) and not _is_ip_address(host):
        _fail("url", "host must be a host name or an IP address")
    try:
        parts.port  # noqa: B018 -- urllib validates the port on access
    except ValueError:
        _fail("url", "port must be a number between 0 and 65535")
    if parts.username and parts.username.startswith("-"):
        _fail("url", "user name must not start with '-'")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_repo_url(value: str) -> str:
    if not value:
        _fail("repo_url", "must not be empty")
    if any(_is_invisible(c) for c in value):
        _fail("repo_url", "must not contain whitespace or control characters")
    if value.startswith("-"):
        _fail("repo_url", "must not start with '-'")
    if _REMOTE_HELPER_RE.fullmatch(value):
        _fail("repo_url", "git remote-helper URLs ('<transport>::<address>', e.g. 'ext::') are not allowed")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in GIT_URL_SCHEMES:
            _fail("repo_url", f"URL scheme must be one of: {', '.join(GIT_URL_SCHEMES)}")
        parts = urlsplit(value)
        if scheme == "file":
            if not parts.path.startswith("/"):
                _fail("repo_url", "a file:// URL must name an absolute path")
        else:
            _check_url_authority(parts)
        return value
    if value.startswith("/") or _SCP_LIKE_RE.fullmatch(value):
        return value
    _fail("repo_url", "must be a git URL (http, https, ssh, git or file scheme), an scp-like 'user@host:path', "
                      "or an absolute local path")


def _check_registry_url(value: str) -> str:
    """host[:port][/path]; one trailing '/' is dropped."""
    if value.endswith("/"):
        value = value[:-1]
    if not value:
        _fail("registry_url", "must not be empty")
    if any(_is_invisible(c) for c in value):
        _fail("registry_url", "must not contain whitespace or control characters")
    if "://" in value:
        _fail("registry_url", "must not include a scheme: write 'host[:port][/path]', e.g. 'registry.example:5000'")
    host_port, _, path = value.partition("/")
    match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?", host_port)
    if match is None:
        _fail("registry_url", "must be 'host[:port][/path]' with a numeric port")
    host, port = match.group(1), match.group(2)
    ip_literal = host[1:-1] if host.startswith("[") and host.endswith("]") else None
    if ip_literal is not None and not _is_ip_address(ip_literal):
        _fail("registry_url", "bracketed host must be an IPv6 address")
    if ip_literal is None and not re.fullmatch(HOSTNAME_PATTERN, host):
        _fail("registry_url", "host must be a host name or an IP address")
    if port is not None and not 1 <= int(port) <= 65535:
        _fail("registry_url", "port must be between 1 and 65535")
    if path and not re.fullmatch(IMAGE_NAME_PATTERN, path):
        _fail("registry_url", "path must be lowercase repository components separated by '/'")
    return value


def _check_webhook_url(value: str) -> str:
    if any(_is_invisible(c) for c in value):
        _fail("webhook_url", "must not contain whitespace or control characters")
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in WEBHOOK_URL_SCHEMES:
        _fail("webhook_url", "must be an http:// or https:// URL")
    _check_url_authority(urlsplit(value))
    return value


def _check_header_value(value: str) -> str:
    if any(_is_control(c) and c != "\t" for c in value):
        _fail("header_value", "must not contain CR, LF or other control characters")
    return value


def _check_vault_fields(fields: dict[str, str]) -> dict[str, str]:
    if not fields:
        _fail("vault_fields", "must map at least one Vault field to an environment variable name")
    return fields


def _reject_bool(value: object) -> object:
    if isinstance(value, bool):
        _fail("int_type", "must be an integer, not a boolean")
    return value


def _to_resource_value(value: object) -> int:
    """A positive integer given as an int, a whole float or a string of digits ("2000", as the reference)."""
    if isinstance(value, bool):
        _fail("resource_value", "must be a positive integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _RESOURCE_DIGITS_RE.fullmatch(value):
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        _fail("resource_value", 'must be a positive integer (e.g. 2000 or "2000")')
    if number < 1:
        _fail("resource_value", "must be greater than 0")
    if number > RESOURCE_MAX:
        _fail("resource_value", f"must be at most {RESOURCE_MAX}")
    return number


def _to_timeout(value: object) -> timedelta:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        _fail("duration", str(exc))
    if not TIMEOUT_MIN_SECONDS <= seconds <= TIMEOUT_MAX_SECONDS:
        _fail("duration", "must be between 1s and 24h")
    return timedelta(seconds=seconds)


# ------------------------------------------------------------------------------------------------ durations

def parse_duration(value: object) -> float:
    """Seconds in a duration: Go syntax ("30m", "1h30m", "1.5s", "500ms"), bare digits ("90"), a non-negative
    int/float of seconds, or a `timedelta`. Raises `ValueError` (with a message naming the rule) otherwise.

    Only parses: bounds are the caller's (a job timeout must be 1s..24h).
    """
    if isinstance(value, timedelta):
        seconds = Decimal(str(value.total_seconds()))
    elif isinstance(value, bool):
        raise ValueError("a duration must be a string like '30m' or a number of seconds, not a boolean")
    elif isinstance(value, int | float):
        try:
            seconds = Decimal(value)
        except (InvalidOperation, ValueError, OverflowError):
            raise ValueError("a duration must be a finite number of seconds") from None
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError("a duration must be a string like '30m' or a number of seconds")
    if not seconds.is_finite():
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    result = float(seconds)
    if math.isinf(result):
        raise ValueError("a duration is too large")
    return result


def _parse_duration_text(text: str) -> Decimal:
    if re.fullmatch(r"[0-9]+", text):
        return Decimal(text)
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError("invalid duration: use a number with a unit (h, m, s, ms, us, ns), "
                         "e.g. '30m', '1h30m', '90s', or whole seconds")
    return sum((Decimal(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_SEGMENT_RE.findall(text)), Decimal(0))


def format_duration(value: timedelta | float) -> str:
    """Go-style text for a duration ("1h30m", "45s", "1.5s"); `parse_duration` reads it back exactly."""
    micros = value // timedelta(microseconds=1) if isinstance(value, timedelta) else round(value * 1_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds = Decimal(micros) / 1_000_000
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if seconds or not text:
        text += f"{seconds.normalize():f}s"
    return text


# ------------------------------------------------------------------------------------------------ field types

OneLine = Annotated[str, AfterValidator(_single_line)]
NonEmptyLine = Annotated[str, AfterValidator(_not_blank), AfterValidator(_single_line)]
FreeText = Annotated[str, AfterValidator(_no_nul)]
Command = Annotated[str, AfterValidator(_not_blank), AfterValidator(_no_nul)]

EnvName = _pattern_type("env_name", ENV_NAME_PATTERN,
                        "must be a variable name: letters, digits and '_', not starting with a digit",
                        "environment variable name")
ImageTag = _pattern_type("image_tag", IMAGE_TAG_PATTERN,
                         "must be 1-128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'",
                         "image tag")
ImageName = Annotated[
    str,
    AfterValidator(_check_image_name),
    WithJsonSchema({"type": "string", "pattern": IMAGE_NAME_PATTERN, "maxLength": IMAGE_NAME_MAX_LENGTH,
                    "description": "OCI repository name, e.g. 'myapp' or 'team/myapp'"}),
]
StageName = _pattern_type("target", STAGE_NAME_PATTERN,
                          "must be a build stage name: letters, digits, '_', '.' and '-', starting with a letter "
                          "or digit", "Dockerfile build stage to build")
HeaderName = _pattern_type("header_name", HEADER_NAME_PATTERN, "must be an HTTP header name (RFC 7230 token)",
                           "HTTP header name")
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
VaultPath = _pattern_type("vault_path", VAULT_PATH_PATTERN,
                          "must be a Vault path: '/'-separated segments of letters, digits, '_', '.' and '-', "
                          "no segment starting with '.'", "Vault secret path, e.g. 'secret/data/team/app'")
VaultName = _pattern_type("vault_name", VAULT_NAME_PATTERN,
                          "must be letters, digits, '_', '.' and '-', not starting with '.'",
                          "Vault field or policy name")
RelativePath = Annotated[
    str,
    AfterValidator(_check_relative_path),
    _string_schema("path relative to the repository root (no '..', not absolute)"),
]
GitRef = Annotated[
    str,
    AfterValidator(_check_git_ref),
    _string_schema("branch, tag or ref name (git check-ref-format rules, not starting with '-') or a hex commit id"),
]
RepoUrl = Annotated[
    str,
    AfterValidator(_check_repo_url),
    _string_schema("git URL (http, https, ssh, git, file), scp-like 'user@host:path', or an absolute path"),
]
RegistryUrl = Annotated[
    str,
    AfterValidator(_check_registry_url),
    _string_schema("registry 'host[:port][/path]' without a scheme, e.g. 'registry.example:5000/team'"),
]
WebhookUrl = Annotated[str, AfterValidator(_check_webhook_url), _string_schema("http(s) URL to notify")]
ResourceValue = Annotated[
    int,
    BeforeValidator(_to_resource_value),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": RESOURCE_MAX},
                              {"type": "string", "pattern": r"^[0-9]+$"}]}),
]
Timeout = Annotated[
    timedelta,
    BeforeValidator(_to_timeout),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": DURATION_PATTERN},
                              {"type": "number", "minimum": TIMEOUT_MIN_SECONDS, "maximum": TIMEOUT_MAX_SECONDS}],
                    "description": "Go-style duration ('30m', '1h30m', '90s') or seconds; 1s to 24h"}),
]


# ------------------------------------------------------------------------------------------------ models

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


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
    fields: Annotated[dict[VaultName, EnvName], AfterValidator(_check_vault_fields)] = Field(
        description="Vault field name -> environment variable name")


class Constraint(_Model):
    """A Nomad constraint on the node that runs the test phase."""

    attribute: NonEmptyLine = Field(description="e.g. '${node.datacenter}' or '${meta.gpu-capable}'")
    operand: ConstraintOperand = "="
    value: OneLine = Field("", validate_default=True, description="empty only for is_set / is_not_set")

    @field_validator("value")
    @classmethod
    def _value_required(cls, value: str, info: ValidationInfo) -> str:
        operand = info.data.get("operand")  # absent when the operand itself was invalid
        if not value and operand is not None and operand not in VALUELESS_OPERANDS:
            _fail("constraint_value", f"must not be empty for operand '{operand}' "
                                      "(only is_set and is_not_set take no value)")
        return value


class TestConfig(_Model):
    """The optional test phase: run the image's entry point and/or commands inside the built image."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    entry_point: bool = Field(False, description="run the image's entry point as the test")
    commands: list[Command] = Field(default_factory=list, description="commands run in the built image")
    env: dict[EnvName, FreeText] = Field(default_factory=dict)
    vault_secrets: list[VaultSecret] = Field(default_factory=list)
    vault_policies: list[VaultName] = Field(default_factory=list, validate_default=True,
                                            description="required when vault_secrets are given")
    gpu_required: bool = False
    gpu_count: Annotated[int, BeforeValidator(_reject_bool)] = Field(0, ge=0, description="0 = one GPU")
    constraints: list[Constraint] = Field(default_factory=list)
    resource_limits: PhaseResources | None = Field(
        None, description="test-phase resources; take priority over resource_limits.test")
    timeout: Timeout | None = None

    @field_validator("vault_policies")
    @classmethod
    def _policies_for_secrets(cls, policies: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("vault_secrets") and not policies:
            _fail("vault_policies", "at least one Vault policy is required when vault_secrets are given")
        return policies

    @property
    def timeout_seconds(self) -> float | None:
        return None if self.timeout is None else self.timeout.total_seconds()


class JobConfig(_Model):
    """Build `repo_url` at `git_ref` into `registry_url/image_name`, optionally test it, then publish it.

    Resources: `resources_for(phase)` resolves each of cpu/memory/disk separately, first value found wins:
    `test.resource_limits` (test phase only; the reference's GPU example puts them there) →
    `resource_limits.<phase>` → global `resource_limits` → `DEFAULT_RESOURCES[phase]`.

    Timeouts: `build_timeout` and `test.timeout` are `timedelta`s (None = the service default); read them as
    `build_timeout_seconds` / `test.timeout_seconds`. JSON dumps write them as Go-style text ("1h30m").
    """

    owner: NonEmptyLine
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
    clear_cache: bool = False
    build_args: dict[EnvName, FreeText] = Field(default_factory=dict)
    target: StageName | None = None
    webhook_url: WebhookUrl | None = None
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key that signs webhook bodies")
    webhook_on_success: bool = True
    webhook_on_failure: bool = True
    webhook_headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    deploy_dir: NonEmptyLine | None = Field(None, description="CLI build-history directory")

    @field_validator("webhook_secret")
    @classmethod
    def _secret_not_masked(cls, secret: SecretStr | None) -> SecretStr | None:
        # A masked dump fed back in would silently replace the real key with the mask: fail loudly instead.
        if secret is not None and secret.get_secret_value() in (_SECRET_MASK, REDACTED):
            _fail("webhook_secret", "is a masked placeholder ('***' or '**********'), not the real secret")
        return secret

    @field_serializer("webhook_secret", when_used="json")
    def _dump_secret(self, secret: SecretStr | None, info: FieldSerializationInfo) -> str | None:
        if secret is None:
            return None
        if isinstance(info.context, Mapping) and info.context.get("reveal_secrets"):
            return secret.get_secret_value()
        return _SECRET_MASK

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
        """JSON-mode dump for status, history and webhook payloads: `webhook_secret` and every
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
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    prefix = url[: url.index("://") + 3]
    userinfo, _, host_port = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{prefix}{user}:{REDACTED}@{host_port}{url[len(prefix) + len(parts.netloc):]}"


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


def _format_loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the key itself was invalid"
            continue
        elif part == "" or any(c in '.[]"' or c.isspace() for c in part):
            path += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
        else:
            path += f".{part}" if path else part
    return path

