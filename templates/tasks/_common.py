"""Shared plumbing for the phase scripts (stdlib only: they run in any image with python3 and buildah).

Contract (docs/architecture.md, "Task scripts"): inputs come from the environment and the JSON payload,
output is human-readable lines, and a failure ends with one `ERROR: <message>` line on stderr and a
non-zero exit. Every external command is an argv list; known secret values are masked in what we print.

Credentials are bound to hosts (docs/security.md): `git_credential_for` and
`registry_auths_for` are the pure matching rules; a credential is offered only to its own scheme + host +
port, git credentials only over https unless the host is listed in JOBFORGE_GIT_PLAIN_HTTP_HOSTS. A job's ssh
key goes to its own repo_url's host only (`ssh_command`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

EXIT_FAILED = 1
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a TERM-killed child
MASK = "***"
KEPT_LINES = 200  # tail of a command's output kept to classify its failure
_UNAUTHORIZED = re.compile(r"unauthorized|\b401\b", re.IGNORECASE)


class TaskError(Exception):
    """A phase failure with a message meant for the job's `error` field."""


class CommandFailed(TaskError):
    """A command run for its output failed; keeps the (masked) output for callers that classify it."""

    def __init__(self, tool: str, returncode: int, output: str):
        super().__init__(f"{tool} exited with code {returncode}: {one_line(output)[-400:]}")
        self.returncode = returncode
        self.output = output


class Terminated(BaseException):
    """Raised from the SIGTERM handler so `finally` blocks (container removal) still run."""


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str


# --- credentials bound to hosts (pure) ------------------------------------------------------------------

DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True)
class Origin:
    """scheme + lowercased host + port (the scheme's default when the URL has none)."""

    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class Credential:
    origin: Origin
    username: str
    password: str


def origin_of(url: str) -> Origin | None:
    """The origin of an http(s) URL, None for anything else (ssh, scp-like, file, malformed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return Origin(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme])


def split_hosts(text: str | None) -> list[str]:
    """A comma-separated `host[:port]` list, lowercased, blanks dropped."""
    return [h.strip().lower() for h in (text or "").split(",") if h.strip()]


def plain_http_allowed(origin: Origin, plain_http_hosts: Iterable[str]) -> bool:
    """A `host` entry allows every port of that host, `host:port` exactly that port."""
    return any(entry in (origin.host, f"{origin.host}:{origin.port}") for entry in plain_http_hosts)


def parse_credential_store(text: str) -> list[Credential]:
    """`git credential-store` lines (`https://user:pass@host[:port]`, percent-encoded); others are skipped."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        origin = origin_of(line)
        parts = urllib.parse.urlsplit(line) if origin else None
        if origin and parts.username is not None and parts.password is not None:
            found.append(Credential(origin, urllib.parse.unquote(parts.username),
                                    urllib.parse.unquote(parts.password)))
    return found


def host_credentials(host_port: str | None, username: str | None, password: str | None) -> list[Credential]:
    """A username/password bound to `host[:port]`: https on that port (default 443), and http on that port
    (default 80), which `git_credential_for` allows only for plain-http hosts."""
    if not host_port or not username or password is None:
        return []
    found = []
    for scheme in ("https", "http"):
        origin = origin_of(f"{scheme}://{host_port.strip()}")
        if origin:
            found.append(Credential(origin, username, password))
    return found


def git_credential_for(url: str, credentials: Sequence[Credential],
                       plain_http_hosts: Iterable[str] = ()) -> Credential | None:
    """The first credential whose origin is exactly the URL's (scheme, host, port); over plain http only when
    the host is listed as plain-http. Never a credential of another host, whatever the job names."""
    origin = origin_of(url)
    if origin is None or (origin.scheme == "http" and not plain_http_allowed(origin, plain_http_hosts)):
        return None
    return next((c for c in credentials if c.origin == origin), None)


def is_ssh_url(url: str) -> bool:
    """What git fetches over ssh: `ssh://…` or scp-like `[user@]host:path` (a ':' before any '/')."""
    if "://" in url:
        return url.split("://", 1)[0].lower() == "ssh"
    colon, slash = url.find(":"), url.find("/")
    return colon > 0 and (slash < 0 or colon < slash)


