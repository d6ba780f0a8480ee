"""Throw-away infrastructure for the demo, the tests and the benchmarks: a local `docker-registry`, a
busybox base image built from the host's static /bin/busybox (no public registry is reachable), a git repo of
an example app, and `jobforge-service` itself as a subprocess on loopback.

Stdlib only and imports nothing of ours, so it works before the package's dependencies are installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """A `docker-registry serve` on 127.0.0.1 with deletes enabled and optional htpasswd (bcrypt) auth.

    `Registry(storage_dir, auth=("user", "password"))`; use as a context manager or call `start()`/`stop()`.
    """

    def __init__(self, storage_dir: str | os.PathLike, *, auth: tuple[str, str] | None = None,
                 binary: str = "docker-registry", startup_timeout: float = 15.0):
        self.dir = Path(storage_dir)
        self.auth = auth
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> "Registry":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, port: int | None = None) -> None:
        """Start on a free port, or on `port` (a restart on the same address, e.g. after an outage test)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if port else 3):  # the free port can be taken between probing and binding
            self.port = port or free_port()
            config = self._write_config()
            log = open(self.dir / "registry.log", "ab")
            self._proc = subprocess.Popen([self.binary, "serve", str(config)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.dir / 'registry.log'}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def _write_config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(self.dir / 'data'))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.auth:
            user, password = self.auth
            # -i reads the password from stdin, keeping it out of argv.
            entry = subprocess.run(["htpasswd", "-niB", user], input=password.encode(), capture_output=True,
                                   check=True).stdout
            (self.dir / "htpasswd").write_bytes(entry.strip() + b"\n")
            lines += ["auth:", "  htpasswd:", "    realm: jobforge-dev",
                      f"    path: {json.dumps(str(self.dir / 'htpasswd'))}"]
        path = self.dir / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                status = self._request("GET", "/v2/").status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = None
            if status in (200, 401):
                return True
            time.sleep(0.05)  # polling a readiness endpoint against a deadline, not synchronising
        return False

    # --- HTTP API helpers ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, method=method, headers=dict(headers or {}))
        if self.auth:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=10)

    def catalog(self) -> list[str]:
        with self._request("GET", "/v2/_catalog?n=1000") as resp:
            return sorted(json.load(resp).get("repositories") or [])

    def tags(self, name: str) -> list[str]:
        """Tags of repository `name`; [] when it does not exist."""
        try:
            with self._request("GET", f"/v2/{name}/tags/list") as resp:
                return sorted(json.load(resp).get("tags") or [])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise

    def manifest_digest(self, name: str, tag: str) -> str | None:
        """The `Docker-Content-Digest` the registry serves for name:tag, None when unknown."""
        try:
            with self._request("HEAD", f"/v2/{name}/manifests/{tag}", {"Accept": MANIFEST_TYPES}) as resp:
                return resp.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def has_manifest(self, name: str, tag: str) -> bool:
        return self.manifest_digest(name, tag) is not None


