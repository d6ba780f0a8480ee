"""`python -m jobforge.smoke` against a real service that registered itself in the Consul double: it discovers
the service through the catalog, builds the example app for real, and writes test_results/<ts>/summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doubles.consul import FakeConsul
from tests.doubles.nomad import FakeNomad, subprocess_runner
from tests.support.gitrepo import GitRepo
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, registry, base_image):
    """A local-backend service registered in a Consul double (JOBFORGE_CONSUL_REGISTER), and the example repo."""
    base = tmp_path_factory.mktemp("smoke")
    repo = GitRepo.from_dir(base / "hello", ROOT / "examples" / "hello")
    consul = FakeConsul()
    with consul.in_thread() as addr:
        with ServiceProcess(base / "service", registry.host, JOBFORGE_CONSUL_REGISTER="true",
                            CONSUL_HTTP_ADDR=addr) as svc:
            yield addr, svc, repo


def smoke(tmp_path: Path, consul_addr: str, *args: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_SERVICE_URL", "JOBFORGE_TOKEN")}
    env["CONSUL_HTTP_ADDR"] = consul_addr
    result = subprocess.run([sys.executable, "-m", "jobforge.smoke", "--results-dir", str(tmp_path / "results"),
                             *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    (run_dir,) = (tmp_path / "results").iterdir()
    return result, json.loads((run_dir / "summary.json").read_text()), run_dir


def test_smoke_discovers_builds_and_writes_the_summary(tmp_path, cluster, registry, base_image):
    addr, svc, repo = cluster
    result, summary, run_dir = smoke(tmp_path, addr, "--repo", str(repo.path), "--image", "smoke/hello",
                                     "--registry", registry.host, "--build-arg", f"BASE_IMAGE={base_image}",
                                     "--tag", "smoke", "--test-command", "/app/run-tests.sh",
                                     "--no-registry-tls-verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["status"] == "SUCCEEDED" and summary["error"] is None
    assert summary["service_url"] == svc.url and summary["discovered_from"].startswith("Consul catalog")
    for phase in ("build", "test", "publish"):
        entry = summary["phases"][phase]
        assert entry["status"] == "SUCCEEDED" and entry["duration_seconds"] > 0 and entry["log_lines"] > 0
        assert (run_dir / "logs" / f"{phase}.log").read_text().count("\n") == entry["log_lines"]
    assert "ok: Hello, tester!" in (run_dir / "logs" / "test.log").read_text()
    tags = {image["reference"].rsplit(":", 1)[1]: image["digest"] for image in summary["images"]}
    assert set(tags) == {summary["job_id"], "smoke"}
    for tag, digest in tags.items():
        assert digest == registry.manifest_digest("smoke/hello", tag)
    assert 0 < summary["job_seconds"] <= summary["wall_seconds"]


def test_a_failing_build_is_recorded_and_fails_the_smoke(tmp_path, cluster, registry, base_image):
    addr, _, repo = cluster
    result, summary, run_dir = smoke(tmp_path, addr, "--repo", str(repo.path), "--image", "smoke/hello",
                                     "--registry", registry.host, "--build-arg", f"BASE_IMAGE={base_image}",
                                     "--test-command", "echo about to fail; exit 3", "--no-registry-tls-verify")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (summary["status"], summary["failed_phase"]) == ("FAILED", "test")
    assert "exited with code 3" in summary["error"] and summary["images"] == []
    assert "about to fail" in (run_dir / "logs" / "test.log").read_text()


def test_no_service_registered_is_an_error_with_a_record(tmp_path):
    consul = FakeConsul()
    with consul.in_thread() as addr:
        result, summary, _ = smoke(tmp_path, addr, "--repo", "/nonexistent", "--image", "x", "--registry",
                                   "127.0.0.1:1")
    assert result.returncode == 2 and "not registered" in result.stderr
    assert summary["status"] == "ERROR" and "jobforge-service is not registered" in summary["error"]


def test_smoke_through_the_nomad_backend_and_the_consul_store(tmp_path, registry, base_image, buildah_storage):
    """The cluster shape: the service on the Nomad double (whose client runs the jobs' own task scripts) with its
    state in Consul KV, registered in that Consul; the smoke tool finds it there."""
    repo = GitRepo.from_dir(tmp_path / "hello", ROOT / "examples" / "hello")
    runner = subprocess_runner(extra_env={"JOBFORGE_BUILDAH_ROOT": str(buildah_storage.root),
                                          "JOBFORGE_BUILDAH_RUNROOT": str(buildah_storage.runroot)})
    nomad, consul = FakeNomad(runner=runner, event_heartbeat=0.5, log_heartbeat=0.5), FakeConsul()
    with nomad.in_thread() as nomad_url, consul.in_thread() as addr:
        with ServiceProcess(tmp_path / "service", registry.host, JOBFORGE_BACKEND="nomad", NOMAD_ADDR=nomad_url,
                            JOBFORGE_STORE="consul", CONSUL_HTTP_ADDR=addr, JOBFORGE_CONSUL_REGISTER="true") as svc:
            result, summary, run_dir = smoke(tmp_path, addr, "--repo", str(repo.path), "--image", "smoke/nomad",
                                             "--registry", registry.host, "--build-arg", f"BASE_IMAGE={base_image}",
                                             "--no-registry-tls-verify")
            dispatched = sorted(jid.split("/")[0] for (_, jid) in nomad.cluster.jobs if "/dispatch-" in jid)
        assert any(key.startswith("jobforge/jobs/") for key in consul.table.entries)  # the state was in Consul
    assert result.returncode == 0, result.stdout + result.stderr + svc.log_tail()
    assert summary["status"] == "SUCCEEDED" and summary["service_url"] == svc.url
    assert {"jobforge-build", "jobforge-test", "jobforge-publish"} <= set(dispatched)
    assert "Hello, world!" in (run_dir / "logs" / "test.log").read_text()
    ((reference, digest),) = [(i["reference"], i["digest"]) for i in summary["images"]]
    assert digest == registry.manifest_digest("smoke/nomad", reference.rsplit(":", 1)[1])
