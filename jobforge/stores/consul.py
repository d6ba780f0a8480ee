"""Consul KV store for cluster mode: the same CAS contract as `SqliteStore`, with Consul's ModifyIndex as version.

Key layout (the only place it is defined; `<...>` segments are escaped by `segment`):

    <prefix>jobs/<job_id>                      the record: JSON from `dump_record` (keeps the webhook secret)
    <prefix>logs/<job_id>/<phase>/<seq:012d>   one chunk of log lines: a JSON list of {"ts", "stream", "line"}
    <prefix>webhooks/pending/<job_id>/<seq:02d>  a webhook delivery still to send (outbox); seq = the event's order
    <prefix>webhooks/done/<job_id>/<seq:02d>     the same once finished (delivered, failed or refused)
    <prefix>history/<owner>/<submitted>_<job_id> the history index: "<STATUS>" or "<STATUS> outstanding"
    <prefix>meta/history-index                   present once every record has its history entry

Why it looks like this:
- `put` is a one-op `PUT /v1/txn` with verb `cas` (Index = expected version; 0 = create only if absent). It is
  atomic and its result carries the key's new ModifyIndex. `PUT /v1/kv/...?cas=` only answers true/false, and
  reading the index back afterwards could return another writer's version and so hide a conflict.
- A finished delivery moves from `pending/` to `done/` in one txn (`delete-cas` + `set`), so the worker's scan
  of `pending/` stays as small as the backlog, whatever the history; creating one checks that `done/` has no
  entry for it (`check-not-exists`), so queuing a delivered event again is a `Conflict`, as in SQLite.
- `list`, `unfinished` and `open_jobs` read the history index, not the records: one small entry per job, under its owner
  (so an owner's history is one prefix), ordered by submission time (`<submitted>` = 20 UTC digits), whose
  value is all the filters need. Only the records of the page (or the outstanding jobs) are then read, in
  `get` txns of up to 64 ops. `put` writes the entry in the same txn as the record's `cas`, so the two never
  disagree. A store whose records predate the index gets it once (`_backfill`, `cas=0` per entry so a newer
  write wins), then `meta/history-index` says so; every replica must run a version that writes the index.
  Logs live under their own prefix so it stays small.
- Log chunks are created with `?cas=0`, so two writers never overwrite one chunk; a chunk value stays under
  `CHUNK_BYTES` (Consul refuses values over 512 KiB), and a longer line is split into pieces marked
  `"more": true` that `get_logs` joins again. An append larger than one chunk is not atomic (a txn is capped
  at 512 KiB as well), unlike SQLite's; every chunk is encoded before the first is written, so a line that
  cannot be encoded fails the whole append with nothing written.
- `segment` escapes every byte outside `[A-Za-z0-9-]` as `_XX`: percent-escapes would be refused by Consul's
  newer key check (only `A-Za-z0-9,-_./`, no `../`, no suffix like `.json`), and escaping `.` rules out both.

All HTTP goes through `_Http`, which maps transport errors and unexpected statuses to `StoreError`; the few
expected statuses (404 on reads, 409 on a txn) are handled by the caller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import quote

import aiohttp
from yarl import URL

from jobforge.errors import Conflict, NotFound, StoreError
from jobforge.models import DeliveryState, JobRecord, JobStatus, LogLine, WebhookDelivery
from jobforge.rules import KEY_PREFIX_PATTERN
from jobforge.stores.base import (
    DueDeliveries,
    LogPage,
    SeqLine,
    Versioned,
    VersionedDelivery,
    dump_delivery,
    due_heads,
    dump_record,
    load_delivery,
    load_record,
    page_of,
)

__all__ = ["ConsulStore", "delivery_key", "deliveries_prefix", "history_key", "history_prefix", "job_key",
           "jobs_prefix", "log_key", "logs_prefix", "segment"]


JOBS = "jobs/"
LOGS = "logs/"
WEBHOOKS = "webhooks/"
HISTORY = "history/"
HISTORY_MARKER = "meta/history-index"
MAX_TXN_OPS = 64
"""Consul refuses a txn of more operations."""
_OUTSTANDING = "outstanding"
_TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)
SEQ_DIGITS = 12
CHUNK_BYTES = 256 * 1024
PIECE_CHARS = 32 * 1024  # <= 6 bytes per char once JSON-encoded (\u00XX), so a piece always fits a chunk
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED = re.compile(r"_([0-9A-F]{2})")
_CAS_ATTEMPTS = 20
STREAM_PHASES = ("build", "test", "publish", "cleanup")
"""The phases `read_logs` serves, in the order a job writes them."""
_PHASE_SPAN = 10**15
_CHUNK_SPAN = 10**5  # > entries per chunk: CHUNK_BYTES / the smallest entry
_SEQ_CACHE_SIZE = 1024


# ---------------------------------------------------------------- key layout

def segment(value: str) -> str:
    """One path segment, reversibly escaped: `_XX` for every UTF-8 byte outside [A-Za-z0-9-]."""
    return "".join(chr(b) if b in _SAFE else f"_{b:02X}" for b in value.encode())


def unsegment(value: str) -> str:
    parts = _ESCAPED.split(value)  # literal, hex, literal, hex, ..., literal
    return b"".join(bytes.fromhex(p) if i % 2 else p.encode() for i, p in enumerate(parts)).decode()


def jobs_prefix(prefix: str) -> str:
    return f"{prefix}{JOBS}"


def job_key(prefix: str, job_id: str) -> str:
    return f"{prefix}{JOBS}{segment(job_id)}"


def logs_prefix(prefix: str, job_id: str, phase: str | None = None) -> str:
    job = f"{prefix}{LOGS}{segment(job_id)}/"
    return job if phase is None else f"{job}{segment(phase)}/"


def log_key(prefix: str, job_id: str, phase: str, seq: int) -> str:
    return f"{logs_prefix(prefix, job_id, phase)}{seq:0{SEQ_DIGITS}d}"


def history_prefix(prefix: str, owner: str | None = None) -> str:
    return f"{prefix}{HISTORY}" + ("" if owner is None else f"{segment(owner)}/")


def history_key(prefix: str, record: JobRecord) -> str:
    """Sorts by submission time within an owner; `_` cannot occur in a `segment`, so it splits unambiguously."""
    return f"{history_prefix(prefix, record.config.owner)}{_submitted(record.submitted_at)}_{segment(record.job_id)}"


def _submitted(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S%f")


def deliveries_prefix(prefix: str, done: bool, job_id: str | None = None) -> str:
    return f"{prefix}{WEBHOOKS}{'done' if done else 'pending'}/" + ("" if job_id is None else f"{segment(job_id)}/")


def delivery_key(prefix: str, delivery: WebhookDelivery, done: bool) -> str:
    return f"{deliveries_prefix(prefix, done, delivery.job_id)}{delivery.seq:02d}"


# ---------------------------------------------------------------- HTTP seam

class _Http:
    """The one place that talks HTTP: address, token, datacenter, error mapping."""

    def __init__(self, addr: str, token: str | None, datacenter: str | None, timeout: float) -> None:
        addr = addr.strip().rstrip("/")
        self.base = addr if "://" in addr else f"http://{addr}"
        self._headers = {"X-Consul-Token": token} if token else {}
        self._dc = datacenter
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, *flags: str, ok: tuple[int, ...] = (200,),
                      params: dict[str, str | int] | None = None, **kwargs: Any) -> tuple[int, bytes]:
        """`flags` are presence-only query flags (`recurse`, `keys`): Consul checks presence, not value."""
        params = {**(params or {}), **({"dc": self._dc} if self._dc else {})}
        query = [*flags, *(f"{k}={quote(str(v), safe='')}" for k, v in params.items())]
        url = URL(f"{self.base}{path}" + (f"?{'&'.join(query)}" if query else ""), encoded=True)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.request(method, url, **kwargs) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, OSError) as exc:  # OSError covers refused connections and timeouts
            raise StoreError(f"consul at {self.base} unreachable: {exc!r}") from exc
        if status not in ok:
            raise StoreError(f"consul answered HTTP {status} to {method} {path}: "
                             f"{body[:300].decode(errors='replace').strip()}")
        return status, body

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@contextmanager
def _answer(what: str) -> Iterator[None]:
    """Map a malformed Consul answer (or a stored value we cannot read) to `StoreError`."""
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # json, base64, pydantic and shape errors
        raise StoreError(f"unexpected data from consul for {what}: {exc}") from exc


def _kv(verb: str, key: str, raw: str = "", index: int = 0) -> dict[str, Any]:
    """One KV op of a `/v1/txn` body."""
    return {"KV": {"Verb": verb, "Key": key, "Value": base64.b64encode(raw.encode()).decode(), "Flags": 0,
                   "Index": index}}


def _value(entry: dict[str, Any]) -> bytes:
    raw = entry["Value"]
    return b"" if raw is None else base64.b64decode(raw, validate=True)


# ---------------------------------------------------------------- log chunks

def _entries(lines: Sequence[LogLine]) -> Iterator[bytes]:
    for ln in lines:
        head = {"ts": ln.ts.isoformat(), "stream": ln.stream.value}
        starts = range(0, max(len(ln.line), 1), PIECE_CHARS)
        for start in starts:
            more = start + PIECE_CHARS < len(ln.line)
            entry = {**head, "line": ln.line[start:start + PIECE_CHARS], **({"more": True} if more else {})}
            yield json.dumps(entry, ensure_ascii=False).encode()


def _chunks(lines: Sequence[LogLine]) -> Iterator[bytes]:
    """JSON lists of entries, each value at most `CHUNK_BYTES`."""
    batch: list[bytes] = []
    size = 2
    for entry in _entries(lines):
        if batch and size + len(entry) + 1 > CHUNK_BYTES:
            yield b"[" + b",".join(batch) + b"]"
            batch, size = [], 2
        batch.append(entry)
        size += len(entry) + 1
    if batch:
        yield b"[" + b",".join(batch) + b"]"


def stream_seq(rank: int, chunk: int, index: int) -> int:
    """A line's position for `read_logs`: phase rank, chunk key, entry index; it grows as a job writes."""
    return (rank + 1) * _PHASE_SPAN + chunk * _CHUNK_SPAN + index


