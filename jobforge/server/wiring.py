"""Builds the service from settings: the one place that picks a store, a backend and the API guard."""

from __future__ import annotations

import logging

from jobforge.backends.base import Backend
from jobforge.backends.local import LocalBackend
from jobforge.cluster import ConsulLeases, Leases, Solo
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.logcaps import LogLimits
from jobforge.errors import ConfigError
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.server.guard import Guard, exposure_problem
from jobforge.server.tokens import TokenFile
from jobforge.server.streaming import StreamLimits
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.base import Store
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from jobforge.vault import VaultReader, no_vault
from jobforge.consul_config import ConsulConfigWatcher
from jobforge.runtime_config import JobDefaults, RuntimeConfig, effective
from jobforge.delivery import DeliveryWorker
from jobforge.metrics import Metrics
from jobforge.outbound import OutboundPolicy

log = logging.getLogger("jobforge.server")


def build_guard(settings: Settings) -> Guard:
    """Who may call the API; `ConfigError` when these settings must not be served (nothing is bound yet)."""
    problem = exposure_problem(settings.server_host, settings.api_tokens_file is not None,
                               settings.insecure_no_auth, settings.cors_origin)
    if problem:
        raise ConfigError(problem)
    tokens = TokenFile(settings.api_tokens_file).load() if settings.api_tokens_file else None
    if tokens is None:
        log.warning("no API tokens configured (JOBFORGE_API_TOKENS_FILE): %s",
                    "JOBFORGE_INSECURE_NO_AUTH=true, anyone who can connect may run builds"
                    if settings.insecure_no_auth else f"serving loopback ({settings.server_host}) only, "
                    "and every local user and process may call the API")
    return Guard(tokens=tokens.entries if tokens else None, cors_origins=frozenset(settings.cors_origin),
                 allowed_hosts=settings.allowed_hosts)


def local_secret_env(settings: Settings) -> dict[str, str]:
    """The service-wide credentials as the task scripts read them, each with the host it is bound to
    (templates/tasks/_common.py does the matching; docs/security.md). Test containers never see
    these: `test.vault_secrets` values come only from JOBFORGE_SECRET_* variables, which only the job's own
    Vault reads set (`jobforge.vault`, per phase)."""
    env = {}
    if settings.registry_username and settings.registry_password:
        # Bound by the scripts to the temp image's host, i.e. REGISTRY_URL's.
        env["REGISTRY_USERNAME"] = settings.registry_username
        env["REGISTRY_PASSWORD"] = settings.registry_password.get_secret_value()
    if settings.registry_auth_file:
        # Renamed: buildah/skopeo would read REGISTRY_AUTH_FILE themselves, for every host.
        env["JOBFORGE_REGISTRY_AUTH_FILE"] = str(settings.registry_auth_file)
    if settings.git_username and settings.git_password and settings.git_credential_host:
        env["GIT_USERNAME"] = settings.git_username
        env["GIT_PASSWORD"] = settings.git_password.get_secret_value()
        env["JOBFORGE_GIT_CREDENTIAL_HOST"] = settings.git_credential_host
    if settings.git_credentials:
        env["JOBFORGE_GIT_CREDENTIALS"] = str(settings.git_credentials)
    if settings.git_plain_http_hosts:
        env["JOBFORGE_GIT_PLAIN_HTTP_HOSTS"] = settings.git_plain_http_hosts
    return env


def build_store(settings: Settings) -> Store:
    if settings.effective_store == "consul":
        consul = settings.consul
        return ConsulStore(consul.http_addr, prefix=consul.prefix, datacenter=consul.datacenter,
                           token=consul.token.get_secret_value() if consul.token else None)
    return SqliteStore(settings.data_dir / "jobforge.db", disk_reserve=settings.disk_reserve)


def build_backend(settings: Settings, metrics: Metrics | None = None) -> Backend:
    if settings.backend == "nomad":
        nomad = settings.nomad
        http = NomadHTTP(nomad.addr, token=nomad.token.get_secret_value() if nomad.token else None,
                         namespace=nomad.namespace, region=nomad.region)
        overrides = {"image": nomad.image} if nomad.image else {}
        return NomadBackend(NomadAPI(http), RenderParams.from_settings(settings, **overrides),
                            placement_timeout=nomad.placement_timeout, stream_timeout=nomad.stream_timeout,
                            on_event_lag=metrics.event_lag if metrics is not None else None,
                            max_line_bytes=settings.max_line_bytes)
    scratch = settings.scratch_dir or settings.data_dir
    return LocalBackend(
        work_dir=scratch / "work", storage_root=scratch / "buildah" / "root",
        storage_runroot=scratch / "buildah" / "runroot",
        registry_url=settings.registry_url, tls_verify=settings.registry_tls_verify,
        secret_env=local_secret_env(settings), kill_grace=settings.kill_grace_seconds,
        max_line_bytes=settings.max_line_bytes,
        build_user=settings.build_user or None, build_network=settings.build_network,
        job_env=VaultReader(settings.vault).phase_env if settings.vault.enabled else no_vault,
    )


