"""The real ``jobforge`` CLI against the real ``jobforge-service`` with an API tokens file: ``--token`` and
``JOBFORGE_TOKEN`` reach every transport (REST and the WebSocket watch), refusals exit 4 with a clear message.

Jobs use a repository that cannot be cloned, so they fail fast in the build phase without buildah."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import cli_env, run_cli
from tests.support.service import ServiceProcess

OPS = "ops-token-for-every-owner-1"
ANN = "ann-token-only-for-ann-0001"
CONFIG = {"owner": "ann", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "test": {"commands": ["true"]}}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("auth-service")
    tokens = data / "tokens"
    tokens.write_text(f"{OPS}\n{ANN} ann\n")
    tokens.chmod(0o600)
    with ServiceProcess(data, "127.0.0.1:5000", JOBFORGE_API_TOKENS_FILE=str(tokens)) as svc:
        svc.token = OPS
        yield svc


def jf(service, *args, tmp_path, token_env: str | None = None, stdin: str | None = None):
    env = {k: v for k, v in cli_env(JOB_SERVICE_URL=service.url).items() if k != "JOBFORGE_TOKEN"}
    if token_env:
        env["JOBFORGE_TOKEN"] = token_env
    return run_cli(*args, cwd=tmp_path, env=env, stdin=stdin)


def submit_as(service, owner: str) -> str:
    status, body = service.post("/json/submitJob", {"job_config": {**CONFIG, "owner": owner}})
    assert status == 200, body
    return body["job_id"]


def test_without_a_token_the_cli_exits_4_and_says_how_to_pass_one(service, tmp_path):
    result = jf(service, "get-history", tmp_path=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "missing bearer token" in result.stderr and "--token" in result.stderr
    assert "JOBFORGE_TOKEN" in result.stderr
    result = jf(service, "get-history", "--token", "wrong-token-0000000000", tmp_path=tmp_path)
    assert result.returncode == 4 and "invalid bearer token" in result.stderr


def test_token_from_the_option_or_the_environment(service, tmp_path):
    job_id = submit_as(service, "ann")
    by_option = jf(service, "--token", OPS, "get-status", job_id, tmp_path=tmp_path)
    assert by_option.returncode == 0, by_option.stderr
    assert json.loads(by_option.stdout)["job_id"] == job_id
    by_env = jf(service, "get-status", job_id, tmp_path=tmp_path, token_env=ANN)
    assert by_env.returncode == 0, by_env.stderr
    by_option_after = jf(service, "get-history", "--token", ANN, tmp_path=tmp_path)
    assert by_option_after.returncode == 0
    assert {j["config"]["owner"] for j in json.loads(by_option_after.stdout)["jobs"]} == {"ann"}


def test_another_owners_job_exits_4_not_allowed(service, tmp_path):
    bob_job = submit_as(service, "bob")
    for args in (("get-status", bob_job), ("get-logs", bob_job), ("kill-job", bob_job), ("watch", bob_job)):
        result = jf(service, *args, tmp_path=tmp_path, token_env=ANN)
        assert result.returncode == 4, (args, result.stderr)
        assert "not allowed" in result.stderr and "bob" in result.stderr
    result = jf(service, "submit-job", "-", "--no-version", tmp_path=tmp_path, token_env=ANN,
                stdin=json.dumps({**CONFIG, "owner": "bob"}))
    assert result.returncode == 4 and "owner 'bob'" in result.stderr


def test_submit_and_watch_over_the_websocket_with_a_token(service, tmp_path):
    result = jf(service, "submit-job", "-", "--no-version", "--watch", "--json", tmp_path=tmp_path, token_env=ANN,
                stdin=json.dumps(CONFIG))
    assert result.returncode == 1, result.stderr  # the clone fails: the job ends FAILED in build
    final = json.loads(result.stdout)
    assert final["status"] == "FAILED" and final["failed_phase"] == "build"
    logs = jf(service, "get-logs", final["job_id"], "build", "--follow", tmp_path=tmp_path, token_env=ANN)
    assert logs.returncode == 1 and logs.stdout.strip()
