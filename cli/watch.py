"""Following a job live over the server's push stream (no polling).

Prints one line per phase change with the elapsed time since submission; when stdout is a terminal a rich
spinner shows the current status below those lines. At the end: ``Published: registry/image:tag`` lines on
success, the failed phase's logs on failure. Ctrl-C stops watching, never the job.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from jobforge_cli.history import human_duration, phase_statuses, utc
from jobforge_cli.terminal import for_terminal, sanitize
from jobforge.client import Client
from jobforge.errors import JobForgeError
from jobforge.models import PHASES, JobStatus, JobStatusResult

EXIT_INTERRUPTED = 130


def _elapsed(job: JobStatusResult, at: datetime | None, now: datetime) -> str:
    """``[1m5s]`` since submission, at the event's own server time when known (so a resumed watch is exact)."""
    seconds = (utc(at or now) - utc(job.submitted_at)).total_seconds()
    return f"[{human_duration(max(0.0, seconds))}]"


def change_lines(previous: dict[str, str] | None, job: JobStatusResult,
                 now: datetime) -> tuple[list[str], dict[str, str]]:
    """Lines for what changed since `previous` (None = first sight of the job) and the new state to keep."""
    state = {"job": job.status.value, **phase_statuses(job)}
    before = previous or {"job": "", **{p.value: "PENDING" for p in PHASES}}
    lines = [] if previous else [f"{_elapsed(job, None if job.status.terminal else now, now)} "
                                 f"job {job.job_id} {job.status.value}"]
    for phase in PHASES:
        name, status = phase.value, state[phase.value]
        if status == before[name] or status == "PENDING":
            continue
        summary = job.phases.get(phase)
        started, ended = (summary.started_at, summary.ended_at) if summary else (None, None)
        took = human_duration(summary.duration) if summary and summary.duration is not None else "-"
        error = (summary.error if summary else None) or job.error or ""
        lines.append({
            "RUNNING": f"{_elapsed(job, started, now)} {name} started",
            "SUCCEEDED": f"{_elapsed(job, ended, now)} {name} succeeded in {took}",
            "FAILED": f"{_elapsed(job, ended, now)} {name} FAILED after {took}: {error}",
        }.get(status, f"{_elapsed(job, ended or job.finished_at, now)} {name} {status.lower()}"))
    if job.status.terminal and before["job"] != job.status.value:
        at, total = _elapsed(job, job.finished_at, now), human_duration(job.metrics.total_duration)
        if job.status == JobStatus.SUCCEEDED:
            lines.append(f"{at} job SUCCEEDED in {total}")
        else:
            where = f" in {job.failed_phase.value}" if job.failed_phase else ""
            lines.append(f"{at} job FAILED{where} after {total}: {job.error or 'no error message'}")
    return lines, state


def published_lines(job: JobStatusResult) -> list[str]:
    image = f"{job.config.get('registry_url', '')}/{job.config.get('image_name', '')}"
    return [f"Published: {image}:{tag}" for tag in job.image_tags]


class _Display:
    """Plain lines, plus a spinner line with the live elapsed time when attached to a terminal."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.tty = tty
        self.console = Console(file=out, highlight=False, markup=False, soft_wrap=True, force_terminal=tty)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=self.console, transient=True) if tty else None
        self.task = self.progress.add_task("connecting", total=None) if self.progress else None

    def __enter__(self) -> "_Display":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def print(self, line: str) -> None:
        self.console.print(sanitize(line) if self.tty else line)

    def status(self, job: JobStatusResult) -> None:
        if self.progress and self.task is not None:
            phase = f" ({job.current_phase.value})" if job.current_phase else ""
            self.progress.update(self.task, description=sanitize(f"{job.job_id} {job.status.value}{phase}"))


def follow(client: Client, job_id: str, out: TextIO, tty: bool) -> JobStatusResult | None:
    """Render the stream until the job ends; None if the user pressed Ctrl-C."""
    job, state = None, None
    try:
        with _Display(out, tty) as display:
            for update in client.watch(job_id):
                if update.job is None:
                    continue
                job = update.job
                lines, state = change_lines(state, job, datetime.now(UTC))
                for line in lines:
                    display.print(line)
                display.status(job)
    except KeyboardInterrupt:
        print(f"\nStopped watching; job {job_id} keeps running. Resume with: jobforge watch {job_id}",
              file=sys.stderr)
        return None
    return job


def watch_job(client: Client, job_id: str, *, out: TextIO, tty: bool,
              on_finish: Callable[[JobStatusResult], None] | None = None) -> tuple[int, JobStatusResult | None]:
    """Follow, then report; returns (exit code, final job). `on_finish` failures only warn."""
    job = follow(client, job_id, out, tty)
    if job is None:
        return EXIT_INTERRUPTED, None
    if job.status == JobStatus.FAILED and job.failed_phase is not None:
        logs = client.get_logs(job_id, phase=job.failed_phase).logs.get(job.failed_phase.value, [])
        print(f"--- {job.failed_phase.value} logs ---", file=out)
        for line in logs:
            print(for_terminal(line, out), file=out)
    elif job.status == JobStatus.SUCCEEDED:
        for line in published_lines(job):
            print(for_terminal(line, out), file=out)
    if on_finish is not None:
        try:
            on_finish(job)
        except (OSError, JobForgeError) as exc:  # history is a convenience: it must not change the outcome
            print(f"warning: could not write local history: {exc}", file=sys.stderr)
    return (0 if job.status == JobStatus.SUCCEEDED else 1), job


def follow_logs(client: Client, job_id: str, phase: str | None, out: TextIO) -> int:
    """Print the logs so far, then each line the server pushes, until the job ends (``get-logs --follow``).

    The stream is subscribed before the backlog is fetched, so no line falls in between; lines that arrive in
    both are printed once (same phase, timestamp and text).
    """
    def show(line_phase: str, text: str) -> None:
        if phase is None or line_phase == phase:
            print(for_terminal(text if phase else f"[{line_phase}] {text}", out), file=out, flush=True)

    job, seen = None, None
    try:
        for update in client.watch(job_id, logs=True):
            if seen is None:  # subscribed: now the backlog cannot miss anything
                backlog = client.get_logs(job_id, phase=phase, structured=True).entries or {}
                seen = {(name, e.ts, e.line) for name, entries in backlog.items() for e in entries}
                for name, entries in backlog.items():
                    for entry in entries:
                        show(name, entry.line)
            if update.type == "log" and update.log is not None and update.phase is not None:
                if (update.phase.value, update.log.ts, update.log.line) not in seen:
                    show(update.phase.value, update.log.line)
            elif update.job is not None:
                job = update.job
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0 if job is None or job.status != JobStatus.FAILED else 1
