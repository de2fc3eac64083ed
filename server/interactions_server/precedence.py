"""Interactive before bulk (issue 16), in each serving process.

Two classes of work. Interactive: what a caller waits for inside its own
request path: LogEvent, a small LogEvents, the state reads and the per-user
analytics reads. Bulk: StreamEvents, large LogEvents, the exports and the
window aggregates. Which RPC is which is decided once, at registration
(server.py); rpc's chain counts each interactive call while it runs.

Bulk asks for its turn before each step that takes more of the machine (a
stream before it reads its next batch, an export before its next response).
The turn is given at once unless the interactive side is *behind*: a call has
been in flight for longer than the target, or one finished later than the
target less than HOLD_TARGETS targets ago. While it is behind, bulk work that
already has a step in flight waits: a stream keeps one batch moving instead
of three and reads no further batch, so HTTP/2 flow control slows its sender,
and the machine's cores (server, PostgreSQL and the sender's) go to the
interactive calls. Bulk never stops: a stream with nothing in flight always
gets its turn. Once the interactive calls are within the target again, bulk
takes its capacity back; with no interactive call at all it is never held.

A target of 0 turns this off (bulk is never held).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from interactions_server import metrics
from interactions_server.config import DEFAULT_INTERACTIVE_LATENCY_TARGET

HOLD_TARGETS = 50  # after a late interactive call, bulk stays held back for this many targets
MIN_HOLD_SECONDS = 0.25
MIN_RECHECK_SECONDS = 0.002  # a held bulk step re-checks at most this often (besides its wake-ups)


class Precedence:
    """The interactive calls in flight, and bulk's turns. One event loop: no locks."""

    def __init__(self, target: float = DEFAULT_INTERACTIVE_LATENCY_TARGET) -> None:
        if target < 0:
            raise ValueError("the interactive latency target must be 0 or more")
        self.target = target
        self.hold = max(MIN_HOLD_SECONDS, HOLD_TARGETS * target)
        self._starts: dict[int, float] = {}  # interactive calls in flight: their start (perf_counter)
        self._next_id = 0
        self._late_until = float("-inf")  # bulk is held back until then (perf_counter)
        self._relief: asyncio.Event | None = None  # set when the interactive side may have caught up

    @property
    def enabled(self) -> bool:
        return self.target > 0

    @property
    def interactive(self) -> int:
        """Interactive calls in flight."""
        return len(self._starts)

    def begin(self) -> int:
        """An interactive call starts; returns its ticket for `end`."""
        ticket = self._next_id
        self._next_id += 1
        self._starts[ticket] = time.perf_counter()
        return ticket

    def end(self, ticket: int) -> None:
        started = self._starts.pop(ticket, None)
        if started is None or not self.enabled:
            return
        now = time.perf_counter()
        if now - started > self.target:
            self._late_until = now + self.hold
        if not self._starts and self._relief is not None:
            self._relief.set()  # a held stream re-checks (it may still be behind)

    def behind(self) -> bool:
        """Whether bulk gives way now."""
        if not self.enabled or not self._starts:
            return False  # no interactive call: the machine is bulk's
        now = time.perf_counter()
        if now < self._late_until:
            return True
        oldest = min(self._starts.values())
        return now - oldest > self.target

    async def bulk_turn(self, rpc: str, idle: Callable[[], bool]) -> None:
        """Returns when bulk work may take its next step. `idle()`: the worker
        has no step in flight (then it always may: bulk never stops)."""
        if idle() or not self.behind():
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_at = started + self.hold  # a held step waits at most this long: bulk never stops
        while not idle() and self.behind() and loop.time() < give_up_at:
            if self._relief is None or self._relief.is_set():
                self._relief = asyncio.Event()
            # Re-checked at least once per target: a late call ages, a hold ends.
            try:
                async with asyncio.timeout(max(self.target, MIN_RECHECK_SECONDS)):
                    await self._relief.wait()
            except TimeoutError:
                pass
        metrics.bulk_held(rpc, loop.time() - started)

    def step_done(self) -> None:
        """A bulk step finished: a worker waiting for its own step re-checks."""
        if self._relief is not None:
            self._relief.set()
