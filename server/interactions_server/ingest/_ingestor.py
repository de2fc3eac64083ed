"""The write path: a batch of events in, one transaction, per-event outcomes out.

A single LogEvent is a batch of one. Valid events are inserted into the log
with one set-based statement that skips known (user_id, event_id) keys; only
the events new to the log are handed to the sync handlers, in the same
transaction, so a duplicate is harmless and an acknowledgement means committed.
The statement stores a linked user's events under its person; a login that
carries LoginDetails.anonymous_id links it in the same transaction (_identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import asyncpg

from interactions_client.rules import CUSTOM, RULES, STANDARD, TypeRule
from interactions_client.v1.event_pb2 import Event, FieldViolation
from interactions_client.validation import validate
from interactions_server import metrics, storage
from interactions_server.auth import event_type_violation
from interactions_server.errors import DeadlineExceeded
from interactions_server.ingest._event_json import attributes_json, details_json
from interactions_server.ingest._identity import (
    LinkDecision,
    LinkRequest,
    complete_links,
    decide_links,
    link_keys,
    refusal_violation,
)
from interactions_server.ingest._sync import SyncEvent, SyncHandler, build_registry, sync_new
from interactions_server.precedence import Precedence

CONFLICT_DESCRIPTION = "already used for a different event"
# A cancelled statement this close to the deadline was cancelled by it
# (statement_timeout and the deadline guard use the same deadline).
_DEADLINE_SLACK = 0.05
YIELD_EVERY = 127  # events between yields to the event loop (a power of two, less one)
YIELD_EVERY_INTERACTIVE = 31  # the same while interactive calls are in flight (precedence.py)
_LOGIN = STANDARD["login"].event_type


def fingerprint(event: Event) -> int:
    """A 64-bit digest of the event's content as the client sent it (absent
    fields stay absent; what the server fills in is not part of it).
    Deterministic serialization orders the attributes map."""
    if event.event_id != event.event_id.lower():  # the key is the lowercase id
        event = Event.FromString(event.SerializeToString())
        event.event_id = event.event_id.lower()
    digest = hashlib.blake2b(event.SerializeToString(deterministic=True), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def conflict_violation() -> FieldViolation:
    return FieldViolation(field="event_id", description=CONFLICT_DESCRIPTION)


@dataclass(slots=True)
class Rejection:
    index: int
    event_id: str
    violations: list[FieldViolation]
    conflict: bool = False  # the event_id was already used for a different event
    precondition: bool = False  # its identity link contradicts the stored links (FAILED_PRECONDITION)


@dataclass(slots=True)
class BatchResult:
    """Outcome of one batch; lists are indexed like the request's events."""

    event_ids: list[str] = field(default_factory=list)  # server-assigned when the request had none
    duplicate: list[bool] = field(default_factory=list)  # False for rejected events
    rejected: list[Rejection] = field(default_factory=list)
    accepted_count: int = 0
    duplicate_count: int = 0


class _TypeInfo(NamedTuple):
    """What building a row needs of an event's type, worked out once at import."""

    name: str | None  # the stored name; None for EVENT_TYPE_CUSTOM (its custom_type)
    default_value: int | None
    rule: TypeRule
    syncs: bool


_TYPES: dict[int, _TypeInfo] = {
    number: _TypeInfo(None if rule is CUSTOM else rule.name, rule.default_value, rule, rule.syncs)
    for number, rule in RULES.items()
}


