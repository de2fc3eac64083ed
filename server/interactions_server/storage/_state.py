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

from interactions_server.storage._citus import on_citus
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


def lines_sql(n: int, table: str, first: int, where: str = "") -> str:
    """The current lines of given keys (parameters ${first}, ${first + 1}:
    users, products) of one state table, tagged with its index `n`."""
    value, out, _ = _STATE_VALUE[table]
    return f"""SELECT {n} AS t, l.user_id, l.product_id, ({out.format("l." + value)})::int8,
       {_TS_TO_US.format("l.updated_at")}, l.last_event_id::text,
       {_TS_TO_US.format("l.sealed_at")}, l.sealed_event_id::text, ({out.format("l.base")})::int8,
       l.tail_a, l.tail_b, l.tail_events, ({out.format("l.origin")})::int8
FROM unnest(${first}::text[], ${first + 1}::text[]) AS k(u, p)
JOIN {table} AS l ON l.user_id = k.u AND l.product_id = k.p{where}"""


# The current lines of given keys in every state table, tagged with the table's index.
_FETCH_STATE_LINES = "\nUNION ALL\n".join(lines_sql(n, table, 2 * n + 1) for n, table in enumerate(STATE_TABLES))


async def fetch_state_lines(
    conn: asyncpg.Connection, keys: Mapping[str, Sequence[tuple[str, str]]]
) -> dict[str, dict[tuple[str, str], StateLine]]:
    """The current lines of the given keys of each state table (by table name), in one statement."""
    if not any(keys.values()):
        return {}
    if on_citus(conn):
        from interactions_server.storage import _citus_write  # imports this module

        return await _citus_write.fetch_state_lines(conn, keys)
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
    if on_citus(conn):
        from interactions_server.storage import _citus_write  # imports this module

        return await _citus_write.fetch_fold_rows(conn, late, tails)
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


class RowsInsert(NamedTuple):
    """An INSERT of rows given as tuples (StateLine[:11], HistoryRow, Segment,
    PurchaseRow): the one description from which both the plain statement (a
    CTE of write_state, rows from arrays) and the Citus one (multi-row VALUES,
    _citus_write.py) are made, so that both write exactly the same."""

    target: str  # the table, with its alias for ON CONFLICT
    columns: tuple[tuple[str, str, str], ...]  # per tuple field: (column, parameter type, expression of "{}")
    order: tuple[str, ...]  # the columns of the rows' key order (no deadlocks)
    conflict: str

    @property
    def column_list(self) -> str:
        return ", ".join(c for c, _, _ in self.columns)

    def from_arrays(self, first: int) -> str:
        """INSERT ... SELECT FROM unnest of one array per column, parameters from ${first + 1}."""
        arrays = ", ".join(f"${first + i + 1}::{t}[]" for i, (_, t, _) in enumerate(self.columns))
        names = ", ".join(c for c, _, _ in self.columns)
        exprs = ", ".join(e.format(f"r.{c}") for c, _, e in self.columns)
        order = ", ".join(f"r.{c}" for c in self.order)
        return f"""INSERT INTO {self.target} ({self.column_list})
    SELECT {exprs}
    FROM unnest({arrays}) AS r({names})
    ORDER BY {order}
    {self.conflict}"""

    def values(self, rows: int) -> str:
        """INSERT ... VALUES of `rows` tuples, parameters row after row."""
        width = len(self.columns)
        tuples = ", ".join(
            "(" + ", ".join(e.format(f"${n * width + i + 1}::{t}") for i, (_, t, e) in enumerate(self.columns)) + ")"
            for n in range(rows)
        )
        return f"INSERT INTO {self.target} ({self.column_list}) VALUES {tuples} {self.conflict}"


_LINE_SET = ", ".join(
    f"{c} = excluded.{c}"
    for c in ("updated_at", "last_event_id", "sealed_at", "sealed_event_id", "base", "tail_a", "tail_b", "tail_events")
)
# Per state table: the lines as StateLine[:11] (a line's origin is never written: only migrations set it).
LINES_INSERT: dict[str, RowsInsert] = {
    table: RowsInsert(
        f"{table} AS l",
        (
            ("user_id", "text", "{}"),
            ("product_id", "text", "{}"),
            (value, "int8", value_in),
            ("updated_at", "int8", _US_TO_TS),
            ("last_event_id", "text", "{}::uuid"),
            ("sealed_at", "int8", _US_TO_TS),
            ("sealed_event_id", "text", "{}::uuid"),
            ("base", "int8", value_in),
            ("tail_a", "int8", "{}"),
            ("tail_b", "int8", "{}"),
            ("tail_events", "int4", "{}"),
        ),
        ("user_id", "product_id"),
        f"ON CONFLICT (user_id, product_id) DO UPDATE SET {value} = excluded.{value}, {_LINE_SET}",
    )
    for table, (value, _, value_in) in _STATE_VALUE.items()
}
_KEY_COLUMNS = (("state_table", "text", "{}"), ("user_id", "text", "{}"), ("product_id", "text", "{}"))
HISTORY_INSERT = RowsInsert(  # rows as HistoryRow
    "state_history",
    (
        *_KEY_COLUMNS,
        ("occurred_at", "int8", _US_TO_TS),
        ("event_id", "text", "{}::uuid"),
        ("event_type", "text", "{}"),
        ("event_value", "int8", "{}"),
    ),
    ("user_id", "product_id", "state_table", "occurred_at", "event_id"),
    "",  # never a row already stored (storage/_deletion.py says why)
)
SEGMENTS_INSERT = RowsInsert(  # rows as Segment
    "state_segments AS g",
    (
        *_KEY_COLUMNS,
        ("until_at", "int8", _US_TO_TS),
        ("until_event_id", "text", "{}::uuid"),
        ("events", "int4", "{}"),
        ("a", "int8", "{}"),
        ("b", "int8", "{}"),
    ),
    ("user_id", "product_id", "state_table", "until_at", "until_event_id"),
    "ON CONFLICT (user_id, product_id, state_table, until_at, until_event_id) DO UPDATE "
    "SET events = excluded.events, a = excluded.a, b = excluded.b",
)
PURCHASES_INSERT = RowsInsert(  # rows as PurchaseRow
    "purchase_history",
    (
        ("user_id", "text", "{}"),
        ("purchased_at", "int8", _US_TO_TS),
        ("event_id", "text", "{}::uuid"),
        ("product_id", "text", "{}"),
        ("session_id", "text", "{}"),
    ),
    ("user_id", "purchased_at", "event_id"),
    "ON CONFLICT DO NOTHING",
)


# Writes the new state of each line of every state table, the new history
# rows and segments, and appends the purchases: one statement, each table's
# rows in key order (no deadlocks).
def _write_state_sql() -> str:
    inserts = [
        *((f"{table}_written", LINES_INSERT[table]) for table in STATE_TABLES),
        ("history_written", HISTORY_INSERT),
        ("segments_written", SEGMENTS_INSERT),
        ("purchases_written", PURCHASES_INSERT),
    ]
    parts: list[str] = []
    first = 0
    for name, insert in inserts:
        parts.append(f"{name} AS (\n    {insert.from_arrays(first)}\n)")
        first += len(insert.columns)
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
    if on_citus(conn):
        from interactions_server.storage import _citus_write  # imports this module

        await _citus_write.write_state(conn, lines, history, segments, purchases)
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
