"""interactions.v1.InteractionService: the RPCs in front of the write path."""

from __future__ import annotations

import asyncio
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
from interactions_server.config import DEFAULT_BATCHES_IN_FLIGHT, DEFAULT_MAX_INFLIGHT_BYTES
from interactions_server.errors import AlreadyExists, InvalidArgument, Unavailable
from interactions_server.ingest import CONFLICT_DESCRIPTION, BatchResult, GroupCommitter, Ingestor, Rejection
from interactions_server.rpc import ByteBudget, footprint

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["InteractionService"].full_name
SHUTTING_DOWN = "server is shutting down; resend unacknowledged batches"
# What a stream reserves of the byte budget before reading a batch: the
# footprint of its previous batch; for its first, 1/FIRST_BATCH_SHARE of the
# budget. The size of a message is known only once gRPC has read it, so a
# small first reservation lets many new streams read large batches at once
# (measured: 20 new streams sending 3 batches of 14.2 MB at once: first
# reservations of 1 MiB: 959 MiB RSS; of 1/4 of the 256 MiB budget: 565 MiB).
FIRST_BATCH_SHARE = 4
# A reservation is let go when no batch arrives within this time, so that
# streams whose senders are idle do not starve other calls of the budget.
IDLE_RESERVATION_SECONDS = 1.0

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
    ) -> None:
        self._ingestor = ingestor
        self._budget = budget or ByteBudget(DEFAULT_MAX_INFLIGHT_BYTES)
        self._committer = committer  # LogEvent: concurrent calls share transactions
        self._batches_in_flight = batches_in_flight
        self._readers: set[asyncio.Task[None]] = set()
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
            raise InvalidArgument(violations, "invalid event")
        return pb.LogEventResponse(event_id=outcome.event_id, duplicate=outcome.duplicate)

    async def LogEvents(self, request: pb.LogEventsRequest, context: grpc.aio.ServicerContext) -> pb.LogEventsResponse:
        _check_batch_size(request.events)
        async with self._budget.held_or_refused(footprint(request)):
            result = await self._write(request.events, context.time_remaining())
        metrics.count_events("LogEvents", request.events, result.duplicate, (r.index for r in result.rejected))
        return pb.LogEventsResponse(
            accepted_count=result.accepted_count,
            duplicate_count=result.duplicate_count,
            rejected=_rejected(result.rejected),
        )

    async def StreamEvents(
        self, request_iterator: AsyncIterator[pb.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.StreamEventsResponse, None]:
        # One task reads requests and starts their writes; this generator
        # answers them in request order as they commit. The semaphore bounds
        # the batches held per stream (written or waiting to be answered), so
        # memory stays bounded and a slow reader of responses slows the sender.
        if self._draining:
            raise Unavailable(SHUTTING_DOWN)
        writes: _WriteQueue = asyncio.Queue()
        slots = asyncio.Semaphore(self._batches_in_flight)
        reader = asyncio.create_task(self._read_stream(aiter(request_iterator), writes, slots, context))
        # A done callback rather than a `finally` in the reader: it also runs
        # when the reader is cancelled before it ever started.
        reader.add_done_callback(lambda _: writes.put_nowait(None))
        self._readers.add(reader)
        metrics.stream_opened()
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
            metrics.stream_closed()
            self._readers.discard(reader)
            _discard(reader)
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
        writes: _WriteQueue,
        slots: asyncio.Semaphore,
        context: Any,
    ) -> None:
        estimate = max(self._budget.limit // FIRST_BATCH_SHARE, 1)
        while True:
            await slots.acquire()
            # Room in the byte budget before reading: until there is, this
            # stream reads nothing and HTTP/2 flow control holds its sender.
            await self._budget.acquire(estimate)
            held = estimate
            read = asyncio.ensure_future(anext(requests, None))
            try:
                done, _ = await asyncio.wait((read,), timeout=IDLE_RESERVATION_SECONDS)
                if not done:
                    # The sender is idle: an idle stream holds no budget.
                    self._budget.release(held)
                    held = 0
                request = await read
            except BaseException:
                read.cancel()
                self._budget.release(held)
                raise
            if request is None:
                self._budget.release(held)
                return
            size = footprint(request)
            self._budget.adjust(size - held)
            estimate = max(size, 1)
            try:
                _check_batch_size(request.events, sequence=request.sequence)
            except InvalidArgument:
                self._budget.release(size)
                raise
            write = asyncio.create_task(self._write_stream_batch(request, context))
            # The request's bytes are let go once its write is done.
            write.add_done_callback(functools.partial(self._release, size))
            writes.put_nowait(write)

    def _release(self, size: int, write: asyncio.Task[pb.StreamEventsResponse]) -> None:
        self._budget.release(size)
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

    async def _write(self, events: Sequence[Event], time_limit: float | None) -> BatchResult:
        if not events:
            return BatchResult()
        # Stream batches run in tasks started by the call, which inherit its caller.
        return await self._ingestor.write(events, time_limit, allowed_types=allowed_event_types())


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
