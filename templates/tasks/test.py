#!/usr/bin/env python3
"""Test phase: run the image's entry point and/or the configured commands inside a working container.

The container (`jobforge-test-<job_id>`) is always removed, also on SIGTERM. Each command runs in its own
PID and network namespaces (`sandbox()`): no network but its own loopback unless `test.network` is `outbound`.
Values of `test.secret_env` come from this process's `JOBFORGE_SECRET_<name>` variables (the job's Vault
values) and are masked in everything we print.

Where the build ran on this storage (the local backend; a Nomad client that ran the build), the image is not
pulled back: the local image is used when its id (the digest of its config) is the config digest of the
manifest the registry serves for the temp image, i.e. the same image; otherwise it is pulled.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    NETWORK_NONE, NETWORK_OUTBOUND, NETWORK_RUNNER, CommandFailed, Context, TaskError, capture,
    containers_lease, failure, is_unauthorized, main, redact, registry_authfile, run, sandbox, step, stop_child,
    tls_for, tool_env, unauthorized_error,
)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_ENV_PREFIX = "JOBFORGE_SECRET_"  # test.vault_secrets values: JOBFORGE_SECRET_<container variable name>
# buildah 1.28's chroot runtime can lose the last pipe-full of a container's output when the process exits
# (seen here: 5,825 of 20,000 lines gone, intermittently). So the container's shell writes the output into a
# file on a bind mount: nothing is lost, nothing is truncated. That mount is the container's to change, so
# we open the file before the container exists and only ever read through that descriptor: replacing the
# path with a symlink to a host file gets nothing of that file read.
OUT_MOUNT = "/.jobforge-out"
STARTED = "started"  # created by the container's shell: proof that the image has /bin/sh
REDIRECT = f': >{OUT_MOUNT}/{STARTED}; exec >>{OUT_MOUNT}/output 2>&1; exec "$@"'
SECRETS_REDIRECT = (f': >{OUT_MOUNT}/{STARTED}; exec >>{OUT_MOUNT}/output 2>&1; . {OUT_MOUNT}/secrets.env; '
                    f'rm -f {OUT_MOUNT}/secrets.env; exec "$@"')
POLL_SECONDS = 0.02


MAX_LINE_BYTES = 1024 * 1024  # the service's default JOBFORGE_MAX_LINE_BYTES: it keeps these pieces as they are
SPLIT_MARKER = f" [line split: longer than {MAX_LINE_BYTES} bytes, continued on the next line]"
READ_BYTES = 1024 * 1024


def create_private(path: str, mode: int = 0o600) -> int:
    """A new file at `path`, never an existing one or the target of a link someone put there."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


class LineFollower:
    """Reads whatever a growing file has gained since the last call, as complete lines, through a descriptor
    opened once (so the path may change under it).

    Bounded whatever the output: the file is read in `READ_BYTES` pieces and a line longer than `MAX_LINE_BYTES`
    is passed on in marked pieces, so a 100 MB line without a newline never sits in memory whole.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial = bytearray()

    def lines(self, final: bool = False) -> Iterator[str]:
        while data := os.read(self.fd, READ_BYTES):
            *complete, rest = data.split(b"\n")
            for segment in complete:
                self.partial += segment
                yield from self._pieces()
                yield self.partial.decode("utf-8", errors="replace")
                self.partial.clear()
            self.partial += rest
            yield from self._pieces()
        if final and self.partial:
            yield self.partial.decode("utf-8", errors="replace")
            self.partial.clear()

    def _pieces(self) -> Iterator[str]:
        while len(self.partial) > MAX_LINE_BYTES:
            cut = MAX_LINE_BYTES
            while cut > MAX_LINE_BYTES - 3 and self.partial[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                cut -= 1
            yield self.partial[:cut].decode("utf-8", errors="replace") + SPLIT_MARKER
            del self.partial[:cut]


@dataclass
class ContainerEnv:
    """`test.env` goes in argv; secret values (Vault) do not: the container's shell sources them from a file."""

    flags: list[str]
    secrets: dict[str, str]

    def secret_flags(self) -> list[str]:
        return [arg for name, value in self.secrets.items() for arg in ("-e", f"{name}={value}")]


def container_env(ctx: Context, spec: dict) -> ContainerEnv:
    flags: list[str] = []
    for name, value in (spec.get("env") or {}).items():
        if not ENV_NAME.match(name):
            raise TaskError(f"invalid test env name {name!r}")
        flags += ["-e", f"{name}={value}"]
    secrets = {}
    for name in spec.get("secret_env") or []:
        if not ENV_NAME.match(name):
            raise TaskError(f"invalid secret env name {name!r}")
        # Only the job's own Vault values, rendered under this prefix, can be the source: never a variable of
        # the service or the runner (a mapping naming REGISTRY_PASSWORD must not copy the service's).
        source = SECRET_ENV_PREFIX + name
        if source not in os.environ:
            raise TaskError(f"secret {name} was not fetched for this job (no {source} in the task environment)")
        ctx.secrets.append(os.environ[source])
        secrets[name] = os.environ[source]
    return ContainerEnv(flags, secrets)


def entry_argv(ctx: Context, container: str) -> list[str]:
    info = json.loads(capture(ctx, ctx.buildah("inspect", "--type", "container", container)))
    config = (info.get("OCIv1") or {}).get("config") or {}
    argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    if not argv:
        raise TaskError("test.entry_point is set but the image has neither ENTRYPOINT nor CMD")
    return argv


