"""The write path's statements on a Citus cluster (storage/_citus.py): the
same semantics as _events.insert_events and _state's reads and writes, in
statements Citus executes on the shards of the batch instead of pulling rows
to the coordinator. The storage functions of _events and _state call these
when their connection is a CitusConnection; the same acceptance tests run
both (tests/citus/).

What Citus routes to shards, and what it does not (docs/scaling.md):

- COPY and multi-row INSERT ... VALUES are split by shard and sent to the
  shards' workers; any INSERT ... SELECT FROM unnest(...) is "pull to
  coordinator" (the coordinator evaluates the SELECT and ships its rows), and
  an INSERT in a CTE is always planned apart, so the plain statements' one-
  statement-per-step shape costs Citus several distributed steps each;
- a SELECT joining unnest(...) to a distributed table on user_id, with
  `user_id = ANY(...)`, runs on the shards of those users only, in parallel;
- UNION ALL of two distributed SELECTs is merged on the coordinator, and a
  LATERAL subquery over a CTE is refused.

So, per batch (one transaction through the coordinator, as on PostgreSQL):

1. one coordinator statement takes what INSERT_EVENTS takes first, in its
   order: the deadline guard, the users' deletion locks, who each linked
   user is and the watermarks (resolve_users_for_ingest, 0008), then the
   state-sync key locks (0005) of the resolved keys. The locks live on the
   coordinator, where the deletion and a link take theirs; a linked user's
   rows are then written under its person;
2. the refused rows (at or before their user's watermark) are left out here,
   under the lock held to commit, exactly as the statement's join did;
3. the keys go in by COPY under a savepoint, in key order; the common case (no
   key known) is done. A unique violation (a resend, a conflict, a key a
   concurrent batch committed) rolls back to the savepoint and inserts the
   keys with ON CONFLICT DO NOTHING RETURNING instead (pulled to the
   coordinator: rare). A batch of at most SMALL_BATCH rows uses that
   statement as multi-row VALUES (one shard, routed) instead of the COPY;
4. the new keys' events go in by COPY (VALUES for a small batch);
5. only when some key was not new: the stored fingerprints of those keys, in
   a statement of its own (it sees keys committed while the insert waited),
   as INSERT_EVENTS' "raced" follow-up does for its rare keys.

State: one read per state table with keys (a UNION ALL would be merged on
the coordinator), the late events' segments then their rows (two reads for
what _state's one LATERAL statement does), and the writes as multi-row
VALUES upserts (the lines, segments, purchases) and a COPY (the history:
only new positions), all of them from the same RowsInsert descriptions as
_state's statement.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import asyncpg

from interactions_server.storage import _state
from interactions_server.storage._events import _TS_TO_US, _US_TO_TS, EventColumns, InsertOutcome
from interactions_server.storage._identity import Link, MovedEvent
from interactions_server.storage._state import (
    HISTORY_INSERT,
    LINES_INSERT,
    PURCHASES_INSERT,
    SEGMENTS_INSERT,
    STATE_TABLES,
    FoldRows,
    HistoryRow,
    LatePosition,
    PurchaseRow,
    RowsInsert,
    Segment,
    StateLine,
    TailStart,
)

SMALL_BATCH = 16  # rows up to which the keys and events go as multi-row VALUES rather than COPY
_MAX_PARAMETERS = 32_767  # of one statement (the protocol's limit)
_MAX_VALUES_ROWS = 1_000  # rows of one multi-row VALUES (its planning grows with the rows)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)

# Step 1: the deadline, the users' deletion locks, who each linked user is and
# the watermarks (resolve_users_for_ingest, 0008), then the state-sync key
# locks of the resolved (person, product) keys: INSERT_EVENTS' order. Every
# table read here is the coordinator's (identity_links, user_deletions), so
# Citus sends nothing to a worker. `locked` is one row (an aggregate): the key
# locks are taken even when no user is resolved.
_BEGIN = """
WITH resolved AS MATERIALIZED (
    SELECT user_id, person, deleted_through FROM resolve_users_for_ingest($1::text[])
    WHERE (SELECT deadline_guard($2::float8))
), locked AS MATERIALIZED (
    SELECT lock_sync_keys(array_agg(coalesce(k.person, l.u)), array_agg(l.p)) AS ok
    FROM unnest($3::text[], $4::text[]) AS l(u, p) LEFT JOIN resolved AS k ON k.user_id = l.u
)
SELECT r.user_id, r.person, r.deleted_through FROM locked LEFT JOIN resolved AS r ON true
"""
_KEY_COLUMNS = ("user_id", "event_id", "occurred_at", "fingerprint")
# Step 3 after a unique violation: the keys that are new, in key order.
_INSERT_KEYS = f"""
INSERT INTO event_keys (user_id, event_id, occurred_at, fingerprint)
SELECT u, e::uuid, {_US_TO_TS.format("o")}, f
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS r(u, e, o, f)
ORDER BY u, e::uuid
ON CONFLICT DO NOTHING
RETURNING user_id, event_id::text
"""
_KEYS_VALUES = RowsInsert(
    "event_keys",
    (
        ("user_id", "text", "{}"),
        ("event_id", "text", "{}::uuid"),
        ("occurred_at", "int8", _US_TO_TS),
        ("fingerprint", "int8", "{}"),
    ),
    ("user_id", "event_id"),
    "ON CONFLICT DO NOTHING RETURNING user_id, event_id::text",
)
_LOG_VALUES = RowsInsert(
    "events",
    (
        ("user_id", "text", "{}"),
        ("event_id", "text", "{}::uuid"),
        ("event_type", "text", "{}"),
        ("session_id", "text", "{}"),
        ("product_id", "text", "{}"),
        ("event_value", "int8", "{}"),
        ("occurred_at", "int8", _US_TO_TS),
        ("details", "text", "{}::jsonb"),
        ("attributes", "text", "{}::jsonb"),
        ("syncs_state", "bool", "{}"),
    ),
    (),
    "",
)
_LOG_COLUMNS = tuple(c for c, _, _ in _LOG_VALUES.columns)
# Step 5: the stored fingerprints of the keys that were not new, on their
# shards only (a NULL one, logged before fingerprints existed, counts as the same content).
_STORED_FINGERPRINTS = """
SELECT k.user_id, k.event_id::text, k.fingerprint
FROM unnest($1::text[], $2::uuid[]) AS b(u, e)
JOIN event_keys AS k ON k.user_id = b.u AND k.event_id = b.e
WHERE k.user_id = ANY($1::text[]) AND k.fingerprint IS NOT NULL
"""


def _us(at: dt.datetime) -> int:
    return (at - _EPOCH) // _US


def _at(us: int | None) -> dt.datetime | None:
    return None if us is None else _EPOCH + us * _US


async def insert_events(
    conn: asyncpg.Connection,
    columns: EventColumns,
    deadline: float | None = None,
    lock_keys: Collection[tuple[str, str]] = (),
) -> InsertOutcome:
    """_events.insert_events on a Citus cluster (the module's docstring), in
    the caller's transaction or, without one (a batch that syncs nothing:
    one statement on PostgreSQL), in a transaction of its own."""
    if not conn.is_in_transaction():
        async with conn.transaction():
            return await insert_events(conn, columns, deadline, lock_keys)
    outcome = InsertOutcome(set(), set(), {}, {})
    users, ids, occurred, prints = columns.user_id, columns.event_id, columns.occurred_us, columns.fingerprint
    marks: dict[str, dt.datetime] = {}
    for user_id, person, mark in await conn.fetch(
        _BEGIN, users, deadline, [k[0] for k in lock_keys], [k[1] for k in lock_keys]
    ):
        if user_id is None:
            continue  # the row of `locked` alone: no user resolved
        if person is not None:
            outcome.persons[user_id] = person
        if mark is not None:
            marks[user_id] = mark
    persons = outcome.persons
    stored = [persons.get(u, u) for u in users]  # the user each row is stored under
    rows: list[int] = []
    for i, user_id in enumerate(users):
        mark = marks.get(user_id)
        if mark is not None and occurred[i] <= _us(mark):
            outcome.refused[(user_id, ids[i])] = mark
        else:
            rows.append(i)
    if not rows:
        return outcome
    # Key order, as INSERT_EVENTS' ORDER BY. Two rows share a stored key only
    # when one was resolved to a person: the person's own row goes first and
    # the other is not logged (INSERT_EVENTS logs a resolved row only under
    # its own fingerprint, and theirs differ in user_id).
    rows.sort(key=lambda i: (stored[i], ids[i], users[i] != stored[i]))
    first: dict[tuple[str, str], int] = {}
    for i in rows:
        first.setdefault((stored[i], ids[i]), i)
    candidates = list(first.values())
    keys = [(stored[i], ids[i], occurred[i], prints[i]) for i in candidates]
    new = await (_insert_keys_values(conn, keys) if len(keys) <= SMALL_BATCH else _copy_keys(conn, keys))
    logged = candidates if len(new) == len(candidates) else [i for i in candidates if (stored[i], ids[i]) in new]
    outcome.new.update((users[i], ids[i]) for i in logged)
    if logged:
        if len(logged) <= SMALL_BATCH:
            await conn.execute(_LOG_VALUES.values(len(logged)), *_values_args(_log_rows(columns, logged, stored)))
        else:
            await conn.copy_records_to_table(
                "events", records=_log_rows(columns, logged, stored, copy=True), columns=_LOG_COLUMNS
            )
    if len(logged) < len(rows):
        # The rows not logged: their stored keys' fingerprints, in a
        # statement of its own (it sees keys committed while the insert
        # waited), as INSERT_EVENTS' "raced" follow-up does for its rare keys.
        known: dict[tuple[str, str], list[int]] = {}
        for i in rows:
            if (users[i], ids[i]) not in outcome.new:
                known.setdefault((stored[i], ids[i]), []).append(i)
        records = await conn.fetch(_STORED_FINGERPRINTS, [k[0] for k in known], [k[1] for k in known])
        for r in records:
            outcome.conflicting.update(
                (users[i], ids[i]) for i in known[(r["user_id"], r["event_id"])] if prints[i] != r["fingerprint"]
            )
    return outcome


async def _copy_keys(conn: asyncpg.Connection, keys: list[tuple[str, str, int, int]]) -> set[tuple[str, str]]:
    """The keys (user, event id, occurred us, fingerprint) inserted; the new ones."""
    await conn.execute("SAVEPOINT interactions_keys")
    try:
        await conn.copy_records_to_table(
            "event_keys", records=[(u, e, _EPOCH + o * _US, f) for u, e, o, f in keys], columns=_KEY_COLUMNS
        )
    except (asyncpg.UniqueViolationError, asyncpg.InternalServerError):
        # Some key is already stored: the keys again, skipping those (the
        # locks, taken before the savepoint, are still held). Citus reports a
        # shard's unique violation in a COPY as an internal error (XX000,
        # multi_copy.c's ReportCopyError): any other cause of one meets the
        # statement below again and fails it.
        await conn.execute("ROLLBACK TO SAVEPOINT interactions_keys")
        records = await conn.fetch(_INSERT_KEYS, *_state._columns(keys, 4))
        return {(r["user_id"], r["event_id"]) for r in records}
    return {(u, e) for u, e, _, _ in keys}


async def _insert_keys_values(conn: asyncpg.Connection, keys: list[tuple[str, str, int, int]]) -> set[tuple[str, str]]:
    records = await conn.fetch(_KEYS_VALUES.values(len(keys)), *_values_args(keys))
    return {(r["user_id"], r["event_id"]) for r in records}


def _log_rows(c: EventColumns, rows: list[int], stored: list[str], *, copy: bool = False) -> list[tuple[Any, ...]]:
    """The log's rows in _LOG_VALUES' column order, under the `stored` user;
    for COPY (`copy`), occurred_at as a datetime."""
    occurred = [_EPOCH + c.occurred_us[i] * _US for i in rows] if copy else [c.occurred_us[i] for i in rows]
    return [
        (stored[i], c.event_id[i], c.event_type[i], c.session_id[i], c.product_id[i], c.event_value[i], at,
         c.details[i], c.attributes[i], c.syncs_state[i])
        for i, at in zip(rows, occurred, strict=True)
    ]  # fmt: skip


def _values_args(rows: Sequence[Sequence[Any]]) -> list[Any]:
    return [value for row in rows for value in row]


def _chunks(insert: RowsInsert, rows: Sequence[Sequence[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """Multi-row VALUES statements of `insert` for `rows`, within the protocol's parameter limit."""
    size = min(_MAX_VALUES_ROWS, _MAX_PARAMETERS // len(insert.columns))
    for first in range(0, len(rows), size):
        chunk = rows[first : first + size]
        yield insert.values(len(chunk)), _values_args(chunk)


# --- state ---------------------------------------------------------------------


async def fetch_state_lines(
    conn: asyncpg.Connection, keys: Mapping[str, Sequence[tuple[str, str]]]
) -> dict[str, dict[tuple[str, str], StateLine]]:
    """_state.fetch_state_lines: one statement per table with keys, on the shards of their users."""
    lines: dict[str, dict[tuple[str, str], StateLine]] = {table: {} for table in STATE_TABLES}
    for n, table in enumerate(STATE_TABLES):
        table_keys = keys.get(table, ())
        if not table_keys:
            continue
        sql = _state.lines_sql(n, table, 1, " WHERE l.user_id = ANY($1::text[])")
        for _, *line in await conn.fetch(sql, [k[0] for k in table_keys], [k[1] for k in table_keys]):
            state_line = StateLine(*line)
            lines[table][(state_line.user_id, state_line.product_id)] = state_line
    return lines


_SEGMENTS_OF_KEYS = f"""
SELECT s.state_table, s.user_id, s.product_id, {_TS_TO_US.format("s.until_at")}, s.until_event_id::text,
       s.events, s.a, s.b
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(t, u, p)
JOIN state_segments AS s ON s.user_id = k.u AND s.product_id = k.p AND s.state_table = k.t
WHERE s.user_id = ANY($2::text[])
"""
# History rows in ranges (after, through] of their keys' positions.
_HISTORY_IN_RANGES = f"""
SELECT h.state_table, h.user_id, h.product_id, {_TS_TO_US.format("h.occurred_at")}, h.event_id::text,
       h.event_type, h.event_value
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::text[])
     AS r(t, u, p, after_us, after_id, through_us, through_id)
JOIN state_history AS h ON h.user_id = r.u AND h.product_id = r.p AND h.state_table = r.t
 AND (h.occurred_at, h.event_id) > (coalesce({_US_TO_TS.format("r.after_us")}, '-infinity'), r.after_id::uuid)
 AND (h.occurred_at, h.event_id) <= (coalesce({_US_TO_TS.format("r.through_us")}, 'infinity'), r.through_id::uuid)
WHERE h.user_id = ANY($2::text[])
"""
_NIL = "00000000-0000-0000-0000-000000000000"
_LAST = "ffffffff-ffff-ffff-ffff-ffffffffffff"

# (state_table, user_id, product_id, after us or None, after id, through us or None, through id)
_Range = tuple[str, str, str, int | None, str, int | None, str]


async def fetch_fold_rows(
    conn: asyncpg.Connection,
    late: Mapping[str, Collection[LatePosition]],
    tails: Mapping[str, Collection[TailStart]],
) -> FoldRows:
    """_state.fetch_fold_rows in two statements: the segments of the late
    keys, then the history rows of the ranges they give (and of the tails)."""
    found = FoldRows({}, {})
    ranges: set[_Range] = set()
    late_keys = sorted({(t, u, p) for t, entries in late.items() for u, p, _, _ in entries})
    if late_keys:
        records = await conn.fetch(
            _SEGMENTS_OF_KEYS, [k[0] for k in late_keys], [k[1] for k in late_keys], [k[2] for k in late_keys]
        )
        for record in records:
            segment = Segment(*record)
            found.segments.setdefault((segment.state_table, segment.user_id, segment.product_id), []).append(segment)
        ends = {
            key: sorted((s.until_us, s.until_event_id) for s in segments) for key, segments in found.segments.items()
        }
        for t, entries in late.items():
            for u, p, at_us, event_id in entries:
                key_ends = ends.get((t, u, p), [])
                index = bisect.bisect_left(key_ends, (at_us, event_id))  # the segment ending at or after it
                if index == len(key_ends):
                    continue  # after every segment: the plain statement's LATERAL finds none either
                after: tuple[int | None, str] = key_ends[index - 1] if index else (None, _NIL)
                ranges.add((t, u, p, *after, *key_ends[index]))
    for t, starts in tails.items():
        for u, p, sealed_us, sealed_id in starts:
            ranges.add((t, u, p, sealed_us, sealed_id or _NIL, None, _LAST))
    if ranges:
        ordered = sorted(ranges, key=lambda r: r[:3])
        for t, u, p, us, event_id, event_type, value in await conn.fetch(
            _HISTORY_IN_RANGES, *_state._columns(ordered, 7)
        ):
            found.rows.setdefault((t, u, p), []).append((us, event_id, event_type, value))
    return found


async def write_state(
    conn: asyncpg.Connection,
    lines: Mapping[str, Sequence[StateLine]],
    history: Sequence[HistoryRow],
    segments: Sequence[Segment],
    purchases: Sequence[PurchaseRow],
) -> None:
    """_state.write_state: the lines, segments and purchases as multi-row
    VALUES (routed to their shards), the history by COPY (VALUES when it is
    small), each in key order."""
    for table in STATE_TABLES:
        table_lines = sorted(line[:11] for line in lines.get(table, ()))
        for sql, args in _chunks(LINES_INSERT[table], table_lines):
            await conn.execute(sql, *args)
    rows = sorted(history, key=lambda h: (h.user_id, h.product_id, h.state_table, h.occurred_us, h.event_id))
    if 0 < len(rows) <= SMALL_BATCH:
        await conn.execute(HISTORY_INSERT.values(len(rows)), *_values_args(rows))
    elif rows:
        await conn.copy_records_to_table(
            "state_history",
            records=[(h.state_table, h.user_id, h.product_id, _at(h.occurred_us), *h[4:]) for h in rows],
            columns=[c for c, _, _ in HISTORY_INSERT.columns],
        )
    if segments:
        order = sorted(segments, key=lambda s: (s.user_id, s.product_id, s.state_table, s.until_us, s.until_event_id))
        for sql, args in _chunks(SEGMENTS_INSERT, order):
            await conn.execute(sql, *args)
    if purchases:
        for sql, args in _chunks(PURCHASES_INSERT, sorted(purchases)):
            await conn.execute(sql, *args)


# --- identity links ------------------------------------------------------------

_RECORD_LINKS = f"""
INSERT INTO identity_links (anonymous_id, user_id, linked_at)
SELECT a, p, {_US_TO_TS.format("t")} FROM unnest($1::text[], $2::text[], $3::int8[]) AS m(a, p, t) ORDER BY a
ON CONFLICT DO NOTHING
"""
_WATERMARKS = "SELECT user_id, deleted_through FROM user_deletions WHERE user_id = ANY($1::text[])"
_KEYS_OUT = """
DELETE FROM event_keys WHERE user_id = ANY($1::text[])
RETURNING user_id, event_id::text, occurred_at, fingerprint
"""
_PERSONS_KEYS = """
SELECT user_id, event_id::text FROM event_keys WHERE user_id = ANY($1::text[]) AND event_id = ANY($2::uuid[])
"""
_EVENTS_OUT = """
DELETE FROM events WHERE user_id = ANY($1::text[])
RETURNING user_id, event_id::text, event_type, session_id, product_id, event_value, occurred_at,
          details, attributes, syncs_state, received_at
"""
_MOVED_COLUMNS = (*_LOG_COLUMNS, "received_at")
_PURCHASES_OUT = """
DELETE FROM purchase_history WHERE user_id = ANY($1::text[])
RETURNING user_id, purchased_at, event_id::text, product_id, session_id
"""
_HISTORY_OUT = """
DELETE FROM state_history WHERE user_id = ANY($1::text[])
RETURNING user_id, product_id, occurred_at, event_id::text, event_type, event_value
"""
_DROPPED = tuple(f"DELETE FROM {table} WHERE user_id = ANY($1::text[])" for table in (*STATE_TABLES, "state_segments"))


async def move_linked(conn: asyncpg.Connection, links: Sequence[Link]) -> tuple[int, list[MovedEvent]]:
    """_identity.move_linked on a cluster: what its one statement does, as
    statements Citus runs (a data-modifying CTE over distributed tables is
    refused), in the same transaction and under the same locks. Each table's
    rows of the anonymous ids are deleted (on their shards) and returned, and
    those that move are inserted under the person (routed to the person's
    shard); what the statement's snapshot saw of the persons' keys is read
    before any key moves. Links are rare: a dozen round trips for one."""
    anonymous = [link.anonymous_id for link in links]
    person = {link.anonymous_id: link.user_id for link in links}
    await conn.execute(_RECORD_LINKS, anonymous, [link.user_id for link in links], [link.linked_us for link in links])
    marks = dict(await conn.fetch(_WATERMARKS, sorted(set(person.values()))))

    def kept(anonymous_id: str, at: dt.datetime) -> bool:  # after the person's deletion watermark
        mark = marks.get(person[anonymous_id])
        return mark is None or at > mark

    keys_out = await conn.fetch(_KEYS_OUT, anonymous)
    had = {
        (r["user_id"], r["event_id"])
        for r in await conn.fetch(
            _PERSONS_KEYS, sorted(set(person.values())), sorted({r["event_id"] for r in keys_out})
        )
    }
    keys_in = sorted(
        (person[r["user_id"]], r["event_id"], _us(r["occurred_at"]), r["fingerprint"])
        for r in keys_out
        if kept(r["user_id"], r["occurred_at"])
    )
    new: set[tuple[str, str]] = set()
    for sql, args in _chunks(_KEYS_VALUES, keys_in):
        new.update((r["user_id"], r["event_id"]) for r in await conn.fetch(sql, *args))
    events_in = [
        (person[r[0]], *r[1:]) for r in await conn.fetch(_EVENTS_OUT, anonymous) if (person[r[0]], r[1]) in new
    ]
    if events_in:
        await conn.copy_records_to_table("events", records=events_in, columns=_MOVED_COLUMNS)
    purchases_in = sorted(
        (person[r[0]], _us(r[1]), *r[2:])
        for r in await conn.fetch(_PURCHASES_OUT, anonymous)
        if kept(r[0], r[1]) and (person[r[0]], r[2]) not in had
    )
    for sql, args in _chunks(PURCHASES_INSERT, purchases_in):
        await conn.execute(sql, *args)
    history = [
        MovedEvent(person[r[0]], r[1], _us(r[2]), r[3], r[4], r[5])
        for r in await conn.fetch(_HISTORY_OUT, anonymous)
        if kept(r[0], r[2]) and (person[r[0]], r[3]) not in had
    ]
    for sql in _DROPPED:
        await conn.execute(sql, anonymous)
    return len(events_in), history
