"""Service settings, read from the environment once at the entry point and passed down.

Variable names follow the reference service (`SERVER_PORT`, `REGISTRY_URL`, `BUILD_TIMEOUT`, ...); settings the
reference did not have use the `JOBFORGE_` prefix. Nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobforge.config import parse_duration
from jobforge.rules import KEY_PREFIX_PATTERN

Duration = Annotated[float, BeforeValidator(parse_duration)]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "jobforge"


def _env(name: str):
    return Field(validation_alias=AliasChoices(name))


class NomadSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    addr: str = Field("http://127.0.0.1:4646", validation_alias="NOMAD_ADDR")
    region: str | None = Field(None, validation_alias="NOMAD_REGION",
                               description="sent only when set; else the agent's own region (the reference's global)")
    namespace: str = Field("default", validation_alias="NOMAD_NAMESPACE")
    datacenters: str = Field("dc1", validation_alias="NOMAD_DATACENTERS",
                             description="comma-separated; a stock cluster's datacenter is dc1")
    token: SecretStr | None = Field(None, validation_alias="NOMAD_TOKEN")
    placement_timeout: Duration = Field(
        5 * 60, gt=0, validation_alias=AliasChoices("JOBFORGE_PLACEMENT_TIMEOUT", "PLACEMENT_TIMEOUT"),
        description="a phase Nomad cannot place (blocked evaluation) fails after this; at once if it never can")
    stream_timeout: Duration = Field(
        65, gt=0, validation_alias="JOBFORGE_NOMAD_STREAM_TIMEOUT",
        description="silence after which a Nomad stream is taken as dead and reopened (heartbeats: 30 s)")
    image: str | None = Field(None, min_length=1, validation_alias="JOBFORGE_NOMAD_IMAGE",
                              description="runner image of the Nomad jobs (python3, buildah, skopeo, git); "
                                          "default: jobforge.nomad.render.DEFAULT_IMAGE")


class ConsulSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    http_addr: str = Field("127.0.0.1:8500", validation_alias="CONSUL_HTTP_ADDR")
    datacenter: str | None = Field(None, validation_alias="CONSUL_DATACENTER",
                                   description="sent as ?dc= only when set; else the agent's own (the reference's dc1)")
    token: SecretStr | None = Field(None, validation_alias="CONSUL_HTTP_TOKEN")
    prefix: str = Field("jobforge/", pattern=KEY_PREFIX_PATTERN, validation_alias="JOBFORGE_CONSUL_PREFIX",
                        description="KV prefix of the consul store; '/'-terminated segments of A-Za-z0-9,-_.")
    self_register: bool = Field(False, validation_alias="JOBFORGE_CONSUL_REGISTER",
                           description="register jobforge-service and jobforge-service-metrics in the local Consul "
                                       "agent at start, deregister on shutdown (outside Nomad; Nomad does it itself)")
    service_address: str | None = Field(None, validation_alias="JOBFORGE_CONSUL_SERVICE_ADDRESS",
                                        description="address registered for the replica; default SERVER_HOST, or "
                                                    "the Consul node's address when listening on 0.0.0.0")


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    addr: str = Field("http://127.0.0.1:8200", validation_alias="VAULT_ADDR")
    token: SecretStr | None = Field(None, validation_alias="VAULT_TOKEN")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    server_host: str = Field("127.0.0.1", validation_alias="SERVER_HOST")
    server_port: int = Field(8080, ge=0, le=65535, validation_alias="SERVER_PORT")
    metrics_port: int = Field(9090, ge=0, le=65535, validation_alias="METRICS_PORT",
                              description="0 disables the separate metrics listener (/metrics stays on the API port)")
    cors_origin: str = Field("*", validation_alias="CORS_ORIGIN")
    log_level: Literal["debug", "info", "warn", "warning", "error"] = Field("info", validation_alias="LOG_LEVEL")
    log_format: Literal["text", "json"] = Field("text", validation_alias="LOG_FORMAT",
                                                description="json: one JSON object per line; text: key=value")

    registry_url: str = Field("localhost:5000", validation_alias="REGISTRY_URL",
                              description="registry for intermediate (temp) images")
    registry_temp_prefix: str = Field("temp", pattern=r"^[a-z0-9]+([._-][a-z0-9]+)*$",
                                      validation_alias="REGISTRY_TEMP_PREFIX")
    registry_username: str | None = Field(None, validation_alias="REGISTRY_USERNAME")
    registry_password: SecretStr | None = Field(None, validation_alias="REGISTRY_PASSWORD")
    registry_tls_verify: bool = Field(True, validation_alias="REGISTRY_TLS_VERIFY")

    build_timeout: Duration = Field(30 * 60, validation_alias="BUILD_TIMEOUT")
    test_timeout: Duration = Field(15 * 60, validation_alias="TEST_TIMEOUT")
    publish_timeout: Duration = Field(15 * 60, validation_alias="JOBFORGE_PUBLISH_TIMEOUT")

    backend: Literal["local", "nomad"] = Field("local", validation_alias="JOBFORGE_BACKEND")
    store: Literal["sqlite", "consul"] | None = Field(
        None, validation_alias="JOBFORGE_STORE",
        description="sqlite: one file in the data dir; consul: cluster KV; default: consul with the nomad backend")
    data_dir: Path = Field(default_factory=_default_data_dir, validation_alias="JOBFORGE_DATA_DIR")
    max_concurrent_jobs: int = Field(2, ge=1, validation_alias="MAX_CONCURRENT_JOBS")
    git_username: str | None = Field(None, validation_alias="JOBFORGE_GIT_USERNAME")
    git_password: SecretStr | None = Field(None, validation_alias="JOBFORGE_GIT_PASSWORD")
    kill_grace_seconds: float = Field(10.0, gt=0, validation_alias="JOBFORGE_KILL_GRACE")

    webhook_allow_hosts: str = Field(
        "", validation_alias="JOBFORGE_WEBHOOK_ALLOW_HOSTS",
        description="comma-separated host names, IP addresses or CIDR networks webhooks may reach although "
                    "they are loopback, link-local, private or otherwise not public (e.g. '127.0.0.1')")
    webhook_max_attempts: int = Field(6, ge=1, le=100, validation_alias="JOBFORGE_WEBHOOK_MAX_ATTEMPTS",
                                      description="attempts per webhook delivery, the first included")
    webhook_backoff: Duration = Field(2.0, gt=0, validation_alias="JOBFORGE_WEBHOOK_BACKOFF",
                                      description="delay before the first retry; doubles with each attempt")
    webhook_backoff_max: Duration = Field(300.0, gt=0, validation_alias="JOBFORGE_WEBHOOK_BACKOFF_MAX")
    webhook_timeout: Duration = Field(10.0, gt=0, validation_alias="JOBFORGE_WEBHOOK_TIMEOUT",
                                      description="total time one delivery attempt may take")

    nomad: NomadSettings = Field(default_factory=NomadSettings)

    @property
    def effective_store(self) -> Literal["sqlite", "consul"]:
        """Cluster mode keeps job state in Consul (any server instance can serve any job); local mode in SQLite."""
        return self.store or ("consul" if self.backend == "nomad" else "sqlite")
    consul: ConsulSettings = Field(default_factory=ConsulSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
