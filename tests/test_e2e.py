"""Real builds through the real service: `jobforge-service` subprocess, local backend, buildah, skopeo,
docker-registry and git on 127.0.0.1. Completion is awaited on the service's WebSocket push, never by sleeping."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import random
import subprocess
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.support.gitrepo import GitRepo
from tests.support.receiver import ThreadedReceiver
from jobforge.devinfra import free_port
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"


def watch(url: str, job_id: str, until_line: str | None = None) -> dict:
    """Follow the job's WebSocket; return the final status (or the status when `until_line` is logged)."""
    async def follow() -> dict:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/json/job/{job_id}/watch?logs=true") as ws:
                last = None
                async for msg in ws:
                    update = json.loads(msg.data)
                    last = update.get("job", last)
                    if update["type"] == "end":
                        return update["job"]
                    if until_line and update["type"] == "log" and until_line in update["log"]["line"]:
                        return last
                raise AssertionError(f"watch closed before the job ended (last state: {last})")
    return asyncio.run(asyncio.wait_for(follow(), 300))


@pytest.fixture(scope="module")
def hello_repo(tmp_path_factory) -> GitRepo:
    return GitRepo.from_dir(tmp_path_factory.mktemp("repos") / "hello", EXAMPLE)


@pytest.fixture(scope="module")
def service(tmp_path_factory, registry, base_image):
    with ServiceProcess(tmp_path_factory.mktemp("service"), registry.host, MAX_CONCURRENT_JOBS="2",
                        JOBFORGE_WEBHOOK_ALLOW_HOSTS="127.0.0.1") as svc:
        yield svc


@pytest.fixture
def config(hello_repo, registry, base_image):
    def make(**changes) -> dict:
        return {"owner": "e2e", "repo_url": str(hello_repo.path), "image_name": f"hello-{uuid.uuid4().hex[:8]}",
                "registry_url": registry.host, "build_args": {"BASE_IMAGE": base_image},
                "test": {"entry_point": True, "commands": ["/app/run-tests.sh"]}, **changes}
    return make


def submit(svc: ServiceProcess, cfg: dict) -> str:
    status, body = svc.post("/json/submitJob", {"job_config": cfg})
    assert status == 200, body
    return body["job_id"]


def run_job(svc: ServiceProcess, cfg: dict) -> tuple[str, dict, dict]:
    job_id = submit(svc, cfg)
    final = watch(svc.url, job_id)
    return job_id, final, svc.logs(job_id)


def test_success_with_entry_point_commands_and_three_tags(service, config, registry):
    cfg = config(image_tags=["latest", "v1.2.3"])
    job_id, final, logs = run_job(service, cfg)
    assert final["status"] == "SUCCEEDED", (final, logs)
    name = cfg["image_name"]
    assert sorted(registry.tags(name)) == sorted([job_id, "latest", "v1.2.3"])
    digests = {registry.manifest_digest(name, tag) for tag in (job_id, "latest", "v1.2.3")}
    assert len(digests) == 1 and None not in digests
    assert "Hello, world!" in logs["test"]  # the image's own ENTRYPOINT + CMD ran
    assert "ok: Hello, tester! (mode: unset)" in logs["test"]  # then the test command
    assert final["temp_image_deleted"] is True
    assert not registry.has_manifest(f"temp-{name}", job_id)
    assert any(line.startswith("Published: ") for line in logs["publish"])
    assert [final["phases"][p]["status"] for p in ("build", "test", "publish")] == ["SUCCEEDED"] * 3


def test_a_real_build_sends_every_webhook_signed_and_in_order(service, config):
    secret = "e2e-hmac-key"
    with ThreadedReceiver() as receiver:
        job_id, final, _ = run_job(service, config(webhook_url=receiver.url(), webhook_secret=secret))
        got = receiver.wait_for_event("job.completed")
    assert final["status"] == "SUCCEEDED"
    assert [r.event for r in got] == ["build.started", "build.completed", "test.started", "test.completed",
                                      "publish.started", "publish.completed", "job.completed"]
    for r in got:
        assert r.headers["X-Webhook-Signature"] == "sha256=" + hmac.new(secret.encode(), r.body, "sha256").hexdigest()
        assert r.payload["job_id"] == job_id and secret.encode() not in r.body
    assert got[-1].payload["image_tags"] == final["image_tags"]


def test_build_failure_stops_before_test_and_publish(service, config, registry, hello_repo, tmp_path):
    repo = GitRepo.from_dir(tmp_path / "broken", EXAMPLE)
    repo.commit("break the build", {"Dockerfile": "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
                                                  "RUN echo 'compiling...' && echo 'fatal: missing header' >&2 && exit 7\n"})
    cfg = config(repo_url=str(repo.path))
    job_id, final, logs = run_job(service, cfg)
    assert (final["status"], final["failed_phase"]) == ("FAILED", "build")
    assert "fatal: missing header" in logs["build"] and "compiling..." in logs["build"]
    assert "build phase failed" in final["error"]
    assert logs["test"] == [] and logs["publish"] == []
    assert registry.tags(cfg["image_name"]) == []
    assert final["phases"]["test"]["status"] == final["phases"]["publish"]["status"] == "SKIPPED"


