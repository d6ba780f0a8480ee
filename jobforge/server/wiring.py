"""Builds the service from settings: the one place that picks a store and a backend."""

from __future__ import annotations

from jobforge.backends.base import Backend
from jobforge.backends.local import LocalBackend
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.server.streaming import StreamLimits
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.base import Store
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from jobforge.webhooks import WebhookSender


def local_secret_env(settings: Settings) -> dict[str, str]:
    env = {}
    if settings.registry_username and settings.registry_password:
        env["REGISTRY_USERNAME"] = settings.registry_username
        env["REGISTRY_PASSWORD"] = settings.registry_password.get_secret_value()
    if settings.git_username and settings.git_password:
        env["GIT_USERNAME"] = settings.git_username
        env["GIT_PASSWORD"] = settings.git_password.get_secret_value()
    return env


def build_store(settings: Settings) -> Store:
    if settings.effective_store == "consul":
        consul = settings.consul
        return ConsulStore(consul.http_addr, prefix=consul.prefix, datacenter=consul.datacenter,
                           token=consul.token.get_secret_value() if consul.token else None)
    return SqliteStore(settings.data_dir / "jobforge.db")


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "nomad":
        nomad = settings.nomad
        http = NomadHTTP(nomad.addr, token=nomad.token.get_secret_value() if nomad.token else None,
                         namespace=nomad.namespace, region=nomad.region)
        overrides = {"image": nomad.image} if nomad.image else {}
        return NomadBackend(NomadAPI(http), RenderParams.from_settings(settings, **overrides))
    data = settings.data_dir
    return LocalBackend(
        work_dir=data / "work", storage_root=data / "buildah" / "root", storage_runroot=data / "buildah" / "runroot",
        registry_url=settings.registry_url, tls_verify=settings.registry_tls_verify,
        secret_env=local_secret_env(settings), kill_grace=settings.kill_grace_seconds,
    )


def build_service(settings: Settings) -> JobService:
    store = build_store(settings)
    backend = build_backend(settings)
    policy = Policy(build_timeout=settings.build_timeout, test_timeout=settings.test_timeout,
                    publish_timeout=settings.publish_timeout)
    registry = RegistryTarget(registry_url=settings.registry_url, temp_prefix=settings.registry_temp_prefix,
                              tls_verify=settings.registry_tls_verify)
    return JobService(store, backend, policy=policy, registry=registry,
                      max_concurrent_jobs=settings.max_concurrent_jobs, webhooks=WebhookSender(),
                      watch_buffer=settings.stream_client_buffer)


def stream_limits(settings: Settings) -> StreamLimits:
    return StreamLimits(client_buffer=settings.stream_client_buffer, stall_timeout=settings.stream_stall_timeout,
                        close_timeout=settings.stream_close_timeout, poll_interval=settings.stream_poll_interval)
