"""Log streams served from the store: the backlog, then live lines, then how the job ended.

The store is the only source: each line carries its store position (`SeqLine.seq`) and a follower reads
"everything after my cursor" again and again, so backlog and live lines come from one query (no gap, no
duplicate between them) and a client connected to any replica sees every line. `Pulse` only decides *when* to
read again: this process fires it when it appends a job's logs or changes its record; writes by other replicas
are picked up by re-reading every `poll_interval`.

Nothing here buffers per client: a follower reads the next batch only when its consumer asks for it, so a slow
consumer costs one batch of memory, never a growing queue (the HTTP layer bounds what it holds per client).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import suppress

from jobforge.models import JobRecord, LogMessage, LogStream, Phase, StreamStatus
from jobforge.stores.base import SeqLine, Store

BATCH = 500


class Pulse:
    """Wakes every follower of a job once something of it changed in this process."""

    def __init__(self) -> None:
        # Weak: an event lives only while some follower waits on it, so finished jobs leave nothing behind.
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()

    def waiter(self, job_id: str) -> asyncio.Event:
        """Take it *before* reading the store: a change after the read then still wakes the reader."""
        event = self._events.get(job_id)
        if event is None:
            event = self._events[job_id] = asyncio.Event()
        return event

    def fire(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()


def log_message(job_id: str, item: SeqLine) -> LogMessage:
    line = item.line
    return LogMessage(job_id=job_id, seq=item.seq, phase=item.phase, timestamp=line.ts,
                      level="error" if line.stream is LogStream.STDERR else "info", stream=line.stream,
                      message=line.line)


def status_message(record: JobRecord) -> StreamStatus:
    return StreamStatus(job_id=record.job_id, status=record.status, failed_phase=record.failed_phase,
                        error=record.error)


async def follow_logs(store: Store, pulse: Pulse, job_id: str, *, phase: Phase | None = None, after: int = 0,
                      poll_interval: float = 1.0) -> AsyncIterator[LogMessage | StreamStatus]:
    """Every line after `after` in write order, then one `StreamStatus` once the job is settled. Raises
    `NotFound` for an unknown job (before yielding anything)."""
    name = phase.value if phase else None
    await store.get(job_id)
    cursor = after
    while True:
        wake = pulse.waiter(job_id)
        batch = await store.read_logs(job_id, after=cursor, limit=BATCH, phase=name)
        for item in batch:
            cursor = item.seq
            yield log_message(job_id, item)
        if len(batch) == BATCH:
            continue
        record = (await store.get(job_id)).record
        if record.settled:
            # Every line was stored before the job settled (a backend reports logs before the end event):
            # drain what arrived since the last read, then say how it ended.
            while batch := await store.read_logs(job_id, after=cursor, limit=BATCH, phase=name):
                for item in batch:
                    cursor = item.seq
                    yield log_message(job_id, item)
            yield status_message(record)
            return
        with suppress(TimeoutError):
            async with asyncio.timeout(poll_interval):
                await wake.wait()
