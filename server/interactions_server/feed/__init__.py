"""The event stream of one process, without gRPC: one reader of the log's
committed transactions fanned out to every subscription (EventStreamService
serves it; docs/subscribe.md). In-process consumers may subscribe too:

    async for batch in feed.subscribe(await feed.now(), storage.StreamFilter(), max_events=1000, max_bytes=1 << 20):
        batch.rows, batch.deletions, batch.end
"""

from interactions_server.feed._feed import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RING_BYTES,
    Batch,
    EventFeed,
    FeedClosed,
    PositionRemoved,
)

__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_RING_BYTES", "Batch", "EventFeed", "FeedClosed", "PositionRemoved"]
