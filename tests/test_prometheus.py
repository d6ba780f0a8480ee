"""The metrics as an operator meets them: a real Prometheus scrapes a real service that ran real jobs, and every
query of the Grafana dashboard evaluates there. `promtool check metrics` lints the scrape."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.gitrepo import GitRepo
from tests.support.prometheus import Prometheus
from tests.support.service import ServiceProcess
from tests.test_e2e import watch

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus missing")]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "jobforge.json"
# What Grafana substitutes for its interval variables, at a 1 s scrape interval.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "1h"}
# Control lines as a test command can print them, without the phase's nonce: ordinary log lines.
FORGED = ['::jobforge-usage {"cpu_seconds": 99999, "max_rss_bytes": 1}',
          '::jobforge-cache {"hits": 1000, "misses": 0}',
          '::jobforge-0123456789abcdef0123456789abcdef cache {"hits": 1000, "misses": 0}']


@pytest.fixture(scope="module")
def metered(tmp_path_factory, registry, base_image):
    """A service whose metrics port a Prometheus scrapes, after one succeeded job (whose test command prints
    forged control lines) and one failed job."""
    base = tmp_path_factory.mktemp("prom")
    repo = GitRepo.from_dir(base / "hello", ROOT / "examples" / "hello")
    with ServiceProcess(base / "service", registry.host) as svc:
        metrics_port = svc.env["METRICS_PORT"]
        prom = Prometheus(base, f"127.0.0.1:{metrics_port}")
        try:
            prom.wait_for('up{job="jobforge"} == 1', "a first scrape")
            jobs = []
            forge = "; ".join(f"echo '{line}' >&2" for line in FORGED)
            for commands in (["/app/run-tests.sh", forge], ["false"]):
                cfg = {"owner": "prom", "repo_url": str(repo.path), "image_name": f"hello-{uuid.uuid4().hex[:8]}",
                       "registry_url": registry.host, "build_args": {"BASE_IMAGE": base_image},
                       "test": {"entry_point": True, "commands": commands}}
                status, body = svc.post("/json/submitJob", {"job_config": cfg})
                assert status == 200, body
                watch(svc.url, body["job_id"])
                jobs.append(body["job_id"])
            prom.wait_for("sum(jobs_total) >= 2", "both finished jobs")
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
                scrape = resp.read()
            yield prom, scrape, svc, jobs
        finally:
            prom.close()


def test_promtool_finds_nothing_to_lint(metered):
    _, scrape, *_ = metered
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout + result.stderr == b"", result.stdout + result.stderr
    text = scrape.decode()
    for name in ("build_duration_seconds_bucket", "test_duration_seconds_bucket", "publish_duration_seconds_bucket",
                 "jobs_total", "concurrent_jobs", "queued_jobs", "job_success_rate", "resource_usage",
                 "http_request_duration_seconds_bucket"):
        assert f"\n{name}" in text, f"{name} missing from the scrape"
    assert "concurrent_jobs_total" not in text


def test_the_issue_queries_have_data(metered):
    prom, *_ = metered
    p90 = prom.wait_for("histogram_quantile(0.9, sum(rate(build_duration_seconds_bucket[5m])) by (le))",
                        "a build duration quantile")
    assert not math.isnan(p90[0]) and p90[0] > 0
    assert prom.values('job_success_rate{window="24h"}') == [0.5]
    assert prom.values("concurrent_jobs") == [0.0]
    assert sorted(prom.values('jobs_total{status="SUCCEEDED"}')) == [1.0]
    assert prom.values('jobs_total{status="FAILED", failed_phase="test"}') == [1.0]
    for phase in ("build", "test"):  # measured by the backend for each phase that ran
        cpu = prom.values(f'resource_usage{{resource_type="cpu", phase="{phase}"}}')
        memory = prom.values(f'resource_usage{{resource_type="memory", phase="{phase}"}}')
        assert cpu and cpu[0] > 0, f"the {phase} phase's CPU seconds were not reported"
        assert memory and memory[0] > 1 << 20, f"the {phase} phase's peak memory was not reported"
    hits = prom.values('build_cache_steps_total{result="hit"}')
    assert hits and hits[0] > 0, "the second build of the same repository took no layer from the cache"
    ratio = prom.values("build_cache_hit_ratio")
    assert ratio and 0 < ratio[0] <= 1
    routes = {r["metric"]["route"] for r in prom.query("http_request_duration_seconds_count")["data"]["result"]}
    assert "/json/{method}" in routes and not any(len(r) > 40 and "-" in r for r in routes), routes


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    found = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            found.append((panel["title"], expr))
    return found


def test_lines_a_test_command_forges_are_log_lines_and_change_no_metric(metered):
    prom, _, svc, (succeeded, _) = metered
    assert [line for line in svc.logs(succeeded)["test"] if line.startswith("::jobforge-")] == FORGED
    assert max(prom.values('resource_usage{resource_type="cpu"}')) < 99999
    assert min(prom.values('resource_usage{resource_type="memory"}')) > 1
    hits = prom.values('build_cache_steps_total{result="hit"}')
    assert hits and hits[0] < 1000


def test_every_dashboard_query_evaluates(metered):
    prom, *_ = metered
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        answer = prom.query(expr)
        assert answer["status"] == "success", (title, expr, answer)
    # The panels about jobs have data after two jobs (webhooks and HTTP need traffic of their own kind).
    assert prom.values('max(job_success_rate{window="24h"})') == [0.5]
