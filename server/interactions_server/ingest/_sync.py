"""Per-type state sync, dispatched through a registry keyed by the sync
target the schema declares for each type (EventRule.sync).

State is order-independent: each (user, product) line always equals the fold
of that key's events in (occurred_at, event_id) order. New events are folded
onto the stored line when they are all newer than the last event folded into
it (the common, in-order case); otherwise the line is recomputed from the log.
Handlers run inside the batch's transaction, after the log insert, and see
only events that were new to the log, so a resend is never applied twice;
sync_new runs them all with one read and one write of the state tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from interactions_client.rules import RULES, SyncTarget, TypeRule, ValueRule
from interactions_server import storage


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


# A fold step: (state, event_value, occurred_at us) -> new state.
Step = Callable[[int | None, int, int], int | None]


def _add(q: int | None, v: int, _: int) -> int:
    return (q or 0) + v


def _remove(q: int | None, v: int, _: int) -> int:
    return 0 if v == 0 else max((q or 0) - v, 0)


def _set(_q: int | None, v: int, _: int) -> int:
    return v


def _wishlist(added_at: int | None, v: int, occurred_us: int) -> int | None:
    if v == 0:
        return None
    return occurred_us if added_at is None else added_at


# How each value rule acts on a target's state. Which types sync where, and
# with which value rule, comes from the schema; these are the semantics.
CART_STEPS: Mapping[int, Step] = {
    ValueRule.VALUE_RULE_QUANTITY: _add,
    ValueRule.VALUE_RULE_QUANTITY_OR_ALL: _remove,
    ValueRule.VALUE_RULE_NEW_QUANTITY: _set,
}
WISHLIST_STEPS: Mapping[int, Step] = {ValueRule.VALUE_RULE_ADD_OR_REMOVE: _wishlist}


class KeyedFold:
    """State per (user, product) in `table`, folded from the events of the types syncing to it."""

    needs_key_lock = True

    def __init__(self, table: str, target: int, steps_by_value_rule: Mapping[int, Step]) -> None:
        self.table = table
        self.steps: dict[str, Step] = {}
        for rule in RULES.values():
            if rule.sync != target:
                continue
            if rule.value not in steps_by_value_rule:
                raise RuntimeError(f"{rule.name} syncs to {table} with a value rule it cannot apply")
            self.steps[rule.name] = steps_by_value_rule[rule.value]

    def fold(self, state: int | None, events: Sequence[tuple[str, int, int]]) -> int | None:
        for event_type, value, occurred_us in events:
            state = self.steps[event_type](state, value, occurred_us)
        return state

    def lines(
        self, events: Sequence[SyncEvent], current: Mapping[tuple[str, str], storage.StateLine]
    ) -> tuple[list[storage.StateLine], list[tuple[str, str]]]:
        """The new lines of the keys of `events` folded onto their `current`
        lines, and the keys whose new events arrived out of order (stale: to
        be refolded from the log)."""
        by_key: dict[tuple[str, str], list[SyncEvent]] = defaultdict(list)
        for e in events:
            by_key[(e.user_id, e.product_id)].append(e)
        lines: list[storage.StateLine] = []
        stale: list[tuple[str, str]] = []
        for key in sorted(by_key):
            new = sorted(by_key[key], key=lambda e: (e.occurred_us, e.event_id))
            line = current.get(key)
            if line is not None and (new[0].occurred_us, new[0].event_id) < (line.updated_us, line.last_event_id):
                stale.append(key)  # arrived out of order: refold the key from the log
                continue
            state = self.fold(
                None if line is None else line.value, [(e.rule.name, e.value, e.occurred_us) for e in new]
            )
            lines.append(storage.StateLine(key[0], key[1], state, new[-1].occurred_us, new[-1].event_id))
        return lines, stale

    async def refold(self, conn: asyncpg.Connection, stale: Sequence[tuple[str, str]]) -> list[storage.StateLine]:
        """The lines of `stale` keys folded from all their logged events."""
        logged: dict[tuple[str, str], list[storage.KeyEvent]] = defaultdict(list)
        for event in await storage.fetch_key_events(conn, stale, list(self.steps)):
            logged[(event.user_id, event.product_id)].append(event)
        lines: list[storage.StateLine] = []
        for key in stale:
            history = logged[key]
            state = self.fold(None, [(e.event_type, e.event_value, e.occurred_us) for e in history])
            lines.append(storage.StateLine(key[0], key[1], state, history[-1].occurred_us, history[-1].event_id))
        return lines


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
        SyncTarget.SYNC_TARGET_USER_CART: KeyedFold("cart_lines", SyncTarget.SYNC_TARGET_USER_CART, CART_STEPS),
        SyncTarget.SYNC_TARGET_USER_WISHLIST: KeyedFold(
            "wishlist_lines", SyncTarget.SYNC_TARGET_USER_WISHLIST, WISHLIST_STEPS
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
    of every keyed table, one writes every table's new state (plus a read of
    the log per table with out-of-order keys)."""
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
    lines: dict[str, list[storage.StateLine]] = {}
    for fold, events in folds:
        folded, stale = fold.lines(events, current.get(fold.table, {}))
        if stale:
            folded += await fold.refold(conn, stale)
        lines[fold.table] = folded
    await storage.write_state(conn, lines, purchases)