def run_in(ctx: Context, container: str, env: ContainerEnv, argv: list[str], network: str) -> int:
    """Run argv in the container, in its own namespaces, its output followed through the bind-mounted file.

    If the container's shell never starts, the image has no /bin/sh, and the command is run again directly,
    with buildah's own relay as the only output channel.
    """
    outdir = tempfile.mkdtemp(prefix="out-", dir=ctx.workdir)
    os.chmod(outdir, 0o700)
    output = create_private(os.path.join(outdir, "output"))
    script = REDIRECT
    if env.secrets:
        with open(create_private(os.path.join(outdir, "secrets.env")), "w", encoding="utf-8") as fh:
            fh.writelines(f"export {name}={shlex.quote(value)}\n" for name, value in env.secrets.items())
        script = SECRETS_REDIRECT
    try:
        with sandbox(network) as prefix:
            cmd = ctx.buildah("run", "--isolation", ctx.isolation, "--volume", f"{outdir}:{OUT_MOUNT}", *env.flags,
                              container, "--", "/bin/sh", "-c", script, "jobforge", *argv)
            code = follow(ctx, prefix + cmd, output)
            if code != 0 and not os.path.lexists(os.path.join(outdir, STARTED)):
                step("the image has no /bin/sh: running the command without output capture")
                direct = ctx.buildah("run", "--isolation", ctx.isolation, *env.flags, *env.secret_flags(),
                                     container, "--")
                code = run(ctx, prefix + direct + argv).returncode
        return code
    finally:
        os.close(output)


def follow(ctx: Context, cmd: list[str], output: int) -> int:
    """Run cmd while printing what the container writes to `output` and buildah to its relay, as it comes."""
    print("+ " + redact(shlex.join(cmd), ctx.secrets), flush=True)
    relay, relay_path = tempfile.mkstemp(prefix="relay-", dir=ctx.workdir)
    relay_out = os.open(relay_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.unlink(relay_path)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=relay_out, stderr=subprocess.STDOUT,
                                env=tool_env())
    finally:
        os.close(relay_out)
    followers = [LineFollower(output), LineFollower(relay)]
    try:
        while True:
            finished = proc.poll() is not None
            for follower in followers:
                for line in follower.lines(final=finished):
                    print(redact(line, ctx.secrets), flush=True)
            if finished:
                return proc.returncode
            try:  # the container's output file has no readiness to wait on: read it again after this
                proc.wait(timeout=POLL_SECONDS)  # returns at once when the command ends (no fixed sleep)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        stop_child(proc)
        raise
    finally:
        os.close(relay)


def local_image(ctx: Context, temp: str, authfile: str) -> str | None:
    """The id of `temp` in local storage when it is the very image the registry serves (same config digest)."""
    try:
        image_id = capture(ctx, ctx.buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}",
                                            temp)).decode().strip()
    except CommandFailed:
        return None  # not built here
    try:
        manifest = json.loads(capture(ctx, ["skopeo", "inspect", "--raw", tls_for(ctx, "tls-verify", temp),
                                            "--authfile", authfile, f"docker://{temp}"]))
    except (CommandFailed, ValueError):
        return None  # the pull below reports what is wrong with the registry
    config = (manifest.get("config") or {}).get("digest") if isinstance(manifest, dict) else None
    return image_id if image_id and config == f"sha256:{image_id.removeprefix('sha256:')}" else None


def create_container(ctx: Context, temp: str, container: str) -> None:
    """A working container of the temp image: from the local image when it is the pushed one, else pulled."""
    with registry_authfile(ctx, [temp]) as authfile:
        image_id = local_image(ctx, temp, authfile)
        if image_id:
            step(f"using the local image {image_id[:12]}: the same image as {temp}")
            argv = ctx.buildah("from", "--pull=never", "--name", container, image_id)
        else:
            step(f"pulling {temp}")
            argv = ctx.buildah("from", "--pull-always", "--name", container, tls_for(ctx, "tls-verify", temp),
                               "--authfile", authfile, temp)
        result = run(ctx, argv)
    if result.returncode != 0:
        if is_unauthorized(result.output):
            raise unauthorized_error(ctx, result.output, [temp])
        raise failure(f"could not pull {temp}", result.output)


def test(ctx: Context) -> None:
    temp = ctx.require("temp_image")
    spec = ctx.payload.get("test") or {}
    env = container_env(ctx, spec)
    network = spec.get("network") or NETWORK_NONE
    if network not in (NETWORK_NONE, NETWORK_OUTBOUND):
        raise TaskError(f"invalid test.network {network!r}: must be '{NETWORK_NONE}' or '{NETWORK_OUTBOUND}'")
    if network == NETWORK_OUTBOUND and ctx.build_network == NETWORK_RUNNER:
        network = NETWORK_RUNNER  # where the runner's own network is the boundary, it is the outbound one
    container = f"jobforge-test-{ctx.require('job_id')}"
    with containers_lease(ctx):  # no sweep removes our container while it exists
        # A container left by a killed earlier attempt would block the name.
        run(ctx, ctx.buildah("rm", container), quiet=True)
        create_container(ctx, temp, container)
        try:
            if spec.get("entry_point"):
                argv = entry_argv(ctx, container)
                step("running the image entry point")
                code = run_in(ctx, container, env, argv, network)
                if code != 0:
                    raise TaskError(f"entry point exited with code {code}: {' '.join(argv)}")
            for number, command in enumerate(spec.get("commands") or [], start=1):
                step(f"test command {number}: {command}")
                code = run_in(ctx, container, env, ["sh", "-c", command], network)
                if code != 0:
                    raise TaskError(f"test command {number} exited with code {code}: {command}")
            step("tests passed")
        finally:
            step(f"removing container {container}")
            # The image stays: removing it would also drop its dangling parents, i.e. the layer cache.
            run(ctx, ctx.buildah("rm", container))


if __name__ == "__main__":
    main(test)
