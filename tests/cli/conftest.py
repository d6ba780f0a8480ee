"""Fixtures for the CLI and client tests: a fake service, a fake Consul, and running the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.cli.fake_service import FakeService

REPO_ROOT = Path(__file__).resolve().parents[2]
# Verbatim copy of shared/reference/consul-samples/catalog-service-response.json (Consul catalog.mdx sample).
CONSUL_SAMPLE = Path(__file__).resolve().parents[1] / "reference" / "consul-samples" / "catalog-service-response.json"


@pytest.fixture
def fake_service() -> Iterator[FakeService]:
    service = FakeService().start()
    try:
        yield service
    finally:
        service.stop()


class FakeConsul:
    """Consul's ``GET /v1/catalog/service/<name>`` on 127.0.0.1; `services` maps a name to its catalog entries."""

    def __init__(self) -> None:
        self.services: dict[str, list[dict]] = {}
        self.seen_tokens: list[str | None] = []
        self.index = 1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server naming
                fake.seen_tokens.append(self.headers.get("X-Consul-Token"))
                prefix = "/v1/catalog/service/"
                if not self.path.startswith(prefix):
                    self.send_error(404)
                    return
                # Consul answers 200 with [] for an unknown service, never 404.
                body = json.dumps(fake.services.get(self.path[len(prefix):].split("?")[0], [])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                # Like Consul: every catalog read carries the blocking-query headers.
                self.send_header("X-Consul-Index", str(fake.index))
                self.send_header("X-Consul-Knownleader", "true")
                self.send_header("X-Consul-Lastcontact", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01},
                                       daemon=True)

    def register(self, service_address: str, port: int, node_address: str = "127.0.0.1") -> None:
        """Register `jobforge-service` with an entry copied from the reference sample."""
        entry = json.loads(CONSUL_SAMPLE.read_text())[0]
        entry |= {"ServiceName": "jobforge-service", "ServiceID": "jobforge-service-1",
                  "ServiceAddress": service_address, "ServicePort": port, "Address": node_address}
        self.services["jobforge-service"] = [entry]
        self.index += 1


@pytest.fixture
def fake_consul() -> Iterator[FakeConsul]:
    consul = FakeConsul()
    consul.thread.start()
    try:
        yield consul
    finally:
        consul.server.shutdown()
        consul.server.server_close()


def cli_command() -> list[str]:
    """The installed ``jobforge`` console script next to this Python, exactly what a user runs."""
    script = Path(sys.executable).with_name("jobforge")
    assert script.exists(), f"{script} is missing: install the package (make test does) before running the CLI tests"
    return [str(script)]


def interruptible() -> None:
    """preexec_fn for a CLI a test Ctrl-Cs: a shell's background job (`make test &`, CI runners) starts with SIGINT
    ignored, which every child inherits and Python then keeps; the user at a terminal has it at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_SERVICE_URL", "CONSUL_HTTP_ADDR")}
    env.pop("PYTHONPATH", None)
    env |= {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "NO_COLOR": "1", "COLUMNS": "120"}
    return env | extra


def run_cli(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a subprocess, as a user or a CI script would."""
    return subprocess.run([*cli_command(), *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def git_available() -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
