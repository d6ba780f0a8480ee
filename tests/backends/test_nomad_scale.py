"""Scale mechanisms of the Nomad backend: streams never take a connection a request needs; long lines are cut
at the cap while they arrive."""

from __future__ import annotations

import pytest

from jobforge.backends.nomad import NomadAPI, NomadBackend, NomadHTTP
from jobforge.nomad import RenderParams
from tests.backends.test_nomad_backend import CONFIG, PAYLOAD, Collector, command
from tests.doubles.nomad import FakeNomad


@pytest.fixture
async def nomad():
    fake = FakeNomad(event_heartbeat=0.2, log_heartbeat=0.2)
    await fake.start()
    yield fake
    await fake.stop()


async def test_open_streams_never_hold_back_a_request(nomad):
    """Room for ONE request connection; the event stream and two followed logs per running phase stay open
    (seven streams), yet a further dispatch and the leader check go through: no pool is shared."""
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url, request_connections=1)), RenderParams())
    collector = Collector(backend)
    try:
        for n in (1, 2, 3):
            await backend.dispatch(command(job_id=f"job-{n}"), PAYLOAD, CONFIG)
        children = sorted(jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-build/dispatch-"))
        for n, child in enumerate(children, 1):
            alloc = nomad.alloc_ids(child)[0]
            nomad.start_alloc(alloc)
            nomad.write_log(alloc, f"running {n}\n".encode())
            nomad.write_log(alloc, f"warming {n}\n".encode(), "stderr")
        # Each line arrived on a followed log: all six log streams (and the event stream) are open now.
        await collector.until(lambda c: sorted(c.lines()) == sorted(
            [f"{what} {n}" for n in (1, 2, 3) for what in ("running", "warming")]))
        await backend.dispatch(command(job_id="job-4"), PAYLOAD, CONFIG)
        assert len([jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-build/dispatch-")]) == 4
        assert await backend.check() == {}
        live = [s for s in nomad.seen if s.path.startswith("/v1/client/fs/logs/") and "follow=true" in s.query]
        assert len(live) >= 6
    finally:
        collector.close()
        await backend.aclose()


async def test_a_long_line_is_reported_in_pieces_at_the_cap(nomad):
    """Lines are cut at `max_line_bytes` while the frames arrive (as the local backend does), never held whole."""
    backend = NomadBackend(NomadAPI(NomadHTTP(nomad.url)), RenderParams(), max_line_bytes=1024)
    collector = Collector(backend)
    try:
        await backend.dispatch(command(), PAYLOAD, CONFIG)
        child = next(jid for (_, jid) in nomad.cluster.jobs if jid.startswith("jobforge-build/dispatch-"))
        nomad.run_alloc(nomad.alloc_ids(child)[0], stdout=b"y" * 2500 + b"\nshort\n")
        await collector.until(lambda c: c.ended() is not None)
        marker = " [line split: longer than 1024 bytes, continued on the next line]"
        assert collector.lines() == ["y" * 1024 + marker, "y" * 1024 + marker, "y" * 452, "short"]
    finally:
        collector.close()
        await backend.aclose()
