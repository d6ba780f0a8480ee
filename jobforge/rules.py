"""The job config's rules as data and small check functions (no models, no I/O, nothing of ours).

`jobforge.config` turns these into pydantic field types. Each check raises `PydanticCustomError(<rule id>,
<message>)`, so `ValidationError.errors()` carries a stable rule id in `type` and a human message in `msg`;
messages never echo the rejected value (it may be a secret).
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Annotated, Any, Literal, NoReturn, get_args
from urllib.parse import SplitResult, urlsplit

from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

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

# Free-text rules as patterns, for the JSON Schema (the check functions below are what the server runs; the
# patterns say the same, so a client generated from the schema sends nothing the server rejects).
_CONTROL = r"\x00-\x1f\x7f-\x9f"  # Unicode category Cc, what `single_line` refuses
ONE_LINE_PATTERN = rf"^[^{_CONTROL}]*$"
NON_EMPTY_LINE_PATTERN = rf"^(?=[^{_CONTROL}]*\S)[^{_CONTROL}]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"
NON_EMPTY_TEXT_PATTERN = r"^(?=[^\x00]*\S)[^\x00]*$"
HEADER_VALUE_PATTERN = r"^[^\x00-\x08\x0a-\x1f\x7f-\x9f]*$"
RELATIVE_PATH_PATTERN = rf"^(?!/)(?!(?:[^/]*/)*\.\.(?:/|$))[^{_CONTROL}]+$"
# git_ref and the URLs: the checks below explain what is wrong; these patterns (ASCII, the common shapes) are
# the rule's outer bound. The server enforces both, and the JSON Schema shows the pattern, so the schema says
# exactly what is accepted (a pattern never admits what its check refuses).
_REF_CHAR = r"[!-)+-.0-9;->@-Z\]_-}]"  # printable ASCII without space ~ ^ : ? * [ \ /
GIT_REF_SCHEMA_PATTERN = (rf"^(?:[0-9a-fA-F]{{4,40}}|(?!-)(?!@$)(?!.*\.\.)(?!.*@\{{)(?!.*\.$)(?!.*\.lock(?:/|$))"
                          rf"(?!\.)(?!.*/\.){_REF_CHAR}+(?:/{_REF_CHAR}+)*)$")
_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6 = (rf"(?:(?:{_H16}:){{7}}{_H16}|(?:{_H16}:){{1,7}}:|(?:{_H16}:){{1,6}}:{_H16}|(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}"
         rf"|(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}|(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}|(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}"
         rf"|{_H16}:(?::{_H16}){{1,6}}|:(?:(?::{_H16}){{1,7}}|:)"
         rf"|::(?:[fF]{{4}}:)?{_IPV4}|(?:{_H16}:){{6}}{_IPV4})")
_URL_HOST = rf"(?:{_HOSTNAME}|\[{_IPV6}\])"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_URL_CHARS = r"A-Za-z0-9_.~!$&'()*+,;=%-"  # RFC 3986 unreserved, sub-delims and '%'
_URL_USERINFO = rf"(?:[A-Za-z0-9_.~!$&'()*+,;=%][{_URL_CHARS}]*(?::[{_URL_CHARS}]*)?@)?"
_URL_REST = rf"(?:/[{_URL_CHARS}:@/]*)?(?:\?[{_URL_CHARS}:@/?]*)?"
_LOCAL_PATH = rf"/[{_URL_CHARS}:@/]*"
_URL_USER = rf"(?:[A-Za-z0-9_.~!$&'()*+,;=%][{_URL_CHARS}]*@)?"  # a user name without a password
REPO_URL_SCHEMA_PATTERN = (rf"^(?:(?:https?://{_URL_USERINFO}|(?:ssh|git)://{_URL_USER}){_URL_HOST}(?::{_PORT})?"
                           rf"{_URL_REST}"
                           rf"|file://{_URL_HOST}?{_LOCAL_PATH}|{_LOCAL_PATH}"
                           rf"|[A-Za-z0-9_][A-Za-z0-9_.+-]*@{_HOSTNAME}:[A-Za-z0-9_.~/][{_URL_CHARS}:@/]*)$")
REGISTRY_URL_SCHEMA_PATTERN = (rf"^{_URL_HOST}(?::(?:[1-9][0-9]{{0,3}}|[1-5][0-9]{{4}}|6[0-4][0-9]{{3}}"
                               rf"|65[0-4][0-9]{{2}}|655[0-2][0-9]|6553[0-5]))?(?:/{_IMAGE_COMPONENT})*/?$")
WEBHOOK_URL_SCHEMA_PATTERN = rf"^https?://{_URL_USERINFO}{_URL_HOST}(?::{_PORT})?{_URL_REST}$"
DURATION_SCHEMA_PATTERN = r"^(?:[1-9][0-9]{0,3}s?|[1-9][0-9]{0,2}m|(?:[1-9]|1[0-9]|2[0-4])h)$"
"""1s..24h in one unit (the check also takes '1h30m', '1.5h', '500ms' sums within bounds)."""
RESOURCE_STRING_PATTERN = r"^[1-9][0-9]{0,8}$"

# git check-ref-format, plus the `--branch` rule that a ref must not start with '-'.
GIT_REF_FORBIDDEN_CHARS = "~^:?*[\\"
GIT_REF_FORBIDDEN_SEQUENCES = ("..", "@{", "//")

# repo_url: accepted URL schemes, and git's `<transport>::<address>` remote-helper syntax (ext:: runs a command).
GIT_URL_SCHEMES = ("http", "https", "ssh", "git", "file")
_REMOTE_HELPER_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::.*", re.DOTALL)
# scp-like `user@host:path` (user and path must not start with '-': they become ssh arguments).
_SCP_LIKE_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.+-]*@(?:{_HOSTNAME}|\[[0-9A-Fa-f:.]+\]):[^-].*")
WEBHOOK_URL_SCHEMES = ("http", "https")
# Headers Job Forge sets on every webhook (or that steer the connection): `webhook_headers` may not name them.
RESERVED_WEBHOOK_HEADERS = (
    "Host", "Content-Type", "Content-Length", "Content-Encoding", "Transfer-Encoding", "Connection", "Keep-Alive",
    "TE", "Trailer", "Upgrade", "Expect", "Proxy-Authorization", "Proxy-Connection", "User-Agent",
    "X-Webhook-Signature", "X-Webhook-Event", "X-Webhook-Delivery",
)
_RESERVED_LOWER = frozenset(h.lower() for h in RESERVED_WEBHOOK_HEADERS)
# The header-name token without the reserved names, case-insensitively (ECMA-262 has no inline (?i) flag).
WEBHOOK_HEADER_NAME_PATTERN = (
    "^(?!(?:" + "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)
                         for name in RESERVED_WEBHOOK_HEADERS) + ")$)" + HEADER_NAME_PATTERN[1:]
)

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

# String lengths: every string of a job config is bounded (a 1 MiB `owner` must not reach the store).
OWNER_MAX_LENGTH = 256
TEXT_MAX_LENGTH = 4096
"""Any string without a limit of its own: URLs, paths, names, header values, the webhook secret."""
FREE_TEXT_MAX_LENGTH = 65536
"""Test commands, env and build-arg values (may hold a script)."""

# Resources (Nomad units: CPU in MHz, memory and disk in MB). The cap keeps values int32-safe for Nomad.
RESOURCE_MAX = 2**31 - 1
_RESOURCE_DIGITS_RE = re.compile(r"[0-9]{1,18}")

ConstraintOperand = Literal["=", "!=", "regexp", ">=", "<=", ">", "<", "version", "is_set", "is_not_set"]
CONSTRAINT_OPERANDS: tuple[str, ...] = get_args(ConstraintOperand)
# Operands that test an attribute's presence only, so they take no value.
VALUELESS_OPERANDS = frozenset({"is_set", "is_not_set"})

# What `redacted()` puts in place of a secret; pydantic's own mask for a SecretStr in a JSON dump.
REDACTED = "***"
SECRET_MASK = "**********"
# Serialisation context that makes JSON dumps carry the real `webhook_secret` (for trusted persistence only).
SECRETS_CONTEXT: Mapping[str, bool] = MappingProxyType({"reveal_secrets": True})
# Validation context of records read back from the store: a rule added later must not make old jobs unreadable.
STORED_CONTEXT: Mapping[str, bool] = MappingProxyType({"stored": True})


# A Consul KV key prefix for the cluster store: empty, or '/'-terminated segments of Consul-safe characters.
KEY_PREFIX_PATTERN = r"^([A-Za-z0-9_,-][A-Za-z0-9_.,-]*/)*$"

# ------------------------------------------------------------------------------------------------ redaction

# `scheme://user:password@`: the password runs to the authority's last '@' (as urlsplit reads it).
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):[^\s/]*@")


def mask_url_passwords(text: str) -> str:
    """Every `scheme://user:password@` in `text` becomes `scheme://user:***@`: the one redaction used for the
    config views, stored log lines, errors, webhooks and the service log."""
    if "://" not in text:
        return text
    return _URL_PASSWORD_RE.sub(lambda m: f"{m['head']}:{REDACTED}@", text)


# ------------------------------------------------------------------------------------------------ rule checks

def fail(rule: str, message: str) -> NoReturn:
    raise PydanticCustomError(rule, message)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def _is_invisible(char: str) -> bool:
    """Whitespace of any kind, control and format characters: nothing that may hide inside a ref or URL."""
    return char.isspace() or not char.isprintable()


def no_nul(value: str) -> str:
    if "\x00" in value:
        fail("no_nul", "must not contain NUL characters")
    return value


def single_line(value: str) -> str:
    if any(_is_control(c) for c in value):
        fail("single_line", "must not contain control characters (including newlines)")
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        fail("not_empty", "must not be empty")
    return value


def pattern_type(rule: str, pattern: str, message: str, description: str) -> Any:
    """A string type that must be non-empty and fully match `pattern`; the pattern goes into the JSON Schema."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not value:
            fail(rule, "must not be empty")
        if not compiled.fullmatch(value):
            fail(rule, message)
        return value

    return Annotated[str, AfterValidator(check), string_schema(description, pattern, min_length=1)]


