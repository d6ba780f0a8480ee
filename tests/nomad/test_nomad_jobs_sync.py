"""nomad-jobs/ holds exactly a fresh render of the default jobs (`make nomad-jobs` re-renders them)."""

from __future__ import annotations

from pathlib import Path

from jobforge.nomad.render import default_job_files

JOBS_DIR = Path(__file__).resolve().parents[2] / "nomad-jobs"


def test_committed_jobs_equal_a_fresh_render():
    expected = default_job_files()
    committed = {p.name: p.read_text(encoding="utf-8") for p in JOBS_DIR.glob("*.hcl")}
    assert sorted(committed) == sorted(expected), "run `make nomad-jobs`"
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale: run `make nomad-jobs`"
