"""One reader per server process, fanned out to every subscription of it.

The reader polls the database's boundary (the oldest transaction still
running) every `poll_interval` and, when it has moved, reads the window of
transactions that finished since, once, into a ring of chunks in memory.
Subscriptions at the live end follow the ring; one that is behind it (a
resumed cursor, START_POSITION_EARLIEST, a consumer slower than the ring is
long) reads the database itself, a response at a time, until it reaches a
chunk of the ring, and follows the ring from there. So:

- N subscriptions cost one poll loop and one read per window, not N;
- memory is the ring (bounded in bytes) and one response per subscription:
  a slow consumer holds nothing but its position, and HTTP/2 flow control
  holds its response back (it falls behind the ring and reads the database
  at its own pace);
- a subscription is a position and nothing else: any process may serve it.

Deletions: the window reads return UserDeleted records at their place in
the stream; besides, each poll learns the deletions committed since the
reader's position, and rows of those users already read (in the ring, or a
catch-up read not yet sent) are dropped before they are sent.

Nothing here knows of gRPC: `encode` (given by the service) turns a row into
the bytes of its message, once per row per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from interactions_server import metrics, storage
from interactions_server.config import DEFAULT_SUBSCRIPTION_POLL_INTERVAL, DEFAULT_SUBSCRIPTION_RING_BYTES
from interactions_server.errors import is_database_unavailable
from interactions_server.precedence import Precedence
from interactions_server.storage import StreamDeletion, StreamFilter, StreamPosition, StreamRead

_log = logging.getLogger("interactions_server.feed")

DEFAULT_POLL_INTERVAL = DEFAULT_SUBSCRIPTION_POLL_INTERVAL  # seconds between polls while someone subscribes
DEFAULT_RING_BYTES = DEFAULT_SUBSCRIPTION_RING_BYTES  # about: what the ring of recent chunks may hold
RING_CHUNKS = 20_000  # at most, empty ones included (an idle window is an empty chunk)
READ_ROWS = 2_000  # rows per read of the live window (a bigger window takes several)
SUMMARIZE_INTERVAL = 0.1  # seconds between summaries of the xid index's new block ranges
IDLE_STOP = 30.0  # seconds without a subscription before the reader stops
HEARTBEAT = 1.0  # seconds: a subscription whose position moved without events hears of it this often
YIELD_EVERY = 128  # rows encoded between yields to the event loop
RETRY_BACKOFF = (0.1, 2.0)  # the reader's wait after a database failure, first and longest
# Catch-up reads ask for a window of transaction ids (the BRIN index finds
# its blocks), adapted to return about a response's worth of rows.
FIRST_SPAN = 1_024
MAX_SPAN = 1 << 40
_ORIGIN = StreamPosition(0)
NO_DELETIONS = 1 << 62  # a poll "since" no deletion is that recent
APPLICATION_NAME = "interactions-feed"  # of the reader's connection, in pg_stat_activity
RPC = "SubscribeEvents"  # the bulk work's name in the precedence's metrics


class FeedClosed(Exception):
    """The feed stops (server shutdown): subscriptions end, to resume elsewhere."""


class PositionRemoved(Exception):
    """The subscription's position is at or before events retention removed."""

    def __init__(self, removed_through: int) -> None:
        super().__init__(f"events up to transaction {removed_through} were removed")
        self.removed_through = removed_through

    @property
    def oldest(self) -> StreamPosition:
        """The oldest position available."""
        return StreamPosition(self.removed_through + 1)


Item = Any  # a row (asyncpg.Record: kind, xid, part, then EventRow's fields) or a StreamDeletion


@dataclass(eq=False, slots=True)
class _Chunk:
    """What one read returned: its items (rows and deletions) in stream order,
    from `start` to `end`."""

    seq: int
    start: StreamPosition
    end: StreamPosition
    items: list[Item]
    removed_through: int
    read_at: float  # time.monotonic() of the read
    nbytes: int
    payloads: list[bytes | None] | None = None  # encoded rows, by item index (filled on first use)
    encoding: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Batch:
    """One response's worth of a subscription: events, then deletions; `end`
    is the position after it (its cursor)."""

    rows: list[Any] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    deletions: list[StreamDeletion] = field(default_factory=list)
    end: StreamPosition = _ORIGIN