def seed_busybox_image(registry_host: str, storage_root: str | os.PathLike, runroot: str | os.PathLike,
                       name: str = "busybox", tag: str = "latest", tls_verify: bool = False,
                       creds: tuple[str, str] | None = None) -> str:
    """Build a base image from the host's static /bin/busybox (applets linked into /bin) and push it.

    Returns the pushed reference, e.g. `127.0.0.1:5000/busybox:latest`.
    """
    ref = f"{registry_host}/{name}:{tag}"
    buildah = ["buildah", "--storage-driver", "vfs", "--root", str(storage_root), "--runroot", str(runroot)]
    container = f"jobforge-seed-{uuid.uuid4().hex[:12]}"

    def sh(*args: str) -> None:
        result = subprocess.run(buildah + list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {args[0]} failed ({result.returncode}): {result.stderr.strip()}")

    with tempfile.TemporaryDirectory() as tmp:
        push = ["push", f"--tls-verify={'true' if tls_verify else 'false'}"]
        if creds:
            authfile = Path(tmp) / "auth.json"
            token = base64.b64encode(":".join(creds).encode()).decode()
            authfile.write_text(json.dumps({"auths": {registry_host: {"auth": token}}}))
            authfile.chmod(0o600)
            push += ["--authfile", str(authfile)]
        sh("from", "--name", container, "scratch")
        try:
            sh("copy", container, "/bin/busybox", "/bin/busybox")
            sh("run", "--isolation", "chroot", container, "--", "/bin/busybox", "--install", "-s", "/bin")
            sh("config", "--cmd", "/bin/sh", container)
            sh("commit", container, ref)
        finally:
            subprocess.run(buildah + ["rm", container], check=False, capture_output=True)
        sh(*push, ref, f"docker://{ref}")
    return ref


# A fixed identity and no user/system git config, so commits work on any machine (no gpg signing etc.).
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Job Forge", "GIT_AUTHOR_EMAIL": "devinfra@jobforge.invalid",
    "GIT_COMMITTER_NAME": "Job Forge", "GIT_COMMITTER_EMAIL": "devinfra@jobforge.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}


def git_repo_of(source: str | os.PathLike, dest: str | os.PathLike) -> str:
    """A git repo (branch main, one commit) holding a copy of `source`; returns its file:// URL."""
    dest = Path(dest)
    shutil.copytree(source, dest)
    env = {**os.environ, **GIT_ENV}
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", f"import {Path(source).name}"]):
        subprocess.run(["git", *argv], cwd=dest, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
    return dest.as_uri()


def remove_tree(path: str | os.PathLike) -> None:
    """rm -rf; rootless buildah leaves files owned by sub-uids, which only `buildah unshare` may delete."""
    shutil.rmtree(path, ignore_errors=True)
    if Path(path).exists() and shutil.which("buildah"):
        subprocess.run(["buildah", "unshare", "rm", "-rf", str(path)], check=False, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def progress(message: str) -> None:
    """A benchmark's progress line: stderr, so stdout stays the one JSON object it prints."""
    print(f"==> {message}", file=sys.stderr, flush=True)


def run_in_scratch(prefix: str, keep: bool, measure: Callable[[Path], object]) -> int:
    """Run a benchmark's `measure(work)` in a fresh temporary directory, remove it (unless `keep`), and print the
    result as the benchmark's one JSON object on stdout."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = measure(work)
    finally:
        if keep:
            progress(f"kept {work}")
        else:
            remove_tree(work)
    print(json.dumps(result, indent=2))
    return 0


def build_network_here(as_root: bool = False) -> str:
    """`outbound` where slirp4netns can give the phases' user a tap: root always, any other user only when
    /dev/net/tun is open to it (mode 0666, the distributions' default; some container hosts make it 0600)."""
    if shutil.which("slirp4netns") is None:
        return "none"
    try:
        usable = as_root or os.stat("/dev/net/tun").st_mode & 0o006 == 0o006
    except OSError:
        usable = False
    return "outbound" if usable else "none"


def service_command() -> list[str]:
    """The installed `jobforge-service` console script of this interpreter's environment: what users run."""
    script = Path(sys.executable).with_name("jobforge-service")
    if not script.exists():
        raise RuntimeError(f"{script} is missing: install the package (make demo / make test do)")
    return [str(script)]


class ServiceProcess:
    """`jobforge-service` as a subprocess on 127.0.0.1 with its own data dir, logging to `service.log` there.

    Settings inherited from the caller's environment that would point it elsewhere (`REGISTRY_*`,
    `JOBFORGE_*`, ...) are dropped; `env` sets what the caller wants. It runs in its own session, so a Ctrl-C
    in a terminal reaches the caller, which then stops the service in order.
    """

    def __init__(self, data_dir: str | os.PathLike, registry_host: str, **env: str) -> None:
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.log_path = self.data_dir / "service.log"
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("REGISTRY_", "JOBFORGE_", "SERVER_", "METRICS_", "MAX_CONCURRENT"))
                     and k not in ("GIT_USERNAME", "GIT_PASSWORD")}
        self.env = {
            **inherited,
            "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(self.port), "METRICS_PORT": str(free_port()),
            "REGISTRY_URL": registry_host, "REGISTRY_TLS_VERIFY": "false", "JOBFORGE_DATA_DIR": str(self.data_dir),
            # webhook receivers of the demo and the tests listen on loopback, which the service refuses otherwise
            "JOBFORGE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            # Tests, demo and bench build from local repositories; a real service refuses them by default.
            "JOBFORGE_ALLOW_FILE_REPOS": "true",
            "LOG_LEVEL": "info", **env,
        }
        # Phases run as root only when the service is root and has no build user (JOBFORGE_BUILD_USER=).
        as_root = os.geteuid() == 0 and self.env.get("JOBFORGE_BUILD_USER", "jobforge-build") == ""
        self.env.setdefault("JOBFORGE_BUILD_NETWORK", build_network_here(as_root))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServiceProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(service_command(), env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobforge-service exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)  # polling a liveness endpoint against a deadline, not synchronising
        raise RuntimeError(f"jobforge-service did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: the service stops running phases and closes its store; SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no service log)"
        return "\n".join("    | " + line for line in text[-lines:])

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
