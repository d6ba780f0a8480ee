"""docs/prometheus.yml: Prometheus finds every replica through Consul (`jobforge-service-metrics`) and scrapes the
path of the registration's `metrics_path` meta.

Debian's prometheus 2.42 package is built without Consul SD ("Disable Consul SD until its Debian package is back
in shape", its changelog): its promtool refuses `consul_sd_configs` as an unknown field. The two tests that need
Consul SD therefore skip, saying so, when the installed binaries lack it; the file's shape is checked regardless.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from jobforge.registration import METRICS_PATH, METRICS_SERVICE_NAME
from tests.doubles.consul import FakeConsul
from tests.support.prometheus import Prometheus
from tests.support.service import ServiceProcess

CONFIG = Path(__file__).resolve().parent.parent / "docs" / "prometheus.yml"
NO_CONSUL_SD = "field consul_sd_configs not found"


def _promtool_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def _consul_sd_missing() -> str | None:
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        return "Debian package prometheus missing"
    result = _promtool_check(CONFIG)
    if NO_CONSUL_SD in result.stdout + result.stderr:
        return "the installed prometheus is built without Consul SD (Debian's 2.42 package)"
    return None


needs_consul_sd = pytest.mark.skipif(_consul_sd_missing() is not None, reason=str(_consul_sd_missing()))


def test_the_config_discovers_the_metrics_service_and_uses_its_metrics_path():
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["consul_sd_configs"]
    assert sd["services"] == [METRICS_SERVICE_NAME] and sd["server"].startswith("127.0.0.1:")
    relabel = {r["target_label"]: r for r in job["relabel_configs"]}
    assert relabel["__metrics_path__"]["source_labels"] == ["__meta_consul_service_metadata_metrics_path"]
    assert relabel["__metrics_path__"]["regex"] == "(.+)"  # an instance without the meta keeps /metrics


@needs_consul_sd
def test_promtool_accepts_the_config():
    result = _promtool_check(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
@needs_consul_sd
def test_a_real_prometheus_discovers_and_scrapes_a_registered_replica(tmp_path, registry):
    consul = FakeConsul()
    with consul.in_thread() as addr:
        with ServiceProcess(tmp_path / "svc", registry.host, JOBFORGE_CONSUL_REGISTER="true",
                            CONSUL_HTTP_ADDR=addr) as svc:
            # A second instance whose meta names a path nothing serves: its scrape must fail, which shows the
            # path comes from the meta.
            consul.register_service(METRICS_SERVICE_NAME, int(svc.env["METRICS_PORT"]), address="127.0.0.1",
                                    service_id="elsewhere", meta={"metrics_path": "/not-metrics"})
            config = yaml.safe_load(CONFIG.read_text())
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            config["scrape_configs"][0]["consul_sd_configs"][0].update(server=addr, refresh_interval="1s")
            prom = Prometheus(tmp_path, config=config)
            try:
                prom.wait_for('up{job="jobforge-service", replica!="elsewhere"} == 1', "a scrape of the replica")
                prom.wait_for('up{job="jobforge-service", replica="elsewhere"} == 0', "the failing instance")
                targets = prom.api("/api/v1/targets")["data"]["activeTargets"]
                urls = sorted(t["scrapeUrl"] for t in targets)
                port = svc.env["METRICS_PORT"]
                assert urls == [f"http://127.0.0.1:{port}{METRICS_PATH}", f"http://127.0.0.1:{port}/not-metrics"]
                assert prom.wait_for('concurrent_jobs{job="jobforge-service"}', "a Job Forge gauge") == [0.0]
            finally:
                prom.close()
