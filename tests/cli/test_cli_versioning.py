"""Branch-aware versioning (cli.versioning): tag sanitising, real git working copies, locking."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from jobforge_cli import versioning
from jobforge_cli.versioning import Version, current_branch, read_version, reserve, sanitize_branch, set_version, version_tag
from jobforge.config import IMAGE_TAG_PATTERN
from jobforge.errors import ConfigError
from tests.cli.conftest import REPO_ROOT
from tests.support.gitrepo import GitRepo

V = Version(1, 2, 3)
LONG = "feature/" + "x" * 192  # 200 characters


@pytest.mark.parametrize("branch, tag", [
    ("main", "main-v1.2.3"),
    ("feature/new-api", "feature-new-api-v1.2.3"),
    ("fix_some_bug", "fix-some-bug-v1.2.3"),
    ("user@laptop/topic", "user-laptop-topic-v1.2.3"),
    ("feature//weird__name--x", "feature-weird-name-x-v1.2.3"),
    ("Überprüfung/café", "Uberprufung-cafe-v1.2.3"),
    ("日本語-branch", "branch-v1.2.3"),
    ("feature/日本語/x", "feature-x-v1.2.3"),
    ("a×b", "a-b-v1.2.3"),
    ("-/_leading and trailing_/-", "leading-and-trailing-v1.2.3"),
    ("release/1.x", "release-1.x-v1.2.3"),
    ("🚀", "v1.2.3"),
    (None, "v1.2.3"),
])
def test_version_tag_is_sanitised(branch, tag):
    assert version_tag(branch, V) == tag
    assert re.fullmatch(IMAGE_TAG_PATTERN, tag)


def test_long_branch_is_cut_to_128_characters_keeping_the_version():
    tag = version_tag(LONG, Version(10, 20, 300))
    assert len(tag) == 128
    assert tag == "feature-" + "x" * (128 - len("feature-") - len("-v10.20.300")) + "-v10.20.300"
    assert re.fullmatch(IMAGE_TAG_PATTERN, tag)


def test_cut_never_leaves_a_dash_before_the_version():
    branch = "a" * 120 + "-" + "b" * 50  # 121 characters fit: the cut lands right after the "-"
    tag = version_tag(branch, V)
    assert tag == "a" * 120 + "-v1.2.3"


def test_sanitize_collapses_runs_and_trims():
    assert sanitize_branch("a  b//c__d@@e") == "a-b-c-d-e"
    assert sanitize_branch("..x..") == "x"


@pytest.mark.parametrize("branch", ["feature/auth", "fix_typo", "me@host", "ünïcödé", LONG])
def test_current_branch_from_a_real_working_copy(tmp_path, branch):
    repo = GitRepo.create(tmp_path / "wc", {"f": "1"}, branch=branch)
    (repo.path / "sub").mkdir()
    assert current_branch(repo.path / "sub") == branch


def test_detached_head_uses_the_short_sha(tmp_path):
    repo = GitRepo.create(tmp_path / "wc", {"f": "1"})
    sha = repo.commit("second", {"f": "2"})
    repo.checkout(sha)
    assert current_branch(repo.path) == sha[:7]
    assert version_tag(current_branch(repo.path), V) == f"{sha[:7]}-v1.2.3"


def test_outside_git_there_is_no_branch(tmp_path):
    assert current_branch(tmp_path) is None


def test_missing_file_starts_at_0_1_0_and_reservations_bump_the_patch(tmp_path):
    assert read_version(tmp_path) == Version(0, 1, 0)
    with reserve(tmp_path, "main") as r:
        assert (r.version, r.tag) == (Version(0, 1, 1), "main-v0.1.1")
        r.commit()
    assert (tmp_path / "version.yaml").read_text() == "version:\n  major: 0\n  minor: 1\n  patch: 1\n"


def test_rejected_submission_burns_no_number(tmp_path):
    with pytest.raises(ConfigError):
        with reserve(tmp_path, "main") as r:
            assert r.tag == "main-v0.1.1"
            raise ConfigError("rejected by the server")
    assert not (tmp_path / "version.yaml").exists()
    with reserve(tmp_path, "main") as r:
        assert r.tag == "main-v0.1.1"


def test_version_major_and_minor(tmp_path):
    with reserve(tmp_path, None) as r:
        r.commit()
    assert set_version(tmp_path, minor=4) == Version(0, 4, 0)
    assert set_version(tmp_path, major=2) == Version(2, 0, 0)
    assert set_version(tmp_path, minor=7) == Version(2, 7, 0)
    assert versioning.peek(tmp_path, "dev") == (Version(2, 7, 0), Version(2, 7, 1), "dev-v2.7.1")


@pytest.mark.parametrize("text", ["version: 3", "version: {major: 1, minor: x, patch: 0}", "[1, 2",
                                  "version: {major: -1, minor: 0, patch: 0}"])
def test_malformed_version_file_is_a_config_error(tmp_path, text):
    (tmp_path / "version.yaml").write_text(text)
    with pytest.raises(ConfigError, match="version.yaml"):
        read_version(tmp_path)


def test_concurrent_threads_get_distinct_patch_numbers(tmp_path):
    n = 16
    start, tags, errors = threading.Barrier(n), [], []

    def submit() -> None:
        start.wait()
        try:
            with reserve(tmp_path, "main") as r:
                tags.append(r.tag)
                r.commit()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(tags, key=lambda t: int(t.rsplit(".", 1)[1])) == [f"main-v0.1.{i}" for i in range(1, n + 1)]
    assert read_version(tmp_path) == Version(0, 1, n)


def test_concurrent_processes_get_distinct_patch_numbers(tmp_path):
    code = ("import sys; from pathlib import Path; from jobforge_cli.versioning import reserve\n"
            "with reserve(Path(sys.argv[1]), 'main') as r:\n    r.commit()\n    print(r.tag)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    tags = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(tags) == sorted(f"main-v0.1.{i}" for i in range(1, 9))
