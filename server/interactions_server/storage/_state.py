"""The SQL of the state tables' sync: the lines (cart_lines, wishlist_lines),
their history and sealed segments (migrations/0006_fold_checkpoints.sql), and
purchase_history. The fold itself is ingest/_sync.py's; it never reads the
event log, so what retention or a purge removes from the log cannot change
the state.

A syncing batch reads the lines of its keys (fetch_state_lines), reads the
history and segments around its late events, only if it has any
(fetch_fold_rows), and writes the lines, the new history rows, the new or
recomputed segments and the purchases in one statement (write_state).
Positions travel as (epoch microseconds, event id text), the order of
(occurred_at, event_id) in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg

from interactions_server.storage._events import _TS_TO_US, _US_TO_TS

STATE_TABLES = ("cart_lines", "wishlist_lines")


class StateLine(NamedTuple):
    """A line of cart_lines or wishlist_lines, in the column order of write_state.
    Values (value, base, origin) are the quantity for the cart, added_at in
    epoch us (or None) for the wishlist."""

    user_id: str
    product_id: str
    value: int | None
    updated_us: int  # the position of the last event folded in
    last_event_id: str
    sealed_us: int | None  # the end of the key's last sealed segment (None: no segment)
    sealed_event_id: str | None
    base: int | None  # the state at the end of the last segment (origin when none)
    tail_a: int | None  # the function of the history rows after it (the open tail)
    tail_b: int | None
    tail_events: int  # how many rows the open tail has
    origin: int | None = None  # the state before the first history row (read, never written here)


class HistoryRow(NamedTuple):
    """A row of state_history: an accepted event that folds into `state_table`."""

    state_table: str
    user_id: str
    product_id: str
    occurred_us: int
    event_id: str
    event_type: str
    event_value: int


class Segment(NamedTuple):
    """A row of state_segments: the history rows of a key after the previous
    segment's end through (until_us, until_event_id), composed into (a, b)."""

    state_table: str
    user_id: str
    product_id: str
    until_us: int
    until_event_id: str
    events: int
    a: int | None
    b: int | None


class PurchaseRow(NamedTuple):
    """A row of purchase_history, in the column order of write_state."""

    user_id: str
    purchased_us: int
    event_id: str
    product_id: str
    session_id: str | None


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


# Per state table: its value column, and how a value of it (the line's value,
# base or origin) is read into Python and written back from epoch us.
_CART = ("quantity", "{}", "{}")
_WISHLIST = ("added_at", _TS_TO_US, _US_TO_TS)
_STATE_VALUE: dict[str, tuple[str, str, str]] = {"cart_lines": _CART, "wishlist_lines": _WISHLIST}
assert tuple(_STATE_VALUE) == STATE_TABLES


# The current lines of given keys in every state table, tagged with the table's index.
_FETCH_STATE_LINES = "\nUNION ALL\n".join(
    f"""SELECT {n} AS t, l.user_id, l.product_id, ({out.format("l." + value)})::int8,
       {_TS_TO_US.format("l.updated_at")}, l.last_event_id::text,
       {_TS_TO_US.format("l.sealed_at")}, l.sealed_event_id::text, ({out.format("l.base")})::int8,
       l.tail_a, l.tail_b, l.tail_events, ({out.format("l.origin")})::int8
FROM unnest(${2 * n + 1}::text[], ${2 * n + 2}::text[]) AS k(u, p)
JOIN {table} AS l ON l.user_id = k.u AND l.product_id = k.p"""
    for n, (table, (value, out, _)) in enumerate(_STATE_VALUE.items())
)


async def fetch_state_lines(
    conn: asyncpg.Connection, keys: Mapping[str, Sequence[tuple[str, str]]]
) -> dict[str, dict[tuple[str, str], StateLine]]:
    """The current lines of the given keys of each state table (by table name), in one statement."""
    if not any(keys.values()):
        return {}
    params: list[list[str]] = []
    for table in STATE_TABLES:
        table_keys = keys.get(table, ())
        params += [[k[0] for k in table_keys], [k[1] for k in table_keys]]
    lines: dict[str, dict[tuple[str, str], StateLine]] = {table: {} for table in STATE_TABLES}
    for t, *line in await conn.fetch(_FETCH_STATE_LINES, *params):
        state_line = StateLine(*line)
        lines[STATE_TABLES[t]][(state_line.user_id, state_line.product_id)] = state_line
    return lines


_SAME_KEY = "{a}.user_id = {b}.u AND {a}.product_id = {b}.p AND {a}.state_table = {b}.t"
_NIL = "'00000000-0000-0000-0000-000000000000'::uuid"

