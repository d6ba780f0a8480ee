"""The fake Nomad's HTTP plumbing: request parsing as the agent does it, and the two streaming endpoints.

- `stream_logs` (reference §10): frames `{"Offset","Data","File"}` written back to back with no separator,
  `Offset` = position after the frame's data, at most 64 KiB of data per frame, `{}` heartbeats while
  following, `plain=true` raw bytes; `follow` never ends on its own (only when the client goes or the fake
  stops). One log file per task and stream (`<task>.<type>.0`): no rotation, no file events.
- `stream_events` (reference §11): NDJSON, `{}` right after subscribing and then every heartbeat period, one
  line per Raft index with the matching events, `index` inclusive (older than the buffer: the oldest kept,
  silently; newer than the newest: the newest is sent again), a subscriber whose current buffer item (the last index it went past, matching or not) is evicted
  by the bounded buffer gets `event dropped from buffer` appended and the stream ends (nomad/stream).
"""

from __future__ import annotations

import asyncio
import copy
import base64
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.doubles.nomad_client import Client
from tests.doubles.nomad_shapes import Refused, compact
from tests.doubles.nomad_state import Cluster

LOG_FRAME_MAX = 64 * 1024
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


@dataclass
class Streams:
    """What the streaming handlers need from the fake."""

    cluster: Cluster
    client: Client
    wait_change: Callable[[float], Awaitable[bool]]  # True if the state changed within the timeout
    wait_log: Callable[[tuple[str, str, str], float], Awaitable[bool]]  # True if that log grew (or streams end)
    closing: Callable[[], bool]
    log_heartbeat: float
    event_heartbeat: float
    cuts: Callable[[], int] = lambda: 0  # bumped by `cut_streams`: streams opened before go half-open

    async def half_open(self) -> None:
        """Write nothing more and never end the response (no FIN), until the fake stops."""
        while not self.closing():
            await self.wait_change(1.0)


# ---------------------------------------------------------------- request parsing

def token(request: web.Request) -> str | None:
    """X-Nomad-Token, else `Authorization: Bearer` (scheme matched case-insensitively)."""
    value = request.headers.get("X-Nomad-Token")
    if value:
        return value
    scheme, _, rest = request.headers.get("Authorization", "").partition(" ")
    return (rest.strip() or None) if scheme.lower() == "bearer" else None


def namespace(request: web.Request) -> str:
    return request.query.get("namespace") or "default"


def read_headers(index: int) -> dict[str, str]:
    return {"X-Nomad-Index": str(index), "X-Nomad-KnownLeader": "true", "X-Nomad-LastContact": "0"}


def reply(request: web.Request, value: Any, headers: dict[str, str] | None = None) -> web.Response:
    """Minified JSON (`?pretty` indents)."""
    body = (json.dumps(value, indent=4).encode() + b"\n") if "pretty" in request.query else compact(value)
    return web.Response(body=body, content_type="application/json", headers=headers)


def kind(value: Any) -> str:
    """The JSON kind as Go's decoder names it in type errors."""
    return {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), "value")


async def body(request: web.Request, go_type: str) -> dict[str, Any]:
    """The JSON body, keys lower-cased (Go matches field names case-insensitively); HTTP-layer 400s."""
    raw = await request.read()
    if not raw.strip():
        raise Refused(400, "Request body is empty")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise Refused(400, f"invalid character in request body: {exc}") from None
    if not isinstance(value, dict):
        raise Refused(400, f"json: cannot unmarshal {kind(value)} into Go value of type {go_type}")
    return {k.lower(): v for k, v in value.items()}


def boolean(query: Mapping[str, str], name: str, status: int) -> bool:
    """strconv.ParseBool of a query parameter; the agent's texts (500 where it does not code the error)."""
    raw = query.get(name, "")
    if raw == "":
        return False
    if raw not in _BOOLS:
        text = f'strconv.ParseBool: parsing "{raw}": invalid syntax'
        if status == 500:
            raise Refused(500, f'Failed to parse value of "{name}" ({raw}) as a bool: {text}')
        raise Refused(400, f"failed to parse {name} field to boolean: {text}")
    return _BOOLS[raw]


# ---------------------------------------------------------------- GET /v1/client/fs/logs/:alloc_id

