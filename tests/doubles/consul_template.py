"""consul-template 0.39 (the version Nomad embeds), for the forms our Nomad jobs and the reference samples use,
reading secrets from a FakeVault in-process (`FakeVault.handle`, no HTTP), and go-envparse, Nomad's env-file parser.

Both doubles render through this module: the fake Vault's tests call it directly, and the fake Nomad's client
renders every `template` block of a task with it (`FakeNomad(vault=...)`, with the task environment for `env`).

`render_template(text, fake, token, env)` evaluates exactly these Go-template forms (templates/nomad/job.nomad.hcl.j2
through jobforge/nomad/render.py, the Vault section of docs/nomad.md, the task scripts' `{{"{{"}}` escapes, and
shared/reference/nomad-samples/parameterized-job.json)::

    {{ with secret "<path>" }} ... {{ end }}        {{ with index .Data.data "<field>" }} ... {{ end }}
    {{ . | toJSON }}    {{ index .Data.data "<field>" | toJSON }}    {{ .Data.data.<field> | toJSON }}
    {{ . }} (a string field, as it is: the service job's API tokens file)    {{ "<literal>" }}    {{ env "<NAME>" }}    ({{- and -}} trims)

and refuses anything else (`UnsupportedTemplate`), before reading anything. `env` reads the task environment
given as `env=` (Nomad hands consul-template the task's environment); without one it is refused, since the
fake does not model consul-template's fallback to its own process environment (nor does it fall back: a name
missing from the task environment renders as ""). `secret` reads like consul-template: a
`sys/internal/ui/mounts` preflight, the KV v2 `data/` insertion (shimKVv2Path), "no secret exists" for a missing
or deleted secret (`SecretUnavailable`). `token` None reads as the fake's root token, "" as no token.
`render_env_template` parses the rendered file as Nomad does for `env = true`, with go-envparse v0.1.0
(`parse_env_file`; `EnvFileError`).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tests.doubles.vault import FakeVault, Number, go_json

__all__ = ["EnvFileError", "SecretUnavailable", "TemplateError", "UnsupportedTemplate", "parse_env_file",
           "render_env_template", "render_template"]


# ---------------------------------------------------------------- consul-template

class TemplateError(Exception):
    """The template does not render (consul-template would fail the task)."""


class UnsupportedTemplate(TemplateError):
    """A form outside the subset of our Nomad jobs: not evaluated, so never guessed."""


class SecretUnavailable(TemplateError):
    """`secret` cannot read its path: Nomad retries the template, then fails the task."""


class EnvFileError(TemplateError):
    """go-envparse refuses the rendered env file: Nomad fails the task."""


_ACTION_SPACE = " \t\r\n"  # text/template's isSpace
_ACTION_TOKEN = re.compile(r'[ \t\r\n]|"(?:[^"\\\n]|\\[^\n])*"|\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|\.|\||[A-Za-z_]\w*',
                           re.ASCII)
_GO_STRING_ESCAPE = re.compile(r'\\(?:([abfnrtv\\"])|x([0-9A-Fa-f]{2})|([0-7]{3})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))')
_SIMPLE = dict(zip("abfnrtv\\\"", "\a\b\f\n\r\t\v\\\"", strict=True))
_FORMS = {("with", "secret", '"'): "secret", ("with", "index", ".Data.data", '"'): "field",
          ("index", ".Data.data", '"', "|", "toJSON"): "field_json", (".", "|", "toJSON"): "dot_json",
          (".Data.data.*", "|", "toJSON"): "path_json", (".",): "dot", ("env", '"'): "env", ("end",): "end", ('"',): "literal"}
_CONTEXT = {"secret": "root", "field": "secret", "field_json": "secret", "path_json": "secret", "dot_json": "value",
            "dot": "value"}
_DATA_FIELD = re.compile(r"\.Data\.data\.([A-Za-z_]\w*)", re.ASCII)  # one level only: `.Data.data.a.b` is refused


def _shape(token: str) -> str:
    """A token as `_FORMS` spells it: string literals as `"`, `.Data.data.<field>` as `.Data.data.*`."""
    return '"' if token.startswith('"') else ".Data.data.*" if _DATA_FIELD.fullmatch(token) else token


def _go_unquote(token: str) -> str:
    """strconv.Unquote of an interpreted string literal (the only kind our templates use)."""
    out, pos, body = bytearray(), 0, token[1:-1]
    for match in [*_GO_STRING_ESCAPE.finditer(body), None]:
        plain = body[pos:match.start() if match else None]
        if "\\" in plain:
            raise TemplateError(f"invalid syntax in string literal {token}")
        out += plain.encode()
        if match is None:
            break
        simple, hex2, octal, u4, u8 = match.groups()
        code = int(u4 or u8 or hex2 or octal or "0", 8 if octal else 16)
        if simple:
            out += _SIMPLE[simple].encode()
        elif hex2 or octal:
            if code > 0xFF:
                raise TemplateError(f"invalid syntax in string literal {token}")
            out.append(code)
        elif 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            raise TemplateError(f"invalid syntax in string literal {token}")
        else:
            out += chr(code).encode()
        pos = match.end()
    try:
        return bytes(out).decode()
    except UnicodeDecodeError:
        raise UnsupportedTemplate(f"string literal {token} is not UTF-8 (not modelled)") from None


def _parse(text: str, *, with_env: bool) -> list[tuple]:
    """text/template's lexer and parser, for the forms in `_FORMS` only (`env` only `with_env`); nodes are tuples."""
    root: list[tuple] = []
    stack: list[tuple[str, list[tuple]]] = [("root", root)]
    pos, trim_next = 0, False
    while True:
        start = text.find("{{", pos)
        chunk = text[pos:] if start < 0 else text[pos:start]
        left_trim = start >= 0 and text[start + 2:start + 3] == "-" and text[start + 3:start + 4] in tuple(_ACTION_SPACE)
        chunk = chunk.lstrip(_ACTION_SPACE) if trim_next else chunk
        chunk = chunk.rstrip(_ACTION_SPACE) if left_trim else chunk
        if chunk:
            stack[-1][1].append(("text", chunk))
        if start < 0:
            break
        tokens, i = [], start + (4 if left_trim else 2)
        while True:
            if text.startswith("}}", i):
                pos, trim_next = i + 2, False
                break
            if text[i:i + 1] in tuple(_ACTION_SPACE) and text.startswith("-}}", i + 1):
                pos, trim_next = i + 4, True
                break
            match = _ACTION_TOKEN.match(text, i)
            if match is None:
                raise UnsupportedTemplate(f"unsupported or unterminated action at offset {start}: "
                                          f"{text[start:start + 60]!r}")
            if match.group() not in _ACTION_SPACE:
                tokens.append(match.group())
            i = match.end()
        form = _FORMS.get(tuple(_shape(t) for t in tokens))
        if form is None:
            raise UnsupportedTemplate(f"unsupported action {{{{ {' '.join(tokens)} }}}}: only the forms of our "
                                      "Nomad jobs and the reference samples are evaluated")
        strings = [_go_unquote(t) for t in tokens if t.startswith('"')]
        context, body = stack[-1]
        if form == "end":
            if len(stack) == 1:
                raise TemplateError(f"unexpected {{{{end}}}} at offset {start}")
            stack.pop()
        elif form == "literal":
            body.append(("text", strings[0]))
        elif form == "env":
            if not with_env:
                raise UnsupportedTemplate(f"{{{{ {' '.join(tokens)} }}}} without a task environment: consul-template's "
                                          "fallback to its own process environment is not modelled")
            body.append(("env", strings[0]))
        elif _CONTEXT[form] != context:
            raise UnsupportedTemplate(f"{{{{ {' '.join(tokens)} }}}} outside the block our jobs use it in")
        elif form == "path_json":
            body.append((form, _DATA_FIELD.fullmatch(tokens[0]).group(1)))
        elif form in ("secret", "field"):
            node: tuple = (form, strings[0], [])
            body.append(node)
            stack.append(("secret" if form == "secret" else "value", node[2]))
        else:
            body.append((form, *strings))
    if len(stack) > 1:
        raise TemplateError("unexpected EOF: a {{ with }} has no {{ end }}")
    return root


