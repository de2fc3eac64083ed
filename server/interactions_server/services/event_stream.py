"""interactions.v1.EventStreamService: the subscription (docs/subscribe.md).

The stream itself is the feed's (interactions_server.feed: one reader per
process, fanned out); this servicer checks the request, turns a cursor into
a position and back, and assembles each response from events the feed
encoded once for every subscription (rpc.yields_encoded). Responses are
written with context.write, not yielded, so that a subscriber that leaves
mid-write ends its call quietly (gRPC logs a failed write of a yielded
response as an error with its traceback).
"""

from __future__ import annotations

from typing import Any

from interactions_client.v1 import event_stream_service_pb2 as pb
from interactions_client.v1 import event_stream_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import feed, rpc, storage
from interactions_server.errors import FailedPrecondition, InvalidArgument, Unavailable
from interactions_server.services import _event_stream_cursor as cursors
from interactions_server.services import _event_stream_protos as protos
from interactions_server.services._event_types import type_filter

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EventStreamService"].full_name
SHUTTING_DOWN = "server is shutting down; resubscribe with the last cursor"
MAX_EVENTS = 1_000  # per response
MAX_BYTES = 1 << 20  # about, per response
MAX_PARTITIONS = 1 << 16


class EventStreamService(event_stream_service_pb2_grpc.EventStreamServiceServicer):
    def __init__(self, events: feed.EventFeed, sealer: cursors.Sealer) -> None:
        self._feed = events
        self._sealer = sealer

    def drain(self) -> None:
        """Ends every subscription with UNAVAILABLE (shutdown): clients resume elsewhere."""
        self._feed.close()

    @rpc.yields_encoded
    async def SubscribeEvents(  # type: ignore[override]  # writes the responses' bytes
        self, request: pb.SubscribeEventsRequest, context: Any
    ) -> None:
        where = _filter(request)
        if request.cursor:
            start = cursors.decode(self._sealer, request.cursor)
        elif request.start == pb.START_POSITION_EARLIEST:
            start = None
        elif request.start in (pb.START_POSITION_UNSPECIFIED, pb.START_POSITION_NOW):
            start = storage.StreamPosition(-1)
        else:
            raise _invalid("start", f"{request.start} is not a StartPosition")
        try:
            if start is None:
                start = await self._feed.earliest()
            elif start.xid < 0:
                start = await self._feed.now()
            else:
                await self._feed.check_available(start)
            async for batch in self._feed.subscribe(start, where, max_events=MAX_EVENTS, max_bytes=MAX_BYTES):
                response = protos.response(batch.payloads, cursors.encode(self._sealer, batch.end), batch.deletions)
                if not await rpc.write_unless_gone(context, response):
                    return  # the subscriber went away while its response was being sent
        except feed.PositionRemoved as exc:
            oldest = cursors.encode(self._sealer, exc.oldest)
            raise FailedPrecondition(
                message="cursor is older than the oldest position available: retention removed events after it; "
                f"the oldest position available is cursor {oldest} (or START_POSITION_EARLIEST)",
                kind="RETENTION",
                subject="cursor",
            ) from None
        except feed.FeedClosed:
            raise Unavailable(SHUTTING_DOWN) from None


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)])


def _filter(request: pb.SubscribeEventsRequest) -> storage.StreamFilter:
    count = request.partition_count
    if not 0 <= count <= MAX_PARTITIONS:
        raise _invalid("partition_count", f"must be from 0 (no partitioning) to {MAX_PARTITIONS:,}")
    if count == 0 and request.partition != 0:
        raise _invalid("partition", "must be 0 without partition_count")
    if count and not 0 <= request.partition < count:
        raise _invalid("partition", f"must be from 0 to partition_count - 1 ({count - 1})")
    types = type_filter(request.event_types)
    return storage.StreamFilter(request.partition, count, None if types.everything else types)