def string_schema(description: str | None, pattern: str | None = None, max_length: int = TEXT_MAX_LENGTH,
                  min_length: int = 0) -> WithJsonSchema:
    """The JSON Schema of a checked string type: what the check allows (or less, never more), bounded by the
    models' `str_max_length` unless the type has a tighter limit."""
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if min_length:
        schema["minLength"] = min_length
    if pattern is not None:
        schema["pattern"] = pattern
    if description is not None:
        schema["description"] = description
    return WithJsonSchema(schema)


_URL_CHARS_MESSAGE = ("must be an ASCII URL: a DNS name or IPv4 host, a port without leading zeros, and only "
                      "RFC 3986 characters (letters, digits, -._~!$&'()*+,;=%:@/?; no fragment)")


def _within(value: str, pattern: str, rule: str, message: str) -> str:
    """The last step of a check whose rule is wider than a regular language: the value must also match the
    pattern the JSON Schema shows, so the schema and the server agree exactly."""
    if not re.fullmatch(pattern, value):
        fail(rule, message)
    return value


def check_image_name(value: str) -> str:
    if not value:
        fail("image_name", "must not be empty")
    if len(value) > IMAGE_NAME_MAX_LENGTH:
        fail("image_name", f"must be at most {IMAGE_NAME_MAX_LENGTH} characters")
    if value != value.lower():
        fail("image_name", "must be lowercase")
    if not re.fullmatch(IMAGE_NAME_PATTERN, value):
        fail("image_name", "must be an OCI repository name: lowercase letters and digits, separated by '.', "
                            "'_', '__' or '-' within a component and by '/' between components")
    return value


