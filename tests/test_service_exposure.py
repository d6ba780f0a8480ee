"""The installed `jobforge-service` refuses to start when its settings would expose an unauthenticated API; it
says why and exits before binding anything."""

from __future__ import annotations

import subprocess

import pytest

from jobforge.devinfra import free_port, service_command
from tests.support.service import ServiceProcess


def start(tmp_path, **env: str) -> subprocess.CompletedProcess[str]:
    base = ServiceProcess(tmp_path / "data", "127.0.0.1:5000").env  # the env a test service gets, on loopback
    return subprocess.run(service_command(), env=base | {"SERVER_PORT": str(free_port()), **env},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_non_loopback_address_without_tokens_is_refused_before_binding(tmp_path, host):
    result = start(tmp_path, SERVER_HOST=host)
    assert result.returncode == 2
    assert f"refusing to serve {host} without authentication" in result.stderr
    assert "JOBFORGE_API_TOKENS_FILE" in result.stderr and "JOBFORGE_INSECURE_NO_AUTH=true" in result.stderr
    assert "listening" not in result.stdout + result.stderr
    assert not (tmp_path / "data" / "jobforge.db").exists()  # nothing was built either


def test_a_missing_tokens_file_is_refused(tmp_path):
    result = start(tmp_path, JOBFORGE_API_TOKENS_FILE=str(tmp_path / "no-such-file"))
    assert result.returncode == 2
    assert f"cannot read JOBFORGE_API_TOKENS_FILE {tmp_path / 'no-such-file'}" in result.stderr


def test_cors_star_without_tokens_is_refused(tmp_path):
    result = start(tmp_path, CORS_ORIGIN="*")
    assert result.returncode == 2 and "CORS_ORIGIN=*" in result.stderr


def test_loopback_without_tokens_starts_with_a_warning(tmp_path):
    with ServiceProcess(tmp_path / "data", "127.0.0.1:5000") as service:
        assert service.get("/health")[0] == 200
        assert service.post("/json/getHistory", {})[0] == 200
        log = service.log_path.read_text()
    assert "no API tokens configured" in log and "loopback (127.0.0.1) only" in log


def listening_on_every_ipv4_address(port: int) -> bool:
    """A LISTEN socket (state 0A) bound to 0.0.0.0:<port> in /proc/net/tcp."""
    with open("/proc/net/tcp", encoding="ascii") as fh:
        return any(f[1] == f"00000000:{port:04X}" and f[3] == "0A" for f in (line.split() for line in fh) if len(f) > 3)


def test_a_non_loopback_address_without_tokens_starts_when_explicitly_insecure(tmp_path):
    with ServiceProcess(tmp_path / "data", "127.0.0.1:5000", SERVER_HOST="0.0.0.0",
                        JOBFORGE_INSECURE_NO_AUTH="true") as service:
        assert listening_on_every_ipv4_address(service.port)
        assert service.get("/health") == (200, {"status": "ok"})
        assert service.post("/json/getHistory", {})[0] == 200  # no token needed: that is what was asked for
        log = service.log_path.read_text()
    assert "no API tokens configured" in log and "JOBFORGE_INSECURE_NO_AUTH=true, anyone who can connect" in log
