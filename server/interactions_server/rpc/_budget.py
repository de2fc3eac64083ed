"""A server-wide budget of request bytes in flight (--max-inflight-bytes).

Every batch holds its bytes from when it is read until it is written. A
request counts as the memory it takes while it is written, not its size on
the wire: gRPC's receive buffer and the deserializer's copy, the parsed
message, the rows built from it and the database driver's buffer are each
about as large (measured: 12 batches of 14.2 MB in flight took the server
from 45 to 665 MiB RSS, about 3.6 times their wire size), so it is charged
FOOTPRINT_FACTOR times its size.

A stream reserves room before it reads its next batch: while there is none
it does not read, so gRPC stops granting HTTP/2 flow-control window (the
server disables BDP probing so that windows stay small) and the sender is
pushed back. A unary call (already read by gRPC) waits briefly for room and
is otherwise refused with RESOURCE_EXHAUSTED, so that its bytes are let go
at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from google.protobuf.message import Message

from interactions_server.errors import ResourceExhausted

UNARY_WAIT_SECONDS = 0.5  # how long a unary call waits for room before RESOURCE_EXHAUSTED
FOOTPRINT_FACTOR = 4
BUDGET_EXHAUSTED = "the server has too many request bytes in flight; retry later"


def footprint(request: Message) -> int:
    """The bytes a request is charged to the budget."""
    return FOOTPRINT_FACTOR * request.ByteSize()


class ByteBudget:
    """Reservations granted first come, first served. A reservation larger
    than the whole budget is granted when nothing else is held, so that no
    valid request waits forever."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the byte budget must be positive")
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    async def acquire(self, size: int) -> None:
        """Waits until `size` bytes fit, then holds them."""
        if not self._waiters and self._fits(size):
            self.used += size
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(size)  # granted just as the waiter gave up
            else:
                with contextlib.suppress(ValueError):  # _grant() may have dropped it already
                    self._waiters.remove(entry)
                self._grant()
            raise

    async def acquire_within(self, size: int, seconds: float) -> bool:
        """`acquire` bounded by `seconds`; False when there was no room in time."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.acquire(size)
                return True
        return False

    def adjust(self, delta: int) -> None:
        """Corrects a reservation made on an estimate to the actual size
        (may exceed the limit by the estimate's error)."""
        if delta < 0:
            self.release(-delta)
        else:
            self.used += delta

    @contextlib.asynccontextmanager
    async def held_or_refused(self, size: int) -> AsyncIterator[None]:
        """Holds `size` bytes for the block; ResourceExhausted when there is
        no room within UNARY_WAIT_SECONDS (for unary calls)."""
        if not await self.acquire_within(size, UNARY_WAIT_SECONDS):
            raise ResourceExhausted(BUDGET_EXHAUSTED)
        try:
            yield
        finally:
            self.release(size)

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():  # cancelled: its acquire() removes it
                self._waiters.popleft()
                continue
            if not self._fits(size):
                return
            self._waiters.popleft()
            self.used += size
            future.set_result(None)
