"""The real CLI as a subprocess against the fake service: argument handling, output, exit codes, versioning and
history end to end. (The same against the real server: test_cli_e2e.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.cli.conftest import cli_command, cli_env, interruptible, run_cli
from tests.cli.fake_service import error_doc, phase_doc, status_doc
from tests.support.gitrepo import GitRepo

T = "2025-10-10T14:"
BUILD = {"owner": "team", "repo_url": "https://example.invalid/r.git", "image_name": "app",
         "registry_url": "127.0.0.1:5000"}


@pytest.fixture
def workdir(tmp_path):
    """A developer's working copy on a feature branch, with a build.yaml."""
    repo = GitRepo.create(tmp_path / "wc", {"README": "x"}, branch="feature/login_page")
    (repo.path / "build.yaml").write_text(yaml.safe_dump(BUILD))
    return repo.path


def sent_configs(fake):
    return [body["job_config"] for method, path, body in fake.requests if path == "/json/submitJob"]


def cli(fake, *args, cwd, stdin=None):
    return run_cli(*args, cwd=cwd, stdin=stdin, env=cli_env(JOB_SERVICE_URL=fake.url))


def test_submit_prints_json_for_scripts_and_bumps_the_branch_version(fake_service, workdir):
    result = cli(fake_service, "submit-job", "build.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"job_id": "job-1", "status": "PENDING"}  # `| jq -r .job_id` works
    assert sent_configs(fake_service) == [BUILD | {"image_tags": ["feature-login-page-v0.1.1"]}]
    assert yaml.safe_load((workdir / "deploy" / "version.yaml").read_text()) == {
        "version": {"major": 0, "minor": 1, "patch": 1}}
    cli(fake_service, "submit-job", "build.yaml", cwd=workdir)
    assert sent_configs(fake_service)[-1]["image_tags"] == ["feature-login-page-v0.1.2"]


@pytest.mark.parametrize("args", [
    ["submit-job", "--no-version", "--image-tags", "a,b", "build.yaml"],
    ["submit-job", "build.yaml", "--no-version", "--image-tags", "a,b"],
    ["submit-job", "--image-tags=a,b", "build.yaml", "--no-version"],
    ["submit-job", "build.yaml", "--image-tags", "a", "--no-version", "--image-tags", "b"],
])
def test_flags_work_before_and_after_the_config(fake_service, workdir, args):
    result = cli(fake_service, *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert sent_configs(fake_service) == [BUILD | {"image_tags": ["a", "b"]}]


@pytest.mark.parametrize("where", ["first", "after-command", "last"])
def test_url_flag_anywhere(fake_service, tmp_path, where):
    fake_service.jobs["j1"] = status_doc("j1")
    args = {"first": ["--url", fake_service.url, "get-status", "j1"],
            "after-command": ["get-status", "--url", fake_service.url, "j1"],
            "last": ["get-status", "j1", "-u", fake_service.url]}[where]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["job_id"] == "j1"


@pytest.mark.parametrize("args", [["submit-job"], ["submit-job", "-"]])
def test_config_from_stdin(fake_service, workdir, args):
    result = cli(fake_service, *args, "--no-version", cwd=workdir, stdin=json.dumps(BUILD))
    assert result.returncode == 0, result.stderr
    assert sent_configs(fake_service) == [BUILD]


def test_inline_yaml_and_global_deep_merge_with_go_style_flag(fake_service, workdir):
    (workdir / "global.yaml").write_text(yaml.safe_dump(BUILD | {
        "clear_cache": True, "image_tags": ["g"], "test": {"entry_point": True, "env": {"A": "1"}}}))
    inline = "{clear_cache: false, image_tags: [p], test: {env: {B: '2'}}}"
    result = cli(fake_service, "submit-job", "-global", "global.yaml", inline, "--no-version", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert sent_configs(fake_service) == [BUILD | {"clear_cache": False, "image_tags": ["p"],
                                                  "test": {"entry_point": True, "env": {"A": "1", "B": "2"}}}]


def test_invalid_config_exits_2_names_fields_and_sends_nothing(fake_service, workdir):
    bad = BUILD | {"image_name": "../x", "git_ref": "main; touch /tmp/pwned", "test": {"env": {"A=B": "1"}},
                   "colour": "red"}
    result = cli(fake_service, "submit-job", json.dumps(bad), cwd=workdir)
    assert result.returncode == 2
    for field in ("image_name:", "git_ref:", "test.env.A=B:", "colour: unknown field"):
        assert field in result.stderr
    assert fake_service.requests == []
    assert not (workdir / "deploy" / "version.yaml").exists()


def test_server_rejection_exits_2_and_burns_no_version(fake_service, workdir):
    fake_service.reject_submit = error_doc(-32602, "invalid params", [{"field": "registry_url", "rule": "denied"}])
    result = cli(fake_service, "submit-job", "build.yaml", cwd=workdir)
    assert result.returncode == 2
    assert "registry_url: denied" in result.stderr
    assert sent_configs(fake_service)[0]["image_tags"] == ["feature-login-page-v0.1.1"]
    assert not (workdir / "deploy" / "version.yaml").exists()
    fake_service.reject_submit = None
    cli(fake_service, "submit-job", "build.yaml", cwd=workdir)
    assert sent_configs(fake_service)[-1]["image_tags"] == ["feature-login-page-v0.1.1"]


def test_unreachable_service_burns_no_version_and_exits_3(workdir):
    result = run_cli("submit-job", "build.yaml", "--url", "http://127.0.0.1:9", cwd=workdir)
    assert result.returncode == 3
    assert not (workdir / "deploy" / "version.yaml").exists()


def test_concurrent_cli_submissions_get_distinct_versions(fake_service, workdir):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cli(fake_service, "submit-job", "build.yaml", cwd=workdir), range(8)))
    assert [r.returncode for r in results] == [0] * 8
    tags = sorted(c["image_tags"][0] for c in sent_configs(fake_service))
    assert tags == sorted(f"feature-login-page-v0.1.{i}" for i in range(1, 9))
    assert "patch: 8" in (workdir / "deploy" / "version.yaml").read_text()


def test_dry_run_prints_redacted_merged_config_and_touches_nothing(fake_service, workdir):
    secret = BUILD | {"webhook_url": "https://hooks.invalid/x", "webhook_secret": "hmac-key"}
    result = cli(fake_service, "submit-job", json.dumps(secret), "--dry-run", "--image-tags", "x", cwd=workdir)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["webhook_secret"] == "***" and "hmac-key" not in result.stdout
    assert shown["image_tags"] == ["x", "feature-login-page-v0.1.1"]
    assert shown["dockerfile_path"] == "Dockerfile"  # validated: defaults filled in
    as_json = cli(fake_service, "submit-job", "build.yaml", "--dry-run", "--json", "--no-version", cwd=workdir)
    assert json.loads(as_json.stdout)["image_tags"] == []
    assert fake_service.requests == [] and not (workdir / "deploy").exists()


def _finish(fake, job_id, status, failed_phase=None):
    ok = phase_doc("SUCCEEDED", T + "23:46Z", T + "24:46Z", 60.0, attempt=1)
    phases = {"build": ok, "test": phase_doc("SKIPPED"), "publish": ok}
    if failed_phase:
        phases = {"build": phase_doc("FAILED", T + "23:46Z", T + "23:50Z", 4.0, "exit 1", attempt=1),
                  "test": phase_doc(), "publish": phase_doc()}
    final = status_doc(job_id, status, phases=phases, failed_phase=failed_phase,
                       error="exit 1" if failed_phase else None, finished_at=T + "25:00Z", total=75.0,
                       tags=[job_id, "feature-login-page-v0.1.1"])
    running = status_doc(job_id, "BUILDING", phases={"build": phase_doc("RUNNING", T + "23:46Z", attempt=1)})
    fake.watch_scripts[job_id] = [{"type": "status", "job": status_doc(job_id)}, {"type": "status", "job": running},
                                  {"type": "end", "job": final}]
    fake.logs[job_id] = {"build": [{"ts": T + "23:47Z", "stream": "stderr", "line": "RUN false: exit 1"}]}


def test_watch_success_prints_phase_lines_and_published_images(fake_service, workdir):
    _finish(fake_service, "job-1", "SUCCEEDED")
    result = cli(fake_service, "submit-job", "build.yaml", "--watch", cwd=workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("] ", 1)[1] for line in lines[:5]] == [
        "job job-1 PENDING", "build started", "build succeeded in 1m0s", "test skipped", "publish succeeded in 1m0s"]
    assert lines[5].endswith("] job SUCCEEDED in 1m15s")
    assert lines[6:] == ["Published: 127.0.0.1:5000/app:job-1",
                         "Published: 127.0.0.1:5000/app:feature-login-page-v0.1.1"]
    assert "\x1b[" not in result.stdout  # no spinner or colours when stdout is not a terminal


def test_watch_failure_prints_failed_phase_logs_and_exits_1(fake_service, workdir):
    _finish(fake_service, "job-1", "FAILED", failed_phase="build")
    result = cli(fake_service, "submit-job", "build.yaml", "--watch", "--json", cwd=workdir)
    assert result.returncode == 1
    assert json.loads(result.stdout)["failed_phase"] == "build"  # --json: final status on stdout
    assert "build FAILED after 4s: exit 1" in result.stderr
    assert result.stderr.rstrip().endswith("--- build logs ---\nRUN false: exit 1")


def test_history_with_watch_writes_the_deploy_dir(fake_service, workdir):
    _finish(fake_service, "job-1", "FAILED", failed_phase="build")
    (workdir / "build.yaml").write_text(yaml.safe_dump(BUILD | {"deploy_dir": "out/hist"}))
    result = cli(fake_service, "submit-job", "build.yaml", "--history", "--watch", cwd=workdir)
    assert result.returncode == 1
    folder = workdir / "out" / "hist" / "builds" / "job-1"
    assert sorted(p.name for p in folder.iterdir()) == ["build.log", "metadata.yaml", "status.md"]
    status_md = (folder / "status.md").read_text()
    assert "- Build: ❌ FAILED (4s)\n- Test: ⏭️ SKIPPED\n- Publish: ⏭️ SKIPPED" in status_md
    history = (workdir / "out" / "hist" / "history.md").read_text()
    assert history.count("## job-1 ") == 1 and "**Branch**: feature/login_page" in history
    assert "version.yaml" in {p.name for p in (workdir / "out" / "hist").iterdir()}


def test_history_without_watch_records_the_submission(fake_service, workdir):
    result = cli(fake_service, "submit-job", "build.yaml", "--history", cwd=workdir)
    assert result.returncode == 0, result.stderr
    meta = yaml.safe_load((workdir / "deploy" / "builds" / "job-1" / "metadata.yaml").read_text())
    assert (meta["status"], meta["branch"], meta["tags"]) == ("PENDING", "feature/login_page",
                                                              ["job-1", "feature-login-page-v0.1.1"])
    assert "⏳ PENDING" in (workdir / "deploy" / "history.md").read_text()


def test_unusable_deploy_dir_fails_before_submitting(fake_service, workdir):
    (workdir / "blocker").write_text("a file, not a directory")
    (workdir / "build.yaml").write_text(yaml.safe_dump(BUILD | {"deploy_dir": "blocker/deploy"}))
    result = cli(fake_service, "submit-job", "build.yaml", "--history", "--no-version", cwd=workdir)
    assert result.returncode != 0
    assert fake_service.requests == []


def test_read_commands_json_and_human(fake_service, tmp_path):
    fake_service.jobs["j1"] = status_doc("j1", "FAILED", failed_phase="test", error="exit 3", total=9.0,
                                         finished_at=T + "23:54Z")
    fake_service.logs["j1"] = {"build": [{"ts": T + "23:46Z", "stream": "stdout", "line": "built"}]}
    for args, check in [
        (["get-status", "j1"], lambda out: json.loads(out)["status"] == "FAILED"),
        (["get-status", "j1", "--human"], lambda out: out.startswith("j1  FAILED in test: exit 3\n")),
        (["get-logs", "j1"], lambda out: json.loads(out)["logs"]["build"] == ["built"]),
        (["get-logs", "j1", "build", "--human"], lambda out: out == "built\n"),
        (["get-logs", "--human", "j1"], lambda out: out == "==> build <==\nbuilt\n"),
        (["get-history"], lambda out: json.loads(out)["total"] == 1),
        (["get-history", "5", "0", "--owner", "team", "--status", "FAILED"],
         lambda out: json.loads(out)["jobs"][0]["id"] == "j1"),
        (["get-history", "--owner", "nobody", "5"], lambda out: json.loads(out)["jobs"] == []),
        (["get-history", "--human"], lambda out: "j1" in out and out.rstrip().endswith("1-1 of 1")),
        (["cleanup", "j1"], lambda out: json.loads(out)["cleaned"] == ["temp image", "workdir"]),
        (["health"], lambda out: out.startswith("live: ok\nready: ok")),
    ]:
        result = cli(fake_service, *args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert check(result.stdout), (args, result.stdout)
    assert [r[2] for r in fake_service.requests if r[1] == "/json/getHistory"][1] == {
        "limit": 5, "offset": 0, "owner": "team", "status": "FAILED"}


@pytest.mark.parametrize("args, code, message", [
    (["get-status", "nope"], 2, "error: job nope not found"),
    (["kill-job", "done"], 2, "error: job done already finished"),
    (["get-logs", "j1", "deploy"], 2, "Invalid value"),
    (["get-history", "0"], 2, "LIMIT"),
    (["get-status"], 2, "JOB_ID"),
    (["no-such-command"], 2, "Unknown command"),
])
def test_usage_and_request_errors_exit_2(fake_service, tmp_path, args, code, message):
    fake_service.jobs["done"] = status_doc("done", "SUCCEEDED")
    result = cli(fake_service, *args, cwd=tmp_path)
    assert result.returncode == code
    assert message in result.stderr + result.stdout


def test_health_not_ready_exits_1(fake_service, tmp_path):
    fake_service.ready_ok = False
    result = cli(fake_service, "health", "--json", cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout)["ready"]["checks"]["backend"] == "buildah missing"


def test_get_logs_follow_prints_backlog_then_pushed_lines_once(fake_service, tmp_path):
    fake_service.jobs["j2"] = status_doc("j2", "BUILDING")
    line = {"ts": T + "23:47Z", "stream": "stdout", "line": "old"}
    fake_service.logs["j2"] = {"build": [line]}
    fake_service.watch_scripts["j2"] = [
        {"type": "status", "job": status_doc("j2", "BUILDING")},
        {"type": "log", "phase": "build", "log": line},  # also in the backlog: printed once
        {"type": "log", "phase": "build", "log": line | {"ts": T + "23:48Z", "line": "new"}},
        {"type": "log", "phase": "test", "log": line | {"ts": T + "23:49Z", "line": "testing"}},
        {"type": "end", "job": status_doc("j2", "SUCCEEDED", finished_at=T + "24:00Z")},
    ]
    result = cli(fake_service, "get-logs", "j2", "--follow", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "[build] old\n[build] new\n[test] testing\n")
    only_build = cli(fake_service, "get-logs", "j2", "build", "--follow", cwd=tmp_path)
    assert only_build.stdout == "old\nnew\n"


def test_ctrl_c_stops_watching_not_the_job(fake_service, tmp_path):
    fake_service.jobs["j3"] = status_doc("j3", "BUILDING")
    fake_service.watch_scripts["j3"] = [{"type": "status", "job": status_doc("j3", "BUILDING")}]
    fake_service.hold_open.add("j3")
    proc = subprocess.Popen([*cli_command(), "watch", "j3"], cwd=tmp_path,
                            env=cli_env(JOB_SERVICE_URL=fake_service.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    first = proc.stdout.readline()  # the watch is live once the first state is printed
    assert first.endswith("job j3 BUILDING\n")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Resume with: jobforge watch j3" in err
    assert not any(r[1] == "/json/killJob" for r in fake_service.requests)


def test_version_commands(tmp_path):
    GitRepo.create(tmp_path, {"f": "1"}, branch="release/2.x")
    assert run_cli("version-minor", "4", cwd=tmp_path).stdout == "0.4.0\n"
    assert run_cli("version-major", "3", cwd=tmp_path).stdout == "3.0.0\n"
    info = run_cli("version-info", cwd=tmp_path)
    assert info.stdout == "version:  3.0.0\nbranch:   release/2.x\nnext tag: release-2.x-v3.0.1\n"
    as_json = json.loads(run_cli("version-info", "--json", "--deploy-dir", "deploy", cwd=tmp_path).stdout)
    assert as_json == {"version": "3.0.0", "branch": "release/2.x", "next_version": "3.0.1",
                       "next_tag": "release-2.x-v3.0.1"}
    assert run_cli("version-major", "-1", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("command", ["", "submit-job", "get-status", "get-logs", "kill-job", "cleanup",
                                     "get-history", "health", "watch", "version-info", "version-major",
                                     "version-minor"])
def test_help_reads_well(tmp_path, command):
    result = run_cli(*filter(None, [command, "--help"]), cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage: jobforge" in result.stdout
    assert "--url" in result.stdout
