"""Per-type state sync, dispatched through a registry keyed by the sync
target the schema declares for each type (EventRule.sync).

State is order-independent: each (user, product) line always equals the fold
of every event ever accepted for that key, in (occurred_at, event_id) order.
The fold never reads the event log (retention and purges cut it): the state
keeps its own history of the events that fold into a line (state_history),
and checkpoints of the fold (migrations/0006_fold_checkpoints.sql):

- every fold step is a function of a closed family (_fold.py), so a run of
  events composes into one (a, b) pair;
- a key's history is cut into sealed segments of SEGMENT_EVENTS events, each
  stored as its composed function (state_segments); the line keeps the end
  of its last segment, the state there (base), and the function and count of
  the events since (its open tail).

New events are folded onto the stored line when they are all newer than its
last event (the common, in-order case): the tail's function is extended and,
once the tail holds SEGMENT_EVENTS events, sealed into a segment in the same
write, so no extra read. A late event costs a bounded amount, whatever the
key's history: one more statement reads the rows of the open tail (fewer
than SEGMENT_EVENTS plus a batch) when it falls there, or, when it falls in
a sealed segment, the rows of that segment (at most 2 * SEGMENT_EVENTS: a
segment is split when it grows past that) and the functions of the key's
segments (history / SEGMENT_EVENTS rows), from which the base is recomposed.

Handlers run inside the batch's transaction, after the log insert, with the
keys' locks held, and see only events that were new to the log, so a resend
is never applied twice. One more case: retention also forgets dedup keys, so
the resend of an event older than the retention cutoff is new to the log;
its position is then already in the key's history (an event is always late
to its own key), and the fold skips it. sync_new runs everything with one
read and one write of the state tables (plus one read when a key is late).

Choices made against the first proposal, and why:
- the line keeps its open tail's function, not only its count, so sealing a
  segment needs no read (the segment is that function) and rides in the
  write statement;
- a recomputed segment keeps its end position (a split's last run ends
  there), so every segment write is an upsert: no delete in the statement;
- history rows carry their state table in the key: a late cart event never
  scans the same product's wishlist history;
- the migration seals existing data itself rather than leaving it to the
  first late event: that one event would pay the whole history inside its
  caller's deadline, and a retry would pay it again;
- SEGMENT_EVENTS 512, not 1024: measured cheaper at 200k events (below).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from interactions_client.rules import RULES, SyncTarget, TypeRule, ValueRule
from interactions_server import storage
from interactions_server.ingest._fold import (
    CART,
    WISHLIST,
    Family,
    Fn,
    Step,
    add_or_remove,
    add_quantity,
    remove_quantity,
    set_quantity,
)

# Events per sealed segment (the unit of a late event's cost): a late event
# reads the rows of its segment (N to 2N) plus one segment row per N events of
# the key. Near sqrt(history) is cheapest; 512 against 1024 took the CPU of a
# late event on a 200k-event key from 12.0-13.4 to 9.7-11.3 ms (server and
# PostgreSQL, docs/performance.md, (l)). The migration 0006 sealed existing
# data in segments of 1024 (2N: split at the first late event into them).
# Read at call time, so that tests can make it small.
SEGMENT_EVENTS = 512


@dataclass(frozen=True, slots=True)
class SyncEvent:
    """The part of a newly logged event that state sync reads."""

    user_id: str
    product_id: str
    event_id: str
    occurred_us: int
    value: int
    session_id: str | None
    rule: TypeRule


Position = tuple[int, str]  # (occurred_at us, event_id): the fold's order
Key = tuple[str, str]  # (user_id, product_id)


# How each value rule acts on a target's state. Which types sync where, and
# with which value rule, comes from the schema; these are the semantics.
CART_STEPS: Mapping[int, Step] = {
    ValueRule.VALUE_RULE_QUANTITY: add_quantity,
    ValueRule.VALUE_RULE_QUANTITY_OR_ALL: remove_quantity,
    ValueRule.VALUE_RULE_NEW_QUANTITY: set_quantity,
}
WISHLIST_STEPS: Mapping[int, Step] = {ValueRule.VALUE_RULE_ADD_OR_REMOVE: add_or_remove}


# A history row as the fold uses it: its position and its step's function.
Item = tuple[Position, Fn]


@dataclass(slots=True)
class _Fold:
    """What a batch writes for one state table."""

    lines: list[storage.StateLine] = field(default_factory=list)
    history: list[storage.HistoryRow] = field(default_factory=list)
    segments: list[storage.Segment] = field(default_factory=list)


@dataclass(slots=True)
class _Late:
    """A key with events at or before its line's last position."""

    key: Key
    line: storage.StateLine
    events: list[Item]  # the key's new events, in fold order
    rows: dict[Position, storage.HistoryRow]  # their history rows
    in_segments: list[Item]  # those at or before the end of its last segment
    tail_read: bool  # some fall in the open tail before the line's last event: read the tail


