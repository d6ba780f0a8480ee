"""Settings come from the reference's environment variable names; defaults point at loopback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobforge.settings import Settings


def test_reference_variable_names_and_durations(monkeypatch):
    monkeypatch.setenv("SERVER_PORT", "8181")
    monkeypatch.setenv("BUILD_TIMEOUT", "1h30m")
    monkeypatch.setenv("TEST_TIMEOUT", "45s")
    monkeypatch.setenv("REGISTRY_URL", "127.0.0.1:5001")
    monkeypatch.setenv("REGISTRY_TLS_VERIFY", "false")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw-not-shown")
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "3")
    monkeypatch.setenv("JOBFORGE_DATA_DIR", "/tmp/jf-data")
    s = Settings()
    assert (s.server_port, s.build_timeout, s.test_timeout) == (8181, 5400, 45)
    assert (s.registry_url, s.registry_tls_verify, s.max_concurrent_jobs) == ("127.0.0.1:5001", False, 3)
    assert str(s.data_dir) == "/tmp/jf-data"
    assert "pw-not-shown" not in repr(s)


def test_defaults_are_loopback_and_the_reference_values(monkeypatch):
    for name in ("SERVER_HOST", "SERVER_PORT", "NOMAD_ADDR", "CONSUL_HTTP_ADDR", "VAULT_ADDR", "REGISTRY_URL",
                 "BUILD_TIMEOUT", "TEST_TIMEOUT", "METRICS_PORT", "JOBFORGE_BACKEND", "MAX_CONCURRENT_JOBS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.server_host == "127.0.0.1" and s.server_port == 8080 and s.metrics_port == 9090
    assert (s.build_timeout, s.test_timeout, s.registry_temp_prefix) == (1800, 900, "temp")
    assert s.backend == "local" and s.max_concurrent_jobs == 2
    for addr in (s.nomad.addr, s.consul.http_addr, s.vault.addr, s.registry_url):
        assert "127.0.0.1" in addr or "localhost" in addr


@pytest.mark.parametrize("name, value", [("BUILD_TIMEOUT", "soon"), ("SERVER_PORT", "http"),
                                         ("JOBFORGE_BACKEND", "kubernetes"), ("MAX_CONCURRENT_JOBS", "0")])
def test_bad_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert name in str(err.value)


@pytest.mark.parametrize("backend, store, expected", [
    ("local", None, "sqlite"), ("nomad", None, "consul"), ("nomad", "sqlite", "sqlite"), ("local", "consul", "consul"),
])
def test_the_store_follows_the_backend_unless_set(monkeypatch, backend, store, expected):
    monkeypatch.setenv("JOBFORGE_BACKEND", backend)
    if store:
        monkeypatch.setenv("JOBFORGE_STORE", store)
    else:
        monkeypatch.delenv("JOBFORGE_STORE", raising=False)
    assert Settings().effective_store == expected


def test_nomad_defaults_fit_a_stock_cluster_and_timeouts_are_durations(monkeypatch):
    for name in ("NOMAD_DATACENTERS", "JOBFORGE_PLACEMENT_TIMEOUT", "PLACEMENT_TIMEOUT",
                 "JOBFORGE_NOMAD_STREAM_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    nomad = Settings().nomad
    assert (nomad.datacenters, nomad.placement_timeout, nomad.stream_timeout) == ("dc1", 300, 65)
    monkeypatch.setenv("PLACEMENT_TIMEOUT", "2m")  # the name works too
    monkeypatch.setenv("JOBFORGE_NOMAD_STREAM_TIMEOUT", "90s")
    assert (Settings().nomad.placement_timeout, Settings().nomad.stream_timeout) == (120, 90)
    monkeypatch.setenv("JOBFORGE_PLACEMENT_TIMEOUT", "30s")
    assert Settings().nomad.placement_timeout == 30


def test_access_settings_default_closed_and_lists_are_comma_separated(monkeypatch):
    for name in ("CORS_ORIGIN", "JOBFORGE_API_TOKENS_FILE", "JOBFORGE_INSECURE_NO_AUTH", "JOBFORGE_ALLOWED_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert (s.cors_origin, s.api_tokens_file, s.insecure_no_auth, s.allowed_hosts) == ((), None, False, ())
    monkeypatch.setenv("CORS_ORIGIN", "https://ui.example, http://127.0.0.1:3000,")
    monkeypatch.setenv("JOBFORGE_ALLOWED_HOSTS", "jobs.example,proxy.example:8443")
    monkeypatch.setenv("JOBFORGE_API_TOKENS_FILE", "/etc/jobforge/tokens")
    s = Settings()
    assert s.cors_origin == ("https://ui.example", "http://127.0.0.1:3000")
    assert s.allowed_hosts == ("jobs.example", "proxy.example:8443")
    assert str(s.api_tokens_file) == "/etc/jobforge/tokens"


def test_the_layer_cache_settings_reach_the_build_payload(monkeypatch):
    from datetime import UTC, datetime

    from jobforge.config import JobConfig
    from jobforge.models import JobRecord
    from jobforge.tasks import RegistryTarget, build_payload

    monkeypatch.setenv("REGISTRY_CACHE_PREFIX", "layers")
    monkeypatch.setenv("JOBFORGE_CACHE_TTL", "2h")
    monkeypatch.setenv("JOBFORGE_CACHE_MAX_BYTES", "1000")
    s = Settings()
    assert (s.registry_cache_prefix, s.cache_ttl, s.cache_max_bytes) == ("layers", 7200, 1000)
    monkeypatch.setenv("REGISTRY_CACHE_PREFIX", "Bad/Prefix")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "REGISTRY_CACHE_PREFIX" in str(err.value)
    config = JobConfig(owner="o", repo_url="https://git.example/a.git", image_name="app", registry_url="127.0.0.1:5000")
    record = JobRecord(job_id="8f1c", config=config, image_tags=["8f1c"], submitted_at=datetime(2025, 1, 1, tzinfo=UTC))
    on = build_payload(record, "build", RegistryTarget(registry_url="127.0.0.1:5000", cache_prefix="layers",
                                                       cache_ttl=7200, cache_max_bytes=1000))
    assert (on["cache_repo"], on["cache_ttl"], on["cache_max_bytes"]) == ("127.0.0.1:5000/layers/app", 7200, 1000)
    assert build_payload(record, "build", RegistryTarget(registry_url="r:1", cache_prefix=""))["cache_repo"] is None
