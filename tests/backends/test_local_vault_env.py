"""The local backend with a job's Vault values (`job_env`): they reach the task script's environment only (not
its argv), are masked in its output and error, and a Vault failure fails the phase before anything starts."""

from __future__ import annotations

from jobforge.backends.base import JobEvent, LogChunk
from jobforge.backends.local import LocalBackend
from jobforge.config import JobConfig
from jobforge.errors import SecretReadError
from jobforge.models import Phase
from jobforge.pipeline import DispatchPhase, PhaseFailed, PhaseStarted

SECRET = "hunter2-vault-value"
CONFIG = JobConfig.model_validate({"owner": "t", "repo_url": "https://git.example.invalid/a.git",
                                   "image_name": "app", "registry_url": "127.0.0.1:5000",
                                   "git_credentials_path": "secret/data/t/git"})
COMMAND = DispatchPhase(job_id="job-1", phase=Phase.BUILD, attempt=1, timeout_seconds=60,
                        resources=CONFIG.resources_for("build"))


def backend(tmp_path, job_env) -> LocalBackend:
    """The 'interpreter' is a shell script standing in for a task script that prints what it was given."""
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "token is $JOBFORGE_JOB_GIT_PASSWORD"\n'
                    'echo "ERROR: refused with $JOBFORGE_JOB_GIT_PASSWORD" >&2\nexit 1\n')
    fake.chmod(0o755)
    return LocalBackend(work_dir=tmp_path / "work", storage_root=tmp_path / "nowhere" / "root",
                        storage_runroot=tmp_path / "nowhere" / "runroot", registry_url="127.0.0.1:5000",
                        tls_verify=False, kill_grace=2, python=str(fake), job_env=job_env)


async def run(b: LocalBackend) -> tuple[list[str], list]:
    lines, events = [], []
    await b.dispatch(COMMAND, {"job_id": "job-1"}, CONFIG)
    async for message in b.events():
        if isinstance(message, LogChunk):
            lines += [line.line for line in message.lines]
        elif isinstance(message, JobEvent):
            events.append(message.event)
            if isinstance(message.event, PhaseFailed):
                break
    await b.aclose()
    return lines, events


async def test_vault_values_reach_the_environment_only_and_are_masked(tmp_path):
    asked = []

    async def job_env(phase: str, config: JobConfig) -> dict[str, str]:
        asked.append((phase, config.git_credentials_path))
        return {"JOBFORGE_JOB_GIT_PASSWORD": SECRET}

    lines, events = await run(backend(tmp_path, job_env))
    assert asked == [("build", "secret/data/t/git")]
    assert "token is ***" in lines  # the script had the value, its output shows the mask
    assert any(line.startswith("argv: ") for line in lines)
    assert events[-1].error == "build phase failed: refused with ***"
    assert SECRET not in repr((lines, events))


async def test_a_vault_failure_fails_the_phase_before_it_starts(tmp_path):
    async def job_env(phase: str, config: JobConfig) -> dict[str, str]:
        raise SecretReadError("Vault refused to read secret/data/t/git: permission denied")

    lines, events = await run(backend(tmp_path, job_env))
    assert not any(isinstance(e, PhaseStarted) for e in events) and lines == []
    assert events[-1].error == ("build phase could not read its Vault secrets: Vault refused to read "
                                "secret/data/t/git: permission denied")
