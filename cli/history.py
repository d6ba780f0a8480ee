"""Local build history under ``<deploy_dir>/``: per-job records and one ``history.md``, formats as in the reference.

    deploy/builds/<job_id>/metadata.yaml   submission facts, then the final state (with --watch)
    deploy/builds/<job_id>/status.md       human summary (with --watch)
    deploy/builds/<job_id>/<phase>.log     complete phase logs (with --watch)
    deploy/history.md                      newest first, exactly one entry per job, updated in place

Times are real UTC (the reference labelled local time as UTC). Formatting is pure; `History` only writes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from jobforge_cli._files import atomic_write, locked
from jobforge.models import PHASES, JobStatus, JobStatusResult, LogsResult, PhaseStatus

HISTORY_HEADER = "# Build History\n"
STATUS_EMOJI = {"SUCCEEDED": "✅", "FAILED": "❌", "PENDING": "⏳", "BUILDING": "🔄", "TESTING": "🔄",
                "PUBLISHING": "🔄", "RUNNING": "🔄", "SKIPPED": "⏭️"}
_PHASE_WORD = {"SUCCEEDED": "SUCCESS"}  # status.md says SUCCESS for a phase, as the reference does


class _Timestamp(str):
    """A UTC time that YAML writes unquoted (``2025-10-10T14:23:45Z``), as in the reference metadata."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Timestamp, lambda d, v: d.represent_scalar("tag:yaml.org,2002:timestamp", str(v)))


def utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float | None) -> str:
    """Whole seconds, Go style: ``42s``, ``4m27s``, ``1h2m3s``."""
    if seconds is None:
        return "-"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def phase_statuses(job: JobStatusResult) -> dict[str, str]:
    """Per phase status; once the job is finished, phases that never ran are SKIPPED."""
    out = {}
    for phase in PHASES:
        summary = job.phases.get(phase)
        status = summary.status if summary else PhaseStatus.PENDING
        if job.status.terminal and status in (PhaseStatus.PENDING, PhaseStatus.RUNNING):
            status = PhaseStatus.SKIPPED
        out[phase.value] = status.value
    return out


def _phase_duration(job: JobStatusResult, phase: str) -> float | None:
    summary = next((s for p, s in job.phases.items() if p.value == phase), None)
    return summary.duration if summary else None


def image_of(config: dict[str, Any]) -> str:
    return f"{config.get('registry_url', '')}/{config.get('image_name', '')}"


def status_md(job: JobStatusResult, branch: str | None) -> str:
    config, phases = job.config, phase_statuses(job)
    lines = [f"# Build Status: {job.job_id}", "",
             f"{STATUS_EMOJI.get(job.status.value, '')} Status: {job.status.value}",
             f"**Branch**: {branch or '-'}",
             f"**Git Ref**: {config.get('git_ref', 'main')}",
             f"**Started**: {iso(job.submitted_at)}",
             f"**Completed**: {iso(job.finished_at) or '-'}",
             f"**Duration**: {human_duration(job.metrics.total_duration)}"]
    if job.status == JobStatus.FAILED:
        lines += [f"**Failed Phase**: {job.failed_phase.value if job.failed_phase else '-'}",
                  f"**Error**: {job.error or '-'}"]
    lines += ["", "## Phases"]
    for phase, status in phases.items():
        word = f"{STATUS_EMOJI.get(status, '')} {_PHASE_WORD.get(status, status)}"
        duration = _phase_duration(job, phase)
        ran = status in ("SUCCEEDED", "FAILED") and duration is not None
        lines.append(f"- {phase.capitalize()}: {word}" + (f" ({human_duration(duration)})" if ran else ""))
    lines += ["", "## Image",
              f"- Registry: {config.get('registry_url', '')}",
              f"- Image: {config.get('image_name', '')}",
              f"- Tags: {', '.join(job.image_tags)}", ""]
    return "\n".join(lines)


def submission_metadata(job_id: str, submitted_at: datetime, branch: str | None, config: dict[str, Any],
                        tags: list[str]) -> dict[str, Any]:
    return {"job_id": job_id, "submitted_at": _Timestamp(iso(submitted_at)), "status": "PENDING",
            "branch": branch, "git_ref": config.get("git_ref", "main"), "image": image_of(config), "tags": tags,
            "job_config": config}


