"""The invariants of the state's fold checkpoints (migrations/0006), checked
from the tables: every line's open tail and sealed segments agree with its
history, and its value is what they give.

- the segments of a key partition its history from the first row through the
  line's sealed position, each holding at most 2 * SEGMENT_EVENTS rows, and
  each segment's (a, b) is the composition of its rows' steps;
- the rows after the sealed position are the open tail: tail_events of them,
  composed into (tail_a, tail_b);
- base = segments(origin) and value = tail(base); the line's position is its
  last history row's (or later, where retention cut the history before 0006).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import asyncpg

from interactions_server.ingest import _sync
from interactions_server.ingest._fold import Fn

_US = "(extract(epoch FROM {}) * 1000000)::int8"
_LINES = {
    "cart_lines": "quantity",
    "wishlist_lines": _US.format("added_at"),
}
_BASE = {"cart_lines": ("base", "origin"), "wishlist_lines": (_US.format("base"), _US.format("origin"))}


async def check_fold_invariants(
    connection: asyncpg.Connection | asyncpg.Pool, users: Sequence[str] | None = None
) -> int:
    """Asserts the invariants for the lines of `users` (every line when None);
    returns how many lines were checked."""
    folds = {fold.table: fold for fold in _sync.build_registry().values() if isinstance(fold, _sync.KeyedFold)}
    limit = 2 * _sync.SEGMENT_EVENTS
    where = "" if users is None else "WHERE user_id = ANY($1::text[])"
    also = where.replace("WHERE", "AND")
    args: list[Any] = [] if users is None else [list(users)]
    checked = 0
    for table, fold in folds.items():
        family = fold.family
        base_sql, origin_sql = _BASE[table]
        lines = await connection.fetch(
            f"""SELECT user_id, product_id, {_LINES[table]} AS value, {_US.format("updated_at")} AS updated_us,
                       last_event_id::text, {_US.format("sealed_at")} AS sealed_us, sealed_event_id::text,
                       {base_sql} AS base, tail_a, tail_b, tail_events, {origin_sql} AS origin
                FROM {table} {where}""",
            *args,
        )
        rows = await connection.fetch(
            f"""SELECT user_id, product_id, {_US.format("occurred_at")} AS us, event_id::text, event_type, event_value
                FROM state_history WHERE state_table = '{table}' {also}
                ORDER BY user_id, product_id, occurred_at, event_id""",
            *args,
        )
        segments = await connection.fetch(
            f"""SELECT user_id, product_id, {_US.format("until_at")} AS us, until_event_id::text, events, a, b
                FROM state_segments WHERE state_table = '{table}' {also}
                ORDER BY user_id, product_id, until_at, until_event_id""",
            *args,
        )
        history: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for r in rows:
            history[(r["user_id"], r["product_id"])].append(r)
        sealed: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for s in segments:
            sealed[(s["user_id"], s["product_id"])].append(s)
        assert not (sealed.keys() | history.keys()) - {(line["user_id"], line["product_id"]) for line in lines}
        for line in lines:
            key = (line["user_id"], line["product_id"])
            what = f"{table} {key}"
            steps = [
                ((r["us"], r["event_id"]), fold.fn(r["event_type"], r["event_value"], r["us"])) for r in history[key]
            ]
            start = 0
            functions: list[Fn] = []
            for s in sealed[key]:
                end = (s["us"], s["until_event_id"])
                run = [f for position, f in steps[start:] if position <= end]
                assert run and steps[start + len(run) - 1][0] == end, f"{what}: a segment does not end on a row"
                assert len(run) == s["events"] <= limit, f"{what}: segment of {s['events']} events, {len(run)} rows"
                assert (s["a"], s["b"]) == family.compose(run), f"{what}: a segment's function"
                functions.append((s["a"], s["b"]))
                start += len(run)
            if sealed[key]:
                last = sealed[key][-1]
                assert (line["sealed_us"], line["sealed_event_id"]) == (last["us"], last["until_event_id"]), what
            else:
                assert line["sealed_us"] is None, f"{what}: sealed without segments"
            tail = [f for _, f in steps[start:]]
            assert line["tail_events"] == len(tail), f"{what}: tail_events {line['tail_events']}, {len(tail)} rows"
            assert (line["tail_a"], line["tail_b"]) == family.compose(tail), f"{what}: the tail's function"
            base = family.apply(family.compose(functions), line["origin"])
            if table == "cart_lines":
                assert (line["base"] or 0) == (base or 0), f"{what}: base {line['base']} != {base}"
            else:
                assert line["base"] == base, f"{what}: base {line['base']} != {base}"
            value = family.apply((line["tail_a"], line["tail_b"]), line["base"])
            assert line["value"] == value, f"{what}: value {line['value']} != tail(base) {value}"
            if steps:
                # Later only for a line whose older events retention removed before 0006.
                assert (line["updated_us"], line["last_event_id"]) >= steps[-1][0], f"{what}: position"
            checked += 1
    return checked