def _truth(value: Any) -> bool:
    """text/template's truth for what JSON decoding yields (numbers are json.Number: strings)."""
    return bool(value) if isinstance(value, bool | str | dict | list) else value is not None


def _to_json(value: Any) -> str:
    """consul-template's toJSON: json.Marshal, "" for nil."""
    return "" if value is None else go_json(value)


def _index(secret: dict[str, Any], name: str) -> Any:
    data = (secret.get("Data") or {}).get("data")
    if data is None:
        raise TemplateError("error calling index: index of untyped nil")
    if not isinstance(data, dict):
        raise TemplateError(f"error calling index: can't index item of type {type(data).__name__}")
    return data.get(name)


def _field(secret: dict[str, Any], name: str) -> Any:
    """The field chain `.Data.data.<name>`: a missing key is nil (missingkey=zero), nil data cannot be walked."""
    data = (secret.get("Data") or {}).get("data")
    if data is None:
        raise TemplateError(f"nil pointer evaluating interface {{}}.{name}")
    if not isinstance(data, dict):
        raise TemplateError(f"can't evaluate field {name} in type {type(data).__name__}")
    return data.get(name)


def _shim_kv2(raw: str, mount: str) -> str:
    """consul-template's shimKVv2Path: insert `data/` after the mount unless `data/` or `metadata/` is there."""
    if raw in (mount, mount.removesuffix("/")):
        return posixpath.join(mount, "data")
    rest = raw.removeprefix(mount)
    if rest.startswith(("data/", "metadata/")):
        return raw
    return posixpath.normpath(posixpath.join(mount, "data", rest))


