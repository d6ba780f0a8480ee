"""Shared plumbing for the phase scripts (stdlib only: they run in any image with python3 and buildah).

Contract (docs/architecture.md, "Task scripts"): inputs come from the environment and the JSON payload,
output is human-readable lines, and a failure ends with one `ERROR: <message>` line on stderr and a
non-zero exit. Every external command is an argv list; known secret values are masked in what we print.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

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


@dataclass
class Context:
    """Everything a phase needs, read once from the environment and the payload."""

    payload: dict
    workdir: str
    storage_driver: str
    root: str | None
    runroot: str | None
    isolation: str
    registry_creds: tuple[str, str] | None
    build_network: str = "outbound"
    secrets: list[str] = field(default_factory=list)

    def require(self, key: str):
        if self.payload.get(key) in (None, ""):
            raise TaskError(f"payload is missing {key!r}")
        return self.payload[key]

    @property
    def tls_verify(self) -> bool:
        return bool(self.payload.get("tls_verify", True))

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
    user, password = os.environ.get("REGISTRY_USERNAME"), os.environ.get("REGISTRY_PASSWORD")
    secrets = [os.environ.get(n, "") for n in ("REGISTRY_PASSWORD", "GIT_PASSWORD")]
    return Context(
        payload=payload,
        workdir=os.path.abspath(workdir),
        storage_driver=os.environ.get("JOBFORGE_STORAGE_DRIVER") or "vfs",
        root=os.environ.get("JOBFORGE_BUILDAH_ROOT") or None,
        runroot=os.environ.get("JOBFORGE_BUILDAH_RUNROOT") or None,
        isolation=os.environ.get("JOBFORGE_ISOLATION") or "chroot",
        registry_creds=(user, password or "") if user else None,
        build_network=build_network,
        secrets=[s for s in secrets if s],
    )


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


def run(ctx: Context, argv: Sequence[str], *, env: dict | None = None, cwd: str | None = None,
        quiet: bool = False) -> Result:
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
                          stderr=subprocess.PIPE, env=tool_env(), check=False)
    if proc.returncode != 0:
        message = redact(proc.stderr.decode("utf-8", errors="replace"), ctx.secrets)
        raise CommandFailed(argv[0], proc.returncode, message)
    return proc.stdout


# --- sandbox ------------------------------------------------------------------------------------------

# `runner`: no namespace of our own; the runner's network is the boundary (a Nomad docker task's bridge).
NETWORK_NONE, NETWORK_OUTBOUND, NETWORK_RUNNER = "none", "outbound", "runner"
TUN = "/dev/net/tun"
# The only variables buildah (and so anything a build step or test command could read of its process) gets:
# never the service's or the runner's credentials.
TOOL_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "XDG_RUNTIME_DIR",
            "_CONTAINERS_USERNS_CONFIGURED", "_CONTAINERS_ROOTLESS_UID", "_CONTAINERS_ROOTLESS_GID")
# Keeps a network namespace alive (with its loopback up) until our end of its stdin closes; $1 is `ip`.
_NETNS_HOLDER = ["unshare", "--net", "--", "sh", "-c", '"$1" link set lo up && echo ready && exec cat >/dev/null',
                 "netns"]


def tool_env() -> dict[str, str]:
    return {name: os.environ[name] for name in TOOL_ENV if name in os.environ}


@contextlib.contextmanager
def sandbox(network: str) -> Iterator[list[str]]:
    """An argv prefix that runs a command (buildah) in fresh PID, mount and network namespaces.

    Chroot isolation puts RUN steps and test commands in buildah's own namespaces and refuses any other
    network, so buildah itself goes in: the step sees and signals only its own processes (a private /proc) and
    has no route to the host's loopback, where the service, the registry and other local daemons listen.
    `outbound` adds a slirp4netns tap with `--disable-host-loopback`: the internet, never 127.0.0.1.
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
        yield ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--", *pid_ns]
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


@contextlib.contextmanager
def registry_authfile(ctx: Context, refs: Sequence[str]) -> Iterator[str | None]:
    """A 0600 containers auth file scoped to the hosts of `refs`, so credentials never reach argv
    and are never offered to other registries (e.g. a Dockerfile's FROM host)."""
    if not ctx.registry_creds:
        yield None
        return
    token = base64.b64encode(":".join(ctx.registry_creds).encode()).decode()
    auths = {registry_host(ref): {"auth": token} for ref in refs}
    path = os.path.join(ctx.workdir, f".auth-{os.getpid()}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"auths": auths}, fh)
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
    if ctx.registry_creds:
        return TaskError(f"registry {host} rejected the credentials (unauthorized): "
                         "check REGISTRY_USERNAME/REGISTRY_PASSWORD")
    return TaskError(f"registry {host} requires credentials (unauthorized): "
                     "set REGISTRY_USERNAME/REGISTRY_PASSWORD")


# --- entry point ----------------------------------------------------------------------------------------


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt our cleanup
    raise Terminated()


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
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.stdout.reconfigure(line_buffering=True, errors="replace")
    sys.stderr.reconfigure(errors="replace")
    ctx: Context | None = None
    try:
        ctx = load_context()
        phase(ctx)
    except TaskError as exc:
        _error(str(exc), ctx)
        sys.exit(EXIT_FAILED)
    except (Terminated, KeyboardInterrupt):
        _error("terminated by signal", ctx)
        sys.exit(EXIT_TERMINATED)
    except Exception as exc:  # noqa: BLE001 - the mapping boundary: any crash becomes the job's error
        _error(f"internal error: {type(exc).__name__}: {exc}", ctx)
        sys.exit(EXIT_FAILED)


def _error(message: str, ctx: Context | None) -> None:
    sys.stdout.flush()
    secrets = ctx.secrets if ctx else []
    print(f"ERROR: {one_line(redact(message, secrets))}", file=sys.stderr, flush=True)
