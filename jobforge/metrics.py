"""Prometheus metrics, named as in the reference service (`build_duration_seconds`, ...), linted clean.

Each `Metrics` owns its registry, so tests and several services in one process never share counters. Events
(a phase ended, a job finished, a request served) are counted where they happen; gauges that describe the whole
fleet of jobs (`concurrent_jobs`, `queued_jobs`, `job_success_rate`) are computed from the store at scrape time,
so they survive restarts and agree between replicas. The reference's `concurrent_jobs_total` is a gauge with a
counter's suffix, which `promtool check metrics` rejects: ours is `concurrent_jobs` (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobforge.models import JobRecord, JobStatus, Phase, PhaseStatus
from jobforge.pipeline import CacheUse, PhaseEnded

_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}

@dataclass(frozen=True)
class FleetSnapshot:
    """Counts derived from stored records at one instant (pure: `fleet_snapshot`)."""

    running: int
    queued: int
    success_rate: dict[str, float | None]


def fleet_snapshot(unfinished: Iterable[JobRecord], finished: Iterable[JobRecord], now: datetime) -> FleetSnapshot:
    """Running/queued counts and success rate per window; a window without finished jobs has no rate."""
    unfinished = list(unfinished)
    running = sum(1 for r in unfinished if r.status.running)
    queued = sum(1 for r in unfinished if r.status is JobStatus.PENDING)
    rates: dict[str, float | None] = {}
    finished = [r for r in finished if r.status.terminal and r.finished_at is not None]
    for window, span in WINDOWS.items():
        inside = [r for r in finished if r.finished_at >= now - span]
        ok = sum(1 for r in inside if r.status is JobStatus.SUCCEEDED)
        rates[window] = ok / len(inside) if inside else None
    return FleetSnapshot(running=running, queued=queued, success_rate=rates)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.phase_duration = {
            phase: Histogram(f"{phase.value}_duration_seconds", f"{phase.value} phase duration in seconds",
                             ["status"], buckets=_BUCKETS, registry=self.registry)
            for phase in Phase
        }
        self.jobs_submitted = Counter("jobs_submitted", "jobs accepted", registry=self.registry)
        self.jobs = Counter("jobs", "jobs finished, by final status and the phase that failed ('none' on success)",
                            ["status", "failed_phase"], registry=self.registry)
        self.concurrent = Gauge("concurrent_jobs", "jobs building, testing or publishing now (from the store)",
                                registry=self.registry)
        self.queued = Gauge("queued_jobs", "jobs accepted and waiting for a slot (from the store)",
                            registry=self.registry)
        self.success_rate = Gauge("job_success_rate", "succeeded / finished jobs that finished within the window",
                                  ["window"], registry=self.registry)
        self.resource_usage = Gauge("resource_usage",
                                    "last finished phase's usage as its backend measured it: cpu in seconds, "
                                    "memory as peak bytes",
                                    ["resource_type", "phase"], registry=self.registry)
        self.http_duration = Histogram("http_request_duration_seconds", "API request duration by route template",
                                       ["method", "route", "code"], buckets=_HTTP_BUCKETS, registry=self.registry)
        self.event_stream_lag = Histogram("nomad_event_stream_lag_seconds",
                                          "nomad backend: time from Nomad recording an allocation change to the "
                                          "service acting on it", buckets=_HTTP_BUCKETS, registry=self.registry)
        self.cache_steps = Counter("build_cache_steps", "cacheable build steps by result: hit (taken from the local "
                                   "store or the registry cache) or miss (built)", ["result"], registry=self.registry)
        self.cache_hit_ratio = Gauge("build_cache_hit_ratio", "hits / cacheable build steps, over the builds this "
                                     "replica has seen since it started", registry=self.registry)
        self._cache_counts = [0, 0]
        self.webhook_deliveries = Counter("webhook_deliveries", "webhook delivery attempts by outcome "
                                          "(delivered, retry, failed, refused)", ["outcome"], registry=self.registry)

        # Every known series exists from the start (at 0), so the first job is a visible increase to rate().
        for phase in Phase:
            for status in (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED):
                self.phase_duration[phase].labels(status=status.value)
        self.cache_steps.labels(result="hit")
        self.cache_steps.labels(result="miss")
        self.jobs.labels(status=JobStatus.SUCCEEDED.value, failed_phase="none")
        for phase in Phase:
            self.jobs.labels(status=JobStatus.FAILED.value, failed_phase=phase.value)

    def event_lag(self, seconds: float) -> None:
        self.event_stream_lag.observe(seconds)

    def submitted(self) -> None:
        self.jobs_submitted.inc()

    def transition(self, old: JobRecord, new: JobRecord) -> None:
        for phase, run in new.phases.items():
            ended = run.status in (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED)
            if ended and old.phases[phase].status != run.status and run.duration_seconds is not None:
                self.phase_duration[phase].labels(status=run.status.value).observe(run.duration_seconds)
        if new.status.terminal and not old.status.terminal:
            failed = new.failed_phase.value if new.failed_phase else "none"
            self.jobs.labels(status=new.status.value, failed_phase=failed).inc()

    def phase_ended(self, event: PhaseEnded) -> None:
        """What the backend measured of the phase (`resource_usage`) and its build's cache use."""
        if event.usage is not None:
            phase = event.phase.value
            self.resource_usage.labels(resource_type="cpu", phase=phase).set(event.usage.cpu_seconds)
            self.resource_usage.labels(resource_type="memory", phase=phase).set(event.usage.memory_peak_bytes)
        if event.cache is not None:
            self.cache(event.cache)

    def cache(self, use: CacheUse) -> None:
        self.cache_steps.labels(result="hit").inc(use.hits)
        self.cache_steps.labels(result="miss").inc(use.misses)
        self._cache_counts[0] += use.hits
        self._cache_counts[1] += use.hits + use.misses
        if self._cache_counts[1]:
            self.cache_hit_ratio.set(self._cache_counts[0] / self._cache_counts[1])

    def request(self, method: str, route: str, code: int, seconds: float) -> None:
        self.http_duration.labels(method=method, route=route, code=str(code)).observe(seconds)

    def webhook_outcome(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def fleet(self, snapshot: FleetSnapshot) -> None:
        self.concurrent.set(snapshot.running)
        self.queued.set(snapshot.queued)
        for window, rate in snapshot.success_rate.items():
            if rate is None:
                try:
                    self.success_rate.remove(window)
                except KeyError:
                    pass
            else:
                self.success_rate.labels(window=window).set(rate)
