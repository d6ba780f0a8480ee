"""Service settings, read from the environment once at the entry point and passed down.

Variable names follow the reference service (`SERVER_PORT`, `REGISTRY_URL`, `BUILD_TIMEOUT`, ...); settings the
reference did not have use the `JOBFORGE_` prefix. Nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobforge.admission import SubmitPolicy, VaultPathRule, parse_vault_path_rules
from jobforge.config import parse_duration
from jobforge.rules import KEY_PREFIX_PATTERN

Duration = Annotated[float, BeforeValidator(parse_duration)]


def _comma_list(value: object) -> object:
    """``a, b,c`` -> ``("a", "b", "c")``: list variables are plain comma-separated text, not JSON."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]


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
    config: bool = Field(False, validation_alias="JOBFORGE_CONSUL_CONFIG",
                         description="watch the service configuration in Consul KV under JOBFORGE_CONSUL_CONFIG_"
                                     "PREFIX (build_timeout, test_timeout, max_concurrent_jobs, default_resource_"
                                     "limits/{cpu,memory,disk} and .../<phase>/{cpu,memory,disk}); environment "
                                     "variables that are set still win")
    config_prefix: str = Field("jobforge-service/config/", pattern=KEY_PREFIX_PATTERN,
                               validation_alias="JOBFORGE_CONSUL_CONFIG_PREFIX")
    config_wait: Duration = Field(60, gt=0, le=600, validation_alias="JOBFORGE_CONSUL_CONFIG_WAIT",
                                  description="longest blocking query on the config prefix")
    lease_ttl: Duration = Field(10, ge=10, le=86400, validation_alias="JOBFORGE_LEASE_TTL",
                                description="TTL of each replica's Consul session (Consul refuses under 10s); "
                                            "the backstop when no replica is left to notice a dead one")
    heartbeat: Duration = Field(2, gt=0, le=60, validation_alias="JOBFORGE_HEARTBEAT",
                                description="how often a replica renews its session and heartbeat key; also its "
                                            "session's lock-delay")
    lease_timeout: Duration = Field(8, gt=0, le=3600, validation_alias="JOBFORGE_LEASE_TIMEOUT",
                                    description="a replica whose heartbeat key has not moved for this long is "
                                                "dead: another ends its session and takes its jobs over")
    replica_name: str | None = Field(None, max_length=200, validation_alias="JOBFORGE_REPLICA_NAME",
                                     description="this replica's name in logs and lease values; default host-pid")
    service_address: str | None = Field(None, validation_alias="JOBFORGE_CONSUL_SERVICE_ADDRESS",
                                        description="address registered for the replica; default SERVER_HOST, or "
                                                    "the Consul node's address when listening on 0.0.0.0")

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "ConsulSettings":
        if self.lease_timeout < 2 * self.heartbeat:
            raise ValueError("JOBFORGE_LEASE_TIMEOUT must be at least twice JOBFORGE_HEARTBEAT: a live replica "
                             "that misses one heartbeat must not be declared dead")
        return self


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    addr: str = Field("http://127.0.0.1:8200", validation_alias="VAULT_ADDR",
                      description="local backend with a Vault login (VAULT_TOKEN, VAULT_TOKEN_FILE or AppRole): the "
                                  "service reads the jobs' KV v2 secrets here itself (git_credentials_path, "
                                  "registry_credentials_path, test.vault_secrets); without one such jobs fail")
    token: SecretStr | None = Field(None, validation_alias="VAULT_TOKEN")
    token_file: Path | None = Field(None, validation_alias="VAULT_TOKEN_FILE",
                                    description="a file holding the token (re-read at each login)")
    role_id: str | None = Field(None, validation_alias="VAULT_ROLE_ID", description="AppRole login, with VAULT_SECRET_ID")
    secret_id: SecretStr | None = Field(None, validation_alias="VAULT_SECRET_ID")
    approle_mount: str = Field("approle", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
                               validation_alias="JOBFORGE_VAULT_APPROLE_MOUNT")
    timeout: Duration = Field(10, gt=0, validation_alias="JOBFORGE_VAULT_TIMEOUT",
                              description="per Vault request")

    @model_validator(mode="after")
    def _one_login(self) -> "VaultSettings":
        if bool(self.role_id) != bool(self.secret_id):
            raise ValueError("VAULT_ROLE_ID and VAULT_SECRET_ID go together (AppRole login)")
        return self

    @property
    def enabled(self) -> bool:
        """The service reads Vault itself only when it has a way to log in."""
        return bool(self.token or self.token_file or self.role_id)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    server_host: str = Field("127.0.0.1", validation_alias="SERVER_HOST")
    server_port: int = Field(8080, ge=0, le=65535, validation_alias="SERVER_PORT")
    metrics_port: int = Field(9090, ge=0, le=65535, validation_alias="METRICS_PORT",
                              description="0 disables the separate metrics listener (/metrics stays on the API port)")
    cors_origin: CommaList = Field((), validation_alias="CORS_ORIGIN",
                                   description="origins (scheme://host[:port]) allowed to call the API from a "
                                               "browser, comma-separated; none by default; '*' needs API tokens")
    api_tokens_file: Path | None = Field(None, validation_alias="JOBFORGE_API_TOKENS_FILE",
                                         description="bearer tokens, one a line: '<token>' or "
                                                     "'<token> <owner>[,<owner>...]'; re-read when it changes")
    insecure_no_auth: bool = Field(False, validation_alias="JOBFORGE_INSECURE_NO_AUTH",
                                   description="serve a non-loopback address without API tokens (anyone who "
                                               "can connect may run builds)")
    allowed_hosts: CommaList = Field((), validation_alias="JOBFORGE_ALLOWED_HOSTS",
                                     description="extra Host header values accepted (name or name:port, "
                                                 "comma-separated), e.g. the name of a reverse proxy")
    log_level: Literal["debug", "info", "warn", "warning", "error"] = Field("info", validation_alias="LOG_LEVEL")
    log_format: Literal["text", "json"] = Field("text", validation_alias="LOG_FORMAT",
                                                description="json: one JSON object per line; text: key=value")

    registry_url: str = Field("localhost:5000", validation_alias="REGISTRY_URL",
                              description="registry for intermediate (temp) images")
    registry_temp_prefix: str = Field("temp", pattern=r"^[a-z0-9]+([._-][a-z0-9]+)*$",
                                      validation_alias="REGISTRY_TEMP_PREFIX")
    registry_cache_prefix: str = Field("cache", pattern=r"^([a-z0-9]+([._-][a-z0-9]+)*)?$",
                                       validation_alias="REGISTRY_CACHE_PREFIX",
                                       description="builds share layers through <REGISTRY_URL>/<prefix>/<image_name>; "
                                                   "empty: no registry layer cache")
    cache_ttl: Duration = Field(7 * 24 * 3600, ge=0, validation_alias="JOBFORGE_CACHE_TTL",
                                description="cached layers older than this are not used and unnamed ones are "
                                            "pruned from the local store; 0: no limit")
    cache_max_bytes: int = Field(20 * 10**9, ge=0, validation_alias="JOBFORGE_CACHE_MAX_BYTES",
                                 description="local layer store size cap, pruned before each build least recently "
                                             "used first; 0: no cap")
    registry_username: str | None = Field(None, validation_alias="REGISTRY_USERNAME",
                                          description="with REGISTRY_PASSWORD: for REGISTRY_URL's host only")
    registry_password: SecretStr | None = Field(None, validation_alias="REGISTRY_PASSWORD")
    registry_auth_file: Path | None = Field(
        None, validation_alias="REGISTRY_AUTH_FILE",
        description="containers auth.json ({'auths': {'host:port': {'auth': base64(user:pass)}}}); each entry is "
                    "handed only to commands talking to that exact host")
    registry_tls_verify: bool = Field(True, validation_alias="REGISTRY_TLS_VERIFY",
                                      description="false turns TLS verification off for REGISTRY_URL only")
    insecure_registries: str = Field("", validation_alias="JOBFORGE_INSECURE_REGISTRIES",
                                     description="comma-separated host[:port] without TLS verification")

    build_timeout: Duration = Field(30 * 60, validation_alias="BUILD_TIMEOUT")
    test_timeout: Duration = Field(15 * 60, validation_alias="TEST_TIMEOUT")
    publish_timeout: Duration = Field(15 * 60, validation_alias="JOBFORGE_PUBLISH_TIMEOUT")

    backend: Literal["local", "nomad"] = Field("local", validation_alias="JOBFORGE_BACKEND")
    store: Literal["sqlite", "consul"] | None = Field(
        None, validation_alias="JOBFORGE_STORE",
        description="sqlite: one file in the data dir; consul: cluster KV; default: consul with the nomad backend")
    data_dir: Path = Field(default_factory=_default_data_dir, validation_alias="JOBFORGE_DATA_DIR")
    scratch_dir: Path | None = Field(
        None, validation_alias="JOBFORGE_SCRATCH_DIR",
        description="local backend: phase workspaces (work/) and buildah's layer storage (buildah/); default: "
                    "the data dir, which then only holds the store")
    disk_reserve: int = Field(
        512 * 1024, ge=0, validation_alias="JOBFORGE_DISK_RESERVE",
        description="sqlite store: bytes of the data disk log lines never take, so that job records (a job's "
                    "failure on a full disk) still fit")
    max_concurrent_jobs: int = Field(2, ge=1, validation_alias="MAX_CONCURRENT_JOBS")
    max_queued_jobs: int = Field(1000, ge=1, validation_alias="MAX_QUEUED_JOBS",
                                 description="jobs waiting for a slot; beyond it submitJob answers 429")
    max_log_bytes: int = Field(64 * 1024 * 1024, ge=1024, validation_alias="JOBFORGE_MAX_LOG_BYTES",
                               description="log bytes kept per job; then one '[log truncated: ...]' line")
    max_log_lines: int = Field(1_000_000, ge=10, validation_alias="JOBFORGE_MAX_LOG_LINES",
                               description="log lines kept per job; then one '[log truncated: ...]' line")
    max_line_bytes: int = Field(1024 * 1024, ge=256, validation_alias="JOBFORGE_MAX_LINE_BYTES",
                                description="longest log line; longer lines are split into marked pieces")
    git_username: str | None = Field(None, validation_alias=AliasChoices("JOBFORGE_GIT_USERNAME", "GIT_USERNAME"),
                                     description="with the password: for JOBFORGE_GIT_CREDENTIAL_HOST only")
    git_password: SecretStr | None = Field(None, validation_alias=AliasChoices("JOBFORGE_GIT_PASSWORD",
                                                                                 "GIT_PASSWORD"))
    git_credential_host: str | None = Field(
        None, pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$",
        validation_alias="JOBFORGE_GIT_CREDENTIAL_HOST",
        description="host[:port] the git username/password belong to (https; http only if plain-http listed)")
    git_credentials: Path | None = Field(
        None, validation_alias="JOBFORGE_GIT_CREDENTIALS",
        description="`git credential-store` file: one https://user:pass@host[:port] a line")
    git_plain_http_hosts: str = Field("", validation_alias="JOBFORGE_GIT_PLAIN_HTTP_HOSTS",
                                      description="comma-separated host[:port] that may get git credentials "
                                                  "over plain http")
    vault_allowed_paths: str = Field(
        "", validation_alias="JOBFORGE_VAULT_ALLOWED_PATHS",
        description="comma-separated Vault path prefixes a job may name: 'prefix' for every owner, "
                    "'owner=prefix' for one owner, '{owner}' in a prefix is the job's owner; empty: none")
    allow_file_repos: bool = Field(False, validation_alias="JOBFORGE_ALLOW_FILE_REPOS",
                                   description="accept file:// and local-path repo_url (tests, demo)")
    kill_grace_seconds: float = Field(10.0, gt=0, validation_alias="JOBFORGE_KILL_GRACE")
    deadline_grace: Duration = Field(5 * 60, ge=0, validation_alias="JOBFORGE_DEADLINE_GRACE",
                                     description="a phase no runner event ends within its timeout plus this fails")
    cleanup_attempts: int = Field(8, ge=1, le=100, validation_alias="JOBFORGE_CLEANUP_ATTEMPTS",
                                  description="attempts to delete a finished job's temp image before giving up")
    cleanup_backoff: Duration = Field(10, gt=0, validation_alias="JOBFORGE_CLEANUP_BACKOFF",
                                      description="wait before the first retry of a failed temp image deletion; "
                                                  "doubled per attempt, at most 1h")
    tick_seconds: Duration = Field(5, gt=0, validation_alias="JOBFORGE_TICK",
                                   description="how often deadlines, lost cleanups and admission are checked")

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

    build_user: str = Field("jobforge-build", pattern=r"^([a-z_][a-z0-9_-]*)?$", validation_alias="JOBFORGE_BUILD_USER",
                            description="local backend run as root: the unprivileged user (with /etc/subuid and "
                                        "/etc/subgid ranges, `make build-user`) that runs every phase; "
                                        "empty: phases run as root")
    build_network: Literal["outbound", "none"] = Field(
        "outbound", validation_alias="JOBFORGE_BUILD_NETWORK",
        description="local backend: network of RUN steps; outbound through slirp4netns without the host's "
                    "loopback, or none (only the step's own loopback)")

    mcp_log_level: int = Field(0, ge=0, le=1, validation_alias="MCP_LOG_LEVEL",
                               description="1: log every MCP request and response (secrets redacted)")
    stream_client_buffer: int = Field(1000, ge=1, le=100_000, validation_alias="JOBFORGE_STREAM_CLIENT_BUFFER",
                                      description="messages buffered per stream/watch client before it is dropped")
    stream_stall_timeout: Duration = Field(30.0, gt=0, validation_alias="JOBFORGE_STREAM_STALL_TIMEOUT",
                                           description="how long a client's full buffer is tolerated")
    stream_close_timeout: Duration = Field(5.0, gt=0, validation_alias="JOBFORGE_STREAM_CLOSE_TIMEOUT",
                                           description="how long a dropped client gets to read its close reason")
    stream_poll_interval: Duration = Field(1.0, gt=0, validation_alias="JOBFORGE_STREAM_POLL_INTERVAL",
                                           description="log streams re-read the store this often (other replicas)")

    nomad: NomadSettings = Field(default_factory=NomadSettings)

    @model_validator(mode="after")
    def _credentials_bound(self) -> "Settings":
        if (self.git_username or self.git_password) and not self.git_credential_host:
            raise ValueError("JOBFORGE_GIT_USERNAME/JOBFORGE_GIT_PASSWORD (GIT_USERNAME/GIT_PASSWORD) need "
                             "JOBFORGE_GIT_CREDENTIAL_HOST: a credential is only ever offered to its own host")
        parse_vault_path_rules(self.vault_allowed_paths)  # ValueError names the bad entry
        for name, path in (("JOBFORGE_GIT_CREDENTIALS", self.git_credentials),
                           ("REGISTRY_AUTH_FILE", self.registry_auth_file)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @property
    def vault_path_rules(self) -> tuple[VaultPathRule, ...]:
        return parse_vault_path_rules(self.vault_allowed_paths)

    @property
    def submit_policy(self) -> SubmitPolicy:
        return SubmitPolicy(allow_file_repos=self.allow_file_repos, vault_paths=self.vault_path_rules)

    @property
    def registry_host(self) -> str:
        """`host[:port]` of REGISTRY_URL (what REGISTRY_USERNAME/REGISTRY_PASSWORD are bound to)."""
        return self.registry_url.split("/", 1)[0].lower()

    @property
    def insecure_registry_hosts(self) -> tuple[str, ...]:
        """Hosts without TLS verification: REGISTRY_URL's when REGISTRY_TLS_VERIFY=false, plus the listed ones."""
        listed = [h.strip().lower() for h in self.insecure_registries.split(",") if h.strip()]
        return tuple(dict.fromkeys(([] if self.registry_tls_verify else [self.registry_host]) + listed))

    @property
    def effective_store(self) -> Literal["sqlite", "consul"]:
        """Cluster mode keeps job state in Consul (any server instance can serve any job); local mode in SQLite."""
        return self.store or ("consul" if self.backend == "nomad" else "sqlite")
    consul: ConsulSettings = Field(default_factory=ConsulSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
