"""``submit-job``: merge and validate locally, reserve a version, submit, record history, optionally watch.

Order matters for the guarantees: nothing is sent when the config is invalid (exit 2); the version file stays
locked from reading the number until the server answered, and is written only on acceptance; history
directories are created before submitting so an unusable deploy dir fails before a job exists.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobforge_cli import merge, versioning
from jobforge_cli.history import History, dump_yaml
from jobforge_cli.watch import watch_job
from jobforge.client import Client
from jobforge.config import JobConfig, format_validation_errors
from jobforge.errors import ConfigError

DEFAULT_DEPLOY_DIR = "deploy"


def validate(config: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(config)
    except ValidationError as exc:
        raise ConfigError("invalid job config", format_validation_errors(exc)) from None


def deploy_dir_of(config: dict[str, Any]) -> Path:
    value = config.get("deploy_dir") or DEFAULT_DEPLOY_DIR
    return Path(value) if isinstance(value, str) else Path(DEFAULT_DEPLOY_DIR)


def run(client_factory: Any, *, source: str | None, global_file: str | None, image_tags: list[str] | None,
        watch: bool, history: bool, no_version: bool, dry_run: bool, json_out: bool) -> int:
    raw = merge.merged_config(source, global_file, image_tags, sys.stdin)
    validate(raw)  # fail fast, before any lock or connection
    deploy_dir = deploy_dir_of(raw)
    branch = versioning.current_branch()
    if dry_run:
        if not no_version:
            raw = merge.add_tags(raw, [versioning.peek(deploy_dir, branch)[2]])
        redacted = validate(raw).redacted()
        sys.stdout.write(json.dumps(redacted, indent=2) + "\n" if json_out else dump_yaml(redacted))
        return 0
    recorder = History(deploy_dir) if history else None
    if recorder:
        recorder.prepare()
    client: Client = client_factory()
    reservation = nullcontext(None) if no_version else versioning.reserve(deploy_dir, branch)
    with reservation as reserved:
        if reserved is not None:
            raw = merge.add_tags(raw, [reserved.tag])
        config = validate(raw)
        result = client.submit_job(raw)
        if reserved is not None:
            reserved.commit()
    submitted_at = datetime.now(UTC)
    if recorder:
        try:
            recorder.record_submission(result.job_id, submitted_at, branch, config.redacted(),
                                       config.image_tags_for(result.job_id))
        except OSError as exc:
            print(f"warning: could not write local history: {exc}", file=sys.stderr)
    if not watch:
        print(result.model_dump_json(indent=2))
        return 0
    out = sys.stderr if json_out else sys.stdout
    finish = (lambda job: recorder.record_final(job, branch, client.get_logs(job.job_id))) if recorder else None
    code, job = watch_job(client, result.job_id, out=out, tty=out.isatty(), on_finish=finish)
    if json_out and job is not None:
        print(job.model_dump_json(indent=2))
    return code