def build_webhooks(settings: Settings, store: Store, metrics: Metrics) -> DeliveryWorker:
    return DeliveryWorker(store, OutboundPolicy.from_setting(settings.webhook_allow_hosts),
                          max_attempts=settings.webhook_max_attempts, backoff=settings.webhook_backoff,
                          backoff_max=settings.webhook_backoff_max, timeout=settings.webhook_timeout,
                          on_outcome=metrics.webhook_outcome)


def build_leases(settings: Settings) -> Leases:
    """Consul store: replicas share the work through leases in that Consul; SQLite: one replica drives all."""
    if settings.effective_store != "consul":
        return Solo()
    consul = settings.consul
    return ConsulLeases(consul.http_addr, prefix=consul.prefix, datacenter=consul.datacenter,
                        token=consul.token.get_secret_value() if consul.token else None, name=consul.replica_name,
                        ttl=consul.lease_ttl, heartbeat=consul.heartbeat, timeout=consul.lease_timeout)


def build_service(settings: Settings) -> JobService:
    """The service with its webhook worker (`service.webhooks`); the caller starts and closes both."""
    store = build_store(settings)
    metrics = Metrics()
    backend = build_backend(settings, metrics)
    policy = Policy(build_timeout=settings.build_timeout, test_timeout=settings.test_timeout,
                    publish_timeout=settings.publish_timeout, deadline_grace=settings.deadline_grace,
                    cleanup_attempts=settings.cleanup_attempts, cleanup_backoff=settings.cleanup_backoff)
    registry = RegistryTarget(registry_url=settings.registry_url, temp_prefix=settings.registry_temp_prefix,
                              tls_verify=settings.registry_tls_verify,
                              insecure_registries=settings.insecure_registry_hosts,
                              cache_prefix=settings.registry_cache_prefix, cache_ttl=settings.cache_ttl or None,
                              cache_max_bytes=settings.cache_max_bytes or None)
    log_limits = LogLimits(max_bytes=settings.max_log_bytes, max_lines=settings.max_log_lines,
                           max_line_bytes=settings.max_line_bytes)
    return JobService(store, backend, policy=policy, registry=registry, metrics=metrics,
                      admission=settings.submit_policy, max_concurrent_jobs=settings.max_concurrent_jobs,
                      webhooks=build_webhooks(settings, store, metrics),
                      max_queued_jobs=settings.max_queued_jobs, log_limits=log_limits,
                      tick_seconds=settings.tick_seconds, shutdown_grace=settings.kill_grace_seconds,
                      watch_buffer=settings.stream_client_buffer, leases=build_leases(settings))


def runtime_env(settings: Settings) -> dict[str, object]:
    """The runtime-configurable values whose environment variable is set: they win over Consul KV."""
    return {name: getattr(settings, name) for name in ("build_timeout", "test_timeout", "max_concurrent_jobs")
            if name in settings.model_fields_set}


def apply_runtime_config(settings: Settings, service: JobService, found: RuntimeConfig, index: int) -> None:
    """Environment (where set) > Consul KV > built-in default; a key removed from Consul falls back."""
    env = runtime_env(settings)
    config = effective(found, env)
    policy = service.policy.model_copy(update={
        "build_timeout": config.build_timeout or settings.build_timeout,
        "test_timeout": config.test_timeout or settings.test_timeout})
    limit = config.max_concurrent_jobs or settings.max_concurrent_jobs
    # Only Consul's values are pinned into new jobs: the environment's never change while the service runs.
    defaults = JobDefaults.of(found.model_copy(update=dict.fromkeys(env)))
    service.reconfigure(policy=policy, max_concurrent_jobs=limit, job_defaults=defaults, index=index)
    log.info("configuration from consul (index %d): build_timeout=%gs test_timeout=%gs max_concurrent_jobs=%d "
             "default resources %s per phase %s", index, policy.build_timeout, policy.test_timeout, limit,
             defaults.resources.model_dump(exclude_none=True) if defaults.resources else "built-in",
             {p: r.model_dump(exclude_none=True) for p, r in defaults.phase_resources.items()} or "built-in")


def build_config_watcher(settings: Settings, service: JobService) -> ConsulConfigWatcher | None:
    """The Consul KV config watcher when JOBFORGE_CONSUL_CONFIG=true; the caller starts and closes it."""
    consul = settings.consul
    if not consul.config:
        return None
    return ConsulConfigWatcher(consul.http_addr, consul.config_prefix,
                               lambda found, index: apply_runtime_config(settings, service, found, index),
                               token=consul.token.get_secret_value() if consul.token else None,
                               datacenter=consul.datacenter, wait=consul.config_wait)


def stream_limits(settings: Settings) -> StreamLimits:
    return StreamLimits(client_buffer=settings.stream_client_buffer, stall_timeout=settings.stream_stall_timeout,
                        close_timeout=settings.stream_close_timeout, poll_interval=settings.stream_poll_interval)
