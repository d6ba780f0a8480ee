"""Self-registration in the local Consul agent, for replicas run outside Nomad (`JOBFORGE_CONSUL_REGISTER=true`).

Nomad registers the services of its allocations itself (the job's `service` blocks); elsewhere the service puts
the same registrations (jobforge.registration) into its agent at start (`PUT /v1/agent/service/register`) and
takes them out on a clean shutdown (`PUT /v1/agent/service/deregister/:id`). A replica that dies without
deregistering is removed by Consul once its checks stay critical (`DeregisterCriticalServiceAfter`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from urllib.parse import quote

import aiohttp

from jobforge.errors import ServiceUnavailable
from jobforge.registration import AgentService, agent_services
from jobforge.settings import Settings

__all__ = ["ConsulAgent", "replica_agent"]

log = logging.getLogger("jobforge.consul")


class ConsulAgent:
    """Registers services in the Consul agent at `addr` (CONSUL_HTTP_ADDR: `host:port` or a URL)."""

    def __init__(self, addr: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        addr = addr.strip().rstrip("/")
        self.base = addr if "://" in addr else f"http://{addr}"
        self._headers = {"X-Consul-Token": token} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._registered: list[str] = []

    async def _put(self, path: str, body: bytes | None = None) -> None:
        try:
            async with aiohttp.ClientSession(timeout=self._timeout, headers=self._headers) as session:
                async with session.put(self.base + path, data=body,
                                       headers={"Content-Type": "application/json"}) as resp:
                    if resp.status != 200:
                        text = (await resp.text(errors="replace"))[:300].strip()
                        raise ServiceUnavailable(f"consul agent at {self.base} answered HTTP {resp.status} to "
                                                 f"PUT {path}: {text}")
        except (aiohttp.ClientError, OSError) as exc:
            raise ServiceUnavailable(f"consul agent at {self.base} unreachable: {exc!r}") from exc

    async def register(self, services: Sequence[AgentService]) -> None:
        """Register every service (replacing an older registration with the same ID); raises ServiceUnavailable."""
        for service in services:
            body = service.model_dump_json(exclude_none=True).encode()
            await self._put("/v1/agent/service/register?replace-existing-checks=true", body)
            self._registered.append(service.id)
            log.info("registered %s (id %s, port %d) in consul at %s", service.name, service.id, service.port,
                     self.base)

    async def deregister(self) -> None:
        """Remove what `register` added; failures are logged (Consul drops it once its checks fail)."""
        while self._registered:
            service_id = self._registered.pop()
            try:
                await self._put(f"/v1/agent/service/deregister/{quote(service_id, safe='')}")
                log.info("deregistered %s from consul", service_id)
            except ServiceUnavailable as exc:
                log.warning("could not deregister %s: %s", service_id, exc.message)


def replica_agent(settings: Settings) -> tuple[ConsulAgent, list[AgentService]]:
    """The agent of CONSUL_HTTP_ADDR and this replica's registrations as the settings describe it. The caller
    holds the agent before registering, so a half-done registration is undone on shutdown too."""
    consul = settings.consul
    agent = ConsulAgent(consul.http_addr, token=consul.token.get_secret_value() if consul.token else None)
    return agent, agent_services(node=socket.gethostname(), server_host=settings.server_host,
                                 server_port=settings.server_port, metrics_port=settings.metrics_port,
                                 advertise=consul.service_address)
