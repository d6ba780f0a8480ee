"""The real `jobforge-service` with `JOBFORGE_STORE=consul` against the fake agent: what it stores survives a restart.

The build fails fast (its repository does not exist), so no image is built; completion is awaited on the
service's WebSocket push.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from jobforge.server.wiring import build_store
from jobforge.settings import Settings
from jobforge.stores.consul import ConsulStore
from jobforge.stores.sqlite import SqliteStore
from tests.doubles.consul import FakeConsul
from tests.support.service import ServiceProcess


def watch_until_end(url: str, job_id: str) -> dict:
    async def follow() -> dict:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/json/job/{job_id}/watch") as ws:
            async for msg in ws:
                update = json.loads(msg.data)
                if update["type"] == "end":
                    return update["job"]
        raise AssertionError("watch closed before the job ended")
    return asyncio.run(asyncio.wait_for(follow(), 120))


def test_settings_pick_the_store(monkeypatch, tmp_path):
    monkeypatch.setenv("JOBFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("JOBFORGE_STORE", raising=False)
    assert isinstance(build_store(Settings()), SqliteStore)
    monkeypatch.setenv("JOBFORGE_STORE", "consul")
    monkeypatch.setenv("JOBFORGE_CONSUL_PREFIX", "team-a/jobforge/")
    store = build_store(Settings())
    assert isinstance(store, ConsulStore) and store.prefix == "team-a/jobforge/"
    monkeypatch.setenv("JOBFORGE_CONSUL_PREFIX", "../escape/")
    with pytest.raises(ValueError, match="JOBFORGE_CONSUL_PREFIX"):
        Settings()


@pytest.mark.e2e
def test_service_keeps_status_history_and_logs_in_consul_across_a_restart(tmp_path, registry):
    fake = FakeConsul()
    config = {"owner": "consul-e2e", "repo_url": str(tmp_path / "no-such-repo"), "image_name": "ghost",
              "registry_url": registry.host}
    with fake.in_thread() as addr:
        with ServiceProcess(tmp_path / "service", registry.host, JOBFORGE_STORE="consul", CONSUL_HTTP_ADDR=addr,
                            JOBFORGE_CONSUL_PREFIX="e2e/jobforge/") as svc:
            status, body = svc.post("/json/submitJob", {"job_config": {**config, "image_name": "Not Valid!"}})
            assert status == 400 and body["error"]["data"][0]["field"] == "job_config.image_name"
            status, body = svc.post("/json/submitJob", {"job_config": config})
            assert status == 200, body
            job_id = body["job_id"]
            final = watch_until_end(svc.url, job_id)
            assert (final["status"], final["failed_phase"]) == ("FAILED", "build"), final
            _, logs = svc.get(f"/json/job/{job_id}/logs")
            assert logs["logs"]["build"], logs
            _, history = svc.post("/json/getHistory", {"limit": 10})
            assert [j["id"] for j in history["jobs"]] == [job_id] and history["total"] == 1

            svc.restart()
            assert svc.get(f"/json/job/{job_id}/status") == (200, final)
            assert svc.get(f"/json/job/{job_id}/logs") == (200, logs)
            assert svc.post("/json/getHistory", {"limit": 10}) == (200, history)
            status, ready = svc.get("/ready")
            assert ready["checks"]["store"] == "ok", ready
        assert not (tmp_path / "service" / "jobforge.db").exists()  # nothing went to SQLite
        keys = sorted(fake.table.entries)
        assert [k for k in keys if k.startswith("e2e/jobforge/jobs/")] == [f"e2e/jobforge/jobs/{job_id}"]  # a uuid
        assert f"e2e/jobforge/logs/{job_id}/build/000000000000" in keys, keys