def final_metadata(job: JobStatusResult, branch: str | None) -> dict[str, Any]:
    build = next((s for p, s in job.phases.items() if p.value == "build"), None)
    started = build.started_at if build else None
    stamp = lambda ts: None if ts is None else _Timestamp(iso(ts))  # noqa: E731
    return {
        "job_id": job.job_id, "submitted_at": stamp(job.submitted_at), "started_at": stamp(started),
        "completed_at": stamp(job.finished_at), "status": job.status.value, "branch": branch,
        "git_ref": job.config.get("git_ref", "main"),
        "duration": human_duration(job.metrics.total_duration),
        "failed_phase": job.failed_phase.value if job.failed_phase else None, "error": job.error,
        "image": image_of(job.config), "tags": job.image_tags, "job_config": job.config,
        "phases": {phase: {"status": status, "duration": human_duration(_phase_duration(job, phase))
                           if status in ("SUCCEEDED", "FAILED") else None}
                   for phase, status in phase_statuses(job).items()},
    }


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def history_entry(*, job_id: str, at: datetime, branch: str | None, git_ref: str, status: str,
                  duration: float | None, tags: list[str], failed_phase: str | None = None,
                  error: str | None = None) -> str:
    """One ``history.md`` entry; `at` is the submission time while pending, the completion time once done."""
    status_text = f"{STATUS_EMOJI.get(status, '')} {status}"
    if failed_phase:
        status_text += f" ({failed_phase})"
    lines = [f"## {job_id} ({utc(at).strftime('%Y-%m-%d %H:%M:%S')} UTC)",
             f"**Branch**: {branch or '-'} | **Git Ref**: {git_ref}",
             f"**Status**: {status_text} | **Duration**: {human_duration(duration)}",
             f"**Tags**: {', '.join(tags)}"]
    if error:
        lines.append(f"**Error**: {' '.join(error.split())}")
    return "\n".join(lines) + "\n"


_ENTRY_START = re.compile(r"^## (\S+) \(", re.MULTILINE)


def upsert_entry(text: str, job_id: str, entry: str) -> str:
    """Replace the job's entry in place, or put it first; other entries are kept verbatim."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY_START.finditer(text)]
    entries = [(jid, text[s:e].rstrip("\n") + "\n") for (s, jid), (e, _) in zip(starts, starts[1:] + [(len(text), "")])]
    if any(jid == job_id for jid, _ in entries):
        entries = [(jid, entry if jid == job_id else body) for jid, body in entries]
    else:
        entries.insert(0, (job_id, entry))
    return HISTORY_HEADER + "".join("\n" + body for _, body in entries)


class History:
    """Writes one deploy dir's history; every file is replaced atomically, ``history.md`` under a lock."""

    def __init__(self, deploy_dir: Path) -> None:
        self.root = deploy_dir
        self.builds = deploy_dir / "builds"

    def prepare(self) -> None:
        """Create the directories before submitting, so an unusable deploy dir fails the command early."""
        self.builds.mkdir(parents=True, exist_ok=True)

    def _upsert(self, job_id: str, entry: str) -> None:
        path = self.root / "history.md"
        with locked(self.root / ".history.lock"):
            text = path.read_text(encoding="utf-8") if path.exists() else HISTORY_HEADER
            atomic_write(path, upsert_entry(text, job_id, entry))

    def record_submission(self, job_id: str, submitted_at: datetime, branch: str | None,
                          config: dict[str, Any], tags: list[str]) -> None:
        meta = submission_metadata(job_id, submitted_at, branch, config, tags)
        atomic_write(self.builds / job_id / "metadata.yaml", dump_yaml(meta))
        self._upsert(job_id, history_entry(job_id=job_id, at=submitted_at, branch=branch,
                                           git_ref=meta["git_ref"], status="PENDING", duration=None, tags=tags))

    def record_final(self, job: JobStatusResult, branch: str | None, logs: LogsResult | None) -> None:
        folder = self.builds / job.job_id
        statuses = phase_statuses(job)
        for phase, status in statuses.items():  # the reference's three log files; server extras stay there
            lines = logs.logs.get(phase, []) if logs else []
            if lines or status in ("SUCCEEDED", "FAILED"):
                atomic_write(folder / f"{phase}.log", "".join(line.rstrip("\n") + "\n" for line in lines))
        atomic_write(folder / "metadata.yaml", dump_yaml(final_metadata(job, branch)))
        atomic_write(folder / "status.md", status_md(job, branch))
        self._upsert(job.job_id, history_entry(
            job_id=job.job_id, at=job.finished_at or job.submitted_at, branch=branch,
            git_ref=job.config.get("git_ref", "main"), status=job.status.value,
            duration=job.metrics.total_duration, tags=job.image_tags,
            failed_phase=job.failed_phase.value if job.failed_phase else None, error=job.error))