def check_relative_path(value: str) -> str:
    if not value:
        fail("relative_path", "must not be empty")
    if any(_is_control(c) for c in value):
        fail("relative_path", "must not contain control characters (NUL, newlines)")
    if value.startswith("/"):
        fail("relative_path", "must be relative to the repository root, not an absolute path")
    if ".." in value.split("/"):
        fail("relative_path", "must not contain '..' segments")
    return value


def check_git_ref(value: str) -> str:
    """git check-ref-format rules (one-level names allowed), or a hex commit id."""
    if re.fullmatch(COMMIT_SHA_PATTERN, value):
        return value
    if not value:
        fail("git_ref", "must not be empty")
    if any(_is_invisible(c) for c in value):
        fail("git_ref", "must not contain whitespace or control characters")
    if value.startswith("-"):
        fail("git_ref", "must not start with '-'")
    if value.startswith("/") or value.endswith("/"):
        fail("git_ref", "must not start or end with '/'")
    if any(c in GIT_REF_FORBIDDEN_CHARS for c in value):
        fail("git_ref", "must not contain any of ~ ^ : ? * [ \\")
    if any(seq in value for seq in GIT_REF_FORBIDDEN_SEQUENCES):
        fail("git_ref", "must not contain '..', '@{' or '//'")
    if value == "@" or value.endswith("."):
        fail("git_ref", "must not be '@' or end with '.'")
    for component in value.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            fail("git_ref", "no '/'-separated component may start with '.' or end with '.lock'")
    return _within(value, GIT_REF_SCHEMA_PATTERN, "git_ref", "must be printable ASCII")


