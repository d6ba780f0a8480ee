"""`jobforge-service`: load settings once, wire the service, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from jobforge import logs
from jobforge.consul_agent import ConsulAgent, replica_agent
from jobforge.errors import ConfigError, ServiceUnavailable
from jobforge.server.app import create_app, create_metrics_app
from jobforge.server.wiring import build_config_watcher, build_guard, build_service, stream_limits
from jobforge.settings import Settings

log = logging.getLogger("jobforge")
_CONFIG_LOAD_WAIT = 10  # seconds the start waits for the Consul KV configuration


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    guard = build_guard(settings)  # before anything is built or bound: refuses unsafe exposure
    service = build_service(settings)
    await service.webhooks.start()
    config_watcher = build_config_watcher(settings, service)
    if config_watcher is not None:
        config_watcher.start()
        if not await config_watcher.wait_loaded(_CONFIG_LOAD_WAIT):
            log.warning("consul config under %s not read within %ds; starting with the environment's values, "
                        "still watching", settings.consul.config_prefix, _CONFIG_LOAD_WAIT)
    await service.start()
    app = create_app(service, guard, stream_limits=stream_limits(settings), mcp_log_level=settings.mcp_log_level)
    runners = [web.AppRunner(app, access_log=None)]
    if settings.metrics_port:
        runners.append(web.AppRunner(create_metrics_app(service), access_log=None))
    ports = [settings.server_port, settings.metrics_port]
    consul: ConsulAgent | None = None
    try:
        if settings.consul.self_register:  # before listening: once /health answers, the replica is findable
            consul, registrations = replica_agent(settings)
            await consul.register(registrations)
        for runner, port in zip(runners, ports):
            await runner.setup()
            await web.TCPSite(runner, settings.server_host, port).start()
        log.info("jobforge-service listening on http://%s:%d (backend=%s, metrics port %s)",
                 settings.server_host, settings.server_port, settings.backend, settings.metrics_port or "off")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # What exists now (modules, schemas, the app) lives as long as the process: out of the collector's
        # sight, so a full collection during a log flood scans only what the flood made (~35 ms less a pass here).
        gc.freeze()
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        if consul is not None:  # first: clients stop finding this replica before it stops answering
            await consul.deregister()
        for runner in runners:
            await runner.cleanup()
        if config_watcher is not None:
            await config_watcher.aclose()
        await service.aclose()  # first: running cleanups finish (bounded) while the backend still works
        await service.backend.aclose()
        await service.webhooks.aclose()
        await service.store.aclose()


def _parse_args(argv: list[str] | None) -> None:
    """Only --help and --version: every setting comes from the environment (docs/architecture.md)."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="jobforge-service",
        description="Serve the Job Forge API (JSON-RPC, REST, WebSocket) and metrics until SIGINT/SIGTERM. "
                    "Configured through environment variables: SERVER_HOST, SERVER_PORT, METRICS_PORT, "
                    "JOBFORGE_BACKEND (local|nomad), JOBFORGE_DATA_DIR, JOBFORGE_API_TOKENS_FILE, REGISTRY_URL, "
                    "NOMAD_ADDR, CONSUL_HTTP_ADDR, ... (see README and docs/).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('jobforge')}")
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"jobforge-service: invalid configuration:\n{exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format, sys.stderr)
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"jobforge-service: invalid configuration: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except ServiceUnavailable as exc:  # e.g. Consul refused the registration (JOBFORGE_CONSUL_REGISTER)
        log.error("jobforge-service stopped: %s", exc.message)
        sys.exit(1)


if __name__ == "__main__":
    main()