def _joined(pieces: list[dict[str, Any]]) -> LogLine:
    first = pieces[0]
    return LogLine(ts=datetime.fromisoformat(first["ts"]), stream=first["stream"],
                   line="".join(p["line"] for p in pieces))


def _listed(body: bytes, ordered: bool = True) -> list[dict[str, Any]]:
    """A `?recurse` answer without folder keys (`.../`, as the Consul UI creates), in key order if `ordered`."""
    entries = [e for e in json.loads(body) if not e["Key"].endswith("/")]
    return sorted(entries, key=lambda e: e["Key"]) if ordered else entries


def _decoded_logs(base: str, phase: str | None, body: bytes | None) -> dict[str, list[LogLine]]:
    """A job's log chunks (the `?recurse` answer under `base`) as complete lines per phase, in write order.
    CPU-bound (a line is a model), so the store runs it on a thread."""
    out: dict[str, list[LogLine]] = {}
    pieces: dict[str, list[dict[str, Any]]] = {}  # per phase: the pieces of a line split by `_entries`
    if body is None:
        return out
    with _answer(base):
        for entry in _listed(body):
            name = phase if phase is not None else unsegment(entry["Key"][len(base):].split("/", 1)[0])
            for item in json.loads(_value(entry)):
                pieces.setdefault(name, []).append(item)
                if not item.get("more"):
                    out.setdefault(name, []).append(_joined(pieces.pop(name)))
        for name, parts in pieces.items():  # a split line whose last piece was never written
            out.setdefault(name, []).append(_joined(parts))
    return out


