"""What the commands print: JSON where the reference printed JSON, short text where a person reads it.

Text goes through `show`/`error`, which strip terminal control sequences on a terminal (`jobforge_cli.terminal`);
JSON needs nothing: it escapes every control character.
"""

from __future__ import annotations

import sys
from typing import TextIO

from pydantic import BaseModel

from jobforge_cli.history import human_duration, iso, phase_statuses
from jobforge_cli.terminal import for_terminal
from jobforge.models import HealthResult, HistoryResult, JobStatusResult, LogsResult


def show(text: str, out: TextIO | None = None) -> None:
    """Print human-readable text, made safe for a terminal (build output and configs are untrusted)."""
    out = out or sys.stdout
    print(for_terminal(text, out), file=out)


def emit_json(model: BaseModel) -> None:
    print(model.model_dump_json(indent=2))


def status_text(job: JobStatusResult) -> str:
    head = f"{job.job_id}  {job.status.value}"
    if job.failed_phase:
        head += f" in {job.failed_phase.value}"
    if job.error:
        head += f": {job.error}"
    lines = [head]
    for phase, status in phase_statuses(job).items():
        summary = next((s for p, s in job.phases.items() if p.value == phase), None)
        took = human_duration(summary.duration) if summary and summary.duration is not None else ""
        lines.append(f"  {phase:<8} {status:<10} {took}".rstrip())
    image = f"{job.config.get('registry_url', '')}/{job.config.get('image_name', '')}"
    lines.append(f"  image    {image}  tags: {', '.join(job.image_tags)}")
    lines.append(f"  submitted {iso(job.submitted_at)}  finished {iso(job.finished_at) or '-'}  "
                 f"duration {human_duration(job.metrics.total_duration)}")
    return "\n".join(lines)


def history_text(history: HistoryResult) -> str:
    rows = [f"{'JOB':<34} {'STATUS':<11} {'OWNER':<14} {'SUBMITTED':<21} {'DURATION':<9} IMAGE"]
    for job in history.jobs:
        image = f"{job.config.get('registry_url', '')}/{job.config.get('image_name', '')}"
        rows.append(f"{job.job_id:<34} {job.status.value:<11} {str(job.config.get('owner', '')):<14} "
                    f"{iso(job.submitted_at):<21} {human_duration(job.metrics.total_duration):<9} {image}")
    end = history.offset + len(history.jobs)
    rows.append(f"{history.offset + 1 if history.jobs else 0}-{end} of {history.total}")
    return "\n".join(rows)


def logs_text(logs: LogsResult, phase: str | None) -> str:
    if phase:
        return "\n".join(logs.logs.get(phase, []))
    return "\n".join(f"==> {name} <==\n" + "\n".join(lines) for name, lines in logs.logs.items() if lines)


def health_text(live: HealthResult, ready: HealthResult) -> str:
    lines = [f"live: {live.status}", f"ready: {ready.status}"]
    lines += [f"  {name}: {value}" for name, value in ready.checks.items()]
    return "\n".join(lines)


def error(message: str, fields: list[dict[str, str]] | None = None) -> None:
    lines = [f"error: {message}"]
    lines += [f"  {item.get('field') or '<config>'}: {item.get('rule')}" for item in fields or []]
    show("\n".join(lines), sys.stderr)
