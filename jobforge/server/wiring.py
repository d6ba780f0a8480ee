"""Builds the service from settings: the one place that picks a store and a backend."""

from __future__ import annotations

from jobforge.backends.base import Backend
from jobforge.backends.local import LocalBackend
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.base import Store
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from jobforge.webhooks import WebhookSender


def local_secret_env(settings: Settings) -> dict[str, str]:
    """The service-wide credentials as the task scripts read them, each with the host it is bound to
    (templates/tasks/_common.py does the matching; docs/security-credentials.md). Test containers never see
    these: `test.vault_secrets` values come only from JOBFORGE_SECRET_* variables, which the service never sets."""
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
                              tls_verify=settings.registry_tls_verify,
                              insecure_registries=settings.insecure_registry_hosts)
    return JobService(store, backend, policy=policy, registry=registry, admission=settings.submit_policy,
                      max_concurrent_jobs=settings.max_concurrent_jobs, webhooks=WebhookSender())
