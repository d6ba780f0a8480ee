"""A real `prometheus` on loopback for tests: its own data directory, a given configuration, the HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from jobforge.devinfra import free_port


class Prometheus:
    """`prometheus` with `config` (a dict, written as JSON, which is YAML), or scraping one static `target` every
    second as job "jobforge"."""

    def __init__(self, workdir: Path, target: str | None = None, *, config: dict[str, Any] | None = None) -> None:
        if config is None:
            config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                      "scrape_configs": [{"job_name": "jobforge", "static_configs": [{"targets": [target]}]}]}
        self.port = free_port()
        path = workdir / "prometheus.yml"
        path.write_text(json.dumps(config))
        self.log_path = workdir / "prometheus.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def query(self, expr: str) -> dict:
        return self.api("/api/v1/query", query=expr)

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)["data"]["result"]]

    def wait_for(self, expr: str, what: str, timeout: float = 120) -> list[float]:
        """Poll a query until it returns a sample: Prometheus itself offers no event to wait on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = self.values(expr)
                if found:
                    return found
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never had {what} ({expr}):\n{self.log_path.read_text()[-2000:]}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