def _items(read: StreamRead) -> list[Item]:
    """The rows and deletions of a read merged in stream order (a
    transaction's deletions after its rows)."""
    if not read.deletions:
        return list(read.rows)
    items: list[Item] = []
    deletions = iter(read.deletions)
    pending = next(deletions, None)
    for row in read.rows:
        while pending is not None and pending.xid < row[1]:
            items.append(pending)
            pending = next(deletions, None)
        items.append(row)
    while pending is not None:
        items.append(pending)
        pending = next(deletions, None)
    return items


def _size(row: Sequence[Any]) -> int:
    """Roughly the bytes a row holds (ids and times, plus its JSON payloads)."""
    return 200 + len(row[10] or "") + len(row[11] or "")


class EventFeed:
    """The subscriptions of one process. `subscribe()` from the event loop
    that serves them; `close()` ends them all."""

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        encode: Callable[[Sequence[Any]], bytes],
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        ring_bytes: int = DEFAULT_RING_BYTES,
        statement_cache_size: int = 100,
        precedence: Precedence | None = None,
    ) -> None:
        self._dsn = dsn
        # Subscriptions are bulk work: each read waits its turn while inline calls are behind.
        self._precedence = precedence or Precedence(0)
        self._pool = pool  # catch-up reads and start positions: never the connections ingest needs
        self._encode = encode
        self._poll_interval = poll_interval
        self._ring_bytes = ring_bytes
        self._statement_cache_size = statement_cache_size
        self._ring: deque[_Chunk] = deque()
        self._ring_nbytes = 0
        self._next_seq = 0
        self._head: StreamPosition | None = None  # where the next read starts (the reader's position)
        self._reader: asyncio.Task[None] | None = None
        self._started: asyncio.Future[StreamPosition] | None = None
        self._appended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscriptions = 0
        self._idle_since = time.monotonic()
        self._closed = False
        # Users whose data was deleted: user -> (deletion xid, when learned).
        # A row of the user below that xid, read before, is not sent.
        self._deleted: dict[str, tuple[int, float]] = {}
        self._catching_up: set[_Chunk] = set()  # catch-up reads not yet sent in full

    # --- for the service ---------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        return self._subscriptions

    async def now(self) -> StreamPosition:
        """START_POSITION_NOW: the reader's current position (the reader starts
        if it was idle). Not where it started: a reader that has run for a
        while started behind the ring, and every subscription from there
        would read its way through the database with reads of its own."""
        started = await self._ensure_reader()
        head = self._head
        return started if head is None else head

    async def earliest(self) -> StreamPosition:
        """START_POSITION_EARLIEST: right after what retention removed."""
        async with storage.acquire(self._pool) as conn:
            return StreamPosition(await storage.removed_through(conn) + 1)

    async def check_available(self, position: StreamPosition) -> None:
        """Raises PositionRemoved when retention removed events after `position`."""
        async with storage.acquire(self._pool) as conn:
            removed = await storage.removed_through(conn)
        if position.xid <= removed:
            raise PositionRemoved(removed)

    def note_deletion(self, user_id: str, xid: int) -> None:
        """A deletion committed (by this process: known at once, not at the next poll)."""
        known = self._deleted.get(user_id)
        if known is None or known[0] < xid:
            self._deleted[user_id] = (xid, time.monotonic())

    def close(self) -> None:
        """Ends every subscription (FeedClosed) and stops the reader."""
        self._closed = True
        self._wake(FeedClosed("the server is shutting down"))
        if self._reader is not None:
            self._reader.cancel()

    async def wait_closed(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader

    async def subscribe(
        self, start: StreamPosition, where: StreamFilter, *, max_events: int, max_bytes: int
    ) -> AsyncIterator[Batch]:
        """The stream from `start`: a Batch at once (`start` itself, maybe with
        events), then one whenever there is something to send, or at least
        every HEARTBEAT seconds while the position moves. Raises
        PositionRemoved, FeedClosed, or the database's errors."""
        if self._closed:
            raise FeedClosed("the server is shutting down")
        self._subscriptions += 1
        metrics.subscription_opened()
        try:
            async for batch in self._follow(start, where, max_events, max_bytes):
                yield batch
        finally:
            self._subscriptions -= 1
            metrics.subscription_closed()
            if not self._subscriptions:
                self._idle_since = time.monotonic()

    # --- one subscription ----------------------------------------------------------

    async def _follow(
        self, start: StreamPosition, where: StreamFilter, max_events: int, max_bytes: int
    ) -> AsyncIterator[Batch]:
        await self._ensure_reader()
        position = start
        sent_at = time.monotonic()
        yield Batch(end=position)
        live: tuple[_Chunk, int] | None = None  # following the ring: (chunk, next item index)
        span = FIRST_SPAN
        while True:
            if self._closed:
                raise FeedClosed("the server is shutting down")
            if self._reader is None or self._reader.done():
                await self._ensure_reader()  # it stopped (the database failed): start it again, or fail
                live = None
            if live is None:
                live = self._join(position)
            if live is not None:
                batch, live = await self._take_live(live, where, max_events, max_bytes)
                if batch is not None:
                    position = batch.end
                    if batch.rows or batch.deletions or time.monotonic() - sent_at >= HEARTBEAT:
                        sent_at = time.monotonic()
                        yield batch
                    continue
                if live is None:  # its chunk left the ring: read the database from here
                    continue
                await self._next_append(max(HEARTBEAT - (time.monotonic() - sent_at), 0.01))
                continue
            target = self._catch_up_target(position)
            if target is None:
                await self._next_append(HEARTBEAT)
                continue
            until = min(target, position.xid + span) if position.xid else None
            chunk = await self._read_behind(position, until, where, max_events)
            # Adapt the span: about one response per read.
            rows = sum(1 for item in chunk.items if not isinstance(item, StreamDeletion))
            if rows >= max_events:
                last_xid = chunk.end.xid
                span = max(1, min(span, 2 * (last_xid - position.xid + 1)))
            elif rows < max_events // 4:
                span = min(span * 4, MAX_SPAN)
            self._catching_up.add(chunk)
            try:
                cursor = (chunk, 0)
                while cursor[1] < len(chunk.items) or position != chunk.end:
                    batch, next_cursor = await self._take(chunk, cursor[1], where, max_events, max_bytes)
                    cursor = (chunk, next_cursor)
                    position = batch.end
                    if batch.rows or batch.deletions or time.monotonic() - sent_at >= HEARTBEAT:
                        sent_at = time.monotonic()
                        yield batch
            finally:
                self._catching_up.discard(chunk)

    def _join(self, position: StreamPosition) -> tuple[_Chunk, int] | None:
        """Where `position` is in the ring: at a chunk's start, or right after one
        of its rows; None when it is not (behind the ring, or between two
        deletions)."""
        for chunk in self._ring:
            if chunk.start == position:
                return chunk, 0
            if chunk.start.xid <= position.xid <= chunk.end.xid and position.key is not None:
                for index, item in enumerate(chunk.items):
                    if not isinstance(item, StreamDeletion) and storage.row_position(item) == position:
                        return chunk, index + 1
        return None

    def _catch_up_target(self, position: StreamPosition) -> int | None:
        """The start (an xid) of the first chunk of the ring past `position`
        that starts a transaction, else the reader's position when it is past
        `position`: a catch-up read goes up to it, then joins the ring there.
        None while there is neither."""
        for chunk in self._ring:
            if chunk.start.key is None and chunk.start.xid > position.xid:
                return chunk.start.xid
        head = self._head
        if head is not None and head.key is None and head.xid > position.xid:
            return head.xid
        return None

    async def _take_live(
        self, live: tuple[_Chunk, int], where: StreamFilter, max_events: int, max_bytes: int
    ) -> tuple[Batch | None, tuple[_Chunk, int] | None]:
        """The next batch from the ring, across chunks; (None, cursor) when it
        has nothing past the cursor yet; (None, None) when the cursor's chunk
        left the ring."""
        chunk, index = live
        if not self._ring or chunk.seq < self._ring[0].seq:
            return None, None
        if index >= len(chunk.items):
            following = self._chunk_after(chunk)
            if following is None:
                return None, live
            chunk, index = following, 0
        batch, index = await self._take(chunk, index, where, max_events, max_bytes)
        # Fill up from the following chunks while there is room (a consumer a
        # few polls behind gets one response, not one per poll).
        while (
            index >= len(chunk.items)
            and not batch.deletions
            and len(batch.rows) < max_events
            and (following := self._chunk_after(chunk)) is not None
        ):
            more, next_index = await self._take(following, 0, where, max_events - len(batch.rows), max_bytes)
            if more.rows or more.deletions or more.end != batch.end:
                batch.rows += more.rows
                batch.payloads += more.payloads
                batch.deletions = more.deletions
                batch.end = more.end
            chunk, index = following, next_index
        return batch, (chunk, index)

    def _chunk_after(self, chunk: _Chunk) -> _Chunk | None:
        first = self._ring[0].seq if self._ring else 0
        position = chunk.seq + 1 - first
        return self._ring[position] if 0 <= position < len(self._ring) else None

    async def _take(
        self, chunk: _Chunk, index: int, where: StreamFilter, max_events: int, max_bytes: int
    ) -> tuple[Batch, int]:
        """A batch of `chunk`'s items from `index` on, filtered: events up to the
        limits, then the deletions that come next (a response ends after its
        deletions). Returns it and the index after what it took."""
        if chunk.start.xid <= chunk.removed_through:
            raise PositionRemoved(chunk.removed_through)
        payloads = await self._payloads(chunk)
        batch = Batch(end=chunk.start if index == 0 else _after(chunk.items[index - 1]))
        names = _TypeSets.of(where)
        count = where.partition_count
        deleted = self._deleted
        size = 0
        items = chunk.items
        end = len(items)
        while index < end:
            item = items[index]
            if isinstance(item, StreamDeletion):
                # A run of deletions ends the batch.
                while index < end and isinstance(items[index], StreamDeletion):
                    deletion = items[index]
                    if not count or deletion.part % count == where.partition:
                        batch.deletions.append(deletion)
                    index += 1
                batch.end = StreamPosition(items[index - 1].xid + 1) if index < end else chunk.end
                if batch.deletions:
                    return batch, index
                continue
            index += 1
            if count and item[2] % count != where.partition:
                continue
            if names is not None:
                event_type = item[5]
                if event_type not in names.names and not (names.custom and event_type not in names.standard):
                    continue
            gone = deleted.get(item[3]) if deleted else None
            if gone is not None and item[1] < gone[0]:
                continue
            payload = payloads[index - 1]
            assert payload is not None
            batch.rows.append(item)
            batch.payloads.append(payload)
            size += len(payload)
            if len(batch.rows) >= max_events or size >= max_bytes:
                break
        batch.end = chunk.end if index >= end else _after(items[index - 1])
        return batch, index

    async def _payloads(self, chunk: _Chunk) -> list[bytes | None]:
        """The encoded rows of `chunk`, computed once (yielding to the event loop
        as it goes); concurrent subscriptions wait for the one that encodes."""
        if chunk.payloads is not None:
            return chunk.payloads
        if chunk.encoding is not None:
            await asyncio.shield(chunk.encoding)
            assert chunk.payloads is not None
            return chunk.payloads
        chunk.encoding = asyncio.get_running_loop().create_future()
        try:
            payloads: list[bytes | None] = []
            encode = self._encode
            for index, item in enumerate(chunk.items, 1):
                payloads.append(None if isinstance(item, StreamDeletion) else encode(item))
                if index % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            chunk.payloads = payloads
            chunk.encoding.set_result(None)
        except BaseException as exc:
            chunk.encoding.set_exception(exc)
            chunk.encoding.exception()  # retrieved: waiters get it, asyncio does not log it
            chunk.encoding = None
            raise
        return payloads

    async def _read_behind(
        self, position: StreamPosition, until: int | None, where: StreamFilter, limit: int
    ) -> _Chunk:
        await self._precedence.bulk_turn(RPC, _busy)
        try:
            async with storage.acquire(self._pool) as conn:
                read = await storage.read_stream(conn, position, limit=limit, until_xid=until, where=where)
        finally:
            self._precedence.step_done()
        if position.xid <= read.removed_through:
            raise PositionRemoved(read.removed_through)
        return _Chunk(-1, position, read.end, _items(read), read.removed_through, time.monotonic(), 0)

    async def _next_append(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(self._appended)

    # --- the reader ------------------------------------------------------------------

    async def _ensure_reader(self) -> StreamPosition:
        if self._closed:
            raise FeedClosed("the server is shutting down")
        if self._reader is None or self._reader.done():
            self._started = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._run(self._started), name="event-feed-reader")
        assert self._started is not None
        return await asyncio.shield(self._started)

    def _wake(self, error: BaseException | None = None) -> None:
        appended, self._appended = self._appended, asyncio.get_running_loop().create_future()
        if error is None:
            appended.set_result(None)
        else:
            appended.set_exception(error)
            appended.exception()  # marked retrieved: nobody may be waiting

    async def _run(self, started: asyncio.Future[StreamPosition]) -> None:
        try:
            await self._read_loop(started)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
                started.exception()
            if not is_database_unavailable(exc):
                _log.exception("the event feed's reader failed")
            self._wake(exc)
        finally:
            self._ring.clear()
            self._ring_nbytes = 0
            self._head = None

    async def _read_loop(self, started: asyncio.Future[StreamPosition]) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            statement_cache_size=self._statement_cache_size,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            poll = await storage.poll_stream(conn, NO_DELETIONS)
            self._head = StreamPosition(poll.boundary)
            started.set_result(self._head)
            summarized_at = 0.0
            while True:
                if not self._subscriptions and time.monotonic() - self._idle_since > IDLE_STOP:
                    return
                poll = await storage.poll_stream(conn, self._head.xid)
                for user_id, xid in poll.recent_deletions:
                    self.note_deletion(user_id, xid)
                self._prune_deleted()
                if poll.boundary <= self._head.xid and self._head.key is None:
                    await asyncio.sleep(self._poll_interval)
                    continue
                if time.monotonic() - summarized_at >= SUMMARIZE_INTERVAL:
                    await storage.summarize_stream(conn)
                    summarized_at = time.monotonic()
                while True:
                    await self._precedence.bulk_turn(RPC, _busy)
                    try:
                        read = await storage.read_stream(conn, self._head, limit=READ_ROWS)
                    finally:
                        self._precedence.step_done()
                    self._append(read)
                    if len(read.rows) < READ_ROWS:
                        break
                await asyncio.sleep(self._poll_interval)
        finally:
            await _close(conn)

    def _append(self, read: StreamRead) -> None:
        assert self._head is not None
        items = _items(read)
        nbytes = 64 + 2 * sum(_size(item) for item in read.rows)  # the rows and their encoding
        chunk = _Chunk(self._next_seq, self._head, read.end, items, read.removed_through, time.monotonic(), nbytes)
        self._next_seq += 1
        self._ring.append(chunk)
        self._ring_nbytes += nbytes
        while len(self._ring) > 1 and (self._ring_nbytes > self._ring_bytes or len(self._ring) > RING_CHUNKS):
            self._ring_nbytes -= self._ring.popleft().nbytes
        self._head = read.end
        self._wake()

    def _prune_deleted(self) -> None:
        """Forgets deletions older than every read whose rows are still held."""
        if not self._deleted:
            return
        held = [c.read_at for c in self._ring] + [c.read_at for c in self._catching_up]
        oldest = min(held, default=time.monotonic())
        for user_id in [u for u, (_, learned) in self._deleted.items() if learned < oldest]:
            del self._deleted[user_id]


@dataclass(frozen=True, slots=True)
class _TypeSets:
    """A StreamFilter's types as sets, for the checks in Python."""

    names: frozenset[str]
    custom: bool
    standard: frozenset[str]

    @classmethod
    def of(cls, where: StreamFilter) -> _TypeSets | None:
        types = where.types
        if types is None or types.everything:
            return None
        return cls(frozenset(types.names), types.custom, frozenset(types.standard))


def _busy() -> bool:
    """A read is never "nothing in flight" for the precedence: it may be held (at most its hold)."""
    return False


def _after(item: Item) -> StreamPosition:
    """The position right after an item."""
    if isinstance(item, StreamDeletion):
        return StreamPosition(item.xid + 1)
    return storage.row_position(item)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=1.0)
    except BaseException:
        conn.terminate()
