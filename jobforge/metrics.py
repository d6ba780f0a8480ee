"""Prometheus metrics, named as in the reference service (`build_duration_seconds`, ...).

Each `Metrics` owns its registry, so tests and several services in one process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobforge.models import JobRecord, JobStatus, Phase, PhaseStatus

_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.phase_duration = {
            phase: Histogram(f"{phase.value}_duration_seconds", f"{phase.value} phase duration", ["status"],
                             buckets=_BUCKETS, registry=self.registry)
            for phase in Phase
        }
        self.jobs_submitted = Counter("jobs_submitted_total", "jobs accepted", registry=self.registry)
        self.jobs_finished = Counter("jobs_finished_total", "jobs finished", ["status"], registry=self.registry)
        self.concurrent = Gauge("concurrent_jobs_total", "jobs currently building, testing or publishing",
                                registry=self.registry)
        self.success_rate = Gauge("job_success_rate", "succeeded / finished jobs since start", ["window"],
                                  registry=self.registry)
        self.webhook_deliveries = Counter("webhook_deliveries", "webhook delivery attempts by outcome "
                                          "(delivered, retry, failed, refused)", ["outcome"], registry=self.registry)
        self._finished = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 0}

    def webhook_outcome(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def submitted(self) -> None:
        self.jobs_submitted.inc()

    def transition(self, old: JobRecord, new: JobRecord) -> None:
        if old.status.running != new.status.running:
            self.concurrent.inc() if new.status.running else self.concurrent.dec()
        for phase, run in new.phases.items():
            ended = run.status in (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED)
            if ended and old.phases[phase].status != run.status and run.duration_seconds is not None:
                self.phase_duration[phase].labels(status=run.status.value).observe(run.duration_seconds)
        if new.status.terminal and not old.status.terminal:
            self.jobs_finished.labels(status=new.status.value).inc()
            self._finished[new.status] += 1
            total = sum(self._finished.values())
            self.success_rate.labels(window="process").set(self._finished[JobStatus.SUCCEEDED] / total)
