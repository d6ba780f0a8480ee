"""Local build history files (cli.history): formats as in the reference README, one entry per job."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml

from jobforge_cli.history import History, human_duration, status_md, upsert_entry
from jobforge.models import JobStatusResult, LogsResult
from tests.cli.fake_service import phase_doc, status_doc

T = "2025-10-10T14:"


def succeeded() -> JobStatusResult:
    doc = status_doc(
        "abc123def456", "SUCCEEDED", finished_at=T + "28:12Z", total=267.0, tags=["abc123def456", "v1.0.0"],
        image_name="my-service", registry_url="registry.cluster:5000", git_ref="refs/heads/main",
        phases={"build": phase_doc("SUCCEEDED", T + "23:46Z", T + "26:01Z", 135.2, attempt=1),
                "test": phase_doc("SUCCEEDED", T + "26:01Z", T + "27:31Z", 89.6, attempt=1),
                "publish": phase_doc("SUCCEEDED", T + "27:31Z", T + "28:12Z", 41.5, attempt=1)})
    return JobStatusResult.model_validate(doc)


def failed_in(phase: str, *, later_reported_as: str = "PENDING") -> JobStatusResult:
    order = ["build", "test", "publish"]
    phases = {}
    for p in order:
        if order.index(p) < order.index(phase):
            phases[p] = phase_doc("SUCCEEDED", T + "23:46Z", T + "24:46Z", 60.0, attempt=1)
        elif p == phase:
            phases[p] = phase_doc("FAILED", T + "24:46Z", T + "24:58Z", 12.0, f"{phase} step exited 1", attempt=1)
        else:
            phases[p] = phase_doc(later_reported_as)
    doc = status_doc("job-f", "FAILED", failed_phase=phase, error=f"{phase} step exited 1",
                     finished_at=T + "24:58Z", total=73.0, phases=phases)
    return JobStatusResult.model_validate(doc)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42, "42s"), (41.5, "42s"), (135, "2m15s"), (267, "4m27s"),
                                           (3600, "1h0m0s"), (3723, "1h2m3s"), (None, "-")])
def test_durations_read_like_the_reference(seconds, text):
    assert human_duration(seconds) == text


def test_status_md_success_matches_the_reference_format():
    assert status_md(succeeded(), "main") == """\
# Build Status: abc123def456

✅ Status: SUCCEEDED
**Branch**: main
**Git Ref**: refs/heads/main
**Started**: 2025-10-10T14:23:45Z
**Completed**: 2025-10-10T14:28:12Z
**Duration**: 4m27s

## Phases
- Build: ✅ SUCCESS (2m15s)
- Test: ✅ SUCCESS (1m30s)
- Publish: ✅ SUCCESS (42s)

## Image
- Registry: registry.cluster:5000
- Image: my-service
- Tags: abc123def456, v1.0.0
"""


@pytest.mark.parametrize("phase, lines", [
    ("build", ["- Build: ❌ FAILED (12s)", "- Test: ⏭️ SKIPPED", "- Publish: ⏭️ SKIPPED"]),
    ("test", ["- Build: ✅ SUCCESS (1m0s)", "- Test: ❌ FAILED (12s)", "- Publish: ⏭️ SKIPPED"]),
    ("publish", ["- Build: ✅ SUCCESS (1m0s)", "- Test: ✅ SUCCESS (1m0s)", "- Publish: ❌ FAILED (12s)"]),
])
@pytest.mark.parametrize("later", ["PENDING", "SKIPPED"])
def test_status_md_failure_in_each_phase(phase, lines, later):
    text = status_md(failed_in(phase, later_reported_as=later), "dev")
    assert "❌ Status: FAILED\n" in text
    assert f"**Failed Phase**: {phase}\n**Error**: {phase} step exited 1\n" in text
    assert "## Phases\n" + "\n".join(lines) + "\n" in text
    assert "**Duration**: 1m13s" in text


def test_full_record_success(tmp_path):
    history = History(tmp_path / "deploy")
    history.prepare()
    job = succeeded()
    history.record_submission(job.job_id, datetime(2025, 10, 10, 14, 23, 45, tzinfo=UTC), "main",
                              job.config, job.image_tags)
    folder = tmp_path / "deploy" / "builds" / "abc123def456"
    pending = (folder / "metadata.yaml").read_text()
    assert "submitted_at: 2025-10-10T14:23:45Z\nstatus: PENDING\nbranch: main\ngit_ref: refs/heads/main\n" in pending
    logs = LogsResult(job_id=job.job_id, logs={"build": ["step 1", "done"], "test": ["ok"], "publish": ["pushed"]})
    history.record_final(job, "main", logs)
    assert sorted(p.name for p in folder.iterdir()) == ["build.log", "metadata.yaml", "publish.log", "status.md",
                                                        "test.log"]
    assert (folder / "build.log").read_text() == "step 1\ndone\n"
    meta_text = (folder / "metadata.yaml").read_text()
    assert meta_text.startswith("job_id: abc123def456\nsubmitted_at: 2025-10-10T14:23:45Z\n"
                                "started_at: 2025-10-10T14:23:46Z\ncompleted_at: 2025-10-10T14:28:12Z\n"
                                "status: SUCCEEDED\nbranch: main\ngit_ref: refs/heads/main\n")
    meta = yaml.safe_load(meta_text)
    assert meta["phases"] == {"build": {"status": "SUCCEEDED", "duration": "2m15s"},
                              "test": {"status": "SUCCEEDED", "duration": "1m30s"},
                              "publish": {"status": "SUCCEEDED", "duration": "42s"}}
    assert (meta["failed_phase"], meta["error"], meta["image"], meta["tags"]) == (
        None, None, "registry.cluster:5000/my-service", ["abc123def456", "v1.0.0"])
    assert meta["job_config"]["webhook_secret"] == "***"
    assert (tmp_path / "deploy" / "history.md").read_text() == """\
