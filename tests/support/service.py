"""Runs the real `jobforge-service` as a subprocess on 127.0.0.1, as users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, data_dir: Path, registry_host: str, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ,
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(self.port),
            "METRICS_PORT": str(free_port()),
            "REGISTRY_URL": registry_host,
            "REGISTRY_TLS_VERIFY": "false",
            "JOBFORGE_DATA_DIR": str(data_dir),
            "JOBFORGE_KILL_GRACE": "3",
            "LOG_LEVEL": "info",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServiceProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "jobforge.server.main"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        raise TimeoutError("service did not answer /health within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- tiny HTTP helpers for tests (the client library has its own tests)

    def post(self, path: str, body) -> tuple[int, object]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        return self._send(req)

    def get(self, path: str) -> tuple[int, object]:
        return self._send(urllib.request.Request(self.url + path))

    def rpc(self, method: str, params=None, id_=1) -> dict:
        status, body = self.post("/json", {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": id_})
        assert status == 200, body
        return body

    @staticmethod
    def _send(req) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode(errors="replace")
