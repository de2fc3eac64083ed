"""The SQL of the subscription (EventStreamService; migrations/0009_event_stream.sql,
docs/subscribe.md).

The stream is the event log in the order of StreamPosition: by the id of the
writing transaction (events.xid), then (user_id, occurred_at, event_id) within
a transaction, and a transaction's UserDeleted records after its events. A
read returns the first rows after a position among those whose transaction
is below the boundary of the read's own snapshot (every transaction below it
has finished, so every committed row below it is visible to the read and no
later commit can add one): that is the whole of the gap-freedom argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg

from interactions_server.storage._analytics import _EVENT_COLUMNS, _TS, _US, TypeFilter, _types_sql

LEGACY_XID = 0  # the xid of every event logged before migration 0009


class StreamKey(NamedTuple):
    """An event's place inside its transaction."""

    user_id: str
    occurred_us: int
    event_id: str


class StreamPosition(NamedTuple):
    """A point of the stream: everything before it has been delivered.
    `key` None: the start of transaction `xid` (every row of a lower xid
    delivered, none of this one); else just after that event of `xid`."""

    xid: int
    key: StreamKey | None = None


class StreamDeletion(NamedTuple):
    """A user's data was deleted by transaction `xid`; after that
    transaction's events in the stream."""

    xid: int
    part: int  # the user's partition hash
    user_id: str
    deleted_at_us: int


class StreamRead(NamedTuple):
    # (xid, part, then EventRow's fields in its order), in stream order.
    rows: list[asyncpg.Record]
    deletions: list[StreamDeletion]  # in stream order, all before `end`
    end: StreamPosition  # the position after this read (after its last row or the window)
    boundary: int  # the read's snapshot boundary: transactions below it had all finished
    removed_through: int  # retention removed events up to this xid (-1: none)


class Poll(NamedTuple):
    boundary: int
    # Deletions committed at or after the reader's position, not yet in a
    # window: (user_id, xid), so that rows already read of those users are
    # dropped before they are sent.
    recent_deletions: list[tuple[str, int]]


_POLL = """
SELECT event_stream_boundary(),
       coalesce((SELECT array_agg(user_id) FROM user_deletions WHERE deleted_xid >= $1::int8::text::xid8), '{}'),
       coalesce((SELECT array_agg(deleted_xid::text::int8) FROM user_deletions
                 WHERE deleted_xid >= $1::int8::text::xid8), '{}')
"""


async def poll_stream(conn: asyncpg.Connection, since_xid: int) -> Poll:
    """The current boundary, and the deletions committed with an xid at or
    after `since_xid` (a handful: those of the last poll interval)."""
    boundary, users, xids = await conn.fetchrow(_POLL, since_xid)
    return Poll(boundary, list(zip(users, xids, strict=True)))


async def summarize_stream(conn: asyncpg.Connection) -> int:
    """Summarizes the xid index's block ranges filled since the last call (see 0009)."""
    summarized: int = await conn.fetchval("SELECT event_stream_summarize()")
    return summarized


