"""The service stack of `jobforge-service` (SQLite store, JobService, local backend, HTTP app) as its own
process, with the local backend's interpreter replaced by a given program: every phase runs that program, so a
test can make a phase print anything (100 MB without a newline, binary) without buildah.

    python -m tests.support.flood_service <data_dir> <program>   # prints "port <n>" once it listens
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

from jobforge.backends.local import LocalBackend
from jobforge.logcaps import LogLimits
from jobforge.pipeline import Policy
from jobforge.server.app import create_app
from jobforge.service import JobService
from jobforge.settings import Settings
from jobforge.stores.sqlite import SqliteStore
from jobforge.tasks import RegistryTarget


async def main(data_dir: Path, program: str) -> None:
    settings = Settings(data_dir=data_dir)  # limits from the environment (JOBFORGE_MAX_LOG_BYTES, ...)
    limits = LogLimits(max_bytes=settings.max_log_bytes, max_lines=settings.max_log_lines,
                       max_line_bytes=settings.max_line_bytes)
    backend = LocalBackend(work_dir=data_dir / "work", storage_root=data_dir / "root", storage_runroot=data_dir / "run",
                           registry_url="127.0.0.1:5000", tls_verify=False, python=program,
                           max_line_bytes=settings.max_line_bytes, kill_grace=3)
    store = SqliteStore(data_dir / "jobforge.db")
    service = JobService(store, backend, policy=Policy(), max_concurrent_jobs=1,
                         registry=RegistryTarget(registry_url="127.0.0.1:5000", tls_verify=False),
                         log_limits=limits)
    await service.start()
    runner = web.AppRunner(create_app(service))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"port {runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await service.aclose()
        await backend.aclose()
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
