"""The service's own Nomad job: N `jobforge-service` replicas (templates/nomad/jobforge-service.nomad.hcl.j2).

`service_context(params)` is the pure part; `jobforge.nomad.render.render_service_job` renders it with the same
escaping Jinja environment as the phase jobs, and `make nomad-jobs` writes the default into nomad-jobs/.

Where the replicas' configuration comes from (the task's environment, as the service reads nothing else):
- Nomad: the ports it maps into the container (`NOMAD_PORT_http`, `NOMAD_PORT_metrics`) and the node's address
  for the local Nomad and Consul agents (`attr.unique.network.ip-address`).
- Consul KV (`keyOrDefault` template, re-rendered and the task restarted on change): deployment settings that
  need a restart, under `<config_prefix>` (the reference's `jobforge-service/config/`). The live settings
  (build_timeout, ...) are not put into the environment, since the environment would win over Consul KV.
- Vault (KV v2 template): the registry credentials and the Nomad/Consul ACL tokens of the service, and the API
  tokens file (field `api_tokens`, written to a 0600 file of the task's secrets dir owned by the image's user;
  the service re-reads it when it changes, so a rotation needs no restart).

Listening: the task shares the node's network (`network_mode = "host"`) and binds only the address and port
Nomad allocated (`NOMAD_IP_http`, `NOMAD_PORT_http`), never 0.0.0.0 (docs/decisions.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobforge.nomad.escape import go_string
from jobforge.registration import CHECKS, METRICS_PATH, METRICS_SERVICE_NAME, SERVICE_NAME, SERVICE_TAGS

__all__ = ["API_TOKENS_FIELD", "SERVICE_JOB_FILE", "SERVICE_TEMPLATE", "VAULT_FIELDS", "ServiceJobParams", "service_context"]

SERVICE_TEMPLATE = "jobforge-service.nomad.hcl.j2"
SERVICE_JOB_FILE = "jobforge-service.nomad.hcl"
DEFAULT_SERVICE_IMAGE = "localhost:5000/jobforge-service:latest"
# Settings read from Consul KV at (re)start: env name -> (key under the config prefix, default).
KV_SETTINGS = (("REGISTRY_URL", "registry_url", "localhost:5000"), ("LOG_LEVEL", "log_level", "info"),
               ("LOG_FORMAT", "log_format", "json"))
# Secrets from Vault as (field of the KV v2 secret at `secrets_path`, env name); missing fields stay unset.
# render.py turns them into the template (the same writer as the phase jobs' credentials).
VAULT_FIELDS = (("registry_username", "REGISTRY_USERNAME"), ("registry_password", "REGISTRY_PASSWORD"),
                ("nomad_token", "NOMAD_TOKEN"), ("consul_token", "CONSUL_HTTP_TOKEN"))
# The Vault field holding the API tokens file's text ('<token> [owner,...]' lines, jobforge.auth) and where it goes.
API_TOKENS_FIELD = "api_tokens"
API_TOKENS_FILE = "secrets/api-tokens"


class ServiceJobParams(BaseModel):
    """Values of the rendered service job; the defaults are what nomad-jobs/jobforge-service.nomad.hcl holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(DEFAULT_SERVICE_IMAGE, min_length=1, description="the image of ./Containerfile")
    runner_image: str = Field("localhost:5000/jobforge-runner:latest", min_length=1,
                              description="JOBFORGE_NOMAD_IMAGE: the phase jobs' image")
    count: int = Field(2, ge=1, description="replicas")
    datacenters: tuple[str, ...] = Field(("dc1",), min_length=1)
    config_prefix: str = Field("jobforge-service/config/", pattern=r"^([A-Za-z0-9_.-]+/)+$")
    secrets_path: str = Field("secret/data/jobforge/service", min_length=1, description="Vault KV v2 path")
    vault_auth: Literal["workload-identity", "token"] = "workload-identity"
    vault_policies: tuple[str, ...] = Field(("jobforge-service",), description="token auth only")
    run_as_uid: int = Field(10001, ge=1, description="the image's user (Containerfile JOBFORGE_UID): owns "
                                                      "the API tokens file")
    cpu: int = Field(500, ge=1)
    memory: int = Field(512, ge=1)


def _kv_template(prefix: str) -> str:
    lines = [f"{env}={{{{ keyOrDefault {go_string(prefix + key)} {go_string(default)} | toJSON }}}}"
             for env, key, default in KV_SETTINGS]
    return "\n".join(lines) + "\n"


def _tokens_template(secrets_path: str) -> str:
    """The field's text as it is (a missing field: an empty file, so every API call is refused: fail closed)."""
    return (f"{{{{ with secret {go_string(secrets_path)} }}}}{{{{ with index .Data.data "
            f"{go_string(API_TOKENS_FIELD)} }}}}{{{{ . }}}}\n{{{{ end }}}}{{{{ end }}}}")


def service_context(params: ServiceJobParams) -> dict[str, Any]:
    node = "${attr.unique.network.ip-address}"
    return {
        "name": SERVICE_NAME,
        "count": params.count,
        "image": params.image,
        "datacenters": list(params.datacenters),
        "service_name": SERVICE_NAME,
        "metrics_service_name": METRICS_SERVICE_NAME,
        "tags": list(SERVICE_TAGS),
        "metrics_path": METRICS_PATH,
        "checks": [c.model_dump() for c in CHECKS],
        "env": {
            "JOBFORGE_BACKEND": "nomad",
            "JOBFORGE_STORE": "consul",
            "SERVER_HOST": "${NOMAD_IP_http}",  # the address Nomad allocated the port on, not 0.0.0.0
            "SERVER_PORT": "${NOMAD_PORT_http}",
            "METRICS_PORT": "${NOMAD_PORT_metrics}",
            "NOMAD_ADDR": f"http://{node}:4646",
            "NOMAD_DATACENTERS": ",".join(params.datacenters),
            "CONSUL_HTTP_ADDR": f"{node}:8500",
            "JOBFORGE_NOMAD_IMAGE": params.runner_image,
            "JOBFORGE_DATA_DIR": "${NOMAD_ALLOC_DIR}/data",
            "PYTHONUNBUFFERED": "1",
            # Lease values and logs name the allocation, which outlives a host name inside a container.
            "JOBFORGE_REPLICA_NAME": "${NOMAD_ALLOC_NAME}-${NOMAD_SHORT_ALLOC_ID}",
            "JOBFORGE_API_TOKENS_FILE": "${NOMAD_SECRETS_DIR}/api-tokens",
        },
        "tokens_template": _tokens_template(params.secrets_path),
        "tokens_destination": API_TOKENS_FILE,
        "run_as_uid": params.run_as_uid,
        "kv_template": _kv_template(params.config_prefix),
        "vault_policies": list(params.vault_policies) if params.vault_auth == "token" else [],
        "cpu": params.cpu,
        "memory": params.memory,
    }