async def stream_logs(streams: Streams, request: web.Request, alloc_id: str) -> web.StreamResponse:
    query = request.query
    if not alloc_id:
        raise Refused(400, "must provide a valid alloc id")
    task = query.get("task", "")
    if not task:
        raise Refused(400, "must provide task name")
    follow, plain = boolean(query, "follow", 400), boolean(query, "plain", 400)
    log_type = query.get("type", "")
    if log_type not in ("stdout", "stderr"):
        raise Refused(400, "must provide log type (stdout/stderr)")
    raw_offset = query.get("offset", "")
    if raw_offset and not raw_offset.lstrip("-").isdigit():
        raise Refused(400, f'Error parsing offset: strconv.ParseInt: parsing "{raw_offset}": invalid syntax')
    offset = int(raw_offset or 0)
    origin = query.get("origin") or "start"
    if origin not in ("start", "end"):
        raise Refused(400, "origin must be start or end")
    alloc = streams.cluster.allocs.get(alloc_id)
    if alloc is None:
        raise Refused(404, f'Unknown allocation "{alloc_id}"')
    if task not in streams.client.task_names(alloc_id):
        raise Refused(400, f'unknown task name "{task}"')
    state = (alloc["TaskStates"] or {}).get(task)
    if state is None or state["StartedAt"] is None:
        raise Refused(404, f'task "{task}" not started yet. No logs available')
    buffer = streams.client.logs.get((alloc_id, task, log_type))
    if buffer is None:
        raise Refused(404, f'log entry for task "{task}" and log type "{log_type}" not found')
    position = min(max(offset, 0), len(buffer)) if origin == "start" else max(len(buffer) - offset, 0)
    response = web.StreamResponse(headers={"Content-Type": "text/plain" if plain else "application/json"})
    await response.prepare(request)
    file = f"alloc/logs/{task}.{log_type}.0"
    loop = asyncio.get_running_loop()
    beat = loop.time() + streams.log_heartbeat
    epoch = streams.cuts()
    try:
        while not streams.closing():
            if streams.cuts() != epoch:
                await streams.half_open()
                return response
            chunk = bytes(buffer[position:position + LOG_FRAME_MAX])
            if chunk:
                position += len(chunk)
                await response.write(chunk if plain else compact(
                    {"Offset": position, "Data": base64.b64encode(chunk).decode(), "File": file}))
                continue
            if not follow:
                break
            if not await streams.wait_log((alloc_id, task, log_type), beat - loop.time()):
                beat = loop.time() + streams.log_heartbeat
                if not plain:
                    await response.write(b"{}")
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away
    return response


# ---------------------------------------------------------------- GET /v1/event/stream

def _topics(request: web.Request) -> dict[str, list[str]]:
    topics: dict[str, list[str]] = {}
    for topic in request.query.getall("topic", []) or ["*"]:
        parts = topic.split(":")
        if len(parts) > 2:
            raise Refused(400, "Invalid topic query: error parsing topics: Invalid key value pair for topic, "
                               f"topic: {topic}")
        topics.setdefault(parts[0], []).append(parts[1] if len(parts) == 2 else "*")
    return topics


def _matches(event: dict[str, Any], topics: dict[str, list[str]], ns: str) -> bool:
    """Topic match, then key: `*`, the event's Key, or one of its FilterKeys (nomad/stream)."""
    if ns != "*" and event["Namespace"] not in ("", ns) and event["Topic"] != "Node":
        return False
    keys = topics.get(event["Topic"], []) + topics.get("*", [])
    return any(k == "*" or k == event["Key"] or k in (event["FilterKeys"] or []) for k in keys)


async def stream_events(streams: Streams, request: web.Request) -> web.StreamResponse:
    raw_index = request.query.get("index") or "0"
    try:
        cursor = int(raw_index)
    except ValueError:
        raise Refused(400, f'Unable to parse index: strconv.Atoi: parsing "{raw_index}": invalid syntax') from None
    topics, ns, cluster = _topics(request), namespace(request), streams.cluster
    # nomad/stream StartAtClosest: the first buffered item at or after `index`; an index older than the buffer
    # silently gets the oldest kept, one past the newest gets the newest (sent again, though below `index`).
    first = next((b for b in cluster.buffer if b["Index"] >= cursor), cluster.buffer[-1] if cluster.buffer else None)
    pending = copy.deepcopy(first) if first is not None else None  # delivered even if evicted meanwhile
    after = first["Index"] if first is not None else 0
    current = 0  # the buffer item the subscription stands on (0: its own start item, never evicted)
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    epoch = streams.cuts()
    try:
        await response.write(b"{}\n")
        beat = loop.time() + streams.event_heartbeat
        while not streams.closing():
            if streams.cuts() != epoch:
                await streams.half_open()
                return response
            batches = [pending] if pending is not None else []
            batches += [b for b in cluster.buffer if b["Index"] > after]
            pending = None
            dropped = False
            for batch in batches:
                # bufferItem.Next: the item the subscriber stands on was evicted (it fell behind) -> dropped
                if current and cluster.evicted_upto >= current:
                    dropped = True
                    break
                events = [e for e in batch["Events"] if _matches(e, topics, ns)]
                current = after = batch["Index"]
                if events:
                    await response.write(compact({"Index": batch["Index"], "Events": events}) + b"\n")
            if dropped:
                await response.write(b"event dropped from buffer")
                break
            if not await streams.wait_change(beat - loop.time()):
                beat = loop.time() + streams.event_heartbeat
                await response.write(b"{}\n")
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away
    return response
