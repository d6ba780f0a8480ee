"""`JOBFORGE_CONSUL_REGISTER=true`: a replica outside Nomad registers itself in the Consul agent under the names
and checks of the Nomad job, the CLI's discovery finds it there, and a clean shutdown deregisters it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from jobforge.client._discovery import SERVICE_NAME as CLI_SERVICE_NAME
from jobforge.client._discovery import consul_service_url
from jobforge.consul_agent import ConsulAgent
from jobforge.errors import ServiceUnavailable
from jobforge.registration import CHECKS, METRICS_PATH, METRICS_SERVICE_NAME, agent_services
from tests.doubles.consul import FakeConsul
from tests.support.service import ServiceProcess


def test_a_replica_registers_is_discovered_and_deregisters(tmp_path, registry):
    consul = FakeConsul()
    with consul.in_thread() as addr:
        svc = ServiceProcess(tmp_path / "svc", registry.host, JOBFORGE_CONSUL_REGISTER="true", CONSUL_HTTP_ADDR=addr)
        with svc:
            by_name = {e["ServiceName"]: e for e in consul.services}
            assert set(by_name) == {CLI_SERVICE_NAME, METRICS_SERVICE_NAME}
            api, metrics = by_name[CLI_SERVICE_NAME], by_name[METRICS_SERVICE_NAME]
            assert (api["ServiceAddress"], api["ServicePort"]) == ("127.0.0.1", svc.port)
            assert metrics["ServicePort"] == int(svc.env["METRICS_PORT"])
            assert metrics["ServiceMeta"] == {"metrics_path": METRICS_PATH}
            checks = consul.checks[api["ServiceID"]]
            assert [(c["Name"], c["Definition"]["HTTP"]) for c in checks] == [
                (c.name, f"{svc.url}{c.path}") for c in CHECKS]
            assert consul_service_url(addr) == svc.url  # what `jobforge` does with CONSUL_HTTP_ADDR
        assert svc.proc.returncode == 0
        assert consul.services == [] and consul.checks == {}
        puts = [s.path for s in consul.seen if s.method == "PUT"]
        assert puts == ["/v1/agent/service/register"] * 2 + [
            f"/v1/agent/service/deregister/{metrics['ServiceID']}", f"/v1/agent/service/deregister/{api['ServiceID']}"]


def test_a_refused_registration_stops_the_start_with_the_reason(tmp_path, registry):
    consul = FakeConsul(acl_token="the-real-token")
    with consul.in_thread() as addr:
        svc = ServiceProcess(tmp_path / "svc", registry.host, JOBFORGE_CONSUL_REGISTER="true",
                             CONSUL_HTTP_ADDR=addr, CONSUL_HTTP_TOKEN="a-wrong-token")
        with pytest.raises(RuntimeError, match="exited with code"):
            svc.start()
    log = svc.log_path.read_text()
    assert "HTTP 403" in log and "ACL not found" in log and "a-wrong-token" not in log
    assert consul.services == []


def test_registrations_listen_address_and_wildcard():
    api, metrics = agent_services(node="host a", server_host="0.0.0.0", server_port=8080, metrics_port=0)
    assert api.address == "" and api.id == "jobforge-service-host-a-8080"
    assert api.checks[0].http == "http://127.0.0.1:8080/health"
    assert (metrics.port, metrics.meta) == (8080, {"metrics_path": METRICS_PATH})  # /metrics on the API port
    (api,) = agent_services(node="n", server_host="::1", server_port=1, metrics_port=2,
                            advertise="192.0.2.1")[:1]
    assert api.address == "192.0.2.1" and api.checks[1].http == "http://[::1]:1/ready"


async def test_the_double_refuses_what_consul_refuses(fake_consul_agent):
    base = f"http://{fake_consul_agent.addr}"
    async with aiohttp.ClientSession() as http:
        for body, reason in (({"Port": 1}, "Missing service name"),
                             ({"Name": "x", "Checks": [{"HTTP": "http://127.0.0.1:1/"}]}, "Interval must be > 0"),
                             ({"Name": "x", "Checks": [{"Interval": "1s"}]}, "Must provide TTL")):
            async with http.put(f"{base}/v1/agent/service/register", json=body) as resp:
                assert (resp.status, reason in await resp.text()) == (400, True)
        async with http.put(f"{base}/v1/agent/service/deregister/nope") as resp:
            assert resp.status == 404 and "Unknown service ID" in await resp.text()
        async with http.get(f"{base}/v1/agent/service/register") as resp:
            assert resp.status == 405
    agent = ConsulAgent(fake_consul_agent.addr)
    await agent.register(agent_services(node="n", server_host="127.0.0.1", server_port=8080, metrics_port=9090))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v1/catalog/services") as resp:
            index = int(resp.headers["X-Consul-Index"])
            assert await resp.json() == {"consul": [], CLI_SERVICE_NAME: ["jobforge", "http"],
                                         METRICS_SERVICE_NAME: ["jobforge", "http"]}
        async with http.get(f"{base}/v1/health/service/{METRICS_SERVICE_NAME}") as resp:
            (entry,) = await resp.json()
        assert entry["Service"]["Meta"] == {"metrics_path": METRICS_PATH} and entry["Service"]["Port"] == 9090
        assert [c["Status"] for c in entry["Checks"]] == ["critical"]  # until the agent first ran it
        async with http.get(f"{base}/v1/health/service/{METRICS_SERVICE_NAME}?passing=1") as resp:
            assert await resp.json() == []
        # a blocking query returns when the catalog changes (the deregistration), not at its 30 s wait
        async def blocking_read():
            async with http.get(f"{base}/v1/catalog/services?index={index}&wait=30s") as resp:
                return int(resp.headers["X-Consul-Index"]), await resp.json()
        blocked = asyncio.create_task(blocking_read())
        while not any(s.path == "/v1/catalog/services" and "index=" in s.query for s in fake_consul_agent.seen):
            await asyncio.sleep(0.01)  # until the request is in; the double has no hook for "request received"
        assert not blocked.done()
        await agent.deregister()
        new_index, names = await asyncio.wait_for(blocked, 10)  # woken by the first deregistration
        assert new_index > index and METRICS_SERVICE_NAME not in names
        async with http.get(f"{base}/v1/catalog/services") as resp:
            assert await resp.json() == {"consul": []}
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        await ConsulAgent("127.0.0.1:1").register(agent_services(node="n", server_host="127.0.0.1",
                                                                 server_port=1, metrics_port=0))
