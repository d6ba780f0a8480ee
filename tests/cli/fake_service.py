"""A fake Job Forge service speaking the HTTP API exactly as docs/api.md describes it.

Used by the client and CLI unit tests (the real-server tests live in test_cli_e2e.py). It runs an aiohttp app
on 127.0.0.1 in a background thread, records every request, and plays scripted watch streams. Documents are
literal dicts, shaped by hand from the docs, so the client's parsing is checked against an independent source.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

T0 = "2025-10-10T14:23:45Z"


def phase_doc(status: str = "PENDING", started: str | None = None, ended: str | None = None,
              duration: float | None = None, error: str | None = None, attempt: int = 0) -> dict[str, Any]:
    return {"status": status, "attempt": attempt, "started_at": started, "ended_at": ended, "duration": duration,
            "error": error}


def status_doc(job_id: str, status: str = "PENDING", *, phases: dict[str, dict] | None = None,
               failed_phase: str | None = None, error: str | None = None, finished_at: str | None = None,
               total: float | None = None, tags: list[str] | None = None, owner: str = "team",
               image_name: str = "app", registry_url: str = "127.0.0.1:5000", git_ref: str = "main") -> dict:
    phases = {p: phase_doc() for p in ("build", "test", "publish")} | (phases or {})
    current = {"BUILDING": "build", "TESTING": "test", "PUBLISHING": "publish"}.get(status)
    return {
        "job_id": job_id, "status": status, "current_phase": current, "failed_phase": failed_phase,
        "error": error,
        "config": {"owner": owner, "repo_url": "https://example.invalid/r.git", "git_ref": git_ref,
                   "image_name": image_name, "registry_url": registry_url, "image_tags": (tags or [job_id])[1:],
                   "webhook_secret": "***"},
        "metrics": {"job_start": T0, "job_end": finished_at, "total_duration": total},
        "image_tags": tags or [job_id], "phases": phases, "submitted_at": T0, "finished_at": finished_at,
    }


def error_doc(code: int, message: str, data: Any = None) -> dict:
    return {"error": {"code": code, "message": message} | ({"data": data} if data is not None else {})}


class FakeService:
    """State and behaviour are plain attributes a test may change before calling the client."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.headers: list[dict[str, str]] = []  # the headers of each request in `requests`, same order
        self.jobs: dict[str, dict] = {}
        self.logs: dict[str, dict[str, list[dict]]] = {}
        self.watch_scripts: dict[str, list[dict]] = {}
        self.reject_submit: dict | None = None  # an error_doc to answer submitJob with (HTTP 400)
        self.ready_ok = True
        self.hold_open: set[str] = set()  # job ids whose watch stays open after the script (for Ctrl-C tests)
        self._next = 0
        self._lock = threading.Lock()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ handlers

    async def _method(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        body = await request.json()
        self.requests.append(("POST", f"/json/{name}", body))
        self.headers.append(dict(request.headers))
        handler = getattr(self, f"_do_{name}", None)
        if handler is None:
            return web.json_response(error_doc(-32601, f"method {name!r} not found"), status=404)
        status, doc = handler(body)
        return web.json_response(doc, status=status)

    def _job(self, body: dict) -> dict | None:
        return self.jobs.get(body.get("job_id", ""))

    def _missing(self, body: dict) -> tuple[int, dict]:
        return 404, error_doc(-32004, f"job {body.get('job_id')} not found")

    def _do_submitJob(self, body: dict) -> tuple[int, dict]:
        if self.reject_submit is not None:
            return 400, self.reject_submit
        with self._lock:
            self._next += 1
            job_id = f"job-{self._next}"
        tags = list(dict.fromkeys([job_id, *body["job_config"].get("image_tags", [])]))
        self.jobs[job_id] = status_doc(job_id, tags=tags, image_name=body["job_config"]["image_name"])
        return 200, {"job_id": job_id, "status": "PENDING"}

    def _do_getStatus(self, body: dict) -> tuple[int, dict]:
        job = self._job(body)
        return (200, job) if job else self._missing(body)

    def _do_getLogs(self, body: dict) -> tuple[int, dict]:
        if not self._job(body):
            return self._missing(body)
        entries = self.logs.get(body["job_id"], {})
        names = [body["phase"]] if body.get("phase") else ["build", "test", "publish"]
        doc: dict[str, Any] = {"job_id": body["job_id"],
                               "logs": {n: [e["line"] for e in entries.get(n, [])] for n in names}}
        if body.get("structured"):
            doc["entries"] = {n: entries.get(n, []) for n in names}
        return 200, doc

    def _do_killJob(self, body: dict) -> tuple[int, dict]:
        job = self._job(body)
        if not job:
            return self._missing(body)
        if job["status"] in ("SUCCEEDED", "FAILED"):
            return 409, error_doc(-32009, f"job {body['job_id']} already finished")
        return 200, {"job_id": body["job_id"], "status": "FAILED", "message": "killed by user"}

    def _do_cleanup(self, body: dict) -> tuple[int, dict]:
        if not self._job(body):
            return self._missing(body)
        return 200, {"job_id": body["job_id"], "cleaned": ["temp image", "workdir"]}

    def _do_getHistory(self, body: dict) -> tuple[int, dict]:
        jobs = [j | {"id": j["job_id"]} for j in reversed(self.jobs.values())
                if body.get("owner") in (None, j["config"]["owner"]) and body.get("status") in (None, j["status"])]
        limit, offset = body.get("limit", 10), body.get("offset", 0)
        return 200, {"jobs": jobs[offset:offset + limit], "total": len(jobs), "limit": limit, "offset": offset}

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.ready_ok:
            return web.json_response({"status": "ok", "checks": {"store": "ok", "backend": "ok"}})
        return web.json_response({"status": "unavailable", "checks": {"store": "ok", "backend": "buildah missing"}},
                                 status=503)

    async def _broken(self, request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        self.requests.append(("GET", request.path_qs, None))
        self.headers.append(dict(request.headers))
        if job_id not in self.jobs:
            return web.json_response(error_doc(-32004, f"job {job_id} not found"), status=404)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        logs = request.query.get("logs") == "true"
        for message in self.watch_scripts.get(job_id, []):
            if message["type"] != "log" or logs:  # log lines only when asked for, as documented
                await ws.send_json(message)
        if job_id in self.hold_open:
            async for _ in ws:  # until the client goes away
                pass
        await ws.close()
        return ws

    # ------------------------------------------------------------ lifecycle

    def _app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/json/job/{job_id}/watch", self._watch),
            web.post("/json/broken", self._broken),
            web.post("/json/{method}", self._method),
            web.get("/health", self._health),
            web.get("/ready", self._ready),
        ])
        return app

    def start(self) -> "FakeService":
        started = threading.Event()

        async def boot() -> None:
            self._runner = web.AppRunner(self._app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(boot())
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-jobforge", daemon=True)
        self._thread.start()
        started.wait()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
