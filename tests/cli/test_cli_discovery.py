"""Service discovery order: --url, JOB_SERVICE_URL, Consul catalog (CONSUL_HTTP_ADDR), localhost."""

from __future__ import annotations

import json

import pytest

from jobforge.client import DEFAULT_URL, discover_url
from jobforge.client._discovery import consul_service_url
from jobforge.errors import ServiceUnavailable
from tests.cli.conftest import cli_env, run_cli


def test_explicit_url_wins_over_everything(fake_consul):
    fake_consul.register("127.0.0.2", 1)
    env = {"JOB_SERVICE_URL": "http://env:1", "CONSUL_HTTP_ADDR": fake_consul.addr}
    assert discover_url("http://flag:2/", env=env) == ("http://flag:2", "--url")


def test_env_url_beats_consul(fake_consul):
    env = {"JOB_SERVICE_URL": "127.0.0.1:9", "CONSUL_HTTP_ADDR": fake_consul.addr}
    assert discover_url(None, env=env) == ("http://127.0.0.1:9", "JOB_SERVICE_URL")
    assert fake_consul.seen_tokens == []  # Consul was not asked


def test_consul_catalog_service_address_and_port(fake_consul):
    fake_consul.register("127.0.0.7", 21855)
    url, source = discover_url(None, env={"CONSUL_HTTP_ADDR": fake_consul.addr, "CONSUL_HTTP_TOKEN": "t0k"})
    assert url == "http://127.0.0.7:21855"
    assert source == f"Consul catalog at http://{fake_consul.addr}"
    assert fake_consul.seen_tokens == ["t0k"]


def test_consul_empty_service_address_falls_back_to_node_address(fake_consul):
    fake_consul.register("", 8080, node_address="127.0.0.9")
    assert discover_url(None, env={"CONSUL_HTTP_ADDR": f"http://{fake_consul.addr}"})[0] == "http://127.0.0.9:8080"


def test_consul_ipv6_address_is_bracketed(fake_consul):
    fake_consul.register("::1", 8080)
    assert consul_service_url(fake_consul.addr) == "http://[::1]:8080"


def test_unregistered_service_names_consul(fake_consul):
    with pytest.raises(ServiceUnavailable, match=f"not registered in Consul at http://{fake_consul.addr}"):
        discover_url(None, env={"CONSUL_HTTP_ADDR": fake_consul.addr})


def test_unreachable_consul_names_the_source(fake_consul):
    addr = fake_consul.addr
    fake_consul.server.shutdown()
    fake_consul.server.server_close()
    with pytest.raises(ServiceUnavailable, match=f"cannot reach Consul at http://{addr} \\(CONSUL_HTTP_ADDR\\)"):
        discover_url(None, env={"CONSUL_HTTP_ADDR": addr})


def test_default_is_localhost_8080():
    assert discover_url(None, env={}) == (DEFAULT_URL, "default") == ("http://localhost:8080", "default")


def test_cli_finds_the_service_through_consul(fake_consul, fake_service, tmp_path):
    fake_service.jobs["j1"] = {}
    port = int(fake_service.url.rsplit(":", 1)[1])
    fake_consul.register("127.0.0.1", port)
    result = run_cli("health", "--json", cwd=tmp_path, env=cli_env(CONSUL_HTTP_ADDR=fake_consul.addr))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"]["status"] == "ok"


@pytest.mark.parametrize("env_key, source", [("JOB_SERVICE_URL", "JOB_SERVICE_URL"), (None, "--url")])
def test_cli_unreachable_exit_3_names_url_and_source(tmp_path, env_key, source):
    args = ["get-status", "abc"] + (["--url", "http://127.0.0.1:9"] if env_key is None else [])
    env = cli_env(**({env_key: "http://127.0.0.1:9"} if env_key else {}))
    result = run_cli(*args, cwd=tmp_path, env=env)
    assert result.returncode == 3
    assert f"cannot reach the Job Forge service at http://127.0.0.1:9 (URL from {source})" in result.stderr


def test_cli_unregistered_in_consul_exit_3(fake_consul, tmp_path):
    result = run_cli("get-history", cwd=tmp_path, env=cli_env(CONSUL_HTTP_ADDR=fake_consul.addr))
    assert result.returncode == 3
    assert "jobforge-service is not registered in Consul" in result.stderr