async def removed_through(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The largest xid retention removed (-1: nothing removed yet)."""
    value: int = await conn.fetchval("SELECT coalesce((SELECT removed_through FROM event_stream_horizon), -1)")
    return value


# Parameters: $1 position xid, $2 upper xid limit (NULL: the boundary), $3-$5
# the position's key (NULL: start of $1), $6 rows, $7 partition, $8 partition
# count (0: all), $9-$11 the TypeFilter. The boundary and the horizon come from
# the statement's own snapshot (scalar subqueries: run once, usable by the
# BRIN scan as bounds).
_BOUND = "(SELECT least(event_stream_boundary(), coalesce($2::int8, 9223372036854775807)))"
_PARTITION = "($8::int4 = 0 OR event_stream_partition_hash({column}) % $8::int4 = $7::int4)"
_AFTER_KEY = f"(e.user_id, e.occurred_at, e.event_id) > ($3::text, {_TS.format('$4::int8')}, $5::uuid)"
_EVENTS_AFTER = f"""
SELECT 1 AS kind, e.xid, event_stream_partition_hash(e.user_id) AS part, {_EVENT_COLUMNS}
FROM events AS e
WHERE e.xid >= $1::int8 AND e.xid < {_BOUND}
  AND ($3::text IS NULL OR e.xid > $1::int8 OR {_AFTER_KEY})
  AND {_PARTITION.format(column="e.user_id")} AND {_types_sql(9)}
ORDER BY e.xid, e.user_id, e.occurred_at, e.event_id
LIMIT $6
"""
# Events logged before the xid existed (all xid 0): in the per-user index's
# order, one page after another, instead of sorting them all for each page.
_LEGACY_EVENTS = f"""
SELECT 1 AS kind, e.xid, event_stream_partition_hash(e.user_id) AS part, {_EVENT_COLUMNS}
FROM events AS e
WHERE e.xid = 0 AND ($3::text IS NULL OR {_AFTER_KEY})
  AND {_PARTITION.format(column="e.user_id")} AND {_types_sql(9)}
ORDER BY e.user_id, e.occurred_at, e.event_id
LIMIT $6
"""
_DELETIONS_AND_BOUNDS = f"""
SELECT 2 AS kind, d.deleted_xid::text::int8, event_stream_partition_hash(d.user_id), d.user_id,
       NULL, NULL, NULL, NULL, NULL, {_US.format("d.deleted_at")}, NULL, NULL, NULL
FROM user_deletions AS d
WHERE d.deleted_xid >= $1::int8::text::xid8 AND d.deleted_xid < {_BOUND}::text::xid8
  AND {_PARTITION.format(column="d.user_id")}
UNION ALL
SELECT 0, {_BOUND}, coalesce((SELECT removed_through FROM event_stream_horizon), -1), NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
"""
_READ = f"({_EVENTS_AFTER})\nUNION ALL\n{_DELETIONS_AND_BOUNDS}"
_READ_LEGACY = f"({_LEGACY_EVENTS})\nUNION ALL\n{_DELETIONS_AND_BOUNDS}"


class StreamFilter(NamedTuple):
    """Which rows a read returns: one partition of `partition_count` (0: all), some types."""

    partition: int = 0
    partition_count: int = 0
    types: TypeFilter | None = None  # None: every type


_EVERY_TYPE = TypeFilter([], False, [])
EVERYTHING = StreamFilter()


async def read_stream(
    conn: asyncpg.Connection,
    after: StreamPosition,
    *,
    limit: int,
    until_xid: int | None = None,
    where: StreamFilter = EVERYTHING,
) -> StreamRead:
    """The first `limit` rows after `after` (and the deletions among them),
    of transactions below the read's boundary and below `until_xid`, in one
    statement. At fewer than `limit` rows the window is done: `end` is the
    start of the first transaction not read. Rows of transaction 0 (logged
    before migration 0009) come page by page in the order of the per-user
    index; from a position in transaction 0, a read returns only those."""
    key = after.key
    types = where.types or _EVERY_TYPE
    legacy = after.xid == LEGACY_XID
    records = await conn.fetch(
        _READ_LEGACY if legacy else _READ,
        after.xid,
        1 if legacy else until_xid,
        *(key if key is not None else (None, None, None)),
        limit,
        where.partition,
        where.partition_count,
        *types,
    )
    rows: list[asyncpg.Record] = []
    deletions: list[StreamDeletion] = []
    boundary = removed = 0
    for record in records:
        kind = record[0]
        if kind == 1:
            rows.append(record)
        elif kind == 2:
            deletions.append(StreamDeletion(record[1], record[2], record[3], record[9]))
        else:
            boundary, removed = record[1], record[2]
    deletions.sort()
    if len(rows) >= limit:
        last = rows[-1]
        end = StreamPosition(last[1], StreamKey(last[3], last[9], last[4]))
        # A transaction's deletions come after its events: those of the last
        # row's transaction wait for the rest of its rows.
        deletions = [d for d in deletions if d.xid < end.xid]
    else:
        # Transaction 0 ends where transaction 1 starts, whatever the boundary.
        end = StreamPosition(LEGACY_XID + 1 if legacy else boundary)
    return StreamRead(rows, deletions, end, boundary, removed)


def row_position(row: Sequence[Any]) -> StreamPosition:
    """The position just after a row of a StreamRead."""
    return StreamPosition(row[1], StreamKey(row[3], row[9], row[4]))