def _position(item: Item) -> Position:
    return item[0]


class KeyedFold:
    """State per (user, product) in `table`, folded from the events of the types syncing to it."""

    needs_key_lock = True

    def __init__(self, table: str, target: int, family: Family, steps_by_value_rule: Mapping[int, Step]) -> None:
        self.table = table
        self.family = family
        self.steps: dict[str, Step] = {}
        for rule in RULES.values():
            if rule.sync != target:
                continue
            if rule.value not in steps_by_value_rule:
                raise RuntimeError(f"{rule.name} syncs to {table} with a value rule it cannot apply")
            self.steps[rule.name] = steps_by_value_rule[rule.value]

    def fn(self, event_type: str, value: int, occurred_us: int) -> Fn:
        return self.steps[event_type](value, occurred_us)

    def plan(self, events: Sequence[SyncEvent], current: Mapping[Key, storage.StateLine], out: _Fold) -> list[_Late]:
        """Folds the keys of `events` whose new events all come after their
        line's last one onto their `current` lines (into `out`); returns the
        late keys, which need the rows fetch_fold_rows reads."""
        by_key: dict[Key, list[SyncEvent]] = defaultdict(list)
        for e in events:
            by_key[(e.user_id, e.product_id)].append(e)
        steps, family, table = self.steps, self.family, self.table
        late: list[_Late] = []
        for key in sorted(by_key):
            new = sorted(by_key[key], key=lambda e: (e.occurred_us, e.event_id))
            items: list[Item] = [((e.occurred_us, e.event_id), steps[e.rule.name](e.value, e.occurred_us)) for e in new]
            rows = [storage.HistoryRow(table, *key, e.occurred_us, e.event_id, e.rule.name, e.value) for e in new]
            line = current.get(key)
            if line is None:
                line = storage.StateLine(*key, None, 0, "", None, None, None, *family.identity, 0)
            elif items[0][0] <= (line.updated_us, line.last_event_id):
                late.append(self._late(key, line, items, rows))
                continue
            # In order: onto the stored value, as before; the tail's function grows.
            value = line.value
            for _, f in items:
                value = family.apply(f, value)
            out.history += rows
            out.lines.append(self._extend(line, line.base, items, out, value=value))
        return late

    @staticmethod
    def _late(key: Key, line: storage.StateLine, new: list[Item], rows: list[storage.HistoryRow]) -> _Late:
        """What a late key needs read: the segments its events fall in, and
        its open tail when one falls there before the line's last event."""
        by_position = {(r.occurred_us, r.event_id): r for r in rows}
        last = (line.updated_us, line.last_event_id)
        if line.sealed_us is None:
            return _Late(key, line, new, by_position, [], True)
        sealed_end = (line.sealed_us, line.sealed_event_id or "")
        in_segments = [i for i in new if i[0] <= sealed_end]
        tail_read = any(sealed_end < i[0] <= last for i in new)
        return _Late(key, line, new, by_position, in_segments, tail_read)

    def _extend(
        self,
        line: storage.StateLine,
        base: int | None,
        items: Sequence[Item],
        out: _Fold,
        *,
        value: int | None = None,
        late: bool = False,
    ) -> storage.StateLine:
        """`line` with `items` (all after the end of its segments, in fold
        order) appended to its open tail, which is sealed into a segment every
        SEGMENT_EVENTS rows; `base` is the state at the end of its segments.
        Its value is `value`, or when `late` the tail applied to the base."""
        limit = SEGMENT_EVENTS
        family = self.family
        then = family.then
        sealed_us, sealed_id = line.sealed_us, line.sealed_event_id
        tail: Fn = (line.tail_a, line.tail_b)
        count = line.tail_events
        for position, f in items:
            tail = then(tail, f)
            count += 1
            if count >= limit:
                sealed_us, sealed_id = position
                out.segments.append(storage.Segment(self.table, line.user_id, line.product_id, *position, count, *tail))
                base = family.apply(tail, base)
                tail, count = family.identity, 0
        if late:
            value = family.apply(tail, base)
        updated_us, last_event_id = (
            max((line.updated_us, line.last_event_id), items[-1][0])
            if items
            else (
                line.updated_us,
                line.last_event_id,
            )
        )
        return storage.StateLine(
            line.user_id,
            line.product_id,
            value,
            updated_us,
            last_event_id,
            sealed_us,
            sealed_id,
            base,
            *tail,
            count,
            line.origin,
        )

    def refold(self, late: Sequence[_Late], found: storage.FoldRows, out: _Fold) -> None:
        """The lines of the late keys, from the rows fetch_fold_rows read for them."""
        family, steps = self.family, self.steps
        for k in late:
            line = k.line
            full_key = (self.table, *k.key)
            stored: list[Item] = [
                ((us, event_id), steps[event_type](value, us))
                for us, event_id, event_type, value in found.rows.get(full_key, ())
            ]
            known = {position for position, _ in stored}
            # Already in the history: the resend of an event whose dedup key retention forgot.
            new = [i for i in k.events if i[0] not in known]
            if not new:
                continue
            out.history += [k.rows[position] for position, _ in new]
            sealed_end = None if line.sealed_us is None else (line.sealed_us, line.sealed_event_id or "")
            in_segments = [i for i in new if sealed_end is not None and i[0] <= sealed_end]
            in_tail = new[len(in_segments) :]
            base = line.base
            if in_segments:  # the base is recomposed from the key's segments
                key_segments = sorted(found.segments.get(full_key, ()), key=lambda s: (s.until_us, s.until_event_id))
                base = self._resegment(line, key_segments, stored, in_segments, out)
            if k.tail_read:
                # The open tail refolded from the base: its stored rows and the new ones.
                stored_tail = [i for i in stored if sealed_end is None or i[0] > sealed_end]
                start = line._replace(tail_a=family.identity[0], tail_b=family.identity[1], tail_events=0)
                merged = sorted([*stored_tail, *in_tail], key=_position)
                folded = self._extend(start, base, merged, out, late=True)
            else:  # every new event of the tail comes after the line's last one
                folded = self._extend(line, base, in_tail, out, late=True)
            last = max((line.updated_us, line.last_event_id), new[-1][0])
            out.lines.append(folded._replace(updated_us=last[0], last_event_id=last[1]))

    def _resegment(
        self,
        line: storage.StateLine,
        segments: Sequence[storage.Segment],
        stored: Sequence[Item],
        new: Sequence[Item],
        out: _Fold,
    ) -> int | None:
        """Recomputes the segments that the `new` events fall in from their
        `stored` rows and the new ones (split in runs of SEGMENT_EVENTS past
        twice that: the last run keeps the segment's end, so every write is
        an upsert); returns the state at the end of the key's segments."""
        limit = SEGMENT_EVENTS
        family = self.family
        ends = [(s.until_us, s.until_event_id) for s in segments]
        members: dict[int, list[Item]] = defaultdict(list)
        for item in new:
            index = bisect.bisect_left(ends, item[0])
            if index == len(ends):
                raise RuntimeError(f"a late event after the segments of a {self.table} key")
            members[index].append(item)
        for item in stored:
            index = bisect.bisect_left(ends, item[0])
            if index in members:
                members[index].append(item)
        functions: list[list[Fn]] = [[(s.a, s.b)] for s in segments]
        for index, items in members.items():
            items.sort(key=_position)
            size = len(items) if len(items) <= 2 * limit else limit
            functions[index] = []
            for first in range(0, len(items), size):
                run = items[first : first + size]
                fn = family.compose(f for _, f in run)
                functions[index].append(fn)
                out.segments.append(
                    storage.Segment(self.table, line.user_id, line.product_id, *run[-1][0], len(run), *fn)
                )
        return family.apply(family.compose(fn for fns in functions for fn in fns), line.origin)


