"""interactions.v1.InteractionService: the RPCs in front of the write path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, cast

import grpc

from interactions_client import limits
from interactions_client.rules import RULES
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import interaction_service_pb2_grpc
from interactions_client.v1.event_pb2 import Event, EventType, FieldViolation
from interactions_server import metrics
from interactions_server.auth import allowed_event_types, event_type_violation
from interactions_server.config import (
    DEFAULT_BATCHES_IN_FLIGHT,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_STREAM_IDLE_TIMEOUT,
)
from interactions_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from interactions_server.ingest import CONFLICT_DESCRIPTION, BatchResult, GroupCommitter, Ingestor, Rejection
from interactions_server.precedence import Precedence
from interactions_server.rpc import EXPECTATION_SECONDS, ByteBudget, footprint

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["InteractionService"].full_name
SHUTTING_DOWN = "server is shutting down; resend unacknowledged batches"
IDLE_CLOSED = (
    "stream closed by the server: no request for {seconds:g} s with nothing in flight "
    "(--stream-idle-timeout); open a new stream to send more"
)
# A LogEvents of at most this many events is interactive (precedence.py): a
# caller that waits for it in its own request path; a larger one is bulk.
INTERACTIVE_BATCH_EVENTS = 20


def is_interactive_batch(request: object) -> bool:
    """Whether a LogEvents request is interactive (small); a request that did not parse counts as one."""
    events = getattr(request, "events", None)
    return events is None or len(events) <= INTERACTIVE_BATCH_EVENTS


# Writes in request order; None once the reading task has ended.
_WriteQueue = asyncio.Queue[asyncio.Task[pb.StreamEventsResponse] | None]


class InteractionService(interaction_service_pb2_grpc.InteractionServiceServicer):
    """Validation and writing are the Ingestor's; this class maps requests to
    batches, batches to responses, and bounds the work of each stream.
    Methods raise (InvalidArgument, Unavailable, database errors); the
    server's StatusInterceptor turns that into the status (rpc/_status.py)."""

    def __init__(
        self,
        ingestor: Ingestor,
        committer: GroupCommitter,
        *,
        batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
        budget: ByteBudget | None = None,
        precedence: Precedence | None = None,
        stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
    ) -> None:
        self._ingestor = ingestor
        self._budget = budget or ByteBudget(DEFAULT_MAX_INFLIGHT_BYTES)
        self._precedence = precedence or Precedence(0)
        self._idle_timeout = stream_idle_timeout or None
        self._committer = committer  # LogEvent: concurrent calls share transactions
        self._batches_in_flight = batches_in_flight
        self._readers: set[asyncio.Task[None]] = set()
        self._first_reads: set[asyncio.Timeout] = set()  # streams waiting for their first request
        self.streams_open = 0
        self._draining = False
        self._event_types = pb.ListEventTypesResponse(
            event_types=[
                pb.EventTypeInfo(event_type=cast("EventType.ValueType", r.event_type), name=r.name, rule=r.proto)
                for r in RULES.values()
            ],
            bounds=limits.BOUNDS,
        )

    def drain(self) -> None:
        """Stops reading new batches on every stream (for shutdown). Batches
        already read are still committed and acknowledged, then each stream
        ends with UNAVAILABLE so that its client resends the rest elsewhere."""
        self._draining = True
        for reader in self._readers:
            reader.cancel()
        if self._first_reads:
            now = asyncio.get_running_loop().time()
            for waiting in self._first_reads:
                waiting.reschedule(now)  # a stream that sent nothing yet ends now

    async def LogEvent(self, request: pb.LogEventRequest, context: grpc.aio.ServicerContext) -> pb.LogEventResponse:
        if not request.HasField("event"):
            raise InvalidArgument([FieldViolation(field="event", description="is required")], "invalid event")
        # The committer batches the events of many callers: the caller's own
        # type restriction (its token's event_types) is checked here.
        if (not_allowed := event_type_violation(request.event, allowed_event_types())) is not None:
            violation = FieldViolation(field=f"event.{not_allowed.field}", description=not_allowed.description)
            raise InvalidArgument([violation], "invalid event")
        async with self._budget.held_or_refused(footprint(request)):
            outcome = await self._committer.submit(request.event, context.time_remaining())
        metrics.count_events(
            "LogEvent", [request.event], [outcome.duplicate], [0] if outcome.violations or outcome.conflict else []
        )
        if outcome.conflict:
            raise AlreadyExists(f"event_id {outcome.event_id} {CONFLICT_DESCRIPTION}")
        if outcome.violations:
            # BadRequest paths are relative to the request: event.<field>.
            violations = [
                FieldViolation(field=f"event.{v.field}", description=v.description) for v in outcome.violations
            ]
            if outcome.precondition:  # a login whose identity link is refused
                raise FailedPrecondition(violations, "cannot link")
            raise InvalidArgument(violations, "invalid event")
        return pb.LogEventResponse(event_id=outcome.event_id, duplicate=outcome.duplicate)

    async def LogEvents(self, request: pb.LogEventsRequest, context: grpc.aio.ServicerContext) -> pb.LogEventsResponse:
        _check_batch_size(request.events)
        bulk = not is_interactive_batch(request)
        async with self._budget.held_or_refused(footprint(request)):
            result = await self._write(request.events, context.time_remaining(), bulk=bulk)
        metrics.count_events("LogEvents", request.events, result.duplicate, (r.index for r in result.rejected))
        return pb.LogEventsResponse(
            accepted_count=result.accepted_count,
            duplicate_count=result.duplicate_count,
            rejected=_rejected(result.rejected),
        )

    async def StreamEvents(
        self, request_iterator: AsyncIterator[pb.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.StreamEventsResponse, None]:
        # Until its first request a stream is only this generator (thousands
        # of idle streams cost little); then one task reads requests and
        # starts their writes, and this generator answers them in request
        # order as they commit. The semaphore bounds the batches held per
        # stream (written or waiting to be answered), so memory stays bounded
        # and a slow reader of responses slows the sender.
        if self._draining:
            raise Unavailable(SHUTTING_DOWN)
        requests = aiter(request_iterator)
        metrics.stream_opened()
        self.streams_open += 1
        try:
            first = await self._first_request(requests)
            if first is None:
                return
            answers = self._answers(requests, first, context)
            # Each batch is let go once written, the first too: no frame of
            # the stream keeps it (20 streams of 14 MB batches otherwise held
            # 850 MiB where the budget allows 256).
            del first
            async with contextlib.aclosing(answers):
                async for response in answers:
                    yield response
        finally:
            self.streams_open -= 1
            metrics.stream_closed()

    async def _first_request(self, requests: AsyncIterator[pb.StreamEventsRequest]) -> pb.StreamEventsRequest | None:
        """The stream's first request, waited for without a task of its own;
        Unavailable when none comes within the idle timeout (or at shutdown)."""
        waiting = asyncio.timeout(self._idle_timeout)
        self._first_reads.add(waiting)
        try:
            async with waiting:
                expectation = await self._budget.expect(self._budget.first_batch)
                lapse = asyncio.get_running_loop().call_later(EXPECTATION_SECONDS, expectation.drop)
                try:
                    first = await anext(requests, None)
                    if first is not None:
                        self._budget.hold(footprint(first))  # before the expectation goes: no gap
                    return first
                finally:
                    lapse.cancel()
                    expectation.drop()
        except TimeoutError:
            if self._draining:
                raise Unavailable(SHUTTING_DOWN) from None
            metrics.stream_closed_idle()
            raise Unavailable(IDLE_CLOSED.format(seconds=self._idle_timeout)) from None
        finally:
            self._first_reads.discard(waiting)

    async def _answers(
        self, requests: AsyncIterator[pb.StreamEventsRequest], first: pb.StreamEventsRequest, context: Any
    ) -> AsyncGenerator[pb.StreamEventsResponse, None]:
        writes: _WriteQueue = asyncio.Queue()
        slots = asyncio.Semaphore(self._batches_in_flight)
        stream = _Stream()
        stream.unread = footprint(first)  # held since it was read; the reader takes it over
        reader = asyncio.create_task(self._read_stream(requests, first, stream, writes, slots, context))
        del first
        # A done callback rather than a `finally` in the reader: it also runs
        # when the reader is cancelled before it ever started.
        reader.add_done_callback(lambda _: writes.put_nowait(None))
        self._readers.add(reader)
        try:
            while (write := await writes.get()) is not None:
                yield await write
                slots.release()
            await asyncio.wait([reader])
            if reader.cancelled():  # by drain(): this generator itself is still running
                raise Unavailable(SHUTTING_DOWN)
            if (error := reader.exception()) is not None:
                raise error
        finally:
            self._readers.discard(reader)
            _discard(reader)
            if stream.unread:  # the reader was cancelled before it took the first batch
                self._budget.release(stream.unread)
                stream.unread = 0
            while not writes.empty():
                if (pending := writes.get_nowait()) is not None:
                    _discard(pending)

    async def ListEventTypes(
        self, request: pb.ListEventTypesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEventTypesResponse:
        return self._event_types

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.StreamEventsRequest],
        first: pb.StreamEventsRequest,
        stream: _Stream,
        writes: _WriteQueue,
        slots: asyncio.Semaphore,
        context: Any,
    ) -> None:
        last_size = 0  # the footprint of the previous batch
        received: pb.StreamEventsRequest | None = first
        del first
        while True:
            await slots.acquire()
            if received is not None:
                request, received = received, None
                size, stream.unread = stream.unread, 0
            else:
                # Interactive calls first: while they are behind their target
                # this stream keeps one batch in flight and reads nothing more.
                await self._precedence.bulk_turn("StreamEvents", stream.idle)
                # Room for a batch like the last before reading, holding nothing
                # (rpc/_budget.py): until there is, this stream reads nothing
                # and HTTP/2 flow control holds its sender.
                expectation = await self._budget.expect(last_size)
                lapse = asyncio.get_running_loop().call_later(EXPECTATION_SECONDS, expectation.drop)
                try:
                    next_request = await self._next_request(requests, stream)
                    if next_request is not None:
                        size = footprint(next_request)
                        self._budget.hold(size)  # before the expectation goes: no gap
                finally:
                    lapse.cancel()
                    expectation.drop()
                if next_request is None:
                    return
                request = next_request
                del next_request
            last_size = size  # held since it was read
            try:
                _check_batch_size(request.events, sequence=request.sequence)
            except InvalidArgument:
                self._budget.release(size)
                raise
            stream.in_flight += 1
            write = asyncio.create_task(self._write_stream_batch(request, context))
            # The request's bytes are let go once its write is done.
            write.add_done_callback(functools.partial(self._release, size, stream))
            writes.put_nowait(write)
            del request  # the write holds it until done; the next read must not wait holding it

    async def _next_request(
        self, requests: AsyncIterator[pb.StreamEventsRequest], stream: _Stream
    ) -> pb.StreamEventsRequest | None:
        """The next request; Unavailable when none comes within the idle
        timeout while the stream has nothing in flight (a client waiting for
        its answers is not idle)."""
        if self._idle_timeout is None:
            return await anext(requests, None)
        read = asyncio.ensure_future(anext(requests, None))
        try:
            while True:
                done, _ = await asyncio.wait((read,), timeout=self._idle_timeout)
                if done:
                    return read.result()
                if stream.idle():
                    metrics.stream_closed_idle()
                    raise Unavailable(IDLE_CLOSED.format(seconds=self._idle_timeout))
        finally:
            _discard(read)  # cancelled, or its outcome marked as seen (returned, or lost to our own cancellation)

    def _release(self, size: int, stream: _Stream, write: asyncio.Task[pb.StreamEventsResponse]) -> None:
        self._budget.release(size)
        stream.in_flight -= 1
        self._precedence.step_done()
        # A write that fails after its stream has ended is not awaited by
        # anyone: mark its exception as seen ("never retrieved" otherwise).
        _discard(write)

    async def _write_stream_batch(self, request: pb.StreamEventsRequest, context: Any) -> pb.StreamEventsResponse:
        result = await self._write(request.events, context.time_remaining())
        metrics.count_events("StreamEvents", request.events, result.duplicate, (r.index for r in result.rejected))
        return pb.StreamEventsResponse(
            sequence=request.sequence,
            accepted_count=result.accepted_count,
            duplicate_count=result.duplicate_count,
            rejected=_rejected(result.rejected),
        )

    async def _write(self, events: Sequence[Event], time_limit: float | None, *, bulk: bool = True) -> BatchResult:
        if not events:
            return BatchResult()
        # Stream batches run in tasks started by the call, which inherit its caller.
        return await self._ingestor.write(events, time_limit, allowed_types=allowed_event_types(), bulk=bulk)


class _Stream:
    """A stream's batches whose writes have not finished."""

    __slots__ = ("in_flight", "unread")

    def __init__(self) -> None:
        self.in_flight = 0
        self.unread = 0  # the footprint of a batch read but not yet taken by the reader

    def idle(self) -> bool:
        return self.in_flight == 0


def _check_batch_size(events: Sequence[Event], *, sequence: int | None = None) -> None:
    if len(events) > limits.MAX_BATCH_EVENTS:
        where = "" if sequence is None else f" (request with sequence {sequence})"
        description = f"has {len(events)} events{where}; the limit is {limits.MAX_BATCH_EVENTS}"
        raise InvalidArgument([FieldViolation(field="events", description=description)], "batch too large")


def _rejected(rejections: Sequence[Rejection]) -> list[pb.RejectedEvent]:
    return [pb.RejectedEvent(index=r.index, event_id=r.event_id, violations=r.violations) for r in rejections]


def _discard(task: asyncio.Task[Any]) -> None:
    """Cancels `task`, or marks its outcome as seen if it already finished
    (so that asyncio does not log "exception was never retrieved")."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()
