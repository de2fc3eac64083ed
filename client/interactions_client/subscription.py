"""EventStreamService on the clients: `client.subscribe(...)`, a subscription
that resumes by itself (docs/subscribe.md).

A subscription is an iterator of batches, one per response of the server:
the batch's events (ExportedEvent, in stream order), then its deletions
(UserDeleted: erase every copy of that user's events), and the cursor after
it. Store the cursor once a batch is processed; `subscribe(cursor=...)`
continues after it, on any server. When the stream breaks (UNAVAILABLE:
server restarted, connection reset; ABORTED) the subscription reopens it
with the cursor of the last batch it handed out, after a backoff, at most
`ResumePolicy.attempts` times in a row without a response in between: the
consumer then gets the batches after that one, so nothing is lost and at
most the batch it was processing comes again (after a crash of the consumer
itself, when it resumes from the cursor it stored last).

The first batch comes at once, without events: its cursor is the start.
A batch may carry no event and only move the cursor on (about once a second
while the stream advances without events of the subscription's filter).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from interactions_client.analytics import EventTypeLike, Resumable, ResumePolicy, event_type_numbers
from interactions_client.v1.analytics_service_pb2 import ExportedEvent
from interactions_client.v1.event_stream_service_pb2 import (
    START_POSITION_EARLIEST,
    START_POSITION_NOW,
    SubscribeEventsRequest,
    SubscribeEventsResponse,
    UserDeleted,
)

SUBSCRIPTION_POLICY = ResumePolicy(attempts=20)
"""A subscription outlives server restarts: 20 tries in a row, about 80 s with backoff capped at 5 s."""

_STARTS = {"now": START_POSITION_NOW, "earliest": START_POSITION_EARLIEST}


@dataclass(frozen=True, slots=True)
class SubscriptionBatch:
    """One response: apply `events`, then `deletions`; then store `cursor`."""

    events: Sequence[ExportedEvent]
    deletions: Sequence[UserDeleted]
    cursor: str


def subscribe_request(
    event_types: Iterable[EventTypeLike], start: str, cursor: str, partition: tuple[int, int] | None
) -> SubscribeEventsRequest:
    """The request of `subscribe`; ValueError for a start or partition that cannot be sent."""
    if start not in _STARTS:
        raise ValueError(f"start must be 'now' or 'earliest', not {start!r}")
    request = SubscribeEventsRequest(cursor=cursor, start=_STARTS[start], event_types=event_type_numbers(event_types))
    if partition is not None:
        index, count = partition
        if not 0 <= index < count:
            raise ValueError(f"partition must be (index, count) with 0 <= index < count, not {partition!r}")
        request.partition, request.partition_count = index, count
    return request


class _Subscription(Resumable):
    """The bookkeeping shared by the async and sync iterators. The stream is
    read only when the consumer asks for the next batch, so when it breaks
    every batch received has been handed out, and it reopens after the last."""

    def __init__(self, open_stream: Callable[[SubscribeEventsRequest], Any], request: SubscribeEventsRequest,
                 policy: ResumePolicy) -> None:  # fmt: skip
        super().__init__(policy)
        self._open = open_stream
        self._request = request
        self._call: Any = None
        self._closed = False
        self.events = 0
        """Events received so far."""

    @property
    def cursor(self) -> str:
        """After the last batch handed out ("" before the first, unless `subscribe(cursor=...)` gave one)."""
        return self._request.cursor

    def _batch(self, response: SubscribeEventsResponse) -> SubscriptionBatch:
        self._progressed()
        self.events += len(response.events)
        if response.cursor:
            self._request.cursor = response.cursor
        return SubscriptionBatch(response.events, response.deletions, response.cursor or self._request.cursor)

    def close(self) -> None:
        """Ends the subscription (from any thread, for the sync one)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class AsyncSubscription(_Subscription):
    """`async for batch in subscription`; `close()` (or leaving the loop) ends it."""

    async def __aiter__(self) -> AsyncIterator[SubscriptionBatch]:
        try:
            while not self._closed:
                self._call = self._open(self._request)
                try:
                    async for response in self._call:
                        yield self._batch(response)
                    return  # the server never ends a subscription; a proxy might
                except grpc.RpcError as error:
                    if self._closed:
                        return
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # The caller was cancelled (Ctrl-C in `interactions tail`) while it read: gRPC
                        # may answer that as a CANCELLED call, which is no failure to retry.
                        raise asyncio.CancelledError from error
                    delay = self._failed(error)
                finally:
                    self._call.cancel()
                await asyncio.sleep(delay)
        finally:
            self.close()


class SyncSubscription(_Subscription):
    """`for batch in subscription`; `close()` (from any thread) ends it."""

    def __iter__(self) -> Iterator[SubscriptionBatch]:
        try:
            while not self._closed:
                self._call = self._open(self._request)
                try:
                    for response in self._call:
                        yield self._batch(response)
                    return
                except grpc.RpcError as error:
                    if self._closed:
                        return
                    delay = self._failed(error)
                finally:
                    self._call.cancel()
                time.sleep(delay)
        finally:
            self.close()