class Ingestor:
    """Validates and writes batches. Database failures propagate as asyncpg /
    OSError exceptions (the caller maps them to UNAVAILABLE)."""

    def __init__(
        self, pool: asyncpg.Pool, *, bulk_connections: int | None = None, precedence: Precedence | None = None
    ) -> None:
        self._pool = pool
        # Bulk writes take at most this many of the pool's connections, so
        # that group commit and the reads never wait for one held by bulk work.
        self._bulk_slots = asyncio.Semaphore(bulk_connections) if bulk_connections else None
        self._precedence = precedence or Precedence(0)
        self._sync: dict[int, SyncHandler] = build_registry()
        self._locked_targets = frozenset(t for t, handler in self._sync.items() if handler.needs_key_lock)

    async def write(
        self,
        events: Sequence[Event],
        time_limit: float | None = None,
        *,
        allowed_types: frozenset[str] | None = None,
        bulk: bool = False,
    ) -> BatchResult:
        """Writes the valid events of the batch in one transaction, bounded by
        `time_limit` seconds per statement (the caller's remaining deadline).
        `allowed_types`: the type names the caller's token may log (None: any);
        an event of another type is rejected like an invalid one. `bulk`: a
        stream's batch or a large LogEvents (not group commit's)."""
        now = time.time()
        received_us = int(now * 1_000_000)
        result = BatchResult(event_ids=[""] * len(events), duplicate=[False] * len(events))
        # One pass: each valid event goes straight into the statement's columns
        # (and, if it syncs state, into its target's list), before any transaction opens.
        columns = storage.EventColumns.empty()
        users, ids, types, sessions, products, values, occurred, details, attributes, syncs, prints_column = columns
        syncing: dict[int, list[SyncEvent]] = {}
        locked: set[tuple[str, str]] = set()  # keys of the events whose sync needs the key's lock
        row_index: dict[tuple[str, str], int] = {}  # first occurrence of each key in the batch
        prints: dict[tuple[str, str], int] = {}  # fingerprint of each key's first occurrence
        repeats: list[tuple[int, tuple[str, str]]] = []  # later occurrences with the same content
        precedence = self._precedence
        logins: list[tuple[int, str]] = []  # (index, user_id) of the login events
        links: list[LinkRequest] = []  # of the logins carrying LoginDetails.anonymous_id
        link_rows: dict[int, int] = {}  # their index -> their row in `columns`
        for i, event in enumerate(events):
            if i & YIELD_EVERY_INTERACTIVE == YIELD_EVERY_INTERACTIVE and (
                i & YIELD_EVERY == YIELD_EVERY or precedence.interactive
            ):
                # A bulk batch's events are 5-6 ms of work: other calls' next
                # steps (a unary call's statement, its answer) go in between,
                # four times as often while interactive calls are in flight.
                await asyncio.sleep(0)
            event_id = event.event_id.lower() or str(uuid.uuid4())
            result.event_ids[i] = event_id
            violations = validate(event, now=now)
            if allowed_types is not None and (not_allowed := event_type_violation(event, allowed_types)) is not None:
                violations.append(not_allowed)
            if violations:
                result.rejected.append(Rejection(i, event.event_id, violations))
                continue
            user_id = event.user_id
            key = (user_id, event_id)
            print_ = fingerprint(event)
            if key in row_index:
                if prints[key] == print_:
                    repeats.append((i, key))
                else:  # the batch's first event with the key is written, this one refused
                    result.rejected.append(Rejection(i, event.event_id, [conflict_violation()], conflict=True))
                continue
            row_index[key] = i
            prints[key] = print_

            info = _TYPES[event.event_type]
            if event.HasField("occurred_at"):
                ts = event.occurred_at
                occurred_us = ts.seconds * 1_000_000 + ts.nanos // 1_000
            else:
                occurred_us = received_us
            # Validation guarantees a value or a default.
            value: int = event.event_value if event.HasField("event_value") else info.default_value  # type: ignore[assignment]
            session_id = event.session_id or None
            product_id = event.product_id or None
            member = event.WhichOneof("details")
            users.append(user_id)
            ids.append(event_id)
            types.append(info.name or event.custom_type)
            sessions.append(session_id)
            products.append(product_id)
            values.append(value)
            occurred.append(occurred_us)
            details.append(None if member is None else details_json(event, member))
            attributes.append(attributes_json(event.attributes) if event.attributes else None)
            syncs.append(info.syncs)
            prints_column.append(print_)
            if info.syncs:
                rule = info.rule
                target = syncing.get(rule.sync)
                if target is None:
                    target = syncing[rule.sync] = []
                target.append(SyncEvent(user_id, product_id or "", event_id, occurred_us, value, session_id, rule))
                if rule.sync in self._locked_targets:
                    locked.add((user_id, product_id or ""))
            elif event.event_type == _LOGIN:
                logins.append((i, user_id))
                if member == "login" and (anonymous_id := event.login.anonymous_id):
                    links.append(LinkRequest(i, anonymous_id, user_id, occurred_us))
                    link_rows[i] = len(users) - 1
        if not users:
            return result

        started = time.perf_counter()
        # A call the client has given up on must not commit later: its
        # statements check the deadline in PostgreSQL (also after a freeze)
        # and are bounded by a statement_timeout.
        deadline = None if time_limit is None else now + time_limit
        refused_links: list[LinkDecision] = []
        try:
            async with self._bulk_slots if bulk and self._bulk_slots is not None else contextlib.nullcontext():
                if links:
                    inserted, refused_links = await self._insert_linking(
                        columns, syncing, locked, links, logins, link_rows, result.event_ids, time_limit, deadline
                    )
                else:
                    inserted = await self._insert(columns, syncing, locked, time_limit, deadline)
        except asyncpg.exceptions.QueryCanceledError as exc:
            if deadline is not None and time.time() >= deadline - _DEADLINE_SLACK:
                raise DeadlineExceeded("the call's deadline passed; nothing was written") from exc
            raise
        metrics.observe_commit(len(users), time.perf_counter() - started)

        if refused_links:  # not written: their links contradict the stored ones
            self._refuse_links(result, events, refused_links, row_index, repeats)
        for key, i in row_index.items():
            if key in inserted.conflicting:
                result.rejected.append(Rejection(i, events[i].event_id, [conflict_violation()], conflict=True))
            else:
                result.duplicate[i] = key not in inserted.new
        for i, key in repeats:
            if key in inserted.conflicting:
                result.rejected.append(Rejection(i, events[i].event_id, [conflict_violation()], conflict=True))
            else:
                result.duplicate[i] = True
        result.rejected.sort(key=lambda r: r.index)
        if inserted.refused:  # events of deleted users, up to their deletion watermark
            self._refuse(result, events, inserted.refused)
        result.duplicate_count = sum(result.duplicate)
        result.accepted_count = len(inserted.new)
        return result

    @staticmethod
    def _refuse_links(
        result: BatchResult,
        events: Sequence[Event],
        refused: Sequence[LinkDecision],
        row_index: dict[tuple[str, str], int],
        repeats: list[tuple[int, tuple[str, str]]],
    ) -> None:
        """Rejects the logins whose links were refused, and their repeats in
        the batch, naming the field (they were not written)."""
        violations: dict[tuple[str, str], FieldViolation] = {}
        for decision in refused:
            i = decision.request.index
            key = (events[i].user_id, result.event_ids[i])
            del row_index[key]
            violations[key] = refusal_violation(decision, "login.anonymous_id")
            result.rejected.append(Rejection(i, events[i].event_id, [violations[key]], precondition=True))
        for i, key in repeats:
            if key in violations:
                result.rejected.append(Rejection(i, events[i].event_id, [violations[key]], precondition=True))
        repeats[:] = [(i, key) for i, key in repeats if key not in violations]

    @staticmethod
    def _refuse(result: BatchResult, events: Sequence[Event], refused: dict[tuple[str, str], datetime]) -> None:
        """Turns the refused events (and their repeats in the batch) into rejections naming user_id."""
        invalid = {r.index for r in result.rejected}
        for i, event in enumerate(events):
            deleted_through = refused.get((event.user_id, result.event_ids[i]))
            if deleted_through is not None and i not in invalid:
                result.duplicate[i] = False
                description = f"data of this user deleted through {deleted_through.isoformat()}"
                result.rejected.append(
                    Rejection(i, event.event_id, [FieldViolation(field="user_id", description=description)])
                )
        result.rejected.sort(key=lambda r: r.index)

    async def _insert(
        self,
        columns: storage.EventColumns,
        syncing: dict[int, list[SyncEvent]],
        locked: set[tuple[str, str]],
        time_limit: float | None,
        deadline: float | None,
    ) -> storage.InsertOutcome:
        if not syncing:
            # One statement is its own transaction: no BEGIN / COMMIT round trips.
            async with storage.acquire(self._pool) as conn:
                return await storage.insert_events(conn, columns, deadline)
        # The insert statement also takes the sync keys' locks; the deadline is
        # checked once more just before COMMIT (in COMMIT's round trip).
        async with storage.transaction(self._pool, time_limit, deadline) as conn:
            inserted = await storage.insert_events(conn, columns, deadline, locked)
            await self._sync_new(conn, syncing, inserted.new, inserted.persons)
        return inserted

    async def _insert_linking(
        self,
        columns: storage.EventColumns,
        syncing: dict[int, list[SyncEvent]],
        locked: set[tuple[str, str]],
        links: Sequence[LinkRequest],
        logins: Sequence[tuple[int, str]],
        link_rows: Mapping[int, int],
        event_ids: Sequence[str],
        time_limit: float | None,
        deadline: float | None,
    ) -> tuple[storage.InsertOutcome, list[LinkDecision]]:
        """_insert for a batch with logins that link (ingest/_identity.py): in
        one transaction, the links' locks and facts first (every bucket lock of
        the batch, before any key lock), then the insert without the logins
        whose links are refused, the sync, and the links of the logins logged
        (new, or resent). Returns the outcome and the refused links."""
        async with storage.transaction(self._pool, time_limit, deadline) as conn:
            facts = await storage.lock_identities(
                conn, set(columns.user_id), {r.anonymous_id for r in links}, {r.user_id for r in links}
            )
            decisions = decide_links(links, facts, logins)
            refused = [d for d in decisions if d.refusal is not None]
            if refused:
                columns = columns.without({link_rows[d.request.index] for d in refused})
            batch_products: dict[str, set[str]] = defaultdict(set)
            for events in syncing.values():
                for e in events:
                    batch_products[e.user_id].add(e.product_id)
            keys = locked | link_keys(decisions, facts, batch_products)
            inserted = await storage.insert_events(conn, columns, deadline, keys)
            await self._sync_new(conn, syncing, inserted.new, inserted.persons)

            def logged(d: LinkDecision) -> bool:
                key = (d.request.user_id, event_ids[d.request.index])
                return key not in inserted.refused and key not in inserted.conflicting

            await complete_links(conn, [d for d in decisions if d.link and logged(d)])
        return inserted, refused

    async def _sync_new(
        self,
        conn: asyncpg.Connection,
        by_target: dict[int, list[SyncEvent]],
        new_keys: set[tuple[str, str]],
        persons: Mapping[str, str],
    ) -> None:
        """Runs the sync handlers on the events that were new to the log (their
        keys' locks are held since the insert), a linked user's under its person."""
        new = {
            target: fresh
            for target, candidates in by_target.items()
            if (fresh := [e for e in candidates if (e.user_id, e.event_id) in new_keys])
        }
        if persons:
            new = {
                target: [
                    dataclasses.replace(e, user_id=persons[e.user_id]) if e.user_id in persons else e for e in fresh
                ]
                for target, fresh in new.items()
            }
        if new:
            await sync_new(conn, self._sync, new)
