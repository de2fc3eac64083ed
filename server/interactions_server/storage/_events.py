"""The write path's log statement and the reads of the state (the state
tables' writes are _state.py's).

Writes are set-based: each function takes a whole batch as arrays and runs
one statement. Timestamps travel as epoch microseconds and event ids as text,
so that PostgreSQL does the conversions in C (see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from interactions_server.storage._citus import for_person, on_citus
from interactions_server.storage._pool import acquire

# SQL expressions converting epoch microseconds (bigint) and timestamptz, exactly.
_US_TO_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"
_TS_TO_US = "(extract(epoch FROM {}) * 1000000)::int8"


class EventColumns(NamedTuple):
    """A batch of event-log rows as one list per column, in the parameter order of INSERT_EVENTS."""

    user_id: list[str]
    event_id: list[str]
    event_type: list[str]
    session_id: list[str | None]
    product_id: list[str | None]
    event_value: list[int]
    occurred_us: list[int]
    details: list[str | None]  # JSON text
    attributes: list[str | None]  # JSON text
    syncs_state: list[bool]
    fingerprint: list[int]  # of the event's content as sent (stored in event_keys)

    @classmethod
    def empty(cls) -> EventColumns:
        return cls([], [], [], [], [], [], [], [], [], [], [])

    def without(self, rows: Collection[int]) -> EventColumns:
        """The same columns without the rows at the positions `rows`."""
        kept = [[value for row, value in enumerate(column) if row not in rows] for column in self]
        return EventColumns(*kept)  # type: ignore[arg-type]  # each list keeps its column's type


INSERT_EVENTS = f"""
WITH resolved AS MATERIALIZED (
    -- Once, before anything is written: the deadline, then the users'
    -- deletion locks and who each linked user is (resolve_users_for_ingest,
    -- migrations/0008_identity.sql, which explains the lock: deleted users'
    -- events up to their watermark are refused; a linked user's events are
    -- stored under its person).
    SELECT user_id, person, deleted_through FROM resolve_users_for_ingest($1::text[])
    WHERE (SELECT deadline_guard($12::float8))
), batch AS (
    SELECT u, coalesce(x.person, u) AS pu, e::uuid AS e, t, s, p, v, {_US_TO_TS.format("o")} AS o,
           d::jsonb AS d, a::jsonb AS a, y, f, x.deleted_through
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::int8[], $7::int8[], $8::text[], $9::text[], $10::bool[], $11::int8[])
         AS r(u, e, t, s, p, v, o, d, a, y, f)
    LEFT JOIN resolved AS x ON x.user_id = r.u
    -- Then the state-sync key locks (migrations/0005_sync_key_locks.sql) of
    -- the events that sync, under the resolved (person, product) keys.
    WHERE (SELECT lock_sync_keys(array_agg(coalesce(k.person, l.u)), array_agg(l.p))
           FROM unnest($13::text[], $14::text[]) AS l(u, p) LEFT JOIN resolved AS k ON k.user_id = l.u)
), refused AS (
    SELECT u, e, deleted_through FROM batch WHERE o <= deleted_through
), new AS (
    INSERT INTO event_keys (user_id, event_id, occurred_at, fingerprint)
    SELECT pu, e, o, f FROM batch
    WHERE NOT coalesce(o <= deleted_through, false)
    -- Two rows of the batch can share a key only when one of them resolved
    -- to a person (a linked user and its person, or two linked users, with
    -- one event id): the person's own row goes first, and a resolved row was
    -- logged only when the key's fingerprint is its own (they differ in
    -- user_id). Other rows need no fingerprint compare.
    ORDER BY pu, e, u <> pu
    ON CONFLICT DO NOTHING
    RETURNING user_id, event_id, fingerprint
), logged AS (
    INSERT INTO events (user_id, event_id, event_type, session_id, product_id,
                        event_value, occurred_at, details, attributes, syncs_state)
    SELECT b.pu, b.e, b.t, b.s, b.p, b.v, b.o, b.d, b.a, b.y
    FROM batch AS b JOIN new ON new.user_id = b.pu AND new.event_id = b.e AND (b.u = b.pu OR new.fingerprint = b.f)
), unlogged AS (
    SELECT b.u, b.pu, b.e, b.f FROM batch AS b
    WHERE NOT EXISTS (SELECT FROM new
                      WHERE new.user_id = b.pu AND new.event_id = b.e AND (b.u = b.pu OR new.fingerprint = b.f))
      AND NOT coalesce(b.o <= b.deleted_through, false)
)
-- Only the rows not logged come back (most batches: none), keyed by the
-- user_id they were sent with. A key in the statement's snapshot is known
-- with other content ("conflict") or the same ("known"); a NULL fingerprint
-- (logged before fingerprints existed) counts as the same content. A key not
-- in the snapshot was committed by a concurrent transaction while this
-- statement waited on it ("raced"). A subquery per row, not a join: always a
-- probe of the key index, never a hash of the whole table. Then one row per
-- linked user of the batch: its person ("resolved", in event_id's column).
SELECT x.u AS user_id, x.e::text AS event_id,
       COALESCE((SELECT CASE WHEN k.fingerprint <> x.f THEN 'conflict' ELSE 'known' END
                 FROM event_keys AS k WHERE k.user_id = x.pu AND k.event_id = x.e), 'raced') AS kind,
       NULL::timestamptz AS deleted_through
FROM unlogged AS x
UNION ALL
SELECT u, e::text, 'refused', deleted_through FROM refused
UNION ALL
SELECT user_id, person, 'resolved', NULL FROM resolved WHERE person IS NOT NULL
"""


class InsertOutcome(NamedTuple):
    """Keys are (user_id, event_id) as the batch sent them, whoever the user's person is."""

    new: set[tuple[str, str]]  # keys logged by this statement
    conflicting: set[tuple[str, str]]  # keys already logged with a different fingerprint
    refused: dict[tuple[str, str], datetime]  # keys of deleted users' events: their deletion watermark
    persons: dict[str, str]  # the batch's linked users: the person each one's events were stored under


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def insert_events(
    conn: asyncpg.Connection,
    columns: EventColumns,
    deadline: float | None = None,
    lock_keys: Collection[tuple[str, str]] = (),
) -> InsertOutcome:
    """Logs the rows whose (user_id, event_id) is new, except those refused by
    a deletion watermark (in one statement); returns those keys, the known
    keys whose stored fingerprint differs, and the refused keys. The rows'
    keys must be unique within the batch. Past `deadline` (epoch seconds, by
    PostgreSQL's clock) the statement fails instead (QueryCanceledError).
    `lock_keys`: the (user_id, product_id) keys whose state-sync locks the
    transaction takes first (what lock_keys does, without a round trip), with
    each user replaced by its person. The events of a linked user are stored
    under its person (`persons` of the outcome).
    On a Citus cluster: _citus_write.insert_events, the same in statements
    Citus routes to shards."""
    if on_citus(conn):
        from interactions_server.storage import _citus_write  # imports this module

        return await _citus_write.insert_events(conn, columns, deadline, lock_keys)
    outcome = InsertOutcome(set(), set(), {}, {})
    not_logged: set[tuple[str, str]] = set()
    raced: list[tuple[str, str]] = []
    for user_id, event_id, kind, deleted_through in await conn.fetch(
        INSERT_EVENTS, *columns, deadline, [k[0] for k in lock_keys], [k[1] for k in lock_keys]
    ):
        if kind == "resolved":
            outcome.persons[user_id] = event_id
            continue
        key = (user_id, event_id)
        not_logged.add(key)
        if kind == "refused":
            outcome.refused[key] = deleted_through
        elif kind == "conflict":
            outcome.conflicting.add(key)
        elif kind == "raced":
            raced.append(key)
    outcome.new.update(key for key in zip(columns.user_id, columns.event_id, strict=True) if key not in not_logged)
    if raced:
        # Rare: the raced keys' fingerprints are read in a statement of its
        # own, which sees the concurrent commit.
        outcome.conflicting.update(await _raced_conflicts(conn, columns, raced, outcome.persons))
    return outcome


_STORED_FINGERPRINTS = """
SELECT k.user_id, k.event_id::text
FROM unnest($1::text[], $2::uuid[], $3::int8[]) AS b(u, e, f)
JOIN event_keys AS k ON k.user_id = b.u AND k.event_id = b.e
WHERE k.fingerprint <> b.f
"""


async def _raced_conflicts(
    conn: asyncpg.Connection,
    columns: EventColumns,
    raced: Sequence[tuple[str, str]],
    persons: Mapping[str, str],
) -> set[tuple[str, str]]:
    """The `raced` keys of the batch that are stored (under the person) with another fingerprint."""
    prints = dict(zip(zip(columns.user_id, columns.event_id, strict=True), columns.fingerprint, strict=True))
    stored = {(persons.get(k[0], k[0]), k[1]): k for k in raced}
    records = await conn.fetch(
        _STORED_FINGERPRINTS, [k[0] for k in stored], [k[1] for k in stored], [prints[k] for k in stored.values()]
    )
    return {stored[(r["user_id"], r["event_id"])] for r in records}


# --- reads -------------------------------------------------------------------
# Every read names any id and answers its person's rows (person_of, 0008).

_PURCHASES = """
SELECT event_id::text, product_id, session_id, purchased_at FROM purchase_history
WHERE user_id = person_of($1) {after}
ORDER BY purchased_at DESC, event_id DESC LIMIT $2
"""
_FIRST_PAGE = _PURCHASES.format(after="")
_NEXT_PAGE = _PURCHASES.format(after="AND (purchased_at, event_id) < ($3, $4::uuid)")


class CartRow(NamedTuple):
    product_id: str
    quantity: int
    updated_at: datetime


class WishlistRow(NamedTuple):
    product_id: str
    added_at: datetime


class PurchaseRecord(NamedTuple):
    event_id: str
    product_id: str
    session_id: str | None
    purchased_at: datetime


# GetCart: on Citus, a router query (one shard: docs/scaling.md shows its plan).
CART_SQL = "SELECT product_id, quantity, updated_at FROM user_cart WHERE user_id = person_of($1) ORDER BY product_id"


async def fetch_cart(pool: asyncpg.Pool, user_id: str) -> list[CartRow]:
    async with acquire(pool) as conn:
        records = await conn.fetch(*await for_person(conn, CART_SQL, user_id))
    return [CartRow(*r) for r in records]


_WISHLIST = "SELECT product_id, added_at FROM user_wishlist WHERE user_id = person_of($1) ORDER BY added_at, product_id"


async def fetch_wishlist(pool: asyncpg.Pool, user_id: str) -> list[WishlistRow]:
    async with acquire(pool) as conn:
        records = await conn.fetch(*await for_person(conn, _WISHLIST, user_id))
    return [WishlistRow(*r) for r in records]


async def fetch_purchases(
    pool: asyncpg.Pool, user_id: str, limit: int, after: tuple[datetime, str] | None
) -> list[PurchaseRecord]:
    """A page of purchases, newest first; `after` is the last row of the previous page."""
    async with acquire(pool) as conn:
        sql, person = await for_person(conn, _FIRST_PAGE if after is None else _NEXT_PAGE, user_id)
        records = await conn.fetch(sql, person, limit, *(after or ()))
    return [PurchaseRecord(*r) for r in records]


# --- maintenance ---------------------------------------------------------------


async def ensure_event_partitions(
    conn: asyncpg.Pool | asyncpg.Connection, months_back: int, months_ahead: int, not_before: datetime | None = None
) -> int:
    """Creates the missing monthly partitions of the event log around now
    (none that ends at or before `not_before`: retention removes those whole);
    returns how many."""
    created: int = await conn.fetchval(
        """
        SELECT ensure_event_partitions(
            greatest((now() - make_interval(months => $1))::date, $3::timestamptz::date),
            (now() + make_interval(months => $2))::date)
        """,
        months_back,
        months_ahead,
        not_before,
    )
    return created