def ssh_command(key_file: str | None, known_hosts_file: str, strict: bool) -> str:
    """GIT_SSH_COMMAND (git runs it through a shell, hence the quoting) that offers exactly one key, the job's, or
    none at all (`key_file` None): the runner's own keys belong to the runner, not to whatever host a job names.

    No ssh config (`-F /dev/null`: no ProxyCommand, IdentityFile or Host blocks of the runner's), no agent and no
    default identities (`IdentitiesOnly`, `IdentityAgent=none`, `IdentityFile=none`), no prompts. Host keys:
    `strict` checks them against `known_hosts_file` (and the runner's /etc/ssh/ssh_known_hosts); otherwise a host
    not in them is accepted on first use and remembered in that (per-run) file only."""
    identity = ["-i", key_file] if key_file else ["-o", "IdentityFile=none"]
    return shlex.join([
        "ssh", "-F", "/dev/null", *identity, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
        "-o", f"StrictHostKeyChecking={'yes' if strict else 'accept-new'}",
        "-o", f"UserKnownHostsFile={known_hosts_file}",
    ])


def key_secrets(key: str) -> list[str]:
    """What to mask of a private key: the whole text and each of its lines (headers included: harmless)."""
    return [key] + [line.strip() for line in key.splitlines() if len(line.strip()) >= 4]


def auth_key_host(key: str) -> str:
    """The `host[:port]` of an auth.json key (`host:port`, `host/ns/repo`, or docker's `https://host/v1/`)."""
    for prefix in ("https://", "http://"):
        if key.lower().startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0].lower()


def registry_auths_for(auths: Mapping[str, dict], hosts: Iterable[str]) -> dict[str, dict]:
    """The entries of a containers auth.json `auths` map whose host is exactly one of `hosts`."""
    wanted = {h.lower() for h in hosts}
    return {key: entry for key, entry in auths.items() if auth_key_host(key) in wanted}