def _check_url_authority(parts: SplitResult) -> None:
    host = parts.hostname
    if not host:
        fail("url", "must include a host")
    if not re.fullmatch(HOSTNAME_PATTERN, host) and not _is_ip_address(host):
        fail("url", "host must be a host name or an IP address")
    try:
        parts.port  # noqa: B018 -- urllib validates the port on access
    except ValueError:
        fail("url", "port must be a number between 0 and 65535")
    if parts.username and parts.username.startswith("-"):
        fail("url", "user name must not start with '-'")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_repo_url(value: str) -> str:
    if not value:
        fail("repo_url", "must not be empty")
    if any(_is_invisible(c) for c in value):
        fail("repo_url", "must not contain whitespace or control characters")
    if value.startswith("-"):
        fail("repo_url", "must not start with '-'")
    if _REMOTE_HELPER_RE.fullmatch(value):
        fail("repo_url", "git remote-helper URLs ('<transport>::<address>', e.g. 'ext::') are not allowed")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in GIT_URL_SCHEMES:
            fail("repo_url", f"URL scheme must be one of: {', '.join(GIT_URL_SCHEMES)}")
        parts = urlsplit(value)
        if scheme == "file":
            if not parts.path.startswith("/"):
                fail("repo_url", "a file:// URL must name an absolute path")
        else:
            _check_url_authority(parts)
            if scheme in ("ssh", "git") and parts.password is not None:
                fail("repo_url", f"{scheme}:// URLs take no password: ssh authenticates with a key "
                                 "(git_credentials_path with field ssh_key), git:// has no authentication")
        return _within(value, REPO_URL_SCHEMA_PATTERN, "repo_url", _URL_CHARS_MESSAGE)
    if value.startswith("/") or _SCP_LIKE_RE.fullmatch(value):
        return _within(value, REPO_URL_SCHEMA_PATTERN, "repo_url", _URL_CHARS_MESSAGE)
    fail("repo_url", "must be a git URL (http, https, ssh, git or file scheme), an scp-like 'user@host:path', "
                      "or an absolute local path")