# For late events: the history rows of the sealed segment each event falls in
# (after the segment before it, through its own end) and the segments of
# their keys; the history rows of the open tails asked for. Every range is a
# range of the primary key's index, so a read is bounded by the rows it
# returns, whatever the key's history. Rows come back tagged with the
# caller's key number (k), not the key: fewer columns to decode per row.
_FETCH_FOLD_ROWS = f"""
WITH late AS (
    SELECT k, t, u, p, {_US_TO_TS.format("o")} AS o, e::uuid AS e
    FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[]) AS r(k, t, u, p, o, e)
), ranges AS (
    SELECT DISTINCT l.k, l.t, l.u, l.p,
           coalesce(before.until_at, '-infinity') AS after_at, coalesce(before.until_event_id, {_NIL}) AS after_id,
           around.until_at AS through_at, around.until_event_id AS through_id
    FROM late AS l
    CROSS JOIN LATERAL (
        SELECT s.until_at, s.until_event_id FROM state_segments AS s
        WHERE {_SAME_KEY.format(a="s", b="l")} AND (s.until_at, s.until_event_id) >= (l.o, l.e)
        ORDER BY s.until_at, s.until_event_id LIMIT 1
    ) AS around
    LEFT JOIN LATERAL (
        SELECT s.until_at, s.until_event_id FROM state_segments AS s
        WHERE {_SAME_KEY.format(a="s", b="l")} AND (s.until_at, s.until_event_id) < (l.o, l.e)
        ORDER BY s.until_at DESC, s.until_event_id DESC LIMIT 1
    ) AS before ON true
), tails AS (
    SELECT k, t, u, p, coalesce({_US_TO_TS.format("o")}, '-infinity') AS after_at,
           coalesce(e::uuid, {_NIL}) AS after_id
    FROM unnest($7::int4[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::text[]) AS r(k, t, u, p, o, e)
)
SELECT false AS segment, r.k, {_TS_TO_US.format("h.occurred_at")}, h.event_id::text, h.event_type, h.event_value,
       NULL::int8, NULL::int8
FROM ranges AS r JOIN state_history AS h ON {_SAME_KEY.format(a="h", b="r")}
 AND (h.occurred_at, h.event_id) > (r.after_at, r.after_id)
 AND (h.occurred_at, h.event_id) <= (r.through_at, r.through_id)
UNION ALL
SELECT false, r.k, {_TS_TO_US.format("h.occurred_at")}, h.event_id::text, h.event_type, h.event_value, NULL, NULL
FROM tails AS r JOIN state_history AS h ON {_SAME_KEY.format(a="h", b="r")}
 AND (h.occurred_at, h.event_id) > (r.after_at, r.after_id)
UNION ALL
SELECT true, k.k, {_TS_TO_US.format("s.until_at")}, s.until_event_id::text, NULL, s.events, s.a, s.b
FROM (SELECT DISTINCT k, t, u, p FROM late) AS k JOIN state_segments AS s ON {_SAME_KEY.format(a="s", b="k")}
"""

# (user_id, product_id, position us, event id) of a late event, in a state table
LatePosition = tuple[str, str, int, str]
# (user_id, product_id, sealed_us, sealed_event_id): a key's open tail, after that position
TailStart = tuple[str, str, int | None, str | None]
# (us, event_id, event_type, event_value): a history row as the fold reads it
StoredRow = tuple[int, str, str, int]


class FoldRows(NamedTuple):
    """What fetch_fold_rows read, by (state_table, user_id, product_id)."""

    rows: dict[tuple[str, str, str], list[StoredRow]]
    segments: dict[tuple[str, str, str], list[Segment]]


async def fetch_fold_rows(
    conn: asyncpg.Connection,
    late: Mapping[str, Collection[LatePosition]],
    tails: Mapping[str, Collection[TailStart]],
) -> FoldRows:
    """By state table: for each `late` position (at or before its key's last
    sealed segment), the history rows of the segment it falls in and every
    segment of its key; for each of `tails`, the history rows after its start.
    Rows and segments in no order."""
    keys: dict[tuple[str, str, str], int] = {}
    late_columns: list[list[Any]] = [[] for _ in range(6)]
    tail_columns: list[list[Any]] = [[] for _ in range(6)]
    for columns, by_table in ((late_columns, late), (tail_columns, tails)):
        for table, entries in by_table.items():
            for user_id, product_id, us, event_id in sorted(entries, key=_entry_order):
                k = keys.setdefault((table, user_id, product_id), len(keys))
                for column, value in zip(columns, (k, table, user_id, product_id, us, event_id), strict=True):
                    column.append(value)
    found = FoldRows({}, {})
    if not keys:
        return found
    names = list(keys)
    for segment, k, us, event_id, event_type, value, a, b in await conn.fetch(
        _FETCH_FOLD_ROWS, *late_columns, *tail_columns
    ):
        key = names[k]
        if segment:
            found.segments.setdefault(key, []).append(Segment(key[0], key[1], key[2], us, event_id, value, a, b))
        else:
            found.rows.setdefault(key, []).append((us, event_id, event_type, value))
    return found


