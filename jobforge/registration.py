"""How the service presents itself to Consul: the two service names and their checks.

One definition for both ways a replica gets registered: the Nomad job's `service` blocks
(templates/nomad/jobforge-service.nomad.hcl.j2) and, outside Nomad, the agent registration of
`JOBFORGE_CONSUL_REGISTER=true` (jobforge.consul_agent). The CLI looks up `SERVICE_NAME`
(jobforge/client/_discovery.py); Prometheus discovers `METRICS_SERVICE_NAME` (docs/prometheus.yml) and scrapes
the path in its `metrics_path` meta.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["CHECKS", "METRICS_PATH", "METRICS_SERVICE_NAME", "SERVICE_NAME", "SERVICE_TAGS", "Check"]

SERVICE_NAME = "jobforge-service"
METRICS_SERVICE_NAME = "jobforge-service-metrics"
METRICS_PATH = "/metrics"
SERVICE_TAGS = ("jobforge", "http")


class Check(BaseModel):
    """An HTTP check on the API port: liveness (/health) and readiness (/ready, store and backend reachable)."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    interval: str = "10s"
    timeout: str = "2s"


CHECKS = (Check(name="alive", path="/health"), Check(name="ready", path="/ready"))