class AppendPurchases:
    """purchase_history is append-only, so arrival order cannot matter."""

    needs_key_lock = False

    @staticmethod
    def rows(events: Sequence[SyncEvent]) -> list[storage.PurchaseRow]:
        return [storage.PurchaseRow(e.user_id, e.occurred_us, e.event_id, e.product_id, e.session_id) for e in events]


SyncHandler = KeyedFold | AppendPurchases


def build_registry() -> dict[int, SyncHandler]:
    """Handlers by SyncTarget; fails at start-up if the schema declares a
    target (or a value rule on it) that no handler implements."""
    registry: dict[int, SyncHandler] = {
        SyncTarget.SYNC_TARGET_USER_CART: KeyedFold("cart_lines", SyncTarget.SYNC_TARGET_USER_CART, CART, CART_STEPS),
        SyncTarget.SYNC_TARGET_USER_WISHLIST: KeyedFold(
            "wishlist_lines", SyncTarget.SYNC_TARGET_USER_WISHLIST, WISHLIST, WISHLIST_STEPS
        ),
        SyncTarget.SYNC_TARGET_PURCHASE_HISTORY: AppendPurchases(),
    }
    declared = {r.sync for r in RULES.values()} - {SyncTarget.SYNC_TARGET_NONE}
    missing = declared - registry.keys()
    if missing:
        raise RuntimeError(f"no sync handler for targets {sorted(missing)}")
    return registry