def _entry_order(entry: LatePosition | TailStart) -> tuple[str, str]:
    return entry[0], entry[1]


# Writes the new state of each line of every state table, the new history
# rows and segments, and appends the purchases: one statement, each table's
# rows in key order (no deadlocks).
def _write_state_sql() -> str:
    n = 0

    def params(*types: str) -> str:
        nonlocal n
        first, n = n, n + len(types)
        return ", ".join(f"${first + i + 1}::{t}[]" for i, t in enumerate(types))

    line_types = ("text", "text", "int8", "int8", "text", "int8", "text", "int8", "int8", "int8", "int4")
    parts = [
        f"""{table}_written AS (
    INSERT INTO {table} AS l (user_id, product_id, {value}, updated_at, last_event_id,
                              sealed_at, sealed_event_id, base, tail_a, tail_b, tail_events)
    SELECT u, p, {value_in.format("v")}, {_US_TO_TS.format("t")}, e::uuid,
           {_US_TO_TS.format("so")}, si::uuid, {value_in.format("bv")}, ta, tb, tn
    FROM unnest({params(*line_types)}) AS r(u, p, v, t, e, so, si, bv, ta, tb, tn)
    ORDER BY u, p
    ON CONFLICT (user_id, product_id) DO UPDATE
    SET {value} = excluded.{value}, updated_at = excluded.updated_at, last_event_id = excluded.last_event_id,
        sealed_at = excluded.sealed_at, sealed_event_id = excluded.sealed_event_id, base = excluded.base,
        tail_a = excluded.tail_a, tail_b = excluded.tail_b, tail_events = excluded.tail_events
)"""
        for table, (value, _, value_in) in _STATE_VALUE.items()
    ]
    parts.append(f"""history_written AS (
    INSERT INTO state_history (user_id, product_id, state_table, occurred_at, event_id, event_type, event_value)
    SELECT u, p, s, {_US_TO_TS.format("o")}, e::uuid, y, v
    FROM unnest({params("text", "text", "text", "int8", "text", "text", "int8")}) AS r(s, u, p, o, e, y, v)
    ORDER BY u, p, s, o, e
)""")
    parts.append(f"""segments_written AS (
    INSERT INTO state_segments AS g (user_id, product_id, state_table, until_at, until_event_id, events, a, b)
    SELECT u, p, s, {_US_TO_TS.format("o")}, e::uuid, n, a, b
    FROM unnest({params("text", "text", "text", "int8", "text", "int4", "int8", "int8")}) AS r(s, u, p, o, e, n, a, b)
    ORDER BY u, p, s, o, e
    ON CONFLICT (user_id, product_id, state_table, until_at, until_event_id) DO UPDATE
    SET events = excluded.events, a = excluded.a, b = excluded.b
)""")
    parts.append(f"""purchases_written AS (
    INSERT INTO purchase_history (user_id, purchased_at, event_id, product_id, session_id)
    SELECT u, {_US_TO_TS.format("t")}, e::uuid, p, s
    FROM unnest({params("text", "int8", "text", "text", "text")}) AS r(u, t, e, p, s)
    ORDER BY u, t, e
    ON CONFLICT DO NOTHING
)""")
    return "WITH " + ",\n".join(parts) + "\nSELECT"


_WRITE_STATE = _write_state_sql()


async def write_state(
    conn: asyncpg.Connection,
    lines: Mapping[str, Sequence[StateLine]],
    history: Sequence[HistoryRow],
    segments: Sequence[Segment],
    purchases: Sequence[PurchaseRow],
) -> None:
    """Writes the new state lines of each state table (by table name), the new
    history rows, the new or recomputed segments and the new purchases, in one
    statement. A line's origin is never written (only migrations set it)."""
    if not purchases and not history and not segments and not any(lines.values()):
        return
    params: list[list[Any]] = []
    for table in STATE_TABLES:
        params += _columns([line[:11] for line in sorted(lines.get(table, ()))], 11)
    params += _columns(history, 7)
    params += _columns(segments, 8)
    await conn.execute(_WRITE_STATE, *params, *_columns(purchases, 5))


async def lock_state_keys(conn: asyncpg.Connection, keys: Collection[tuple[str, str]]) -> None:
    """Takes the state-sync locks of the (user_id, product_id) keys, until the
    transaction ends (migrations/0005; the write path takes them in its insert
    statement). Whoever folds events into keys outside the write path must
    hold them."""
    await conn.execute("SELECT lock_sync_keys($1::text[], $2::text[])", [k[0] for k in keys], [k[1] for k in keys])