def _deleted(secret: dict[str, Any]) -> bool:
    """consul-template's deletedKVv2: a parseable deletion_time in the past."""
    data = secret.get("data")
    metadata = data.get("metadata") if isinstance(data, dict) else None
    stamp = metadata.get("deletion_time") if isinstance(metadata, dict) else None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", stamp or "")
    if match is None:
        return False
    when = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)
    return datetime.now(UTC) > when


def _read_secret(fake: FakeVault, token: str | None, raw: str) -> dict[str, Any]:
    """consul-template's vault.read dependency: preflight, path shim, read, the deleted check."""
    path = raw.strip().strip("/")
    if not path:
        raise TemplateError(f'vault.read: invalid format: "{path}"')
    if re.search(r"[?#%\x00-\x1f\x7f]", path):
        raise UnsupportedTemplate(f"secret path {raw!r}: URL syntax (?, #, %, control characters) is not modelled")
    preflight = fake.handle("GET", "sys/internal/ui/mounts/" + path, token=token)
    info = preflight.body.get("data") or {} if preflight.status == 200 else {}
    kv2 = info.get("type") == "kv" and (info.get("options") or {}).get("version") == "2"
    secret_path = _shim_kv2(path, info.get("path", "")) if kv2 else path  # a failed preflight means "not KV v2"
    reply = fake.handle("GET", secret_path, token=token)
    body = json.loads(reply.encoded() or b"null", parse_int=Number, parse_float=Number)  # the API client's UseNumber
    if reply.status == 404:
        secret = body if isinstance(body, dict) and (body.get("warnings") or body.get("data")) else None
    elif reply.status >= 400:
        raise SecretUnavailable(f"vault.read({path}): Error making API request. URL: GET /v1/{secret_path} "
                                f"Code: {reply.status}. Errors: {body.get('errors')}")
    else:
        secret = body
    if secret is None or _deleted(secret):
        raise SecretUnavailable(f"vault.read({path}): no secret exists at {secret_path}")
    return {"Data": secret.get("data")}