async def sync_new(
    conn: asyncpg.Connection, registry: Mapping[int, SyncHandler], by_target: Mapping[int, Sequence[SyncEvent]]
) -> None:
    """Applies a batch's newly logged events to every state table, inside its
    transaction (the keys' locks held): one statement reads the current lines
    of every keyed table, one writes every table's new state, history and
    segments (plus, when some keys are late, one read of their history and
    segments for every table together)."""
    folds: list[tuple[KeyedFold, Sequence[SyncEvent]]] = []
    purchases: list[storage.PurchaseRow] = []
    for target, events in by_target.items():
        handler = registry[target]
        if isinstance(handler, KeyedFold):
            folds.append((handler, events))
        else:
            purchases += handler.rows(events)
    current = await storage.fetch_state_lines(
        conn, {fold.table: sorted({(e.user_id, e.product_id) for e in events}) for fold, events in folds}
    )
    outs: dict[str, _Fold] = {}
    late: list[tuple[KeyedFold, list[_Late]]] = []
    for fold, events in folds:
        out = outs[fold.table] = _Fold()
        if fold_late := fold.plan(events, current.get(fold.table, {}), out):
            late.append((fold, fold_late))
    if late:
        positions: dict[str, list[storage.LatePosition]] = defaultdict(list)
        tails: dict[str, list[storage.TailStart]] = defaultdict(list)
        for fold, keys in late:
            for k in keys:
                positions[fold.table] += [(*k.key, *i[0]) for i in k.in_segments]
                if k.tail_read:
                    tails[fold.table].append((*k.key, k.line.sealed_us, k.line.sealed_event_id))
        found = await storage.fetch_fold_rows(conn, positions, tails)
        for fold, keys in late:
            fold.refold(keys, found, outs[fold.table])
    await storage.write_state(
        conn,
        {table: out.lines for table, out in outs.items()},
        [row for out in outs.values() for row in out.history],
        [segment for out in outs.values() for segment in out.segments],
        purchases,
    )


async def fold_events(conn: asyncpg.Connection, events: Sequence[SyncEvent]) -> None:
    """Folds `events` (of any syncing types, in any order, late or not) into
    the state, in the caller's transaction, for whoever adds accepted events
    to the state outside the write path (an identity link moving a user's
    events onto another, say). Takes their keys' locks first, in one
    statement: call it holding no other state-sync lock. An event already in
    its key's history is skipped (its position is then never after its
    line's last event, so the fold reads the rows around it), so folding the
    same events twice changes nothing; purchases are appended once too."""
    registry = build_registry()
    by_target: dict[int, list[SyncEvent]] = defaultdict(list)
    for e in events:
        by_target[e.rule.sync].append(e)
    keyed = {
        (e.user_id, e.product_id) for target, es in by_target.items() for e in es if registry[target].needs_key_lock
    }
    if keyed:
        await storage.lock_state_keys(conn, sorted(keyed))
    if by_target:
        await sync_new(conn, registry, by_target)
