"""A JobService on the Nomad backend and SQLite, against the Nomad double, for service-level Nomad tests; the
double's client plays each phase's task with a runner the test holds at a gate per phase."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from jobforge.admission import SubmitPolicy
from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.nomad import RenderParams
from jobforge.pipeline import Policy
from jobforge.service import JobService
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget
from tests.doubles.nomad import FakeNomad, TaskRun

CONFIG = {"owner": "team", "repo_url": "https://git.example.invalid/app.git", "image_name": "app",
          "registry_url": "127.0.0.1:5000", "image_tags": ["latest"], "test": {"commands": ["true"]}}
PHASES = ("build", "test", "publish")


class Gates:
    """Each phase's task prints a line and waits at its gate; `exit_codes` says how it ends."""

    def __init__(self) -> None:
        self.open = {phase: asyncio.Event() for phase in (*PHASES, "cleanup")}
        self.exit_codes = {phase: 0 for phase in self.open}

    async def runner(self, run: TaskRun, payload: bytes, env: dict) -> int:
        run.write(f"{run.name} started\n".encode())
        await self.open[run.name].wait()
        code = self.exit_codes[run.name]
        if code:
            run.write(f"ERROR: {run.name} went wrong\n".encode(), "stderr")
        else:
            run.write(f"{run.name} done\n".encode())
        return code


@asynccontextmanager
async def service_on(db, nomad: FakeNomad, **backend_options):
    """The service (short stream timeout and retry delay); leaving the block drops it without stopping anything
    in Nomad, as SIGKILL would."""
    options = {"stream_timeout": 2.0, "retry_delay": 0.05, **backend_options}
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url)), RenderParams(), **options)
    store = SqliteStore(db)
    svc = JobService(store, backend, policy=Policy(), max_concurrent_jobs=2, admission=SubmitPolicy.permissive(),
                     registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False))
    await svc.start()
    try:
        yield svc
    finally:  # no graceful stop of anything in Nomad: the children run on, as after SIGKILL
        await svc.aclose()
        await backend.aclose()
        await store.aclose()


def running_in_nomad(nomad: FakeNomad, phase: str) -> bool:
    return any(jid.startswith(f"jobforge-{phase}/dispatch-") and any(
        a["ClientStatus"] == "running" for a in nomad.allocations(jid)) for (_, jid) in nomad.cluster.jobs)
