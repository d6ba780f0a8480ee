"""A store wrapper that fails chosen writes, for fault-injection tests of the service."""

from __future__ import annotations

from jobforge.errors import StoreError
from jobforge.stores.base import Store


class FaultyStore:
    """Delegates to `inner`; `fail_puts(n, times)` makes the n-th next `put` (and the `times - 1` after it) raise
    `StoreError(message)`; `fail_appends` does the same for `append_logs`. The failed write changes nothing."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._plans: dict[str, list] = {"put": [], "append_logs": []}
        self._counts = {"put": 0, "append_logs": 0}
        self.failures = 0

    def fail_puts(self, nth: int = 1, times: int = 1, message: str = "consul: 500 leader election") -> None:
        self._plan("put", nth, times, message)

    def fail_appends(self, nth: int = 1, times: int = 1, message: str = "sqlite: database or disk is full") -> None:
        self._plan("append_logs", nth, times, message)

    def _plan(self, op: str, nth: int, times: int, message: str) -> None:
        start = self._counts[op] + nth
        self._plans[op].append((start, start + times, message))

    def _maybe_fail(self, op: str) -> None:
        self._counts[op] += 1
        n = self._counts[op]
        for start, stop, message in self._plans[op]:
            if start <= n < stop:
                self.failures += 1
                raise StoreError(message)

    async def put(self, record, expected_version):
        self._maybe_fail("put")
        return await self.inner.put(record, expected_version)

    async def append_logs(self, job_id, phase, lines):
        self._maybe_fail("append_logs")
        return await self.inner.append_logs(job_id, phase, lines)

    def __getattr__(self, name):
        return getattr(self.inner, name)