def _execute(nodes: list[tuple], dot: Any, out: list[str], read: Callable[[str], dict[str, Any]],
             env: Mapping[str, str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "env":
            out.append(env.get(node[1], ""))
        elif kind == "secret":
            _execute(node[2], read(node[1]), out, read, env)
        elif kind == "field":
            value = _index(dot, node[1])
            if _truth(value):
                _execute(node[2], value, out, read, env)
        elif kind == "dot":
            out.append(_print(dot))
        elif kind == "path_json":
            out.append(_to_json(_field(dot, node[1])))
        else:
            out.append(_to_json(_index(dot, node[1]) if kind == "field_json" else dot))


def _print(value: Any) -> str:
    """text/template's `{{ . }}` of a string or json.Number (its text, as is); maps and lists are not modelled."""
    if isinstance(value, str):
        return value
    raise UnsupportedTemplate(f"{{{{ . }}}} of a {type(value).__name__}: only strings are modelled")


def render_template(text: str, fake: FakeVault, token: str | None = None, *,
                    env: Mapping[str, str] | None = None) -> str:
    """The file consul-template writes for `text` (`token` None: the root token; "": no token; `env`: the task
    environment that `env "NAME"` reads, or None to refuse `env`)."""
    nodes, cache = _parse(text, with_env=env is not None), {}
    token = fake.root_token if token is None else token

    def read(path: str) -> dict[str, Any]:
        if path not in cache:  # one dependency per path
            cache[path] = _read_secret(fake, token, path)
        return cache[path]

    out: list[str] = []
    _execute(nodes, None, out, read, env or {})
    return "".join(out)


def render_env_template(text: str, fake: FakeVault, token: str | None = None, *,
                        env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables Nomad sets from a `template { env = true }` whose data is `text`."""
    return parse_env_file(render_template(text, fake, token, env=env))


# ---------------------------------------------------------------- go-envparse v0.1.0 (Nomad's env-file parser)

MAX_ENV_LINE = 64 * 1024  # bufio.MaxScanTokenSize: a longer line is "token too long"
_GO_WHITESPACE = " \t\n\v\f\r\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
                 "\u2028\u2029\u202f\u205f\u3000"


def _go_trim_space(raw: bytes) -> bytes:
    return raw.decode("utf-8", "surrogateescape").strip(_GO_WHITESPACE).encode("utf-8", "surrogateescape")


def _go_char(byte: int) -> str:
    return f"'{chr(byte)}'" if 0x20 <= byte < 0x7F else f"'\\x{byte:02x}'"


def _env_line(line: bytes) -> tuple[bytes, bytes] | None:
    """envparse.parseLine; None for blank and comment lines; ValueError with go-envparse's message."""
    line = _go_trim_space(line)
    if not line or line.startswith(b"#"):
        return None
    if b"=" not in line:
        raise ValueError("missing =")
    key, value = (_go_trim_space(part) for part in line.split(b"=", 1))
    if len(key) > len(b"export "):
        key = key.removeprefix(b"export ")
    if not key:
        raise ValueError("empty key")
    if not (65 <= key[0] <= 90 or 97 <= key[0] <= 122 or key[0] == 95):
        raise ValueError(f"key must start with [A-Za-z_] but found {_go_char(key[0])}")
    for byte in key[1:]:
        if not (chr(byte).isascii() and (chr(byte).isalnum() or byte == 95)):
            raise ValueError(f"key characters must be [A-Za-z0-9_] but found {_go_char(byte)}")
    out, last_significant, mode, i = bytearray(), 0, "normal", 0
    while i < len(value):
        byte = value[i]
        if byte < 32:
            raise ValueError(f"0x{byte:02x} is an invalid value character")
        if byte > 127:
            if mode == "escape":
                raise ValueError("multibyte characters disallowed in escape sequences")
            last_significant = len(out)  # (sic: before appending, as upstream does)
            out.append(byte)
        elif mode == "normal":
            if byte in b"\"'":
                mode = "double" if byte == 34 else "single"
            elif byte == 35:  # '#': a comment ends the value
                return key, bytes(out[:last_significant])
            else:
                out.append(byte)
                last_significant = len(out) if byte not in b" \t" else last_significant
        elif mode == "double":
            if byte == 34:
                mode = "normal"
            elif byte == 92:
                mode = "escape"
            else:
                out.append(byte)
                last_significant = len(out)
        elif mode == "escape":
            char = chr(byte)
            if char in "\"\\/":
                out.append(byte)
            elif char in "bfrnt":
                out += {"b": b"\b", "f": b"\f", "r": b"\r", "n": b"\n", "t": b"\t"}[char]
            elif char == "u":
                code, i = _env_hex(value, i + 1), i + 4
                if 0xD800 <= code <= 0xDFFF:
                    if len(value) < i + 6 or value[i + 1:i + 3] != b"\\u":
                        raise ValueError("incomplete Unicode surrogate pair")
                    low, i = _env_hex(value, i + 3), i + 6
                    code = (0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                            if code < 0xDC00 and 0xDC00 <= low <= 0xDFFF else 0xFFFD)  # utf16.DecodeRune
                out += chr(code).encode()
            else:
                raise ValueError(f'invalid escape sequence: "{char}"')
            last_significant, mode = len(out), "double"
        else:  # single quotes
            if byte == 39:
                mode = "normal"
            else:
                out.append(byte)
                last_significant = len(out)
        i += 1
    errors = {"double": 'unmatched "', "single": "unmatched '", "escape": "incomplete escape sequence"}
    if mode in errors:
        raise ValueError(errors[mode])
    return key, bytes(out)


def _env_hex(value: bytes, start: int) -> int:
    digits = value[start:start + 4]
    if len(digits) < 4:
        raise ValueError("incomplete hex sequence")
    for byte in digits:
        if chr(byte) not in "0123456789abcdefABCDEF":
            raise ValueError(f'invalid hex character: "{chr(byte)}"')
    return int(digits, 16)


def parse_env_file(text: str) -> dict[str, str]:
    """envparse.Parse over the file, as Nomad's loadTemplateEnv reads each `env = true` template."""
    lines = text.encode("utf-8", "surrogateescape").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    env: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if len(line) >= MAX_ENV_LINE:
            scanned = number - 1
            raise EnvFileError(f"error on line {scanned}: bufio.Scanner: token too long" if scanned
                               else "error reading: bufio.Scanner: token too long")
        try:
            parsed = _env_line(line.removesuffix(b"\r"))
        except ValueError as exc:
            raise EnvFileError(f"error on line {number}: {exc}") from None
        if parsed is not None:
            env[parsed[0].decode()] = parsed[1].decode("utf-8", "surrogateescape")
    return env
