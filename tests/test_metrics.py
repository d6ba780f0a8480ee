"""The pure parts of metrics and logging: control lines, what a phase's end records, fleet gauges from records,
log line formats."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import datetime, timedelta, timezone

from jobforge import logs
from jobforge.config import JobConfig
from jobforge.control import ControlLines
from jobforge.metrics import Metrics, fleet_snapshot
from jobforge.models import JobRecord, JobStatus, Phase
from jobforge.pipeline import CacheUse, PhaseFailed, PhaseSucceeded, ResourceUsage

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def record(status: JobStatus, finished_ago: timedelta | None) -> JobRecord:
    cfg = JobConfig.model_validate({"owner": "o", "repo_url": "https://git.example/r.git", "image_name": "i",
                                    "registry_url": "registry.example"})
    finished = NOW - finished_ago if finished_ago is not None else None
    return JobRecord(job_id="j", config=cfg, status=status, image_tags=["latest"],
                     submitted_at=(finished or NOW) - timedelta(minutes=1), finished_at=finished)


NONCE = "5f0c3d9e8a7b6c5d4e3f2a1b0c9d8e7f"


def test_only_a_line_with_the_phases_nonce_is_a_control_line():
    control = ControlLines(NONCE)
    report = '{"hits": 9, "misses": 0}'
    for forged in (f"::jobforge-cache {report}", '::jobforge-usage {"cpu_seconds": 1, "max_rss_bytes": 1}',
                   f"::jobforge-0123 cache {report}", f" ::jobforge-{NONCE} cache {report}",
                   f"::jobforge-{NONCE[:-1]} cache {report}", f"::jobforge-{NONCE}"):
        assert control.take(forged) is False, forged
    assert control.cache is None
    assert control.take(f'::jobforge-{NONCE} cache {{"hits": 3, "misses": 1}}') is True
    assert control.cache == CacheUse(hits=3, misses=1)
    assert control.take(f'::jobforge-{NONCE} cache {{"hits": -1}}') is True  # ours, but broken: dropped, ignored
    assert control.cache == CacheUse(hits=3, misses=1)
    assert ControlLines("").take('::jobforge- cache {"hits": 1, "misses": 0}') is False  # no nonce: nothing is one


def test_a_phase_end_records_what_its_backend_measured():
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    metrics.phase_ended(PhaseSucceeded(phase=Phase.BUILD, attempt=1, at=at, cache=CacheUse(hits=2, misses=1),
                                       usage=ResourceUsage(cpu_seconds=12.5, memory_peak_bytes=3 << 20)))
    assert value("resource_usage", {"resource_type": "cpu", "phase": "build"}) == 12.5
    assert value("resource_usage", {"resource_type": "memory", "phase": "build"}) == 3 << 20
    assert value("build_cache_steps_total", {"result": "hit"}) == 2
    metrics.phase_ended(PhaseFailed(phase=Phase.TEST, attempt=1, at=at, error="x"))  # nothing measured
    assert value("resource_usage", {"resource_type": "cpu", "phase": "test"}) is None
    assert value("build_cache_steps_total", {"result": "hit"}) == 2


def test_cache_hit_ratio_is_hits_over_all_cacheable_steps_seen():
    metrics = Metrics()
    metrics.cache(CacheUse(hits=0, misses=3))
    metrics.cache(CacheUse(hits=3, misses=0))
    metrics.cache(CacheUse(hits=0, misses=0))
    value = metrics.registry.get_sample_value
    assert value("build_cache_steps_total", {"result": "hit"}) == 3
    assert value("build_cache_steps_total", {"result": "miss"}) == 3
    assert value("build_cache_hit_ratio") == 0.5


def test_fleet_snapshot_counts_and_windows():
    unfinished = [record(JobStatus.BUILDING, None), record(JobStatus.PENDING, None), record(JobStatus.PENDING, None)]
    finished = [record(JobStatus.SUCCEEDED, timedelta(minutes=10)), record(JobStatus.FAILED, timedelta(hours=2)),
                record(JobStatus.SUCCEEDED, timedelta(days=2)), record(JobStatus.FAILED, timedelta(days=8))]
    snap = fleet_snapshot(unfinished, finished, NOW)
    assert (snap.running, snap.queued) == (1, 2)
    assert snap.success_rate == {"1h": 1.0, "24h": 0.5, "7d": 2 / 3}
    assert fleet_snapshot([], [], NOW).success_rate == {"1h": None, "24h": None, "7d": None}


def test_a_window_without_jobs_has_no_series():
    metrics = Metrics()
    metrics.fleet(fleet_snapshot([], [record(JobStatus.SUCCEEDED, timedelta(minutes=1))], NOW))
    metrics.fleet(fleet_snapshot([], [], NOW))
    assert metrics.registry.get_sample_value("job_success_rate", {"window": "1h"}) is None


def _emit(fmt: str, **extra) -> str:
    stream = io.StringIO()
    logs.configure("info", fmt, stream)
    try:
        logging.getLogger("jobforge.service").info("Job submitted successfully", extra=extra)
    finally:
        logging.getLogger().handlers.clear()
    return stream.getvalue()


def test_json_lines_carry_the_job_id():
    line = json.loads(_emit("json", job_id="abc", owner="team a"))
    assert line["msg"] == "Job submitted successfully" and line["job_id"] == "abc" and line["level"] == "info"
    assert line["ts"].endswith("+00:00")


def test_text_lines_are_key_value_with_quoting():
    text = _emit("text", job_id="abc", owner="team a")
    assert 'msg="Job submitted successfully"' in text and "job_id=abc" in text and 'owner="team a"' in text


async def test_the_job_context_reaches_tasks_started_in_it_and_none_clears_it():
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    log = logging.getLogger("jobforge.service")

    async def in_a_task() -> None:
        log.warning("job job-a: from a task started inside")

    try:
        with logs.about_job("job-a"):
            log.info("inside")
            await asyncio.create_task(in_a_task())
            with logs.about_job(None):  # e.g. an admission pass started by job-a's end
                log.info("about no single job")
            log.info("job job-b: named explicitly", extra={"job_id": "job-b"})
        log.info("outside")
    finally:
        logging.getLogger().handlers.clear()
    got = [(line["msg"], line.get("job_id")) for line in map(json.loads, stream.getvalue().splitlines())]
    assert got == [("inside", "job-a"), ("job job-a: from a task started inside", "job-a"),
                   ("about no single job", None), ("job job-b: named explicitly", "job-b"), ("outside", None)]
