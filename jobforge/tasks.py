"""What a phase's task script receives: the JSON payload, built purely from the job record.

Both backends hand this payload to the same scripts in `templates/tasks/` (the local backend as a file, Nomad as
the dispatch payload). It never holds secrets: credentials reach the scripts through the environment only.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from jobforge.models import JobRecord, JobStatus, Phase


class RegistryTarget(BaseModel):
    """Where temp images live; from the service settings."""

    model_config = ConfigDict(frozen=True)

    registry_url: str
    temp_prefix: str = "temp"
    tls_verify: bool = True
    insecure_registries: tuple[str, ...] = ()  # host[:port] without TLS verification besides registry_url
    cache_prefix: str = "cache"  # the layer cache repository: <registry_url>/<cache_prefix>/<image_name>; "": none
    cache_ttl: float | None = 7 * 24 * 3600  # seconds; None: cached layers never expire
    cache_max_bytes: int | None = 20 * 10**9  # the local layer store's cap; None: no cap


def temp_image(record: JobRecord, target: RegistryTarget) -> str:
    return f"{target.registry_url}/{target.temp_prefix}-{record.config.image_name}:{record.job_id}"


def cache_repo(record: JobRecord, target: RegistryTarget) -> str | None:
    """The job's layer cache repository; None when the service has no registry cache (empty prefix)."""
    if not target.cache_prefix:
        return None
    return f"{target.registry_url}/{target.cache_prefix}/{record.config.image_name}"


def publish_targets(record: JobRecord) -> list[str]:
    cfg = record.config
    return [f"{cfg.registry_url}/{cfg.image_name}:{tag}" for tag in record.image_tags]


def build_payload(record: JobRecord, phase: str, target: RegistryTarget) -> dict:
    """`phase` is a `Phase` value or "cleanup"."""
    cfg = record.config
    test = cfg.test
    return {
        "job_id": record.job_id,
        "phase": phase,
        "repo_url": cfg.repo_url,
        "git_ref": cfg.git_ref,
        "dockerfile_path": cfg.dockerfile_path,
        "dockerfile_context": cfg.dockerfile_context,
        "build_args": dict(cfg.build_args),
        "target": cfg.target,
        "image_format": cfg.image_format,
        "clear_cache": cfg.clear_cache,
        "cache_repo": cache_repo(record, target),
        "cache_ttl": target.cache_ttl,
        "cache_max_bytes": target.cache_max_bytes,
        "temp_image": temp_image(record, target),
        "tls_verify": target.tls_verify,
        "insecure_registries": list(target.insecure_registries),
        "test": {
            "entry_point": bool(test and test.entry_point),
            "commands": list(test.commands) if test else [],
            "env": dict(test.env) if test else {},
            "network": test.network.value if test else "none",
            "secret_env": sorted({v for s in test.vault_secrets for v in s.fields.values()}) if test else [],
        },
        "publish_targets": publish_targets(record),
        # A failed publish may have left tags the publish phase could not roll back: cleanup removes them.
        "rollback_targets": publish_targets(record)
        if phase == "cleanup" and record.status is JobStatus.FAILED and record.failed_phase is Phase.PUBLISH else [],
    }


def templates_dir() -> Path:
    """The task scripts: packaged as `jobforge/_templates` in a wheel, `templates/` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_templates", here.parent / "templates"):
        if (candidate / "tasks").is_dir():
            return candidate
    raise FileNotFoundError("task scripts not found (expected jobforge/_templates or ./templates)")


def task_script(name: str) -> Path:
    return templates_dir() / "tasks" / f"{name}.py"