def test_test_failure_publishes_nothing_and_deletes_the_temp_image(service, config, registry):
    cfg = config(test={"commands": ["echo checking", "echo 'assertion failed: 1 != 2'; exit 3", "echo never"]})
    job_id, final, logs = run_job(service, cfg)
    assert (final["status"], final["failed_phase"]) == ("FAILED", "test")
    assert "assertion failed: 1 != 2" in logs["test"] and "never" not in logs["test"]
    assert "exited with code 3" in final["error"]
    assert registry.tags(cfg["image_name"]) == [] and logs["publish"] == []
    assert final["temp_image_deleted"] is True
    assert not registry.has_manifest(f"temp-{cfg['image_name']}", job_id)


def test_kill_during_build_stops_the_build(service, config, tmp_path):
    naptime = random.randint(1000, 9999)  # unique on this machine, so pgrep finds only this build's sleep
    repo = GitRepo.from_dir(tmp_path / "slow", EXAMPLE)
    repo.commit("slow build", {"Dockerfile": "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
                                             f"RUN echo slow-step-begins && sleep {naptime}\n"})
    job_id = submit(service, config(repo_url=str(repo.path)))
    assert watch(service.url, job_id, until_line="slow-step-begins")["status"] == "BUILDING"
    status, body = service.post("/json/killJob", {"job_id": job_id})
    assert (status, body["status"]) == (200, "FAILED")
    final = watch(service.url, job_id)
    assert (final["status"], final["error"], final["failed_phase"]) == ("FAILED", "killed by user", "build")
    leftover = subprocess.run(["pgrep", "-f", f"sleep {naptime}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the build's processes must be gone after a kill"


def test_timeout_fails_the_phase_and_says_so(service, config, tmp_path):
    repo = GitRepo.from_dir(tmp_path / "hang", EXAMPLE)
    repo.commit("hang in tests", {"run-tests.sh": "#!/bin/sh\necho waiting forever\nsleep 300\n"}, executable=["run-tests.sh"])
    cfg = config(repo_url=str(repo.path), test={"commands": ["/app/run-tests.sh"], "timeout": "3s"})
    job_id, final, logs = run_job(service, cfg)
    assert (final["status"], final["failed_phase"]) == ("FAILED", "test")
    assert final["error"] == "test phase timed out after 3s"
    assert "waiting forever" in logs["test"]


def test_subdirectory_dockerfile_context_build_args_and_target(service, config, tmp_path, base_image):
    repo = GitRepo.create(tmp_path / "mono", {
        "services/api/docker/Dockerfile": (
            "ARG BASE_IMAGE\n"
            "FROM ${BASE_IMAGE} AS base\nARG FLAVOUR\nCOPY message.txt /message.txt\n"
            "RUN echo \"flavour=$FLAVOUR\" > /flavour\n"
            "FROM base AS release\nRUN echo release > /stage\n"
            "FROM base AS debug\nRUN echo debug > /stage\n"),
        "services/api/message.txt": "context is services/api\n",
        "message.txt": "WRONG CONTEXT\n",
    })
    cfg = config(repo_url=str(repo.path), dockerfile_path="services/api/docker/Dockerfile",
                 dockerfile_context="services/api", target="release",
                 build_args={"BASE_IMAGE": base_image, "FLAVOUR": "salty"},
                 test={"commands": ["cat /message.txt /flavour /stage"]})
    _, final, logs = run_job(service, cfg)
    assert final["status"] == "SUCCEEDED", logs
    assert ["context is services/api", "flavour=salty", "release"] == [
        line for line in logs["test"] if line in ("context is services/api", "flavour=salty", "release", "debug")]


def test_git_ref_as_branch_tag_and_commit(service, config, tmp_path):
    files = {p.name: p.read_text() for p in EXAMPLE.iterdir() if p.is_file()}
    files["Dockerfile"] += "COPY version.txt /app/\n"
    repo = GitRepo.create(tmp_path / "refs", {**files, "version.txt": "from-sha\n"},
                          executable=["app.sh", "run-tests.sh"])
    sha = repo.head()
    repo.commit("tagged", {"version.txt": "from-tag\n"})
    repo.tag("v2.0.0", message="release")
    repo.branch("feature/x")
    repo.checkout("feature/x")
    repo.commit("branch", {"version.txt": "from-branch\n"})
    repo.checkout("main")
    repo.commit("main moves on", {"version.txt": "from-main\n"})
    expected = {"feature/x": "from-branch", "v2.0.0": "from-tag", sha: "from-sha", sha[:10]: "from-sha"}
    test = {"commands": ["cat /app/version.txt"]}
    jobs = {ref: submit(service, config(repo_url=str(repo.path), git_ref=ref, test=test)) for ref in expected}
    for ref, job_id in jobs.items():
        final = watch(service.url, job_id)
        _, logs = service.get(f"/json/job/{job_id}/logs?phase=test")
        assert final["status"] == "SUCCEEDED", (ref, final["error"])
        assert expected[ref] in logs["logs"]["test"], ref


def test_repository_served_over_smart_http(service, config, hello_repo, git_http_server):
    url = git_http_server.serve(hello_repo, f"hello-{uuid.uuid4().hex[:6]}")
    _, final, logs = run_job(service, config(repo_url=url))
    assert final["status"] == "SUCCEEDED", logs["build"]
    assert any(url in line for line in logs["build"])


def test_hostile_values_stay_data(service, config, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    status, body = service.post("/json/submitJob", {"job_config": config(git_ref=f"main; touch {marker}")})
    assert status == 400 and body["error"]["data"][0]["field"] == "job_config.git_ref"
    cfg = config(build_args={"BASE_IMAGE": config()["build_args"]["BASE_IMAGE"], "GREETING": f"$(touch {marker})"},
                 test={"commands": ["echo \"it's \\\"quoted\\\"; $QUOTED\"", "cat /app/greeting"],
                       "env": {"QUOTED": f"a'b\"c; touch {marker}"}})
    _, final, logs = run_job(service, cfg)
    assert final["status"] == "SUCCEEDED", logs
    assert f"it's \"quoted\"; a'b\"c; touch {marker}" in logs["test"]
    assert f"$(touch {marker})" in logs["test"]  # the build arg reached the image as text
    assert not marker.exists()


def test_restart_keeps_jobs_logs_and_history(service, config):
    job_id, final, logs = run_job(service, config())
    _, history_before = service.post("/json/getHistory", {"limit": 100})
    service.restart()
    status, after = service.get(f"/json/job/{job_id}/status")
    assert status == 200 and after == final
    assert service.logs(job_id) == logs
    _, history_after = service.post("/json/getHistory", {"limit": 100})
    assert history_after == history_before
    page = [service.post("/json/getHistory", {"limit": 2, "offset": o})[1]["jobs"] for o in range(0, 6, 2)]
    assert [j["id"] for p in page for j in p] == [j["id"] for j in history_before["jobs"]][:6]


@pytest.fixture(scope="module")
def auth_service(tmp_path_factory, registry, base_image, auth_registry):
    """A service whose REGISTRY_AUTH_FILE holds `password` for the auth registry (a job's publish target)."""
    def start(password: str) -> ServiceProcess:
        data = tmp_path_factory.mktemp("auth-service")
        token = base64.b64encode(f"{AUTH_USER}:{password}".encode()).decode()
        (data / "auth.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
        (data / "auth.json").chmod(0o600)
        return ServiceProcess(data, registry.host, REGISTRY_AUTH_FILE=str(data / "auth.json"),
                              JOBFORGE_INSECURE_REGISTRIES=auth_registry.host).start()
    started = []
    yield lambda password: started.append(start(password)) or started[-1]
    for svc in started:
        svc.stop()


def test_publish_to_a_registry_with_basic_auth(auth_service, config, auth_registry):
    svc = auth_service(AUTH_PASSWORD)
    cfg = config(registry_url=auth_registry.host, image_tags=["stable"])
    job_id, final, logs = run_job(svc, cfg)
    assert final["status"] == "SUCCEEDED", logs["publish"]
    assert sorted(auth_registry.tags(cfg["image_name"])) == sorted([job_id, "stable"])


def test_wrong_registry_password_fails_publish_clearly(auth_service, config, auth_registry):
    wrong = "not-the-password-" + uuid.uuid4().hex
    svc = auth_service(wrong)
    _, final, logs = run_job(svc, config(registry_url=auth_registry.host))
    assert (final["status"], final["failed_phase"]) == ("FAILED", "publish")
    assert "rejected the credentials" in final["error"]
    assert any("REGISTRY_USERNAME/REGISTRY_PASSWORD" in line for line in logs["publish"])
    everything = json.dumps([final, logs, svc.post("/json/getHistory", {})[1]]) + svc.log_path.read_text()
    assert wrong not in everything


def test_logs_are_complete_long_lines_and_many_lines(service, config):
    cfg = config(test={"commands": [
        "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done",
        "head -c 300000 /dev/zero | tr '\\0' 'x'; echo",
        "printf 'no trailing newline'",
    ]})
    _, final, logs = run_job(service, cfg)
    assert final["status"] == "SUCCEEDED"
    test_lines = logs["test"]
    numbered = [line for line in test_lines if line.startswith("line ")]
    assert numbered == [f"line {i}" for i in range(20000)]
    assert "x" * 300000 in test_lines
    assert "no trailing newline" in test_lines


def test_ready_metrics_port_and_unreachable_registry(service, tmp_path):
    assert service.get("/ready") == (200, {"status": "ok", "checks": {"store": "ok", "backend": "ok"}})
    metrics_url = f"http://127.0.0.1:{service.env['METRICS_PORT']}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    assert "# TYPE build_duration_seconds histogram" in text and "\nconcurrent_jobs 0.0" in text
    with ServiceProcess(tmp_path / "no-registry", f"127.0.0.1:{free_port()}") as lonely:
        status, body = lonely.get("/ready")
    assert status == 503 and "unreachable" in body["checks"]["registry"]
