"""The real ``jobforge`` CLI as a subprocess against the real ``jobforge-service`` (local backend) on 127.0.0.1.

Tests without `e2e` use jobs that fail fast at the clone (no buildah needed) or never reach the backend; tests
marked `e2e` build examples/hello for real with buildah, skopeo and docker-registry. Completion is awaited on
the CLI's own watch (the server's push stream), never by sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.cli.conftest import cli_command, cli_env, interruptible, run_cli
from tests.support.gitrepo import GitRepo
from tests.support.invalid_configs import INVALID
from tests.support.service import ServiceProcess

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
BRANCH = "feature/cli_e2e@x"
TAG = "feature-cli-e2e-x-v0.1.1"


@pytest.fixture(scope="module")
def service(tmp_path_factory, registry):
    with ServiceProcess(tmp_path_factory.mktemp("cli-service"), registry.host, MAX_CONCURRENT_JOBS="4") as svc:
        yield svc


@pytest.fixture
def wc(tmp_path, registry):
    """A developer's working copy on a feature branch, with deploy/global.yaml and a per-build build.yaml.

    The repo to build does not exist, so jobs fail fast in the build phase (at the clone)."""
    repo = GitRepo.create(tmp_path / "wc", {"README": "x"}, branch=BRANCH)
    (repo.path / "deploy").mkdir()
    (repo.path / "deploy" / "global.yaml").write_text(yaml.safe_dump({
        "owner": "cli-e2e", "repo_url": str(tmp_path / "no-such-repo.git"), "image_name": "cli-e2e",
        "registry_url": registry.host, "clear_cache": True, "image_tags": ["global-tag"],
        "test": {"entry_point": True, "env": {"A": "1", "B": "2"}, "commands": ["true"]},
    }))
    (repo.path / "build.yaml").write_text(yaml.safe_dump({
        "git_ref": "develop", "clear_cache": False, "image_tags": ["build-tag"],
        "test": {"env": {"B": "override", "C": "3"}},
    }))
    return repo.path


def jf(service, *args, cwd, stdin=None, timeout=120):
    return run_cli(*args, cwd=cwd, stdin=stdin, env=cli_env(JOB_SERVICE_URL=service.url), timeout=timeout)


def history_total(service) -> int:
    return service.rpc("getHistory", {"limit": 1})["result"]["total"]


def test_submit_merges_deeply_versions_and_prints_json(service, wc):
    result = jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml", "--image-tags", "x,y",
                cwd=wc)
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]  # what `| jq -r .job_id` reads
    status = json.loads(jf(service, "get-status", job_id, cwd=wc).stdout)
    config = status["config"]
    assert config["git_ref"] == "develop"
    assert config["clear_cache"] is False  # false overrides true
    assert config["test"]["entry_point"] is True and config["test"]["commands"] == ["true"]  # nested merge
    assert config["test"]["env"] == {"A": "1", "B": "override", "C": "3"}
    assert status["image_tags"] == [job_id, "build-tag", "x", "y", TAG]  # lists replaced, then appended
    assert "patch: 1" in (wc / "deploy" / "version.yaml").read_text()


@pytest.mark.parametrize("order", ["flags-first", "flags-last", "mixed"])
def test_flags_before_and_after_the_config_really_apply(service, wc, order):
    args = {"flags-first": ["--watch", "--no-version", "--global", "deploy/global.yaml", "build.yaml"],
            "flags-last": ["build.yaml", "--global", "deploy/global.yaml", "--no-version", "--watch"],
            "mixed": ["--global", "deploy/global.yaml", "build.yaml", "--watch", "--no-version"]}[order]
    result = jf(service, "submit-job", *args, cwd=wc)
    assert result.returncode == 1, result.stderr  # watched to the end: the clone fails
    assert "build FAILED after" in result.stdout and "--- build logs ---" in result.stdout
    assert not (wc / "deploy" / "version.yaml").exists()  # --no-version honoured wherever it stands


def test_config_from_stdin(service, wc):
    build = (wc / "build.yaml").read_text()
    result = jf(service, "submit-job", "--global", "deploy/global.yaml", "--no-version", cwd=wc, stdin=build)
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    assert json.loads(jf(service, "get-status", job_id, cwd=wc).stdout)["config"]["git_ref"] == "develop"


def test_invalid_configs_exit_2_with_field_names_and_dispatch_nothing(service, tmp_path):
    before = history_total(service)

    def run(case):
        name, config, field, rule = case
        return case, jf(service, "submit-job", "--no-version", cwd=tmp_path, stdin=json.dumps(config))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, INVALID))
    for (name, _, field, rule), result in results:
        assert result.returncode == 2, (name, result.stderr)
        assert f"  {field}: " in result.stderr and rule in result.stderr, (name, result.stderr)
    assert history_total(service) == before
    assert len(INVALID) >= 25


def test_request_rejected_by_the_server_burns_no_version(service, wc):
    # Valid for the model but over the service's 1 MiB body limit: only the server can refuse it (413).
    blobs = {f"BLOB{i}": "x" * 60_000 for i in range(20)}  # each value within its 64 KiB limit, together > 1 MiB
    big = yaml.safe_load((wc / "build.yaml").read_text()) | {"build_args": blobs}
    (wc / "big.yaml").write_text(yaml.safe_dump(big))
    result = jf(service, "submit-job", "--global", "deploy/global.yaml", "big.yaml", cwd=wc)
    assert result.returncode == 2, result.stderr
    assert "1048576" in result.stderr
    assert not (wc / "deploy" / "version.yaml").exists()
    ok = jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml", cwd=wc)
    job_id = json.loads(ok.stdout)["job_id"]
    assert json.loads(jf(service, "get-status", job_id, cwd=wc).stdout)["image_tags"][-1] == TAG


def test_concurrent_submissions_get_distinct_patch_numbers(service, wc):
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml",
                                             cwd=wc), range(6)))
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    tags = set()
    for r in results:
        status = json.loads(jf(service, "get-status", json.loads(r.stdout)["job_id"], cwd=wc).stdout)
        tags.add(status["image_tags"][-1])
    assert tags == {f"feature-cli-e2e-x-v0.1.{i}" for i in range(1, 7)}


def test_history_and_watch_record_a_build_failure(service, wc):
    result = jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml", "--history", "--watch",
                cwd=wc)
    assert result.returncode == 1, result.stderr
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if " job " in line)
    folder = wc / "deploy" / "builds" / job_id
    assert {p.name for p in folder.iterdir()} >= {"metadata.yaml", "status.md", "build.log"}
    status_md = (folder / "status.md").read_text()
    assert "❌ Status: FAILED" in status_md and f"**Branch**: {BRANCH}" in status_md
    assert "- Test: ⏭️ SKIPPED\n- Publish: ⏭️ SKIPPED" in status_md
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert (meta["status"], meta["failed_phase"], meta["branch"]) == ("FAILED", "build", BRANCH)
    assert (folder / "build.log").read_text().strip()
    history = (wc / "deploy" / "history.md").read_text()
    assert history.count(f"## {job_id} ") == 1 and "❌ FAILED (build)" in history


def test_every_read_command_and_exit_codes(service, wc):
    sub = jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml", "--no-version", cwd=wc)
    job_id = json.loads(sub.stdout)["job_id"]
    watched = jf(service, "watch", job_id, cwd=wc)
    assert watched.returncode == 1 and "job FAILED in build" in watched.stdout
    status = jf(service, "get-status", job_id, cwd=wc)
    assert (status.returncode, json.loads(status.stdout)["failed_phase"]) == (0, "build")
    assert jf(service, "get-status", "--human", job_id, cwd=wc).stdout.startswith(f"{job_id}  FAILED in build")
    logs = json.loads(jf(service, "get-logs", job_id, cwd=wc).stdout)
    assert set(logs["logs"]) >= {"build", "test", "publish"} and logs["logs"]["build"]
    build_only = jf(service, "get-logs", job_id, "build", "--human", cwd=wc)
    assert build_only.returncode == 0 and build_only.stdout.strip()
    follow = jf(service, "get-logs", job_id, "--follow", cwd=wc)
    assert follow.returncode == 1 and follow.stdout.startswith("[build] ")
    history = json.loads(jf(service, "get-history", "1", "0", "--owner", "cli-e2e", "--status", "FAILED",
                            cwd=wc).stdout)
    assert history["limit"] == 1 and history["jobs"][0]["config"]["owner"] == "cli-e2e"
    page2 = json.loads(jf(service, "get-history", "--status", "FAILED", "1", "1", cwd=wc).stdout)
    assert page2["offset"] == 1 and page2["jobs"][0]["id"] != history["jobs"][0]["id"]
    assert json.loads(jf(service, "cleanup", job_id, cwd=wc).stdout)["job_id"] == job_id
    assert jf(service, "cleanup", job_id, cwd=wc).returncode == 0  # idempotent
    killed = jf(service, "kill-job", job_id, cwd=wc)
    assert killed.returncode == 2 and "error:" in killed.stderr  # finished: conflict
    assert jf(service, "get-status", "no-such-job", cwd=wc).returncode == 2
    health = jf(service, "health", "--json", cwd=wc)
    assert json.loads(health.stdout)["live"]["status"] == "ok"
    assert run_cli("get-history", "--url", "http://127.0.0.1:9", cwd=wc).returncode == 3


def test_version_commands_in_a_real_repo(service, wc):
    assert jf(service, "version-minor", "5", cwd=wc).stdout == "0.5.0\n"
    info = jf(service, "version-info", cwd=wc).stdout
    assert info == f"version:  0.5.0\nbranch:   {BRANCH}\nnext tag: feature-cli-e2e-x-v0.5.1\n"
    assert jf(service, "version-major", "2", cwd=wc).stdout == "2.0.0\n"
    sub = jf(service, "submit-job", "--global", "deploy/global.yaml", "build.yaml", cwd=wc)
    job_id = json.loads(sub.stdout)["job_id"]
    assert json.loads(jf(service, "get-status", job_id, cwd=wc).stdout)["image_tags"][-1] == \
        "feature-cli-e2e-x-v2.0.1"


# ------------------------------------------------------------------------ real builds


@pytest.fixture
def hello_wc(tmp_path, registry, base_image):
    """examples/hello as the working copy itself (branch feature/hello_world), with its build.yaml filled in."""
    repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE, branch="feature/hello_world")
    text = (EXAMPLE / "build.yaml").read_text()
    text = text.replace("__REPO_URL__", str(repo.path)).replace("__REGISTRY__", registry.host)
    text = text.replace("git_ref: main", "git_ref: feature/hello_world")
    (repo.path / "build.yaml").write_text(text)
    return repo


@pytest.mark.e2e
def test_real_build_success_with_watch_and_history(service, hello_wc, registry):
    result = jf(service, "submit-job", "build.yaml", "--image-tags", "cli", "--watch", "--history",
                cwd=hello_wc.path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if " job " in line)
    tag = "feature-hello-world-v0.1.1"
    published = [line for line in result.stdout.splitlines() if line.startswith("Published: ")]
    assert published == [f"Published: {registry.host}/hello:{t}" for t in (job_id, "latest", "demo", "cli", tag)]
    assert {job_id, "latest", "demo", "cli", tag} <= set(registry.tags("hello"))
    folder = hello_wc.path / "deploy" / "builds" / job_id
    assert {p.name for p in folder.iterdir()} == {"metadata.yaml", "status.md", "build.log", "test.log",
                                                 "publish.log"}
    status_md = (folder / "status.md").read_text()
    assert "✅ Status: SUCCEEDED" in status_md and "- Publish: ✅ SUCCESS (" in status_md
    assert "ok: Hello, tester! (mode: ci)" in (folder / "test.log").read_text()
    assert "✅ SUCCEEDED" in (hello_wc.path / "deploy" / "history.md").read_text()


@pytest.mark.e2e
def test_real_test_failure_records_test_failed_and_publish_skipped(service, hello_wc, registry):
    hello_wc.commit("break the test", {"run-tests.sh": "#!/bin/sh\necho 'assertion failed' >&2\nexit 4\n"},
                    executable=["run-tests.sh"])
    result = jf(service, "submit-job", "build.yaml", "--watch", "--history", "--image-tags", "never",
                cwd=hello_wc.path, timeout=600)
    assert result.returncode == 1
    assert "--- test logs ---" in result.stdout and "assertion failed" in result.stdout
    assert "never" not in registry.tags("hello")
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if " job " in line)
    status_md = (hello_wc.path / "deploy" / "builds" / job_id / "status.md").read_text()
    assert "- Build: ✅ SUCCESS (" in status_md and "- Test: ❌ FAILED (" in status_md
    assert "- Publish: ⏭️ SKIPPED" in status_md


@pytest.mark.e2e
def test_real_publish_failure_to_a_registry_needing_auth(service, hello_wc, auth_registry):
    build = yaml.safe_load((hello_wc.path / "build.yaml").read_text()) | {"registry_url": auth_registry.host}
    result = jf(service, "submit-job", json.dumps(build), "--watch", "--history", "--no-version",
                cwd=hello_wc.path, timeout=600)
    assert result.returncode == 1
    assert "--- publish logs ---" in result.stdout
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if " job " in line)
    meta = yaml.safe_load((hello_wc.path / "deploy" / "builds" / job_id / "metadata.yaml").read_text())
    assert meta["failed_phase"] == "publish"
    assert [meta["phases"][p]["status"] for p in ("build", "test", "publish")] == ["SUCCEEDED", "SUCCEEDED",
                                                                                   "FAILED"]


@pytest.mark.e2e
def test_ctrl_c_stops_watching_then_kill_job_stops_the_build(service, hello_wc):
    hello_wc.commit("slow build", {"Dockerfile": "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN sleep 120\n"})
    job_id = json.loads(jf(service, "submit-job", "build.yaml", "--no-version", cwd=hello_wc.path).stdout)["job_id"]
    watcher = subprocess.Popen([*cli_command(), "watch", job_id], cwd=hello_wc.path,
                               env=cli_env(JOB_SERVICE_URL=service.url), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    for line in watcher.stdout:  # wait until the CLI reports the running build
        if line.rstrip().endswith("build started"):
            break
    watcher.send_signal(signal.SIGINT)
    _, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 130 and f"Resume with: jobforge watch {job_id}" in err
    assert json.loads(jf(service, "get-status", job_id, cwd=hello_wc.path).stdout)["status"] == "BUILDING"
    killed = jf(service, "kill-job", job_id, cwd=hello_wc.path)
    assert killed.returncode == 0, killed.stderr
    resumed = jf(service, "watch", job_id, cwd=hello_wc.path, timeout=120)
    assert resumed.returncode == 1 and "killed by user" in resumed.stdout
