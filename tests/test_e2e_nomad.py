"""Real builds through the Nomad backend: the service dispatches the parameterized jobs to the Nomad double,
whose client runs the jobs' own task scripts (written from the jobs' template blocks) with buildah, skopeo and
git on this machine, and the service follows the event stream and the framed logs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from jobforge.admission import SubmitPolicy
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.models import GetLogsParams, JobIdParams, SubmitJobParams
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.doubles.nomad import FakeNomad, subprocess_runner
from tests.support.gitrepo import GitRepo

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"


@pytest.fixture
async def service(tmp_path, registry, buildah_storage):
    # The jobs mount the client's buildah-cache volume; on this "client" that is the session's storage.
    runner = subprocess_runner(extra_env={"JOBFORGE_BUILDAH_ROOT": str(buildah_storage.root),
                                          "JOBFORGE_BUILDAH_RUNROOT": str(buildah_storage.runroot)})
    nomad = FakeNomad(runner=runner, event_heartbeat=0.5, log_heartbeat=0.5)
    await nomad.start()
    store = SqliteStore(tmp_path / "jobs.db")
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url)), RenderParams())
    svc = JobService(store, backend, policy=Policy(), max_concurrent_jobs=2,
                     registry=RegistryTarget(registry_url=registry.host, tls_verify=False),
                     admission=SubmitPolicy(allow_file_repos=True))  # the test builds from local repositories
    await svc.start()
    try:
        yield svc, nomad
    finally:
        await svc.aclose()
        await backend.aclose()
        await store.aclose()
        await nomad.stop()


def config(repo: GitRepo, registry, base_image, **changes) -> dict:
    return {"owner": "nomad-e2e", "repo_url": str(repo.path), "image_name": f"hello-{uuid.uuid4().hex[:8]}",
            "registry_url": registry.host, "image_tags": ["latest"], "build_args": {"BASE_IMAGE": base_image},
            "test": {"entry_point": True, "commands": ["/app/run-tests.sh"]}, **changes}


async def run_to_end(svc: JobService, cfg: dict):
    submitted = await svc.submit_job(SubmitJobParams.model_validate({"job_config": cfg}))
    await svc.idle()
    status = await svc.get_status(JobIdParams(job_id=submitted.job_id))
    logs = await svc.get_logs(GetLogsParams(job_id=submitted.job_id))
    return status, logs.logs


async def test_build_test_publish_through_nomad(service, tmp_path, registry, base_image):
    svc, nomad = service
    repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
    cfg = config(repo, registry, base_image)
    status, logs = await run_to_end(svc, cfg)
    assert status.status.value == "SUCCEEDED", (status.error, logs)
    name, job_id = cfg["image_name"], status.job_id
    digests = {registry.manifest_digest(name, tag) for tag in (job_id, "latest")}
    assert len(digests) == 1 and None not in digests
    assert "Hello, world!" in logs["test"] and any(line.startswith("Published: ") for line in logs["publish"])
    assert any(line.startswith("STEP 1/") for line in logs["build"])
    assert status.temp_image_deleted is True and not registry.has_manifest(f"temp-{name}", job_id)
    dispatched = sorted(jid.split("/")[0] for (_, jid) in nomad.cluster.jobs if "/dispatch-" in jid)
    assert dispatched == ["jobforge-build", "jobforge-cleanup", "jobforge-publish", "jobforge-test"]
    usage = svc.metrics.registry.get_sample_value
    for phase in ("build", "test", "publish"):  # from the allocations' stats, read while the client had them
        assert usage("resource_usage", {"resource_type": "memory", "phase": phase}) > 1 << 20, phase
        assert usage("resource_usage", {"resource_type": "cpu", "phase": phase}) is not None, phase
    steps = usage("build_cache_steps_total", {"result": "hit"}) + usage("build_cache_steps_total", {"result": "miss"})
    assert steps > 0  # the build's control line came through the task's logs, with its nonce


async def test_a_failing_test_phase_through_nomad(service, tmp_path, registry, base_image):
    svc, _ = service
    repo = GitRepo.from_dir(tmp_path / "hello", EXAMPLE)
    status, logs = await run_to_end(svc, config(repo, registry, base_image,
                                                test={"commands": ["echo 'expected 2, got 3'; exit 4"]}))
    assert (status.status.value, status.failed_phase.value) == ("FAILED", "test")
    assert "expected 2, got 3" in logs["test"] and "exited with code 4" in status.error
    assert logs["publish"] == []