# ---------------------------------------------------------------- history index entries

class _HistoryEntry(NamedTuple):
    submitted: str
    job_id: str
    status: str
    outstanding: bool


def _history_value(record: JobRecord) -> bytes:
    return (record.status.value + (f" {_OUTSTANDING}" if record.outstanding else "")).encode()


def _history_op(prefix: str, record: JobRecord) -> dict[str, Any]:
    return _kv("set", history_key(prefix, record), _history_value(record).decode())


def _history_entry(key: str, value: bytes) -> _HistoryEntry:
    """Parses `<...>/<submitted>_<job segment>` and its value; ValueError when malformed."""
    submitted, sep, job = key.rpartition("/")[2].partition("_")
    status, _, flag = value.decode().partition(" ")
    if not sep or not submitted.isdigit() or not status or flag not in ("", _OUTSTANDING):
        raise ValueError(f"malformed history entry {key!r}")
    return _HistoryEntry(submitted, unsegment(job) if "_" in job else job, status, flag == _OUTSTANDING)


# ---------------------------------------------------------------- the store

class ConsulStore:
    def __init__(self, addr: str = "127.0.0.1:8500", *, prefix: str = "jobforge/", token: str | None = None,
                 datacenter: str | None = None, timeout: float = 30.0) -> None:
        if not re.fullmatch(KEY_PREFIX_PATTERN, prefix):
            raise ValueError(f"consul key prefix {prefix!r} must match {KEY_PREFIX_PATTERN}, e.g. 'jobforge/'")
        self.prefix = prefix
        self._http = _Http(addr, token, datacenter, timeout)
        self._next_seq: OrderedDict[tuple[str, str], int] = OrderedDict()  # LRU, refreshed on a CAS miss
        self._indexed = False  # the history index is known complete (`_backfill`)

    async def get(self, job_id: str) -> Versioned:
        key = job_key(self.prefix, job_id)
        status, body = await self._http.request("GET", f"/v1/kv/{key}", ok=(200, 404))
        if status == 404:
            raise NotFound(f"job {job_id} not found")
        with _answer(key):
            entry = json.loads(body)[0]
            return Versioned(load_record(_value(entry)), int(entry["ModifyIndex"]))

    async def put(self, record: JobRecord, expected_version: int) -> int:
        op = _kv("cas", job_key(self.prefix, record.job_id), dump_record(record), expected_version)
        return await self._txn([op, _history_op(self.prefix, record)], f"job {record.job_id}", expected_version)

    async def list(self, limit: int, offset: int, owners: Collection[str] | None = None,
                   status: JobStatus | None = None) -> tuple[list[JobRecord], int]:
        """Reads the history index (of the given owners only), then just the page's records."""
        found = [e for e in await self._history(owners) if status is None or e.status == status.value]
        found.sort(key=lambda e: (e.submitted, e.job_id), reverse=True)
        return await self._records([e.job_id for e in found[offset:offset + limit]]), len(found)

    async def unfinished(self) -> list[JobRecord]:
        """Reads the history index, then the records of the jobs it marks outstanding (checked again on them)."""
        found = sorted((e for e in await self._history(None) if e.outstanding),
                       key=lambda e: (e.submitted, e.job_id))
        return [r for r in await self._records([e.job_id for e in found]) if r.outstanding]

    async def open_jobs(self) -> list[tuple[str, JobStatus]]:
        """From the history index alone: no record is read."""
        with _answer(history_prefix(self.prefix)):
            found = sorted(((e.submitted, e.job_id, JobStatus(e.status)) for e in await self._history(None)
                            if e.outstanding and e.status not in _TERMINAL))
        return [(job_id, status) for _, job_id, status in found]

    async def append_logs(self, job_id: str, phase: str, lines: Sequence[LogLine]) -> None:
        try:
            values = list(_chunks(lines))  # encode everything first: a bad line fails before any write
        except UnicodeEncodeError as exc:
            raise StoreError(f"consul log write failed: text is not valid Unicode ({exc.reason})") from exc
        for value in values:
            await self._add_chunk(job_id, phase, value)

    async def log_page(self, job_id: str, phase: str | None, offset: int, limit: int, max_chars: int,
                       text_only: bool = False) -> LogPage:
        """Every chunk of the job is read (a chunk's line count is only known once decoded); decoding and
        paging run on a thread, so a 200,000-line log does not hold the event loop."""
        base, body = await self._log_listing(job_id, phase)
        return await asyncio.to_thread(
            lambda: page_of(_decoded_logs(base, phase, body), offset, limit, max_chars, text_only))

    async def get_logs(self, job_id: str, phase: str | None = None) -> dict[str, list[LogLine]]:
        base, body = await self._log_listing(job_id, phase)
        return await asyncio.to_thread(_decoded_logs, base, phase, body)

    async def put_delivery(self, delivery: WebhookDelivery, expected_version: int) -> int:
        pending, done = (delivery_key(self.prefix, delivery, d) for d in (False, True))
        value = dump_delivery(delivery)
        if delivery.state is DeliveryState.PENDING:
            ops = [_kv("cas", pending, value, expected_version)]
            if expected_version == 0:
                ops.insert(0, _kv("check-not-exists", done))
        elif expected_version == 0:  # created already finished
            ops = [_kv("check-not-exists", pending), _kv("cas", done, value, 0)]
        else:  # finished now: move it out of pending/
            ops = [_kv("delete-cas", pending, index=expected_version), _kv("set", done, value)]
        return await self._txn(ops, f"webhook delivery {delivery.delivery_id}", expected_version)

    async def pending_deliveries(self, limit: int) -> list[VersionedDelivery]:
        base = deliveries_prefix(self.prefix, done=False)
        with _answer(base):
            found = [VersionedDelivery(load_delivery(_value(e)), int(e["ModifyIndex"]))
                     for e in await self._recurse(base)]
        found.sort(key=lambda v: (v.delivery.created_at, v.delivery.job_id, v.delivery.seq))
        return found[:limit]

    async def due_deliveries(self, now: datetime, limit: int) -> DueDeliveries:
        """One listing of `pending/` (in key order: job, then event order), of which only each job's first entry
        is parsed; the listing is as large as the backlog, the parsing as the jobs that have one."""
        base = deliveries_prefix(self.prefix, done=False)
        heads: dict[str, dict[str, Any]] = {}
        for entry in await self._recurse(base):
            heads.setdefault(entry["Key"][len(base):].partition("/")[0], entry)
        with _answer(base):
            found = [VersionedDelivery(load_delivery(_value(e)), int(e["ModifyIndex"])) for e in heads.values()]
        return due_heads(found, now, limit)

    async def job_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        entries = [e for done in (False, True) for e in await self._recurse(deliveries_prefix(self.prefix, done, job_id))]
        with _answer(f"webhook deliveries of {job_id}"):
            return sorted((load_delivery(_value(e)) for e in entries), key=lambda d: d.seq)

    async def read_logs(self, job_id: str, after: int = 0, limit: int = 500,
                        phase: str | None = None) -> list[SeqLine]:
        """Reads only the chunks at or after the cursor's. Phases are ranked in `STREAM_PHASES` order: a job
        writes them one after the other, so the position only grows; other phase names are not streamed."""
        out: list[SeqLine] = []
        chunks = await self._chunks_by_phase(job_id)  # one listing for every phase
        for rank, name in enumerate(STREAM_PHASES):
            if (phase is not None and name != phase) or stream_seq(rank + 1, 0, 0) <= after:
                continue
            first_chunk = max(0, (after - stream_seq(rank, 0, 0)) // _CHUNK_SPAN)
            pieces: list[dict[str, Any]] = []
            for chunk in chunks.get(name, []):
                if chunk < first_chunk:
                    continue
                key = log_key(self.prefix, job_id, name, chunk)
                status, body = await self._http.request("GET", f"/v1/kv/{key}", "raw", ok=(200, 404))
                if status == 404:
                    continue
                with _answer(key):
                    items = json.loads(body)
                for index, item in enumerate(items):
                    pieces.append(item)
                    if item.get("more"):
                        continue
                    with _answer(key):
                        line = _joined(pieces)
                    pieces = []
                    seq = stream_seq(rank, chunk, index)
                    if seq > after:
                        out.append(SeqLine(seq, name, line))
                        if len(out) >= limit:
                            return out
        return out

    async def ping(self) -> None:
        _, body = await self._http.request("GET", "/v1/status/leader")
        with _answer("/v1/status/leader"):
            leader = json.loads(body)
        if not leader:
            raise StoreError(f"consul at {self._http.base} has no cluster leader")

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ helpers

    async def _txn(self, ops: list[dict[str, Any]], what: str, expected_version: int) -> int:
        """Run `ops` atomically; returns the ModifyIndex of the one key they write. A failed `cas`,
        `delete-cas` or `check-not-exists` is a `Conflict`; any other error a `StoreError`."""
        status, body = await self._http.request("PUT", "/v1/txn", ok=(200, 409), json=ops)
        with _answer(f"txn on {what}"):
            answer = json.loads(body)
            if status == 200:
                return int(answer["Results"][0]["KV"]["ModifyIndex"])
            errors = [e["What"] for e in answer["Errors"]]
        if errors and all(error.endswith(("index is stale", "exists")) for error in errors):
            raise Conflict(f"{what} exists or changed concurrently (expected version {expected_version})")
        raise StoreError(f"consul rolled back the write of {what}: {'; '.join(errors)}")

    async def _recurse(self, prefix: str, ordered: bool = True) -> list[dict[str, Any]]:
        """Every entry under `prefix` (in key order unless `ordered` is False), skipping folder keys (`.../`, as
        the Consul UI creates)."""
        status, body = await self._http.request("GET", f"/v1/kv/{prefix}", "recurse", ok=(200, 404))
        if status == 404:  # nothing under the prefix
            return []
        with _answer(prefix):
            return _listed(body, ordered)

    async def _log_listing(self, job_id: str, phase: str | None) -> tuple[str, bytes | None]:
        """The raw `?recurse` answer for a job's log chunks (None: there are none), for `_decoded_logs`."""
        base = logs_prefix(self.prefix, job_id, phase)
        status, body = await self._http.request("GET", f"/v1/kv/{base}", "recurse", ok=(200, 404))
        return base, (body if status == 200 else None)

    # ------------------------------------------------------------ history index (list, unfinished)

    async def _history(self, owners: Collection[str] | None) -> list[_HistoryEntry]:
        """The index entries of `owners` (None: everyone's): one listing per owner, no record read."""
        if not self._indexed:
            await self._backfill()
        prefixes = [history_prefix(self.prefix)] if owners is None else [
            history_prefix(self.prefix, owner) for owner in sorted(owners)]
        found: list[_HistoryEntry] = []
        for prefix in prefixes:
            entries = await self._recurse(prefix, ordered=False)
            with _answer(prefix):
                found += (_history_entry(e["Key"], _value(e)) for e in entries)
        return found

    async def _records(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The records of `job_ids`, in that order: `get` txns of up to `MAX_TXN_OPS` keys."""
        records: list[JobRecord] = []
        for start in range(0, len(job_ids), MAX_TXN_OPS):
            ops = [_kv("get", job_key(self.prefix, job_id)) for job_id in job_ids[start:start + MAX_TXN_OPS]]
            status, body = await self._http.request("PUT", "/v1/txn", ok=(200, 409), json=ops)
            with _answer("history records"):
                answer = json.loads(body)
                if status != 200:
                    raise StoreError("consul could not read the records of a history page: "
                                     + "; ".join(e["What"] for e in answer["Errors"]))
                records += (load_record(_value(r["KV"])) for r in answer["Results"])
        return records

    async def _backfill(self) -> None:
        """Give every record that predates the index its entry (`cas` 0: an entry a `put` wrote meanwhile
        is newer and stays), then write the marker. Runs once per store; any replica may run it."""
        marker = f"{self.prefix}{HISTORY_MARKER}"
        status, _ = await self._http.request("GET", f"/v1/kv/{marker}", ok=(200, 404))
        if status == 404:
            entries = await self._recurse(jobs_prefix(self.prefix))
            with _answer(jobs_prefix(self.prefix)):
                records = [load_record(_value(e)) for e in entries]
            for start in range(0, len(records), MAX_TXN_OPS):  # one txn per 64 records; key by key if one exists
                batch = records[start:start + MAX_TXN_OPS]
                ops = [_kv("cas", history_key(self.prefix, r), _history_value(r).decode()) for r in batch]
                status, _ = await self._http.request("PUT", "/v1/txn", ok=(200, 409), json=ops)
                for record in batch if status == 409 else ():
                    key = history_key(self.prefix, record)
                    await self._http.request("PUT", f"/v1/kv/{key}", params={"cas": 0}, data=_history_value(record))
            await self._http.request("PUT", f"/v1/kv/{marker}", data=b"1")
        self._indexed = True

    async def _add_chunk(self, job_id: str, phase: str, value: bytes) -> None:
        slot = (job_id, phase)
        for _ in range(_CAS_ATTEMPTS):
            seq = self._next_seq.pop(slot, None)
            if seq is None:
                seq = await self._first_free_seq(job_id, phase)
            key = log_key(self.prefix, job_id, phase, seq)
            _, body = await self._http.request("PUT", f"/v1/kv/{key}", params={"cas": 0}, data=value)
            with _answer(key):
                created = json.loads(body)
            if created is True:
                self._next_seq[slot] = seq + 1
                while len(self._next_seq) > _SEQ_CACHE_SIZE:
                    self._next_seq.popitem(last=False)
                return
        raise StoreError(f"could not append logs of job {job_id} ({phase}): another writer kept taking the slot")

    async def _first_free_seq(self, job_id: str, phase: str) -> int:
        return max(await self._chunk_seqs(job_id, phase), default=-1) + 1

    async def _chunks_by_phase(self, job_id: str) -> dict[str, list[int]]:
        prefix = logs_prefix(self.prefix, job_id)
        status, body = await self._http.request("GET", f"/v1/kv/{prefix}", "keys", ok=(200, 404))
        out: dict[str, list[int]] = {}
        if status == 404:
            return out
        with _answer(prefix):
            for key in json.loads(body):
                name, _, seq = key[len(prefix):].partition("/")
                if seq.isdigit():
                    out.setdefault(unsegment(name), []).append(int(seq))
        return {name: sorted(seqs) for name, seqs in out.items()}

    async def _chunk_seqs(self, job_id: str, phase: str) -> list[int]:
        prefix = logs_prefix(self.prefix, job_id, phase)
        status, body = await self._http.request("GET", f"/v1/kv/{prefix}", "keys", ok=(200, 404))
        if status == 404:
            return []
        with _answer(prefix):
            return sorted(int(k[len(prefix):]) for k in json.loads(body) if k[len(prefix):].isdigit())