def auth_entry(username: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def entry_password(entry: dict) -> str | None:
    """The password in an auth.json entry (for masking), None when it holds none."""
    try:
        return base64.b64decode(entry.get("auth", "")).decode().split(":", 1)[1]
    except (ValueError, IndexError, UnicodeDecodeError):
        return entry.get("password") or None


# --- context --------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a phase needs, read once from the environment and the payload.

    `registry_auths`: every registry credential this task holds, as auth.json entries keyed by host; which
    of them a command gets is decided per command by `registry_authfile`.
    """

    payload: dict
    workdir: str
    storage_driver: str
    root: str | None
    runroot: str | None
    isolation: str
    registry_auths: dict[str, dict] = field(default_factory=dict)
    git_credentials: list[Credential] = field(default_factory=list)
    git_plain_http_hosts: list[str] = field(default_factory=list)
    git_ssh_key: str | None = None  # the job's own key (Vault `ssh_key`), for its repo_url over ssh only
    git_known_hosts: str | None = None  # the job's known_hosts lines (Vault `known_hosts`)
    build_network: str = "outbound"
    secrets: list[str] = field(default_factory=list)

    def require(self, key: str):
        if self.payload.get(key) in (None, ""):
            raise TaskError(f"payload is missing {key!r}")
        return self.payload[key]

    @property
    def temp_host(self) -> str | None:
        temp = self.payload.get("temp_image")
        return registry_host(temp).lower() if temp else None

    @property
    def insecure_hosts(self) -> list[str]:
        """The service's registry when REGISTRY_TLS_VERIFY=false (payload `tls_verify`), plus the hosts in
        `insecure_registries` (JOBFORGE_INSECURE_REGISTRIES): the only hosts without TLS verification."""
        hosts = [self.temp_host] if self.temp_host and self.payload.get("tls_verify", True) is False else []
        return list(dict.fromkeys(hosts + [h.lower() for h in self.payload.get("insecure_registries") or []]))

    def tls_verify_for(self, ref: str) -> bool:
        return registry_host(ref).lower() not in self.insecure_hosts

    def buildah(self, *args: str) -> list[str]:
        """`buildah` with the global storage flags for the persistent layer cache."""
        argv = ["buildah", "--storage-driver", self.storage_driver]
        if self.root:
            argv += ["--root", self.root]
        if self.runroot:
            argv += ["--runroot", self.runroot]
        return argv + list(args)


def load_context() -> Context:
    path = os.environ.get("JOBFORGE_PAYLOAD")
    if not path:
        raise TaskError("JOBFORGE_PAYLOAD is not set")
    try:
        if path == "-":  # the local backend hands it over on stdin
            payload = json.load(sys.stdin)
        else:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TaskError(f"cannot read payload {path}: {exc}") from exc
    if not isinstance(payload, dict):
        raise TaskError("payload must be a JSON object")
    build_network = os.environ.get("JOBFORGE_BUILD_NETWORK") or NETWORK_OUTBOUND
    if build_network not in (NETWORK_NONE, NETWORK_OUTBOUND, NETWORK_RUNNER):
        raise TaskError(f"JOBFORGE_BUILD_NETWORK must be {NETWORK_OUTBOUND}, {NETWORK_NONE} or {NETWORK_RUNNER}")
    workdir = os.environ.get("JOBFORGE_WORKDIR") or os.getcwd()
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chdir(workdir)
    ctx = Context(
        payload=payload,
        workdir=os.path.abspath(workdir),
        storage_driver=os.environ.get("JOBFORGE_STORAGE_DRIVER") or "vfs",
        root=os.environ.get("JOBFORGE_BUILDAH_ROOT") or None,
        runroot=os.environ.get("JOBFORGE_BUILDAH_RUNROOT") or None,
        isolation=os.environ.get("JOBFORGE_ISOLATION") or "chroot",
        build_network=build_network,
    )
    ctx.registry_auths = _registry_auths(ctx, os.environ)
    ctx.git_credentials = _git_credentials(ctx, os.environ)
    ctx.git_plain_http_hosts = split_hosts(os.environ.get("JOBFORGE_GIT_PLAIN_HTTP_HOSTS"))
    ctx.git_ssh_key = os.environ.get("JOBFORGE_JOB_GIT_SSH_KEY") or None
    ctx.git_known_hosts = os.environ.get("JOBFORGE_JOB_GIT_KNOWN_HOSTS") or None
    if ctx.git_ssh_key:
        ctx.secrets.extend(key_secrets(ctx.git_ssh_key))
    ctx.secrets.extend(p for p in (entry_password(e) for e in ctx.registry_auths.values()) if p)
    ctx.secrets.extend(c.password for c in ctx.git_credentials if c.password)
    return ctx


def _read_secret_file(what: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise TaskError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _registry_auths(ctx: Context, env: Mapping[str, str]) -> dict[str, dict]:
    """auth.json entries, most specific source last (so it wins for its host):
    JOBFORGE_REGISTRY_AUTH_FILE (the service's REGISTRY_AUTH_FILE), REGISTRY_USERNAME/REGISTRY_PASSWORD bound to
    the service registry (the temp image's host), the job's own Vault credentials bound to its publish host."""
    auths: dict[str, dict] = {}
    path = env.get("JOBFORGE_REGISTRY_AUTH_FILE")
    if path:
        try:
            loaded = json.loads(_read_secret_file("registry auth file", path)).get("auths") or {}
        except (ValueError, AttributeError) as exc:
            raise TaskError(f"registry auth file {path} is not a containers auth.json") from exc
        auths.update({k: v for k, v in loaded.items() if isinstance(v, dict)})
    if env.get("REGISTRY_USERNAME") and ctx.temp_host:
        auths[ctx.temp_host] = auth_entry(env["REGISTRY_USERNAME"], env.get("REGISTRY_PASSWORD", ""))
    targets = ctx.payload.get("publish_targets") or []
    if env.get("JOBFORGE_JOB_REGISTRY_USERNAME") and targets:
        auths[registry_host(targets[0]).lower()] = auth_entry(env["JOBFORGE_JOB_REGISTRY_USERNAME"],
                                                              env.get("JOBFORGE_JOB_REGISTRY_PASSWORD", ""))
    return auths


def _git_credentials(ctx: Context, env: Mapping[str, str]) -> list[Credential]:
    """In order of precedence: the job's own Vault credentials (bound to its repo_url's origin), the
    JOBFORGE_GIT_CREDENTIALS store file, GIT_USERNAME/GIT_PASSWORD bound to JOBFORGE_GIT_CREDENTIAL_HOST."""
    found: list[Credential] = []
    repo = origin_of(ctx.payload.get("repo_url") or "")
    if repo and env.get("JOBFORGE_JOB_GIT_USERNAME"):
        found.append(Credential(repo, env["JOBFORGE_JOB_GIT_USERNAME"], env.get("JOBFORGE_JOB_GIT_PASSWORD", "")))
    if env.get("JOBFORGE_GIT_CREDENTIALS"):
        found += parse_credential_store(_read_secret_file("git credentials", env["JOBFORGE_GIT_CREDENTIALS"]))
    found += host_credentials(env.get("JOBFORGE_GIT_CREDENTIAL_HOST"), env.get("GIT_USERNAME"),
                              env.get("GIT_PASSWORD"))
    return found


# --- output -------------------------------------------------------------------------------------------


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def one_line(message: str) -> str:
    return " ".join(message.split("\n")).strip()


def failure(what: str, output: str) -> TaskError:
    """An error naming what failed plus the tool's last output line (usually its own diagnosis)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return TaskError(f"{what}: {lines[-1] if lines else 'no output'}")


# --- running commands -----------------------------------------------------------------------------------

# The only variables the tools (buildah, skopeo, git, ssh, unshare, nsenter, slirp4netns, ip) start with, plus
# `LC_*`. buildah runs the build steps and test commands: whatever it holds may reach them (bud copies its
# *_proxy variables into every RUN step), so nothing of the service's or the runner's environment does, not its
# credentials, its settings (JOBFORGE_*) nor a Nomad task's NOMAD_*. Storage, isolation and auth go in argv.
TOOL_ENV = (
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR",
    # set by `buildah unshare` (enter_user_namespace): rootless buildah must not try to enter a namespace again
    "_CONTAINERS_USERNS_CONFIGURED", "_CONTAINERS_ROOTLESS_UID", "_CONTAINERS_ROOTLESS_GID",
    # where the runner keeps its containers configuration and CA roots when not in the default places
    "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF", "SSL_CERT_FILE", "SSL_CERT_DIR",
)
TOOL_ENV_PREFIXES = ("LC_",)


def tool_env() -> dict[str, str]:
    """This process's values of TOOL_ENV (and LC_*), nothing else: a tool uses only what a command hands it
    explicitly (`--authfile`, the git credential helper, `git_env`)."""
    return {k: v for k, v in os.environ.items() if k in TOOL_ENV or k.startswith(TOOL_ENV_PREFIXES)}


def run(ctx: Context, argv: Sequence[str], *, env: dict | None = None, cwd: str | None = None,
        quiet: bool = False, watch: Callable[[str], None] | None = None) -> Result:
    """Run argv (by default with only `tool_env()`), forwarding its merged stdout/stderr line by line (masked)
    while keeping the tail for callers that classify failures. `quiet` keeps the whole output for the caller instead of printing it.
    """
    print("+ " + redact(shlex.join(argv), ctx.secrets), flush=True)
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=tool_env() if env is None else env, cwd=cwd)
    lines: deque[str] = deque(maxlen=None if quiet else KEPT_LINES)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace")
            lines.append(line)
            if watch is not None:
                watch(line)
            if not quiet:
                # A last line without a newline must not glue onto the next `==>` line.
                sys.stdout.write(redact(line if line.endswith("\n") else line + "\n", ctx.secrets))
                sys.stdout.flush()
        returncode = proc.wait()
    except BaseException:
        stop_child(proc)
        raise
    return Result(returncode, "".join(lines))


def stop_child(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Let a child that got the runner's group-wide SIGTERM finish its own cleanup, then insist.

    Signalling it again right away would interrupt that cleanup (buildah then leaks its container).
    """
    for action in (None, proc.terminate, proc.kill):
        if action:
            action()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def capture(ctx: Context, argv: Sequence[str]) -> bytes:
    """Run argv for its exact stdout bytes (a manifest, JSON); its stderr goes into CommandFailed."""
    print("+ " + redact(shlex.join(argv), ctx.secrets), flush=True)
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=False, env=tool_env())
    if proc.returncode != 0:
        message = redact(proc.stderr.decode("utf-8", errors="replace"), ctx.secrets)
        raise CommandFailed(argv[0], proc.returncode, message)
    return proc.stdout


# --- sandbox ------------------------------------------------------------------------------------------

# `runner`: no namespace of our own; the runner's network is the boundary (a Nomad docker task's bridge).
NETWORK_NONE, NETWORK_OUTBOUND, NETWORK_RUNNER = "none", "outbound", "runner"
TUN = "/dev/net/tun"
# Keeps a network namespace alive (with its loopback up) until our end of its stdin closes; $1 is `ip`.
_NETNS_HOLDER = ["unshare", "--net", "--", "sh", "-c", '"$1" link set lo up && echo ready && exec cat >/dev/null',
                 "netns"]


@contextlib.contextmanager
def sandbox(network: str, inside: Callable[[str], contextlib.AbstractContextManager] | None = None
            ) -> Iterator[list[str]]:
    """An argv prefix that runs a command (buildah) in fresh PID, mount and network namespaces.

    Chroot isolation puts RUN steps and test commands in buildah's own namespaces and refuses any other
    network, so buildah itself goes in: the step sees and signals only its own processes (a private /proc) and
    has no route to the host's loopback, where the service, the registry and other local daemons listen.
    `outbound` adds a slirp4netns tap with `--disable-host-loopback`: the internet, never 127.0.0.1.
    `inside(netns_path)`, when given, is entered once the namespace exists (the build's registry relay).
    """
    pid_ns = ["unshare", "--pid", "--fork", "--mount-proc", "--"]
    if network == NETWORK_RUNNER:
        yield pid_ns
        return
    if network == NETWORK_OUTBOUND and not os.access(TUN, os.R_OK | os.W_OK):
        raise TaskError(f"network 'outbound' needs slirp4netns and {TUN} readable and writable by uid "
                        f"{os.getuid()} (mode 0666, the distributions' default); without it, use "
                        "JOBFORGE_BUILD_NETWORK=none for builds and test.network: none for tests")
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"  # often not on a user's PATH
    holder = subprocess.Popen([*_NETNS_HOLDER, ip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=tool_env())
    slirp, exit_w = None, -1
    try:
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline() != b"ready\n":
            holder.wait()
            raise failure("could not create a network namespace", holder.stderr.read().decode(errors="replace"))
        if network == NETWORK_OUTBOUND:
            slirp, exit_w = _slirp(holder.pid)
        netns = f"/proc/{holder.pid}/ns/net"
        with inside(netns) if inside is not None else contextlib.nullcontext():
            yield ["nsenter", f"--net={netns}", "--", *pid_ns]
    finally:
        if exit_w >= 0:
            os.close(exit_w)  # slirp4netns exits when this end closes
        with contextlib.suppress(OSError):
            holder.stdin.close()  # type: ignore[union-attr]
        for proc in (slirp, holder):
            if proc is not None:
                stop_child(proc, grace=2.0)


def _slirp(pid: int) -> tuple[subprocess.Popen, int]:
    """Outbound network for the namespace of `pid`, without the host's loopback; returns (process, exit fd)."""
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            ["slirp4netns", "--configure", "--disable-host-loopback", "--enable-sandbox",
             f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", str(pid), "tap0"],
            pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errors, env=tool_env())
    except OSError as exc:
        os.close(exit_w)
        raise TaskError(f"could not start slirp4netns for outbound network: {exc}") from exc
    finally:
        os.close(ready_w)
        os.close(exit_r)
    with os.fdopen(ready_r, "rb") as ready:
        if ready.read(1) != b"1":
            os.close(exit_w)
            proc.wait()
            errors.seek(0)
            raise failure("could not give the namespace outbound network (slirp4netns)",
                          errors.read().decode(errors="replace"))
    errors.close()
    return proc, exit_w


# --- buildah containers -----------------------------------------------------------------------------------

# In the storage root: every step that creates containers there holds it shared while they exist, so whoever
# gets it exclusively knows that each container in the storage is litter (of a killed buildah: `bud` leaves its
# working container when SIGTERMed while it sets a RUN step up, whatever --force-rm says).
CONTAINERS_LOCK = "jobforge-containers.lock"


def _containers_lock(ctx: Context, create: bool) -> int | None:
    """A descriptor of this storage's containers lock; None without a storage of Job Forge's own (buildah's
    default storage is shared with whatever else runs buildah or podman here: nothing in it is ours to remove),
    or when the storage does not exist and `create` is false."""
    if not ctx.root or not (create or os.path.isdir(ctx.root)):
        return None
    os.makedirs(ctx.root, mode=0o700, exist_ok=True)
    return os.open(os.path.join(ctx.root, CONTAINERS_LOCK),
                   os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _sweep_if_alone(ctx: Context, lock: int) -> None:
    """Remove every container of the storage when no other step holds the lock; otherwise leave them to the
    next sweep (one of them may be in use). Returns holding no lock, or the exclusive one."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    listed = subprocess.run(ctx.buildah("containers", "--quiet", "--notruncate"), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=tool_env())
    ids = listed.stdout.split() if listed.returncode == 0 else []
    if not ids:
        return
    result = run(ctx, ctx.buildah("rm", *ids), quiet=True)
    removed = len(set(ids) & set(result.output.split()))
    step(f"removed {removed} leftover build container(s)" if result.returncode == 0 else
         f"removed {removed} of {len(ids)} leftover build containers: {one_line(result.output)[-400:]}")


def sweep_containers(ctx: Context) -> None:
    """Remove the storage's leftover containers unless a step of a running job may be using one."""
    lock = _containers_lock(ctx, create=False)
    if lock is not None:
        try:
            _sweep_if_alone(ctx, lock)
        finally:
            os.close(lock)


@contextlib.contextmanager
def containers_lease(ctx: Context) -> Iterator[None]:
    """Around a step that creates containers (bud, the test container): sweeps leftovers, holds the lock shared
    while the step's containers may exist, then sweeps again, when alone, whatever became of the step."""
    lock = _containers_lock(ctx, create=True)
    if lock is None:
        yield
        return
    try:
        _sweep_if_alone(ctx, lock)
        fcntl.flock(lock, fcntl.LOCK_SH)  # from exclusive (not atomic: nothing of ours exists yet) or blocking
        yield
    finally:
        try:
            _sweep_if_alone(ctx, lock)
        finally:
            os.close(lock)


# --- registries -----------------------------------------------------------------------------------------


def registry_host(ref: str) -> str:
    """`host:port/repo:tag` -> `host:port` (refs here are always fully qualified)."""
    return ref.split("/", 1)[0]


def repository(ref: str) -> str:
    """`host/a/b:tag` or `host/a/b@sha256:...` -> `host/a/b`."""
    name = ref.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def tls_flag(option: str, verify: bool) -> str:
    return f"--{option}={'true' if verify else 'false'}"


def tls_for(ctx: Context, option: str, ref: str) -> str:
    return tls_flag(option, ctx.tls_verify_for(ref))


SYSTEM_REGISTRIES_CONF = "/etc/containers/registries.conf"


def registries_conf_text(system_text: str | None, insecure_hosts: Sequence[str]) -> str:
    """A registries.conf (v2) for `buildah bud`: the runner's own settings plus `insecure = true` for exactly
    `insecure_hosts`. bud has a single --tls-verify for every registry it talks to, and a Dockerfile's FROM
    can name any; so TLS is decided per host here and --tls-verify is left unset. A v1-format system file
    cannot be mixed with v2 tables and is left out (its search list then does not apply to builds)."""
    base = system_text if system_text and "[registries." not in system_text else ""
    entries = [f"\n[[registry]]\nlocation = {json.dumps(host)}\ninsecure = true\n" for host in insecure_hosts
               if f"location = {json.dumps(host)}" not in base]
    return base + "".join(entries)


def registries_conf(ctx: Context) -> str:
    """Write `registries_conf_text` for this run into the workdir; returns its path."""
    try:
        with open(SYSTEM_REGISTRIES_CONF, encoding="utf-8") as fh:
            system_text = fh.read()
    except OSError:
        system_text = None
    return private_file(os.path.join(ctx.workdir, ".registries.conf"),
                        registries_conf_text(system_text, ctx.insecure_hosts))


def private_file(path: str, text: str) -> str:
    """Write `text` to a new 0600 file (replacing any file or symlink there)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


@contextlib.contextmanager
def registry_authfile(ctx: Context, refs: Sequence[str]) -> Iterator[str]:
    """A 0600 containers auth file holding only the credentials of the hosts of `refs`, so credentials never
    reach argv and are never offered to another registry (a job's publish target, a Dockerfile's FROM host).

    Always written, also when empty: with `--authfile` buildah and skopeo read no other auth file (the
    runner's ~/.docker/config.json, $REGISTRY_AUTH_FILE, ...)."""
    auths = registry_auths_for(ctx.registry_auths, [registry_host(ref) for ref in refs])
    path = private_file(os.path.join(ctx.workdir, f".auth-{os.getpid()}.json"), json.dumps({"auths": auths}))
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def is_unauthorized(output: str) -> bool:
    return bool(_UNAUTHORIZED.search(output))


def unauthorized_error(ctx: Context, output: str, refs: Sequence[str]) -> TaskError:
    """Name the registry that refused us; the hint depends on whether we sent credentials at all."""
    hosts = [registry_host(r) for r in refs]
    failing = [line for line in output.splitlines() if is_unauthorized(line)]
    host = next((h for h in hosts for line in failing if h in line), hosts[0])
    if registry_auths_for(ctx.registry_auths, [host]):
        return TaskError(f"registry {host} rejected the credentials (unauthorized): "
                         "check REGISTRY_AUTH_FILE or REGISTRY_USERNAME/REGISTRY_PASSWORD")
    return TaskError(f"registry {host} requires credentials (unauthorized): no credential is bound to this "
                     "host (REGISTRY_AUTH_FILE; REGISTRY_USERNAME/REGISTRY_PASSWORD apply to REGISTRY_URL only)")


# --- entry point ----------------------------------------------------------------------------------------


_PARENT = os.getppid()


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt our cleanup
    if os.getppid() != _PARENT:
        # The service died (its parent-death signal brought us here): nobody reads our output any more and
        # nobody signalled our group, so silence the pipes and stop the whole group ourselves.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            os.killpg(os.getpgrp(), signal.SIGTERM)
        except OSError:
            pass
    raise Terminated()


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the process that started us dies (Linux PR_SET_PDEATHSIG), so a phase
    never outlives a crashed runner; `_on_sigterm` then stops our whole process group."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _PARENT:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def enter_user_namespace() -> None:
    """As an unprivileged user, re-run this script as root of a user namespace mapping the user's sub-uids
    (`buildah unshare`), where rootless buildah works and `sandbox()` may create namespaces; root on the
    host (container root mapped to the user) is never gained."""
    if os.geteuid() != 0 and not os.environ.get("_CONTAINERS_USERNS_CONFIGURED"):
        flags = ["-I"] if sys.flags.isolated else []
        argv = ["buildah", "unshare", "--", sys.executable, *flags, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
        os.execvp(argv[0], argv)


def main(phase: Callable[[Context], None]) -> None:
    """Run one phase and turn its outcome into the exit status + final `ERROR:` line."""
    enter_user_namespace()
    _take_nonce()
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent()
    sys.stdout.reconfigure(line_buffering=True, errors="replace")
    sys.stderr.reconfigure(errors="replace")
    ctx: Context | None = None
    try:
        ctx = load_context()
        phase(ctx)
    except TaskError as exc:
        _fail(str(exc), ctx, EXIT_FAILED)
    except (Terminated, KeyboardInterrupt):
        _fail("terminated by signal", ctx, EXIT_TERMINATED)
    except Exception as exc:  # noqa: BLE001 - the mapping boundary: any crash becomes the job's error
        _fail(f"internal error: {type(exc).__name__}: {exc}", ctx, EXIT_FAILED)


def _fail(message: str, ctx: Context | None, code: int) -> None:
    """The contract's last line `ERROR: …`, then exit."""
    _error(message, ctx)
    sys.exit(code)


# The backend's per-phase nonce (jobforge.control). On Nomad it is dispatch meta, which Nomad also exposes as
# NOMAD_META_*: every copy goes. A dispatch without it leaves `${NOMAD_META_control_nonce}` uninterpolated.
NONCE_ENV = ("JOBFORGE_CONTROL_NONCE", "NOMAD_META_control_nonce", "NOMAD_META_CONTROL_NONCE")
_nonce: list[str] = []


def _take_nonce() -> None:
    """Take the nonce out of the environment before any tool starts: no build step or test command inherits it."""
    found = [os.environ.pop(name, "") for name in NONCE_ENV]
    _nonce[:] = [value for value in found if value and not value.startswith("${")][:1]


def control_line(kind: str, report: dict) -> None:
    """A stderr line for the backend, not the job's log (jobforge.control): prefixed with this phase's nonce, so a
    command printing the same text cannot forge it. Without a nonce (run by hand) nothing is written."""
    if _nonce:
        print(f"::jobforge-{_nonce[0]} {kind} {json.dumps(report)}", file=sys.stderr, flush=True)


def _error(message: str, ctx: Context | None) -> None:
    sys.stdout.flush()
    secrets = ctx.secrets if ctx else []
    print(f"ERROR: {one_line(redact(message, secrets))}", file=sys.stderr, flush=True)
