"""The service's own Nomad job (nomad-jobs/jobforge-service.nomad.hcl): it parses with python-hcl2, the Nomad
double parses and registers it, and it registers the Consul names the CLI and Prometheus look up."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from jobforge.client._discovery import SERVICE_NAME as CLI_SERVICE_NAME
from jobforge.nomad.render import DEFAULT_IMAGE, render_service_job
from jobforge.nomad.service_job import ServiceJobParams
from jobforge.registration import CHECKS, METRICS_PATH, METRICS_SERVICE_NAME
from jobforge.auth import parse_tokens
from tests.doubles.consul_template import render_env_template, render_template
from tests.doubles.nomad import FakeNomad
from tests.doubles.vault import FakeVault
from tests.nomad.helpers import labeled, load_hcl, untemplate

JOB_FILE = Path(__file__).resolve().parents[2] / "nomad-jobs" / "jobforge-service.nomad.hcl"
SECOND = 1_000_000_000


def test_python_hcl2_reads_replicas_ports_services_and_env():
    name, job = labeled(load_hcl(JOB_FILE.read_text())["job"])
    assert (name, job["type"]) == ("jobforge-service", "service")
    group_name, group = labeled(job["group"])
    assert group["count"] == 2
    services = {s["name"]: s for s in group["service"]}
    assert set(services) == {CLI_SERVICE_NAME, METRICS_SERVICE_NAME}
    assert [(c["name"], c["type"], c["path"]) for c in services[CLI_SERVICE_NAME]["check"]] == [
        ("alive", "http", "/health"), ("ready", "http", "/ready")]
    assert services[METRICS_SERVICE_NAME]["meta"] == [{"metrics_path": METRICS_PATH}]
    assert services[METRICS_SERVICE_NAME]["port"] == "metrics"
    _, task = labeled(group["task"])
    (env,) = task["env"]
    env = {k: untemplate(v) for k, v in env.items()}
    assert env["JOBFORGE_BACKEND"] == "nomad" and env["JOBFORGE_STORE"] == "consul"
    assert env["SERVER_HOST"] == "${NOMAD_IP_http}"  # never 0.0.0.0
    assert env["SERVER_PORT"] == "${NOMAD_PORT_http}" and env["METRICS_PORT"] == "${NOMAD_PORT_metrics}"
    assert env["CONSUL_HTTP_ADDR"] == "${attr.unique.network.ip-address}:8500"
    assert env["JOBFORGE_NOMAD_IMAGE"] == DEFAULT_IMAGE  # the phase jobs' runner image
    templates = {t["destination"]: t for t in task["template"]}
    assert 'keyOrDefault "jobforge-service/config/registry_url"' in templates["local/consul.env"]["data"]
    assert templates["secrets/service.env"]["perms"] == "600"
    assert "secret/data/jobforge/service" in templates["secrets/service.env"]["data"]
    assert job["update"][0]["max_parallel"] == 1 and job["update"][0]["auto_revert"] is True
    assert job["migrate"][0]["health_check"] == "checks"


def test_params_change_the_render():
    text = render_service_job(ServiceJobParams(count=5, image="127.0.0.1:5000/jobforge-service:1.2",
                                               config_prefix="team-a/jobforge/config/"))
    _, job = labeled(load_hcl(text)["job"])
    _, group = labeled(job["group"])
    _, task = labeled(group["task"])
    assert group["count"] == 5 and task["config"][0]["image"] == "127.0.0.1:5000/jobforge-service:1.2"
    assert "team-a/jobforge/config/log_level" in json.dumps(task["template"])
    with pytest.raises(ValueError):
        ServiceJobParams(count=0)


def test_the_vault_template_puts_the_service_secrets_into_its_environment():
    _, job = labeled(load_hcl(JOB_FILE.read_text())["job"])
    _, group = labeled(job["group"])
    _, task = labeled(group["task"])
    template = next(t for t in task["template"] if t["destination"] == "secrets/service.env")
    assert template["env"] is True and template["perms"] == "600"
    vault = FakeVault()
    vault.put("jobforge/service", {"registry_username": "ci", "registry_password": 'p@ss "w"\n#1',
                                   "nomad_token": "n-tok", "unrelated": "x"})
    assert render_env_template(untemplate(template["data"]) + "\n", vault) == {
        "REGISTRY_USERNAME": "ci", "REGISTRY_PASSWORD": 'p@ss "w"\n#1', "NOMAD_TOKEN": "n-tok"}


def test_the_api_tokens_file_comes_from_vault_as_it_is_and_is_empty_without_the_field():
    """What the service then reads from JOBFORGE_API_TOKENS_FILE (jobforge.auth.parse_tokens)."""
    _, job = labeled(load_hcl(JOB_FILE.read_text())["job"])
    _, group = labeled(job["group"])
    _, task = labeled(group["task"])
    template = next(t for t in task["template"] if t["destination"] == "secrets/api-tokens")
    assert template["perms"] == "600" and template.get("env") is not True  # a file, not the environment
    vault = FakeVault()
    lines = "t0k3n-admin-0123456789abcdef\nt0k3n-team-a-0123456789abcdef team-a,team-b\n"
    vault.put("jobforge/service", {"api_tokens": lines, "nomad_token": "n-tok"})
    text = render_template(untemplate(template["data"]), vault)
    entries, problems = parse_tokens(text)
    assert text.startswith(lines) and len(entries) == 2 and problems == []
    assert "n-tok" not in text  # nothing else of the secret
    vault.put("jobforge/service", {"nomad_token": "n-tok"})
    assert render_template(untemplate(template["data"]), vault) == ""  # no field: no token, every call refused


@pytest.fixture
async def nomad():
    fake = FakeNomad()
    await fake.start()
    yield fake
    await fake.stop()


async def test_the_nomad_double_parses_and_registers_it(nomad):
    async with aiohttp.ClientSession(nomad.url) as http:
        async with http.post("/v1/jobs/parse", json={"JobHCL": JOB_FILE.read_text(), "Canonicalize": True}) as r:
            assert r.status == 200, await r.text()
            job = await r.json()
        async with http.put("/v1/jobs", json={"Job": job}) as r:
            assert r.status == 200, await r.text()
        async with http.get("/v1/job/jobforge-service") as r:
            assert r.status == 200, await r.text()
            stored = await r.json()
    assert (stored["ID"], stored["Type"]) == ("jobforge-service", "service")
    (group,) = stored["TaskGroups"]
    assert group["Count"] == 2
    # Dynamic ports on the node's address, no mapping: the task shares the node's network and binds them itself.
    ports = {p["Label"]: p["To"] for p in group["Networks"][0]["DynamicPorts"]}
    assert ports == {"http": 0, "metrics": 0}
    services = {s["Name"]: s for s in group["Services"]}
    assert set(services) == {CLI_SERVICE_NAME, METRICS_SERVICE_NAME}
    api = services[CLI_SERVICE_NAME]
    assert api["PortLabel"] == "http" and api["Provider"] == "consul"
    assert [(c["Type"], c["Path"], c["Interval"]) for c in api["Checks"]] == [
        ("http", c.path, 10 * SECOND) for c in CHECKS]
    metrics = services[METRICS_SERVICE_NAME]
    assert metrics["PortLabel"] == "metrics" and metrics["Meta"] == {"metrics_path": METRICS_PATH}
    assert stored["Update"]["MaxParallel"] == 1 and stored["Update"]["HealthCheck"] == "checks"
    assert stored["Update"]["MinHealthyTime"] == 10 * SECOND and stored["Update"]["AutoRevert"] is True
    assert stored["Migrate"]["MaxParallel"] == 1
    (task,) = group["Tasks"]
    assert task["Config"]["image"] == "localhost:5000/jobforge-service:latest"
    assert task["Vault"]["Env"] is False and task["Vault"]["DisableFile"] is True
    assert task["Env"]["SERVER_PORT"] == "${NOMAD_PORT_http}"
    assert task["Config"]["network_mode"] == "host" and task["Env"]["SERVER_HOST"] == "${NOMAD_IP_http}"
    assert task["Env"]["JOBFORGE_API_TOKENS_FILE"] == "${NOMAD_SECRETS_DIR}/api-tokens"
    tokens = next(t for t in task["Templates"] if t["DestPath"] == "secrets/api-tokens")
    assert (tokens["Perms"], tokens["Uid"], tokens["Gid"], tokens["ChangeMode"], tokens["Envvars"]) == (
        "600", 10001, 10001, "noop", False)
