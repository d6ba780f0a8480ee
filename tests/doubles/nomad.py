"""A fake Nomad agent (server + one client node) on 127.0.0.1, shaped from shared/reference/nomad-api.md.

HTTP subset (reference §1-§11): `PUT|POST /v1/jobs` and `/v1/job/:id` (register), `POST /v1/jobs/parse`,
`GET /v1/jobs`, `GET /v1/job/:id` (+ `/summary`, `/allocations`, `/evaluations`, `/dispatch`),
`DELETE /v1/job/:id`, `GET /v1/allocation/:id`, `POST /v1/allocation/:id/stop`, `GET /v1/allocations`,
`GET /v1/evaluation/:id`, `GET /v1/client/fs/logs/:alloc`, `GET /v1/client/allocation/:id/stats`
(nomad_stats.py), `GET /v1/event/stream`, `GET /v1/status/leader`.
Job IDs may contain `/` (dispatched children), raw or as `%2F`; sub-resources match by suffix as in the agent.
Errors are plain text with the agent's status codes and texts; reads carry `X-Nomad-Index`,
`X-Nomad-KnownLeader` and `X-Nomad-LastContact` and block on `?index=&wait=` (no jitter); writes carry
`X-Nomad-Index`. With `acl_token` set every request needs it in `X-Nomad-Token` (or `Authorization: Bearer`):
none -> 403 `Permission denied`, another -> 403 `ACL token not found`.

The pieces: nomad_state.py (server state, writes, events), nomad_scheduler.py (placement, stops, lost nodes),
nomad_client.py (the client node: task lifecycle, logs, runner hook), nomad_http.py (request parsing, log and
event streams), nomad_jobspec.py (job JSON and HCL), nomad_shapes.py (wire shapes and Go-isms); templates render through
consul_template.py against the FakeVault given as `vault=`.

Test knobs: `node=` (a nomad_placement.Node: datacenter, attributes, meta, host volumes, devices, capacity;
placement honours them as Nomad's feasibility checks do, and `node_changed()` re-runs blocked evals after a test
edits `fake.node`); `auto_place=False` leaves evaluations pending until `place(job_id)`; `runner=` drives allocations
automatically (see nomad_client.py; `subprocess_runner()` plays the docker driver on this host), rendering
templates with the secrets of `vault=` (a FakeVault, read in-process; none: every `secret` is missing); without a
runner use `receive_alloc` / `start_alloc` / `write_log` / `report_stats` / `finish_alloc` or `run_alloc`;
`lose_alloc`, `fail_to_place`, `allow_placement`, `gc`; outside stops as an operator makes them: `stop_alloc`
(`nomad alloc stop`: migrate, a replacement is placed), `stop_job` (`nomad job stop [-purge]`), `drain_node`
(deadline reached: every allocation migrated, the node ineligible); `fail_template` (the template hook's "Template failed: ..."
kill); `event_heartbeat` / `log_heartbeat` shorten the `{}` periods (Nomad: 30 s events, 1 s logs);
`seen` records requests; `outage = (status, text)` fails every request; `lose_replies = ["/dispatch"]` does the
next such request and then resets the connection instead of replying; `cut_streams()` makes every open stream
half-open (no more bytes, no FIN: the peer went away without a word) while new connections work. Run it in the test's loop
(`await start()` / `await stop()`) or in a thread for a subprocess (`with fake.in_thread() as url:`; then call
helpers through `fake.call(fn, *args)`).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from tests.doubles._serve import serve_on_loopback, served_in_thread
from tests.doubles.nomad_client import Client, Runner, TaskRun, subprocess_runner
from tests.doubles.nomad_http import (
    Streams,
    body,
    boolean,
    kind,
    namespace,
    read_headers,
    reply,
    stream_events,
    stream_logs,
    token,
)
from tests.doubles.nomad_jobspec import decode_job, parse_hcl
from tests.doubles.nomad_placement import Node
from tests.doubles.nomad_shapes import (
    JOB_STUB_KEYS,
    SECOND,
    Refused,
    alloc_stub,
    compact,
    go_b64decode,
    new_id,
    parse_duration,
)
from tests.doubles.nomad_state import Cluster
from tests.doubles.nomad_stats import sample
from tests.doubles.vault import FakeVault

__all__ = ["FakeNomad", "Node", "Seen", "TaskRun", "subprocess_runner"]

DEFAULT_WAIT, MAX_WAIT = 300.0, 600.0
_NOT_IMPLEMENTED_SUFFIXES = ("/evaluate", "/periodic/force", "/plan", "/versions", "/revert", "/deployments",
                             "/deployment", "/stable", "/scale", "/services", "/submission")


class Seen(NamedTuple):
    method: str
    path: str
    query: str
    token: str | None


class FakeNomad:
    def __init__(self, *, acl_token: str | None = None, region: str = "global", datacenter: str = "dc1",
                 runner: Runner | None = None, vault: FakeVault | None = None,
                 auto_place: bool = True, event_buffer_size: int = 100, event_heartbeat: float = 30.0,
                 log_heartbeat: float = 1.0, kill_timeout: float = 5.0, node: Node | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.acl_token, self.event_heartbeat, self.log_heartbeat = acl_token, event_heartbeat, log_heartbeat
        self.cluster = Cluster(clock=clock, region=region, datacenter=datacenter,
                               event_buffer_size=event_buffer_size)
        if node is not None:
            self.cluster.node = node
        self.cluster.auto_place = auto_place
        # task directories of runner-driven allocations; created on first use, removed by stop()
        self.data_dir = Path(tempfile.gettempdir()) / f"fake-nomad-{new_id()}"
        self.client = Client(self.cluster, data_dir=self.data_dir, runner=runner, vault=vault,
                             kill_timeout=kill_timeout)
        self.cluster.on_change = self._wake
        self.client.on_log = self._log_written
        self.outage: tuple[int, str] | None = None
        self.lose_replies: list[str] = []  # path suffixes: the next request ending so is done, its reply lost
        self.seen: list[Seen] = []
        self.port: int | None = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._cuts = 0
        # One event per followed log, set by a write to that log only: a write wakes its own followers, not
        # every stream of the node (weak: an event lives while someone waits on it).
        self._log_changed: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Event] = \
            weakref.WeakValueDictionary()
        self._streams = Streams(self.cluster, self.client, self._wait_change, self._wait_log, lambda: self._closing,
                                log_heartbeat, event_heartbeat, lambda: self._cuts)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """What NOMAD_ADDR holds."""
        return f"http://{self.addr}"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._changed, self._closing, self._loop = asyncio.Event(), False, asyncio.get_running_loop()
        app = web.Application(middlewares=[self._agent], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._route)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        self.port = await serve_on_loopback(self._runner)
        return self.url

    async def stop(self) -> None:
        self._closing = True
        self._wake()  # blocked queries and streams return at once
        self._wake_logs()
        await self.client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def in_thread(self) -> AbstractContextManager[str]:
        """Serve from a thread with its own loop (for a service subprocess); yields the URL."""
        return served_in_thread(self.start, self.stop, "fake-nomad")

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a helper on the fake's loop (needed when it serves from `in_thread`)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn(*args, **kwargs)

        async def run() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), loop).result(30)

    # ------------------------------------------------------------ test helpers (see nomad_client / nomad_state)

    def job(self, job_id: str, namespace: str = "default") -> dict[str, Any] | None:
        job = self.cluster.job(namespace, job_id)
        return self.cluster.job_view(job) if job else None

    def allocations(self, job_id: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [self.cluster.alloc_view(a) for a in self.cluster.allocs_of(namespace, job_id)]

    def alloc_ids(self, job_id: str, namespace: str = "default") -> list[str]:
        return [a["ID"] for a in self.cluster.allocs_of(namespace, job_id)]

    def place(self, job_id: str | None = None) -> None:
        """Run the scheduler on pending evaluations (of `job_id`, or all) when `auto_place=False`."""
        for eval_id in self.cluster.pending_evals():
            if job_id is None or self.cluster.evals[eval_id]["JobID"] == job_id:
                self.cluster.scheduler.process(eval_id)

    def receive_alloc(self, alloc_id: str) -> None:
        self.client.receive(alloc_id)

    def start_alloc(self, alloc_id: str) -> None:
        self.client.start(alloc_id)

    def write_log(self, alloc_id: str, data: bytes | str, stream: str = "stdout", task: str | None = None) -> None:
        self.client.write(alloc_id, data, stream, task)

    def finish_alloc(self, alloc_id: str, exit_code: int = 0) -> None:
        self.client.finish(alloc_id, exit_code)

    def report_stats(self, alloc_id: str, *, rss: int, percent: float, max_usage: int | None = None,
                     at: int | None = None, task: str | None = None) -> None:
        """The task's latest stats sample (docker driver shape; cgroup v1 when `max_usage` is given), stamped now
        by the client's clock unless `at` (ns) says when."""
        self.client.record_stats(alloc_id, sample(rss=rss, percent=percent, max_usage=max_usage,
                                                  at=self.cluster.clock() if at is None else at), task)

    def run_alloc(self, alloc_id: str, stdout: bytes = b"", stderr: bytes = b"", exit_code: int = 0) -> None:
        """Received -> Task Setup -> Started -> (logs) -> Terminated [-> Not Restarting]: complete or failed."""
        self.client.run_alloc(alloc_id, stdout, stderr, exit_code)

    def lose_alloc(self, alloc_id: str, replace: bool = True) -> str | None:
        """The node went down: ClientStatus `lost`; returns the replacement's ID (if `replace`)."""
        return self.cluster.scheduler.lose(alloc_id, replace)

    def fail_to_place(self, job_id: str) -> None:
        """Evaluations of `job_id` (or of jobs dispatched from it) fail to place: blocked, no allocation."""
        self.cluster.unplaceable.add(job_id)

    def allow_placement(self, job_id: str) -> None:
        self.cluster.scheduler.unblock(job_id)

    def gc(self) -> list[str]:
        return self.cluster.scheduler.gc()

    @property
    def node(self) -> Node:
        return self.cluster.node

    def node_changed(self) -> None:
        """The node's fingerprint changed (a test edited `fake.node`): blocked evaluations run again."""
        self.cluster.scheduler.unblock()

    def stop_alloc(self, alloc_id: str) -> str:
        """`nomad alloc stop`: the alloc is migrated (stopped, a replacement placed); returns the eval ID."""
        return self.cluster.stop_alloc(alloc_id)["EvalID"]

    def stop_job(self, job_id: str, purge: bool = False, namespace: str = "default") -> None:
        """`nomad job stop [-purge]` (of a dispatched child, or of a parameterized parent)."""
        self.cluster.deregister(namespace, job_id, purge)

    def drain_node(self) -> None:
        """`nomad node drain -enable` once its deadline passed: the node turns ineligible and every allocation
        still running on it is migrated (DesiredTransition.Migrate, then stopped: "alloc is being migrated")."""
        self.cluster.node.eligible = False
        for alloc in list(self.cluster.allocs.values()):
            if alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] not in ("complete", "failed", "lost"):
                self.cluster.stop_alloc(alloc["ID"], triggered_by="node-drain")

    def fail_template(self, alloc_id: str, error: str) -> None:
        """A template cannot render (e.g. a Vault secret that does not exist): the task is killed and fails."""
        self.client.fail_template(alloc_id, error)

    def cut_streams(self) -> None:
        """Every stream open now goes silent without closing (a half-open connection); new ones are served."""
        self._cuts += 1
        self._wake()
        self._wake_logs()

    async def settle(self) -> None:
        """Drain: wait until every runner-driven allocation has finished (instead of sleeping)."""
        await self.client.settle()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (on state changes, not by polling) until `predicate()` holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                assert self._changed is not None
                await self._changed.wait()

    # ------------------------------------------------------------ plumbing

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _log_written(self, key: tuple[str, str, str]) -> None:
        event = self._log_changed.pop(key, None)
        if event is not None:
            event.set()
        self._wake()

    def _wake_logs(self) -> None:
        """Every log follower re-checks now (the fake stops, streams are cut)."""
        for key in list(self._log_changed):
            event = self._log_changed.pop(key, None)
            if event is not None:
                event.set()

    @web.middleware
    async def _agent(self, request: web.Request, handler) -> web.StreamResponse:
        caller = token(request)
        self.seen.append(Seen(request.method, request.path, request.query_string, caller))
        self._wake()  # so a test can wait until a request has arrived (`wait_until`), e.g. before it blocks
        try:
            if self.outage is not None:
                raise Refused(*self.outage)
            if self.acl_token is not None and caller != self.acl_token:
                raise Refused(403, "ACL token not found" if caller else "Permission denied")
            response = await handler(request)
            if self.lose_replies and request.path.endswith(self.lose_replies[0]):
                self.lose_replies.pop(0)
                assert request.transport is not None
                request.transport.abort()  # done, but the caller never hears of it (reset, no reply)
            return response
        except Refused as refused:
            return web.Response(status=refused.status, text=refused.text, headers=refused.headers)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/v1/jobs":
            return await self._methods(request, GET=self._list_jobs, PUT=self._register, POST=self._register)
        if path == "/v1/jobs/parse":
            return await self._methods(request, PUT=self._parse, POST=self._parse)
        if path.startswith("/v1/job/"):
            return await self._job_specific(request, path[len("/v1/job/"):])
        if path.startswith("/v1/allocation/"):
            tokens = path[len("/v1/allocation/"):].split("/")
            if len(tokens) == 1:
                return await self._methods(request, GET=lambda r: self._alloc(r, tokens[0]))
            if len(tokens) == 2 and tokens[1] == "stop":
                stop = lambda r: self._alloc_stop(tokens[0])  # noqa: E731
                return await self._methods(request, POST=stop, PUT=stop)
            raise Refused(404, "Resource not found")
        if path == "/v1/allocations":
            return await self._methods(request, GET=self._list_allocs)
        if path.startswith("/v1/evaluation/"):
            return await self._methods(request, GET=lambda r: self._eval(r, path[len("/v1/evaluation/"):]))
        if path.startswith("/v1/client/allocation/"):
            return await self._client_alloc(request, path[len("/v1/client/allocation/"):])
        if path.startswith("/v1/client/fs/logs/"):
            return await self._methods(request, GET=lambda r: stream_logs(self._streams, r,
                                                                          path[len("/v1/client/fs/logs/"):]))
        if path == "/v1/event/stream":
            return await stream_events(self._streams, request)
        if path == "/v1/status/leader" and method == "GET":
            return reply(request, "127.0.0.1:4647")
        raise Refused(404, "404 page not found\n")

    async def _methods(self, request: web.Request, **handlers) -> web.StreamResponse:
        handler = handlers.get(request.method)
        if handler is None:
            raise Refused(405, "Invalid method")
        return await handler(request)

    async def _job_specific(self, request: web.Request, rest: str) -> web.StreamResponse:
        for suffix in _NOT_IMPLEMENTED_SUFFIXES:
            if rest.endswith(suffix):
                raise Refused(501, f"fake nomad: /v1/job/:id{suffix} is not implemented")
        if rest.endswith("/allocations"):
            job_id = rest[:-len("/allocations")]
            return await self._methods(request, GET=lambda r: self._job_allocs(r, job_id))
        if rest.endswith("/evaluations"):
            job_id = rest[:-len("/evaluations")]
            return await self._methods(request, GET=lambda r: self._job_evals(r, job_id))
        if rest.endswith("/summary"):
            return await self._summary(request, rest[:-len("/summary")])
        if rest.endswith("/dispatch"):
            job_id = rest[:-len("/dispatch")]
            return await self._methods(request, PUT=lambda r: self._dispatch(r, job_id),
                                       POST=lambda r: self._dispatch(r, job_id))
        return await self._methods(request, GET=lambda r: self._read_job(r, rest),
                                   PUT=lambda r: self._register(r, rest), POST=lambda r: self._register(r, rest),
                                   DELETE=lambda r: self._deregister(r, rest))

    async def _block(self, request: web.Request, current: Callable[[], int]) -> int:
        """A blocking query: wait until `current()` passes `?index=` or `?wait=` runs out."""
        if "index" not in request.query:
            return max(current(), 1)
        raw = request.query["index"]
        if not raw.isdigit():
            raise Refused(400, "Invalid index")
        wait = DEFAULT_WAIT
        if "wait" in request.query:
            try:
                wait = min(parse_duration(request.query["wait"]) / SECOND, MAX_WAIT)
            except ValueError:
                raise Refused(400, "Invalid wait time") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while current() <= int(raw) and not self._closing and self._changed is not None:
            try:
                await asyncio.wait_for(self._changed.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                break
        return max(current(), 1)

    # ------------------------------------------------------------ jobs

    async def _register(self, request: web.Request, path_id: str = "") -> web.Response:
        fields = await body(request, "api.JobRegisterRequest")
        if fields.get("job") is None:
            raise Refused(400, "Job must be specified")
        job = decode_job(fields["job"])
        if job["ID"] is None:
            raise Refused(400, "Job ID hasn't been provided")
        if path_id and job["ID"] != path_id:
            raise Refused(400, "Job ID does not match name")
        job["Namespace"] = request.query.get("namespace") or fields.get("namespace") or job["Namespace"] or "default"
        region = request.query.get("region") or fields.get("region") or job["Region"] or ""
        job["Region"] = self.cluster.region if region in ("", "global") else region
        result = self.cluster.register(job, enforce=bool(fields.get("enforceindex")),
                                       enforce_index=int(fields.get("jobmodifyindex") or 0))
        return reply(request, result, {"X-Nomad-Index": str(result["Index"])})

    async def _parse(self, request: web.Request) -> web.Response:
        fields = await body(request, "api.JobsParseRequest")
        text = fields.get("jobhcl") or ""
        if fields.get("hclv1"):
            raise Refused(400, "fake nomad: HCLv1 parsing is not implemented")
        if fields.get("variables"):
            raise Refused(400, "fake nomad: HCL2 variables are not implemented")
        return reply(request, parse_hcl(text, canonical=bool(fields.get("canonicalize"))))

    async def _read_job(self, request: web.Request, job_id: str) -> web.Response:
        ns = namespace(request)
        index = await self._block(request, lambda: self._job_index(ns, job_id))
        job = self.cluster.job(ns, job_id)
        if job is None:
            raise Refused(404, "job not found", read_headers(index))
        return reply(request, self.cluster.job_view(job), read_headers(index))

    def _job_index(self, ns: str, job_id: str) -> int:
        job = self.cluster.job(ns, job_id)
        return job["ModifyIndex"] if job else self.cluster.tables["jobs"]

    async def _list_jobs(self, request: web.Request) -> web.Response:
        index = await self._block(request, lambda: self.cluster.tables["jobs"])
        ns, prefix = namespace(request), request.query.get("prefix", "")
        with_meta = boolean(request.query, "meta", 500)
        stubs = []
        for (job_ns, job_id), job in sorted(self.cluster.jobs.items(), key=lambda item: item[0][1]):
            if (ns == "*" or job_ns == ns) and job_id.startswith(prefix):
                stubs.append(self._stub(job, with_meta))
        return reply(request, stubs, read_headers(index))

    def _stub(self, job: dict[str, Any], with_meta: bool) -> dict[str, Any]:
        values = {**job, "Periodic": job.get("Periodic") is not None,
                  "ParameterizedJob": job.get("ParameterizedJob") is not None,
                  "JobSummary": self.cluster.summary(job)}
        stub = {k: values[k] for k in JOB_STUB_KEYS}
        if with_meta:
            stub["Meta"] = job.get("Meta")
        return stub

    async def _summary(self, request: web.Request, job_id: str) -> web.Response:
        if request.method != "GET":
            raise Refused(405, "Invalid method")
        ns = namespace(request)

        def current() -> int:
            job = self.cluster.job(ns, job_id)
            return self.cluster.summary(job)["ModifyIndex"] if job else self.cluster.tables["jobs"]
        index = await self._block(request, current)
        job = self.cluster.job(ns, job_id)
        if job is None:
            raise Refused(404, "job not found", read_headers(index))
        return reply(request, self.cluster.summary(job), read_headers(index))

    async def _dispatch(self, request: web.Request, job_id: str) -> web.Response:
        fields = await body(request, "structs.JobDispatchRequest")
        if fields.get("jobid") and fields["jobid"] != job_id:
            raise Refused(400, "Job ID does not match")
        raw_payload = fields.get("payload")
        if raw_payload is not None and not isinstance(raw_payload, str):
            raise Refused(400, f"json: cannot unmarshal {kind(raw_payload)} into Go struct field "
                               "JobDispatchRequest.Payload of type []uint8")
        try:
            payload = go_b64decode(raw_payload or "")
        except ValueError as exc:
            raise Refused(400, str(exc)) from None
        meta = fields.get("meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise Refused(400, "json: cannot unmarshal value into Go struct field JobDispatchRequest.Meta of type "
                               "map[string]string")
        idempotency = request.query.get("idempotency_token") or fields.get("idempotencytoken") or ""
        ns = request.query.get("namespace") or fields.get("namespace") or "default"
        result = self.cluster.dispatch(ns, job_id, payload, meta, fields.get("idprefixtemplate") or "", idempotency)
        return reply(request, result, {"X-Nomad-Index": str(result["Index"])})

    async def _deregister(self, request: web.Request, job_id: str) -> web.Response:
        purge = boolean(request.query, "purge", 500)
        boolean(request.query, "global", 500)
        result = self.cluster.deregister(namespace(request), job_id, purge)
        index = result.pop("Index")
        return reply(request, result, {"X-Nomad-Index": str(index)})

    async def _job_allocs(self, request: web.Request, job_id: str) -> web.Response:
        ns = namespace(request)

        def current() -> int:
            allocs = self.cluster.allocs_of(ns, job_id)
            return max(a["ModifyIndex"] for a in allocs) if allocs else self.cluster.tables["allocs"]
        index = await self._block(request, current)
        # memdb's "job" index: entries of one job come in primary-key (ID) order, not by age
        stubs = [alloc_stub(a, self.cluster.alloc_jobs[a["ID"]])
                 for a in sorted(self.cluster.allocs_of(ns, job_id), key=lambda a: a["ID"])]
        return reply(request, stubs, read_headers(index))

    async def _job_evals(self, request: web.Request, job_id: str) -> web.Response:
        ns = namespace(request)
        index = await self._block(request, lambda: self.cluster.tables["evals"])
        evals = sorted((e for e in self.cluster.evals.values() if e["JobID"] == job_id and e["Namespace"] == ns),
                       key=lambda e: e["ID"])  # memdb order: by ID
        return reply(request, evals, read_headers(index))

    async def _eval(self, request: web.Request, eval_id: str) -> web.Response:
        index = await self._block(request, lambda: self.cluster.evals.get(eval_id, {}).get(
            "ModifyIndex", self.cluster.tables["evals"]))
        ev = self.cluster.evals.get(eval_id)
        if ev is None:
            raise Refused(404, "eval not found", read_headers(index))
        return reply(request, ev, read_headers(index))

    # ------------------------------------------------------------ allocations

    async def _alloc(self, request: web.Request, alloc_id: str) -> web.Response:
        def current() -> int:
            alloc = self.cluster.allocs.get(alloc_id)
            return alloc["ModifyIndex"] if alloc else self.cluster.tables["allocs"]
        index = await self._block(request, current)
        alloc = self.cluster.allocs.get(alloc_id)
        if alloc is None:
            raise Refused(404, "alloc not found", read_headers(index))
        return reply(request, self.cluster.alloc_view(alloc), read_headers(index))

    async def _list_allocs(self, request: web.Request) -> web.Response:
        index = await self._block(request, lambda: self.cluster.tables["allocs"])
        ns, prefix = namespace(request), request.query.get("prefix", "")
        stubs = [alloc_stub(a, self.cluster.alloc_jobs[a["ID"]])
                 for a in sorted(self.cluster.allocs.values(), key=lambda a: a["ID"])
                 if (ns == "*" or a["Namespace"] == ns) and a["ID"].startswith(prefix)]
        return reply(request, stubs, read_headers(index))

    async def _client_alloc(self, request: web.Request, rest: str) -> web.Response:
        """`/v1/client/allocation/:id/<action>` (command/agent/alloc_endpoint.go): exactly two segments."""
        tokens = rest.split("/")
        if len(tokens) != 2:
            raise Refused(404, "Resource not found")
        alloc_id, action = tokens
        if action == "stats":
            stats = self.client.stats(alloc_id, request.query.get("task", ""))
            return reply(request, stats.model_dump(mode="json"))
        if action in ("checks", "exec", "snapshot", "restart", "gc", "signal", "pause"):
            raise Refused(501, f"fake nomad: /v1/client/allocation/:id/{action} is not implemented")
        raise Refused(404, "Resource not found")

    async def _alloc_stop(self, alloc_id: str) -> web.Response:
        result = self.cluster.stop_alloc(alloc_id)
        return web.Response(body=compact(result), content_type="application/json",
                            headers={"X-Nomad-Index": str(result["Index"])})

    async def _wait_log(self, key: tuple[str, str, str], timeout: float) -> bool:
        """True if the log `key` was written to (or every stream must re-check) within `timeout` seconds."""
        event = self._log_changed.get(key)
        if event is None:
            event = self._log_changed[key] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), max(timeout, 0))
            return True
        except TimeoutError:
            return False

    async def _wait_change(self, timeout: float) -> bool:
        """True if the state changed within `timeout` seconds, False on timeout."""
        assert self._changed is not None
        try:
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0))
            return True
        except TimeoutError:
            return False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