# Build History

## abc123def456 (2025-10-10 14:28:12 UTC)
**Branch**: main | **Git Ref**: refs/heads/main
**Status**: ✅ SUCCEEDED | **Duration**: 4m27s
**Tags**: abc123def456, v1.0.0
"""


@pytest.mark.parametrize("phase", ["build", "test", "publish"])
def test_full_record_failure_in_each_phase(tmp_path, phase):
    history = History(tmp_path)
    job = failed_in(phase)
    ran = ["build", "test", "publish"][: ["build", "test", "publish"].index(phase) + 1]
    logs = LogsResult(job_id="job-f", logs={p: [f"{p} output"] if p in ran else [] for p in ("build", "test",
                                                                                              "publish")})
    history.record_final(job, "dev", logs)
    folder = tmp_path / "builds" / "job-f"
    assert sorted(p.stem for p in folder.glob("*.log")) == sorted(ran)
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert meta["failed_phase"] == phase and meta["status"] == "FAILED"
    statuses = {p: v["status"] for p, v in meta["phases"].items()}
    expected = {p: "SUCCEEDED" if p in ran[:-1] else "FAILED" if p == phase else "SKIPPED"
                for p in ("build", "test", "publish")}
    assert statuses == expected
    entry = (tmp_path / "history.md").read_text()
    assert f"**Status**: ❌ FAILED ({phase}) | **Duration**: 1m13s\n" in entry
    assert f"**Error**: {phase} step exited 1\n" in entry


def test_history_md_has_one_entry_per_job_newest_first_updated_in_place(tmp_path):
    history = History(tmp_path)
    at = datetime(2025, 10, 10, 14, 23, 45, tzinfo=UTC)
    history.record_submission("job-f", at, "dev", {"git_ref": "main"}, ["job-f"])
    history.record_submission("job-2", at.replace(minute=30), "dev", {"git_ref": "main"}, ["job-2"])
    history.record_final(failed_in("test"), "dev", None)
    history.record_final(failed_in("test"), "dev", None)  # a repeated watch must not add a second entry
    text = (tmp_path / "history.md").read_text()
    assert text.count("## job-f ") == 1 and text.count("## job-2 ") == 1
    assert text.index("## job-2 ") < text.index("## job-f ")
    assert "## job-2 (2025-10-10 14:30:45 UTC)\n**Branch**: dev | **Git Ref**: main\n" \
           "**Status**: ⏳ PENDING | **Duration**: -\n**Tags**: job-2\n" in text
    assert "## job-f (2025-10-10 14:24:58 UTC)" in text


def test_upsert_keeps_other_entries_verbatim():
    text = "# Build History\n\n## a (x UTC)\nA\n\n## b (y UTC)\nB\n"
    assert upsert_entry(text, "b", "## b (z UTC)\nB2\n") == "# Build History\n\n## a (x UTC)\nA\n\n## b (z UTC)\nB2\n"
    assert upsert_entry(text, "c", "## c (w UTC)\nC\n").startswith("# Build History\n\n## c (w UTC)\nC\n\n## a")


def test_history_writes_are_atomic_no_temp_files_left(tmp_path):
    history = History(tmp_path)
    history.record_final(succeeded(), "main", None)
    leftovers = [p.name for p in tmp_path.rglob(".*.tmp")]
    assert leftovers == []
