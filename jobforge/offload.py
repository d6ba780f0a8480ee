"""One worker thread for the CPU-heavy parts of a request (parsing a large body, building and encoding a large
reply), so the event loop stays free for everything else (health checks, streams).

One thread, not a pool: the work holds the GIL, so more threads would not finish it sooner, and each one more
would make the event loop wait longer for the GIL (every `sys.getswitchinterval()` a thread may keep it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_LANE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobforge-offload")


async def run(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on the offload thread; requests queue there in arrival order."""
    return await asyncio.get_running_loop().run_in_executor(_LANE, fn, *args)
