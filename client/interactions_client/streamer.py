"""The bulk streamer: `async with client.stream() as s: await s.send(event)`.

Promise: an event that `send` accepted is, when the context exits, either
committed exactly once or reported as failed (`totals.failed`,
`undelivered`, and DeliveryFailedError); it is never silently lost.

How: events are buffered into batches (closed at `batch_size` events or
`linger` seconds after the first one) and written on one StreamEvents call,
each batch with a sequence number the server echoes once it has committed the
batch. At most `max_in_flight` batches are unacknowledged at a time; `send`
waits while the window is full, so at most (max_in_flight + 1) * batch_size
events are held in memory. When the stream breaks (server restart, network
drop, UNAVAILABLE) the streamer reconnects with exponential backoff and resends
every unacknowledged batch; this is safe because every event has an event_id
and the server stores each (user_id, event_id) once. After `retry_timeout`
seconds of failing without a single acknowledgement, it gives up and reports
the unacknowledged events as failed. Closing sends what is buffered, then
waits for every acknowledgement.

Totals, once the context has exited, satisfy
``sent == accepted + duplicate + rejected + failed``:

- sent: events `send` took (locally rejected ones included).
- accepted: events the server acknowledged as newly stored.
- duplicate: events the server acknowledged as stored before. This includes
  events this stream itself committed whose acknowledgement was lost in a
  break: their resend is acknowledged as duplicate. So accepted + duplicate is
  exactly what is now stored of this stream, while `accepted` alone may
  under-count this stream's new writes by at most `resent`.
- rejected: events that broke a rule (pre-validation or server), each
  reported once through `on_rejected` or in `rejections`.
- failed: events not confirmed when the streamer gave up or was cancelled.
  They may or may not have been committed; resending them is safe.
- resent: event transmissions repeated after a reconnect.
- reconnects: streams opened after the first one.

Pre-validation (`validate`, on by default) rejects a bad event locally,
before it takes a place in a batch. It is most of the client's CPU per event
(about 2.5 of 4.4 us here; batching and serialising are the rest); the server
validates every event anyway, so a bulk path that wants the CPU back passes
`validate=False` to `client.stream()`: a bad event is then reported by the
server, in `rejections`/`on_rejected` with `local=False`, and counts the same.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, cast

import grpc
import grpc.aio

from interactions_client.errors import DeliveryFailedError, from_rpc_error
from interactions_client.events import with_event_id
from interactions_client.limits import MAX_BATCH_EVENTS
from interactions_client.results import Rejection
from interactions_client.rpc_protos import Violation
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2 import StreamEventsRequest, StreamEventsResponse
from interactions_client.validation import validate as validate_event

OpenStream = Callable[[], Any]
"""Opens a StreamEvents call (a grpc.aio.StreamStreamCall)."""

RejectionCallback = Callable[[Rejection], None]

# A broken stream with one of these is retried; any other status (e.g.
# UNAUTHENTICATED, UNIMPLEMENTED) will not heal by itself, so the streamer
# gives up at once.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(slots=True)
class StreamTotals:
    """Event counts; see the module docstring for their exact meaning."""

    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    resent: int = 0
    reconnects: int = 0  # streams opened after the first

    @property
    def unresolved(self) -> int:
        """Events sent but neither acknowledged nor reported failed yet."""
        return self.sent - self.accepted - self.duplicate - self.rejected - self.failed


@dataclass(frozen=True, slots=True)
class Undelivered:
    """An event `send` took that was never acknowledged (counted in totals.failed)."""

    event: Event
    index: int
    tag: object


@dataclass(slots=True)
class _Batch:
    request: StreamEventsRequest
    indices: list[int]  # each event's position in the order of `send` calls
    tags: list[object]
    transmissions: int = 0

    def __len__(self) -> int:
        return len(self.request.events)


class EventStreamer:
    """Streams events in acknowledged batches; use as an async context manager.

    on_rejected: called with each Rejection as it is known; without it,
    rejections collect in `rejections` (unbounded: pass a callback for huge
    streams). `send(event, tag)` hands `tag` back in the Rejection/Undelivered.
    raise_on_failure: raise DeliveryFailedError at exit when events failed.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        batch_size: int = 500,
        linger: float = 0.02,
        max_in_flight: int = 8,
        retry_timeout: float = 60.0,
        validate: bool = True,
        on_rejected: RejectionCallback | None = None,
        raise_on_failure: bool = True,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_EVENTS}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._open_stream = open_stream
        self._batch_size = batch_size
        self._linger = linger
        self._max_in_flight = max_in_flight
        self._retry_timeout = retry_timeout
        self._validate = validate
        self._on_rejected = on_rejected
        self._raise_on_failure = raise_on_failure
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff

        self.totals = StreamTotals()
        self.rejections: list[Rejection] = []
        self.undelivered: list[Undelivered] = []

        # Guards the buffer and the window; every change is announced with notify_all.
        self._cond = asyncio.Condition()
        self._buffer: list[Event] = []
        self._buffer_indices: list[int] = []
        self._buffer_tags: list[object] = []
        self._buffer_generation = 0
        self._buffer_opened_at = 0.0
        self._buffer_started = asyncio.Event()
        self._pending: dict[int, _Batch] = {}  # unacknowledged batches by sequence, oldest first
        self._next_sequence = 1
        self._entered = False
        self._closing = False
        self._failure: BaseException | None = None
        self._failing_since: float | None = None  # start of the current run of broken streams
        self._attempt = 0
        self._streams_opened = 0
        self._runner: asyncio.Task[None] | None = None
        self._lingerer: asyncio.Task[None] | None = None

    # Public API.

    @property
    def buffered(self) -> int:
        """Events held in memory: the open batch plus unacknowledged batches."""
        return len(self._buffer) + sum(len(batch) for batch in self._pending.values())

    @property
    def in_flight(self) -> int:
        """Closed batches not acknowledged yet (at most max_in_flight)."""
        return len(self._pending)

    async def send(self, event: Event, tag: object = None) -> None:
        """Queues `event`, waiting while the window of unacknowledged batches is full.

        An event without event_id is sent as a copy with a fresh one (needed to
        deduplicate resends). Raises DeliveryFailedError once the streamer gave up.
        """
        if not self._entered or self._closing:
            raise RuntimeError("send() is only for use inside `async with streamer:`")
        self._raise_if_failed()
        event = with_event_id(event)
        if self._validate and (violations := validate_event(event)):
            index = self.totals.sent
            self.totals.sent += 1
            self.totals.rejected += 1
            found = [Violation(v.field, v.description) for v in violations]
            self._report(Rejection(event, found, local=True, index=index, tag=tag))
            return
        async with self._cond:
            while len(self._buffer) >= self._batch_size:  # full, and no slot to close it yet
                await self._cond.wait_for(self._window_open)
                self._raise_if_failed()
                if len(self._buffer) >= self._batch_size:
                    self._close_buffer()
            self._raise_if_failed()
            if not self._buffer:
                self._buffer_opened_at = asyncio.get_running_loop().time()
                self._buffer_started.set()
            self._buffer.append(event)
            self._buffer_indices.append(self.totals.sent)
            self._buffer_tags.append(tag)
            self.totals.sent += 1
            if len(self._buffer) >= self._batch_size and self._window_open():
                self._close_buffer()

    async def flush(self) -> None:
        """Sends the open batch now and waits until every event sent so far is
        acknowledged (or the streamer gave up)."""
        async with self._cond:
            await self._close_open_batch()
            upto = self._next_sequence
            await self._cond.wait_for(lambda: self._failure is not None or next(iter(self._pending), upto) >= upto)

    async def __aenter__(self) -> EventStreamer:
        if self._entered:
            raise RuntimeError("an EventStreamer can be entered once")
        self._entered = True
        self._runner = asyncio.create_task(self._run(), name="interactions-streamer")
        self._lingerer = asyncio.create_task(self._linger_loop(), name="interactions-streamer-linger")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None or issubclass(exc_type, Exception):
                # Even when the body failed, what `send` took is delivered.
                await self._drain()
        finally:
            # Cancelled (here or in the body), or drained: anything left is reported as failed.
            await self._stop()
        if exc_type is None and self.totals.failed and self._raise_on_failure:
            raise self._failed_error()

    # Batching.

    def _window_open(self) -> bool:
        return len(self._pending) < self._max_in_flight or self._failure is not None

    def _close_buffer(self) -> None:
        """Turns the open batch into an in-flight one (lock held, window open)."""
        sequence = self._next_sequence
        self._next_sequence += 1
        request = StreamEventsRequest(sequence=sequence, events=self._buffer)
        self._pending[sequence] = _Batch(request, self._buffer_indices, self._buffer_tags)
        self._buffer = []
        self._buffer_indices = []
        self._buffer_tags = []
        self._buffer_generation += 1
        self._cond.notify_all()

    async def _close_open_batch(self) -> None:
        """Closes the open batch as soon as the window allows (lock held)."""
        await self._cond.wait_for(self._window_open)
        if self._buffer and self._failure is None:
            self._close_buffer()

    def _can_close_or_closed(self, generation: int) -> bool:
        return self._window_open() or self._buffer_generation != generation

    def _has_work_from(self, sequence: int) -> bool:
        return sequence < self._next_sequence or self._closing

    async def _linger_loop(self) -> None:
        """Closes a batch `linger` seconds after its first event, if size has not."""
        loop = asyncio.get_running_loop()
        while True:
            await self._buffer_started.wait()
            self._buffer_started.clear()
            generation = self._buffer_generation
            delay = self._buffer_opened_at + self._linger - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self._cond:
                await self._cond.wait_for(partial(self._can_close_or_closed, generation))
                if self._buffer_generation == generation and self._buffer and self._failure is None:
                    self._close_buffer()

    # The connection.

    async def _run(self) -> None:
        """Keeps a stream open while there is work; reconnects and resends on breaks."""
        try:
            while True:
                async with self._cond:
                    await self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                    if not self._pending:
                        return  # closing, and everything is acknowledged
                error = await self._one_stream()
                if not self._pending:
                    self._failing_since = None  # broke while idle: nothing to resend
                    continue
                if isinstance(error, grpc.RpcError) and error.code() not in RETRYABLE_CODES:
                    await self._give_up(from_rpc_error(error))
                    return
                loop = asyncio.get_running_loop()
                now = loop.time()
                if self._failing_since is None:
                    self._failing_since = now
                remaining = self._failing_since + self._retry_timeout - now
                if remaining <= 0:
                    await self._give_up(from_rpc_error(error) if isinstance(error, grpc.RpcError) else error)
                    return
                await asyncio.sleep(min(self._next_backoff(), remaining))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. an on_rejected callback that raised: stop, and say so at exit
            await self._give_up(exc)

    def _next_backoff(self) -> float:
        delay = min(self._max_backoff, self._initial_backoff * 2.0 ** min(self._attempt, 30))
        self._attempt += 1
        return delay * random.uniform(0.5, 1.0)  # jitter: many clients must not reconnect in lockstep

    async def _one_stream(self) -> BaseException | None:
        """Runs one StreamEvents call until it ends; returns why it ended (None: server closed it)."""
        if self._streams_opened:
            self.totals.reconnects += 1
        self._streams_opened += 1
        call = self._open_stream()
        writer = asyncio.create_task(self._write_batches(call))
        # A writer bug must not leave the reader waiting forever for answers.
        writer.add_done_callback(lambda task: task.cancelled() or task.exception() is None or call.cancel())
        try:
            await self._read_acks(call)
            return None
        except grpc.RpcError as error:
            return cast(BaseException, error)
        finally:
            writer.cancel()
            await asyncio.wait([writer])  # not `await writer`: that would swallow our own cancellation
            call.cancel()
            if not writer.cancelled() and (writer_error := writer.exception()) is not None:
                raise writer_error

    async def _write_batches(self, call: Any) -> None:
        """Writes every unacknowledged batch, oldest first, then new ones as they close."""
        sequence = next(iter(self._pending), self._next_sequence)
        try:
            while True:
                async with self._cond:
                    await self._cond.wait_for(partial(self._has_work_from, sequence))
                    if sequence >= self._next_sequence:
                        break  # closing, and everything is written
                    batch = self._pending.get(sequence)
                sequence += 1
                if batch is None:
                    continue
                if batch.transmissions:
                    self.totals.resent += len(batch)
                batch.transmissions += 1
                await call.write(batch.request)
            await call.done_writing()  # the server ends the call after the last answer
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call is over; the reader reports why

    async def _read_acks(self, call: Any) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._on_ack(response)
            async with self._cond:
                self._cond.notify_all()

    def _on_ack(self, response: StreamEventsResponse) -> None:
        batch = self._pending.pop(response.sequence, None)
        if batch is None:
            return  # not ours to count (cannot happen with a conforming server)
        self._failing_since = None
        self._attempt = 0
        totals = self.totals
        totals.accepted += response.accepted_count
        totals.duplicate += response.duplicate_count
        totals.rejected += len(response.rejected)
        events = batch.request.events
        for rejected in response.rejected:
            violations = [Violation(v.field, v.description) for v in rejected.violations]
            index = rejected.index
            self._report(Rejection(events[index], violations, False, batch.indices[index], batch.tags[index]))

    def _report(self, rejection: Rejection) -> None:
        if self._on_rejected is None:
            self.rejections.append(rejection)
        else:
            self._on_rejected(rejection)

    # Failure and shutdown.

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failed_error()

    def _failed_error(self) -> DeliveryFailedError:
        cause = self._failure
        reason = f": {cause}" if cause is not None else ""
        return DeliveryFailedError(
            f"{self.totals.failed} event(s) were not confirmed{reason}", failed=self.totals.failed, cause=cause
        )

    def _fail_everything(self, cause: BaseException | None) -> None:
        """Reports every event not acknowledged as failed (no await: safe while cancelled)."""
        if self._failure is None:
            self._failure = cause or DeliveryFailedError("the streamer was stopped", failed=0)
        held: list[tuple[Sequence[Event], list[int], list[object]]]
        held = [(b.request.events, b.indices, b.tags) for b in self._pending.values()]
        held.append((self._buffer, self._buffer_indices, self._buffer_tags))
        for events, indices, tags in held:
            self.undelivered.extend(map(Undelivered, events, indices, tags))
            self.totals.failed += len(events)
        self._pending.clear()
        self._buffer = []
        self._buffer_indices = []
        self._buffer_tags = []

    async def _give_up(self, cause: BaseException | None) -> None:
        async with self._cond:
            self._fail_everything(cause)
            self._cond.notify_all()

    async def _drain(self) -> None:
        async with self._cond:
            await self._close_open_batch()
            self._closing = True
            self._cond.notify_all()
        if self._runner is not None:
            await self._runner

    async def _stop(self) -> None:
        self._closing = True
        tasks = [t for t in (self._runner, self._lingerer) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._pending or self._buffer:
            self._fail_everything(None)


OWN_CONNECTION_OPTION = ("grpc.use_local_subchannel_pool", 1)
"""A channel option: the channel gets a TCP connection of its own. Without it,
grpc shares one connection among the channels of a process that have the same
target and options (its global subchannel pool)."""


class ParallelStreamer:
    """Several EventStreamers, each on a connection of its own
    (`client.stream(connections=N)`), used like one: `send` deals the events
    to them a batch at a time, round robin. With `interactions-server
    --workers N` the kernel spreads connections, not calls, over the workers,
    so this is how one producer reaches every worker; a worker's death breaks
    only the streams on its connections (each resends its own batches).

    Totals add up; `rejections`, `undelivered` and the Rejections given to
    `on_rejected` carry each event's position in this streamer's `send` order.
    """

    def __init__(
        self,
        streamers: Callable[[RejectionCallback], Sequence[EventStreamer]],
        *,
        batch_size: int,
        on_rejected: RejectionCallback | None = None,
        raise_on_failure: bool = True,
        close: Callable[[], Any] | None = None,
    ) -> None:
        self._on_rejected = on_rejected
        self._raise_on_failure = raise_on_failure
        self._close = close
        self._streamers = list(streamers(self._report))
        if not self._streamers:
            raise ValueError("a ParallelStreamer needs at least one streamer")
        self._batch_size = batch_size
        self._current = 0
        self._dealt = 0  # events sent to the current streamer since it was chosen
        self._sent = 0
        self.rejections: list[Rejection] = []

    @property
    def streamers(self) -> list[EventStreamer]:
        return list(self._streamers)

    @property
    def totals(self) -> StreamTotals:
        total = StreamTotals()
        for streamer in self._streamers:
            t = streamer.totals
            total.sent += t.sent
            total.accepted += t.accepted
            total.duplicate += t.duplicate
            total.rejected += t.rejected
            total.failed += t.failed
            total.resent += t.resent
            total.reconnects += t.reconnects
        return total

    @property
    def undelivered(self) -> list[Undelivered]:
        return [Undelivered(u.event, *cast(tuple[int, object], u.tag)) for s in self._streamers for u in s.undelivered]

    @property
    def buffered(self) -> int:
        return sum(s.buffered for s in self._streamers)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._streamers)

    async def send(self, event: Event, tag: object = None) -> None:
        """Queues `event` on the current streamer (see EventStreamer.send)."""
        if self._dealt >= self._batch_size:
            self._current = (self._current + 1) % len(self._streamers)
            self._dealt = 0
        self._dealt += 1
        index = self._sent
        self._sent += 1
        await self._streamers[self._current].send(event, (index, tag))

    async def flush(self) -> None:
        await asyncio.gather(*(s.flush() for s in self._streamers))

    def _report(self, rejection: Rejection) -> None:
        index, tag = cast(tuple[int, object], rejection.tag)
        rejection = Rejection(rejection.event, rejection.violations, rejection.local, index, tag)
        if self._on_rejected is None:
            self.rejections.append(rejection)
        else:
            self._on_rejected(rejection)

    async def __aenter__(self) -> ParallelStreamer:
        for streamer in self._streamers:
            await streamer.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await asyncio.gather(*(s.__aexit__(exc_type, exc, tb) for s in self._streamers))
        finally:
            if self._close is not None:
                await self._close()
        failed = self.totals.failed
        if exc_type is None and failed and self._raise_on_failure:
            causes = [s._failure for s in self._streamers if s._failure is not None]
            cause = causes[0] if causes else None
            reason = f": {cause}" if cause is not None else ""
            raise DeliveryFailedError(f"{failed} event(s) were not confirmed{reason}", failed=failed, cause=cause)
