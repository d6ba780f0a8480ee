"""Nomad endpoints used by the backend, one method each (verb, path and answers as in the API reference)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from jobforge.backends.nomad.http import NomadError, NomadHTTP, segment
from jobforge.backends.nomad.models import (
    AllocResourceUsage,
    Allocation,
    DispatchReply,
    Evaluation,
    EventBatch,
    JobStub,
)
from jobforge.backends.nomad.wire import FrameDecoder, NdjsonDecoder
from jobforge.errors import BackendError

MAX_PAYLOAD = 16384  # bytes, after base64 decoding: Nomad refuses larger dispatch payloads
_Model = TypeVar("_Model", bound=BaseModel)


def _parse(model: type[_Model], value: Any, what: str) -> _Model:
    """An answer that does not fit its model is Nomad's (or a proxy's) fault: a BackendError, never a crash."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise BackendError(f"nomad {what}: unexpected answer: {exc.errors()[0]['msg']}") from exc


class NomadAPI:
    def __init__(self, http: NomadHTTP) -> None:
        self.http = http

    async def parse_job(self, hcl: str) -> dict:
        """`POST /v1/jobs/parse`: HCL → the bare JSON job, with defaults filled in."""
        return await self.http.request("POST", "/v1/jobs/parse", body={"JobHCL": hcl, "Canonicalize": True},
                                       what="parse job")

    async def register_job(self, job: dict) -> dict:
        """`POST /v1/jobs`; re-registering an identical spec changes nothing (parameterized jobs get no eval)."""
        return await self.http.request("POST", "/v1/jobs", body={"Job": job}, what=f"register {job.get('ID')}")

    async def read_job(self, job_id: str) -> dict | None:
        """`GET /v1/job/:id`; None when Nomad answers 404 `job not found`."""
        try:
            return await self.http.request("GET", f"/v1/job/{segment(job_id)}", what=f"read job {job_id}")
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise

    async def dispatch(self, job_id: str, meta: dict[str, str], payload: bytes, idempotency_token: str
                       ) -> DispatchReply:
        """`POST /v1/job/:id/dispatch?idempotency_token=`: a retried dispatch returns the existing child."""
        reply = await self.http.request(
            "POST", f"/v1/job/{segment(job_id)}/dispatch", params={"idempotency_token": idempotency_token},
            body={"Meta": meta, "Payload": base64.b64encode(payload).decode()}, what=f"dispatch {job_id}")
        return _parse(DispatchReply, reply, f"dispatch {job_id}")

    async def deregister(self, job_id: str) -> dict:
        """`DELETE /v1/job/:id`: stops a dispatched child (its allocation is killed); unknown ids succeed."""
        return await self.http.request("DELETE", f"/v1/job/{segment(job_id)}", what=f"stop {job_id}")

    async def children(self, parent: str) -> list[JobStub]:
        """`GET /v1/jobs?prefix=<parent>/dispatch-&meta=true`: the dispatched children with their meta."""
        stubs = await self.http.request("GET", "/v1/jobs", params={"prefix": f"{parent}/dispatch-", "meta": True},
                                        what=f"children of {parent}") or []
        return [_parse(JobStub, stub, f"children of {parent}") for stub in stubs]

    async def job_allocations(self, job_id: str) -> list[Allocation]:
        """`GET /v1/job/:id/allocations`: in ID order (not by age); an unknown job has none."""
        stubs = await self.http.request("GET", f"/v1/job/{segment(job_id)}/allocations",
                                        what=f"allocations of {job_id}") or []
        return [_parse(Allocation, stub, f"allocations of {job_id}") for stub in stubs]

    async def job_evaluations(self, job_id: str) -> list[Evaluation]:
        """`GET /v1/job/:id/evaluations`: placement failures are in `FailedTGAllocs` of the completed ones."""
        evals = await self.http.request("GET", f"/v1/job/{segment(job_id)}/evaluations",
                                        what=f"evaluations of {job_id}") or []
        return [_parse(Evaluation, ev, f"evaluations of {job_id}") for ev in evals]

    async def alloc_stats(self, alloc_id: str, task: str) -> AllocResourceUsage | None:
        """`GET /v1/client/allocation/:id/stats?task=`: answered by the allocation's client, only while it still
        holds the allocation. None on Nomad's 404s: `Unknown allocation` (not received yet, or garbage-collected)
        and `No path to node` / `Unknown node` (its node is gone)."""
        try:
            stats = await self.http.request("GET", f"/v1/client/allocation/{segment(alloc_id)}/stats",
                                            params={"task": task}, what=f"stats of {alloc_id}")
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise
        return _parse(AllocResourceUsage, stats or {}, f"stats of {alloc_id}")

    async def leader(self) -> str:
        return await self.http.request("GET", "/v1/status/leader", what="leader")

    async def events(self, topics: list[str], index: int, *, idle_timeout: float | None = None
                     ) -> AsyncIterator[EventBatch]:
        """`GET /v1/event/stream?topic=..&index=` (index inclusive): batches `{Index, Events}` and the `{}`
        heartbeats (the first comes right after subscribing). A non-JSON tail (`event dropped from buffer`)
        raises ValueError; silence longer than `idle_timeout` raises BackendError."""
        decoder = NdjsonDecoder()
        async for chunk in self.http.stream("/v1/event/stream", params={"topic": topics, "index": index},
                                            what="event stream", idle_timeout=idle_timeout):
            for batch in decoder.feed(chunk):
                yield _parse(EventBatch, batch, "event stream")
        decoder.close()

    async def logs(self, alloc_id: str, task: str, kind: str, *, follow: bool, offset: int = 0,
                   idle_timeout: float | None = None, total: float | None = None) -> AsyncIterator[dict]:
        """`GET /v1/client/fs/logs/:alloc` framed: frames with base64 `Data`; heartbeats skipped."""
        decoder = FrameDecoder()
        params = {"task": task, "type": kind, "follow": follow, "origin": "start", "offset": offset}
        async for chunk in self.http.stream(f"/v1/client/fs/logs/{segment(alloc_id)}", params=params,
                                            what=f"logs of {alloc_id}", idle_timeout=idle_timeout, total=total):
            for frame in decoder.feed(chunk):
                if frame:
                    yield frame
