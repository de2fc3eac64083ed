"""A server-wide budget of request bytes in flight (--max-inflight-bytes).

Every batch holds its bytes from when it is read until it is written. A
request counts as the memory it takes while it is written, not its size on
the wire: gRPC's receive buffer and the deserializer's copy, the parsed
message, the rows built from it and the database driver's buffer are each
about as large (measured: 12 batches of 14.2 MB in flight took the server
from 45 to 665 MiB RSS, about 3.6 times their wire size), so it is charged
FOOTPRINT_FACTOR times its size.

A stream holds budget only for the batches it has received. The size of a
message is known only once gRPC has read it, so before a stream reads its
next batch it *expects* one the size of its last (of a quarter of the budget
for its first): streams take turns by these expectations (`expect`), so that
20 new streams sending 14 MB batches do not all land one at once, but unary
calls never see them: a unary call waits only for bytes actually held. While
there is no room a stream does not read, so gRPC stops granting HTTP/2
flow-control window (the server disables BDP probing so that windows stay
small) and the sender is pushed back. An expectation is dropped when its
batch arrives, or after EXPECTATION_SECONDS without one: a stream whose
sender is idle expects nothing and holds nothing. A unary call (already read
by gRPC) waits briefly for room and is otherwise refused with
RESOURCE_EXHAUSTED, so that its bytes are let go at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import Message

from interactions_server.errors import ResourceExhausted

UNARY_WAIT_SECONDS = 0.5  # how long a unary call waits for room before RESOURCE_EXHAUSTED
EXPECTATION_SECONDS = 1.0  # a stream's expectation of its next batch lapses after this long without it
# A stream's first batch is expected to be 1/FIRST_BATCH_SHARE of the budget
# (measured: 20 new streams sending 3 batches of 14.2 MB at once: 565 MiB
# RSS with a quarter; 1,123 MiB when nothing was expected).
FIRST_BATCH_SHARE = 4
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
        self.expected = 0  # the streams' expectations of their next batch (seen by streams only)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._expecting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    async def acquire(self, size: int) -> None:
        """Waits until `size` bytes fit, then holds them."""
        if not self._waiters and self._fits(size):
            self.used += size
            return
        await self._wait(self._waiters, size, self.release)

    async def _wait(
        self, queue: collections.deque[tuple[int, asyncio.Future[None]]], size: int, undo: Callable[[int], None]
    ) -> None:
        """Waits in `queue` until _grant() grants `size`; `undo` gives it back
        when it was granted just as the waiter gave up."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        queue.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                undo(size)
            else:
                with contextlib.suppress(ValueError):  # _grant() may have dropped it already
                    queue.remove(entry)
                self._grant()
            raise

    async def acquire_within(self, size: int, seconds: float) -> bool:
        """`acquire` bounded by `seconds`; False when there was no room in time."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.acquire(size)
                return True
        return False

    @property
    def first_batch(self) -> int:
        """What a stream expects of its first batch."""
        return max(self.limit // FIRST_BATCH_SHARE, 1)

    def _expectation_fits(self, size: int) -> bool:
        taken = self.used + self.expected
        return taken == 0 or taken + size <= self.limit

    async def expect(self, size: int) -> Expectation:
        """Waits, in turn with the other streams, until a batch of `size`
        bytes would fit beside what is held and expected; then expects it
        (a stream before it reads its next batch). Unary calls never wait
        for expectations."""
        if not self._expecting and not self._waiters and self._expectation_fits(size):
            self.expected += size
        else:
            await self._wait(self._expecting, size, self._unexpect)
        return Expectation(self, size)

    def _unexpect(self, size: int) -> None:
        self.expected -= size
        self._grant()

    def hold(self, size: int) -> None:
        """Holds `size` bytes already received (may go over the limit by the
        error of the expectation it arrived under)."""
        self.used += size

    @contextlib.asynccontextmanager
    async def held_or_refused(self, size: int) -> AsyncIterator[None]:
        """Holds `size` bytes for the block; ResourceExhausted when there is
        no room within UNARY_WAIT_SECONDS (for unary calls)."""
        if not self._waiters and self._fits(size):
            self.used += size  # the common case: no timer
        elif not await self.acquire_within(size, UNARY_WAIT_SECONDS):
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
                return  # unary calls first: no stream's expectation is granted before them
            self._waiters.popleft()
            self.used += size
            future.set_result(None)
        while self._expecting:
            size, future = self._expecting[0]
            if future.done():
                self._expecting.popleft()
                continue
            if not self._expectation_fits(size):
                return
            self._expecting.popleft()
            self.expected += size
            future.set_result(None)


class Expectation:
    """A stream's expectation of its next batch; `drop()` (idempotent) when
    the batch has arrived, or when it is late."""

    __slots__ = ("_budget", "_size")

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget: ByteBudget | None = budget
        self._size = size

    def drop(self) -> None:
        if self._budget is not None:
            budget, self._budget = self._budget, None
            budget._unexpect(self._size)
