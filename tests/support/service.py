"""The real `jobforge-service` as a subprocess (see `jobforge.devinfra.ServiceProcess`), plus tiny HTTP
helpers for tests (the client library has its own tests)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from jobforge import devinfra


class ServiceProcess(devinfra.ServiceProcess):
    """Phases run as the service's user unless a test sets JOBFORGE_BUILD_USER: the suites' repositories live
    in pytest's root-private temp dirs, which a build user cannot read (tests/test_isolation.py runs as one)."""
    token: str | None = None  # sent as the bearer token by post/get/rpc when set

    def __init__(self, data_dir: Path, registry_host: str, **env: str) -> None:
        super().__init__(data_dir, registry_host, **{"JOBFORGE_KILL_GRACE": "3", "JOBFORGE_BUILD_USER": "", **env})

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def post(self, path: str, body) -> tuple[int, object]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._send(urllib.request.Request(self.url + path, data=data,
                                                 headers={"Content-Type": "application/json", **self._auth()}))

    def get(self, path: str) -> tuple[int, object]:
        return self._send(urllib.request.Request(self.url + path, headers=self._auth()))

    def rpc(self, method: str, params=None, id_=1) -> dict:
        status, body = self.post("/json", {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": id_})
        assert status == 200, body
        return body

    def logs(self, job_id: str) -> dict[str, list[str]]:
        """Every log line of a job per phase, read page by page (getLogs bounds each reply)."""
        logs: dict[str, list[str]] = {}
        offset = 0
        while offset is not None:
            status, page = self.get(f"/json/job/{job_id}/logs?offset={offset}")
            assert status == 200, page
            for phase, lines in page["logs"].items():
                logs.setdefault(phase, []).extend(lines)
            offset = page["next_offset"]
        return logs

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
