"""docs/prometheus.yml: Prometheus finds every replica through Consul (`jobforge-service-metrics`) and scrapes the
path of the registration's `metrics_path` meta.

Debian's prometheus 2.42 package is built without Consul SD ("Disable Consul SD until its Debian package is back
in shape", its changelog): its promtool refuses `consul_sd_configs` as an unknown field. The two tests that need
Consul SD therefore skip, saying so, when the installed binaries lack it; the file's shape is checked regardless,
and a real Prometheus applies the file's relabelling to what its Consul SD would make of the double's answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
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


def consul_sd_target_groups(consul_addr: str, service: str) -> list[dict]:
    """What Prometheus' Consul SD makes of `/v1/health/service/<service>` (discovery/consul/consul.go): one target
    per instance with the `__meta_consul_*` labels, so that the real Prometheus below applies docs/prometheus.yml's
    relabelling to them through `file_sd_configs` when its Consul SD is compiled out."""
    with urllib.request.urlopen(f"http://{consul_addr}/v1/health/service/{service}", timeout=10) as resp:
        entries = json.load(resp)
    groups = []
    for entry in entries:
        node, svc = entry["Node"], entry["Service"]
        statuses = {c["Status"] for c in entry["Checks"]}
        health = next((s for s in ("critical", "warning", "maintenance") if s in statuses), "passing")
        labels = {"__meta_consul_address": node["Address"], "__meta_consul_dc": node["Datacenter"],
                  "__meta_consul_health": health, "__meta_consul_node": node["Node"],
                  "__meta_consul_service": svc["Service"], "__meta_consul_service_address": svc["Address"],
                  "__meta_consul_service_id": svc["ID"], "__meta_consul_service_port": str(svc["Port"]),
                  "__meta_consul_tags": "," + ",".join(svc["Tags"]) + ","}
        labels |= {f"__meta_consul_service_metadata_{k}": v for k, v in svc["Meta"].items()}
        groups.append({"targets": [f"{svc['Address'] or node['Address']}:{svc['Port']}"], "labels": labels})
    return groups


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus missing")
def test_the_relabelling_scrapes_the_announced_path_with_the_consul_labels(tmp_path, registry):
    """The same as above with Consul SD's output fed through file SD: the relabel rules of docs/prometheus.yml
    and the double's health answer, in a real Prometheus."""
    consul = FakeConsul()
    with consul.in_thread() as addr:
        with ServiceProcess(tmp_path / "svc", registry.host, JOBFORGE_CONSUL_REGISTER="true",
                            CONSUL_HTTP_ADDR=addr) as svc:
            port = svc.env["METRICS_PORT"]
            consul.register_service(METRICS_SERVICE_NAME, int(port), address="127.0.0.1", service_id="elsewhere",
                                    meta={"metrics_path": "/not-metrics"})
            targets_file = tmp_path / "targets.json"
            targets_file.write_text(json.dumps(consul_sd_target_groups(addr, METRICS_SERVICE_NAME)))
            config = yaml.safe_load(CONFIG.read_text())
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            job = config["scrape_configs"][0]
            del job["consul_sd_configs"]
            job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
            prom = Prometheus(tmp_path, config=config)
            try:
                prom.wait_for('up{job="jobforge-service", replica!="elsewhere"} == 1', "a scrape of the replica")
                prom.wait_for('up{job="jobforge-service", replica="elsewhere"} == 0', "the failing instance")
                targets = prom.api("/api/v1/targets")["data"]["activeTargets"]
                assert sorted(t["scrapeUrl"] for t in targets) == [
                    f"http://127.0.0.1:{port}{METRICS_PATH}", f"http://127.0.0.1:{port}/not-metrics"]
                replica = next(t for t in targets if t["labels"]["replica"] != "elsewhere")
                assert replica["labels"]["replica"].startswith(f"{METRICS_SERVICE_NAME}-")
                assert replica["labels"]["consul_node"] == "node-1"
                assert prom.wait_for('concurrent_jobs{job="jobforge-service"}', "a Job Forge gauge") == [0.0]
            finally:
                prom.close()
