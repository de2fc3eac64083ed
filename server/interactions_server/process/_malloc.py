"""glibc malloc settings that let the server's memory go back to the system.

Batches are large (up to tens of MB) and short-lived. glibc raises its mmap
threshold after each large free, so later batches land in the heap, where
freed memory fragments and stays in RSS; and every thread gets its own arena.
A fixed 1 MiB mmap threshold and two arenas measured: 20-stream overload
ended at 394 MiB RSS instead of 677 MiB. No-op off glibc.

Freed memory inside the heaps still stays in RSS until malloc_trim() hands
its pages back, so the server trims every 2 s (`trim_after_bursts`): after
the fault suite's overload burst RSS settles at 58-59 MiB from a 51 MiB start
(1.14-1.16x) instead of 63 MiB and more (1.15-1.31x). One arena instead of
two gained only 1 MiB more.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import AsyncIterator

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 1024 * 1024
ARENA_MAX = 2


TRIM_INTERVAL_SECONDS = 2.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Applies the settings to this process; False when not on glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_ARENA_MAX, ARENA_MAX))


def trim() -> bool:
    """Returns the free pages of every heap to the system; False when nothing was released or not on glibc."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


async def trim_after_bursts(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """Trims every `interval` seconds (until cancelled). A trim with little
    to release costs well under a millisecond."""
    if _libc() is None:
        return
    while True:
        await asyncio.sleep(interval)
        trim()


@contextlib.asynccontextmanager
async def memory_returned() -> AsyncIterator[None]:
    """The settings for this process, and a trim every TRIM_INTERVAL_SECONDS
    while the block runs: around the serving of a process (a worker, or the
    single process of --workers 1), never inside a Server, which may share
    its process with others (tests)."""
    tune()
    trimmer = asyncio.create_task(trim_after_bursts(), name="malloc-trim")
    try:
        yield
    finally:
        trimmer.cancel()
        await asyncio.gather(trimmer, return_exceptions=True)
