"""How the service presents itself to Consul: the two service names, their checks, and the agent registration.

One definition for both ways a replica gets registered: the Nomad job's `service` blocks
(templates/nomad/jobforge-service.nomad.hcl.j2) and, outside Nomad, the agent registration of
`JOBFORGE_CONSUL_REGISTER=true` (`agent_services` here, sent by jobforge.consul_agent). The CLI looks up
`SERVICE_NAME` (jobforge/client/_discovery.py); Prometheus discovers `METRICS_SERVICE_NAME` (docs/prometheus.yml)
and scrapes the path in its `metrics_path` meta. Pure: no I/O.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CHECKS", "METRICS_PATH", "METRICS_SERVICE_NAME", "SERVICE_NAME", "SERVICE_TAGS", "AgentCheck",
           "AgentService", "Check", "agent_services"]

SERVICE_NAME = "jobforge-service"
METRICS_SERVICE_NAME = "jobforge-service-metrics"
METRICS_PATH = "/metrics"
SERVICE_TAGS = ("jobforge", "http")
# Consul removes a registration whose checks stayed critical this long (a replica that died without deregistering).
DEREGISTER_CRITICAL_AFTER = "10m"
_WILDCARD = {"", "0.0.0.0", "::", "[::]"}


class Check(BaseModel):
    """An HTTP check on the API port: liveness (/health) and readiness (/ready, store and backend reachable)."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    interval: str = "10s"
    timeout: str = "2s"


CHECKS = (Check(name="alive", path="/health"), Check(name="ready", path="/ready"))


class AgentCheck(BaseModel):
    """A check of `PUT /v1/agent/service/register` (Consul's CheckType JSON)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(alias="Name")
    http: str | None = Field(None, alias="HTTP")
    tcp: str | None = Field(None, alias="TCP")
    interval: str = Field(alias="Interval")
    timeout: str = Field(alias="Timeout")
    deregister_after: str = Field(DEREGISTER_CRITICAL_AFTER, alias="DeregisterCriticalServiceAfter")


class AgentService(BaseModel):
    """The body of `PUT /v1/agent/service/register` (Consul's ServiceDefinition JSON)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)

    id: str = Field(alias="ID")
    name: str = Field(alias="Name")
    address: str = Field("", alias="Address")
    port: int = Field(alias="Port", ge=1, le=65535)
    tags: tuple[str, ...] = Field(SERVICE_TAGS, alias="Tags")
    meta: dict[str, str] = Field(default_factory=dict, alias="Meta")
    checks: tuple[AgentCheck, ...] = Field((), alias="Checks")


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def agent_services(*, node: str, server_host: str, server_port: int, metrics_port: int,
                   advertise: str | None = None) -> list[AgentService]:
    """The registrations of one replica: the API (`SERVICE_NAME`) and the metrics (`METRICS_SERVICE_NAME`, on
    the API port when there is no separate metrics listener, `metrics_port` 0).

    `advertise` is the address others reach the replica at; by default the listen address, or none (Consul then
    uses the node's address) when the service listens on every interface. Checks are sent to the listen address
    (loopback when listening on every interface): the agent runs them next to the service. IDs carry the node
    and port, so replicas on one node do not replace each other.
    """
    listen = "127.0.0.1" if server_host in _WILDCARD else server_host
    address = advertise if advertise is not None else ("" if server_host in _WILDCARD else server_host)
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", node)
    checks = tuple(AgentCheck(name=c.name, http=f"http://{_host(listen)}:{server_port}{c.path}",
                              interval=c.interval, timeout=c.timeout) for c in CHECKS)
    services = [AgentService(id=f"{SERVICE_NAME}-{prefix}-{server_port}", name=SERVICE_NAME, address=address,
                             port=server_port, checks=checks)]
    port = metrics_port or server_port
    metrics_check = AgentCheck(name="metrics-port", tcp=f"{_host(listen)}:{port}", interval="10s", timeout="2s")
    services.append(AgentService(id=f"{METRICS_SERVICE_NAME}-{prefix}-{port}", name=METRICS_SERVICE_NAME,
                                 address=address, port=port, meta={"metrics_path": METRICS_PATH},
                                 checks=(metrics_check,)))
    return services