def check_registry_url(value: str) -> str:
    """host[:port][/path]; one trailing '/' is dropped."""
    if value.endswith("/"):
        value = value[:-1]
    if not value:
        fail("registry_url", "must not be empty")
    if any(_is_invisible(c) for c in value):
        fail("registry_url", "must not contain whitespace or control characters")
    if "://" in value:
        fail("registry_url", "must not include a scheme: write 'host[:port][/path]', e.g. 'registry.example:5000'")
    host_port, _, path = value.partition("/")
    match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?", host_port)
    if match is None:
        fail("registry_url", "must be 'host[:port][/path]' with a numeric port")
    host, port = match.group(1), match.group(2)
    ip_literal = host[1:-1] if host.startswith("[") and host.endswith("]") else None
    if ip_literal is not None and not _is_ip_address(ip_literal):
        fail("registry_url", "bracketed host must be an IPv6 address")
    if ip_literal is None and not re.fullmatch(HOSTNAME_PATTERN, host):
        fail("registry_url", "host must be a host name or an IP address")
    if port is not None and not 1 <= int(port) <= 65535:
        fail("registry_url", "port must be between 1 and 65535")
    if path and not re.fullmatch(IMAGE_NAME_PATTERN, path):
        fail("registry_url", "path must be lowercase repository components separated by '/'")
    return _within(value, REGISTRY_URL_SCHEMA_PATTERN, "registry_url",
                   "must be 'host[:port][/path]' with a DNS name or IPv4 host and a port without leading zeros")


def check_webhook_url(value: str) -> str:
    if any(_is_invisible(c) for c in value):
        fail("webhook_url", "must not contain whitespace or control characters")
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in WEBHOOK_URL_SCHEMES:
        fail("webhook_url", "must be an http:// or https:// URL")
    _check_url_authority(urlsplit(value))
    return _within(value, WEBHOOK_URL_SCHEMA_PATTERN, "webhook_url", _URL_CHARS_MESSAGE)


def is_reserved_webhook_header(name: str) -> bool:
    return name.lower() in _RESERVED_LOWER


def check_webhook_header_name(value: str, info: Any) -> str:
    """Refused at submit time; a record read back from the store (`STORED_CONTEXT`) stays readable, and the
    sender drops such a header instead."""
    stored = isinstance(getattr(info, "context", None), Mapping) and info.context.get("stored")
    if is_reserved_webhook_header(value) and not stored:
        fail("webhook_header_reserved", "is set by Job Forge on every webhook and cannot be overridden "
                                        f"(reserved: {', '.join(RESERVED_WEBHOOK_HEADERS)})")
    return value


def check_header_value(value: str) -> str:
    if any(_is_control(c) and c != "\t" for c in value):
        fail("header_value", "must not contain CR, LF or other control characters")
    return value


def check_vault_fields(fields: dict[str, str]) -> dict[str, str]:
    if not fields:
        fail("vault_fields", "must map at least one Vault field to an environment variable name")
    return fields


def reject_bool(value: object) -> object:
    if isinstance(value, bool):
        fail("int_type", "must be an integer, not a boolean")
    return value


def json_integer(value: object) -> object:
    """JSON Schema's `integer`: an int or a whole float (`5.0`), never a boolean or a string."""
    if isinstance(value, float) and not math.isfinite(value):
        fail("int_type", "must be an integer: a finite number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        fail("int_type", "must be an integer")
    return value


def to_resource_value(value: object) -> int:
    """A positive integer given as an int, a whole float or a string of digits ("2000", as the reference)."""
    if isinstance(value, bool):
        fail("resource_value", "must be a positive integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _RESOURCE_DIGITS_RE.fullmatch(value):
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        fail("resource_value", 'must be a positive integer (e.g. 2000 or "2000")')
    if number < 1:
        fail("resource_value", "must be greater than 0")
    if number > RESOURCE_MAX:
        fail("resource_value", f"must be at most {RESOURCE_MAX}")
    return number


def to_timeout(value: object) -> timedelta:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        fail("duration", str(exc))
    if not TIMEOUT_MIN_SECONDS <= seconds <= TIMEOUT_MAX_SECONDS:
        fail("duration", "must be between 1s and 24h")
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
