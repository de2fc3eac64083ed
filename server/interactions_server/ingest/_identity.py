"""Identity links on the write path: LinkIdentity's link, and the links of a
batch's logins that carry LoginDetails.anonymous_id (the Ingestor's), decided
and made inside one transaction.

A link runs as: storage.lock_identities (the deletion-bucket locks: the
anonymous id's exclusively, so that a concurrent batch with its events either
commits first, and its rows are moved, or waits and sees the link; then the
facts) -> decide_links (here, in Python: the batch's links in batch order)
-> the state-sync key locks of the person's lines the moved events fold
into (after every bucket lock, in one call, as in every transaction of the
service, so that none can deadlock: a batch's insert statement takes them
with its own, LinkIdentity's fold takes them) -> complete_links:
storage.move_linked moves the anonymous id's events, keys and purchases
under the person and drops its state lines, history and segments, then its
history is folded into the person's lines by the state sync's own fold
(_sync.fold_events), as events arriving late (bounded work per late event,
migrations/0006).

The rules (README, "Identity"): a link is permanent and single; linking an
anonymous id again to the same person is "already linked", to another one is
refused naming anonymous_id; an id that is a person (ids are linked to it, or
it logged in) cannot be linked as an anonymous id; a target that is itself a
linked anonymous id stands for its person, so links never chain.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import DeadlineExceeded, FailedPrecondition
from interactions_server.ingest._sync import SyncEvent, fold_events

LINKED_ELSEWHERE = "is already linked to another user (links are permanent)"
IS_A_PERSON = "is a user (it logged in, or ids are linked to it): a user cannot be linked as an anonymous id"
_DEADLINE_SLACK = 0.05  # as the Ingestor's


@dataclass(frozen=True, slots=True)
class LinkRequest:
    index: int  # the login's position in its batch (links are decided in batch order)
    anonymous_id: str
    user_id: str  # as requested: a linked anonymous id stands for its person
    linked_us: int  # occurred_at of the link, epoch microseconds


@dataclass(frozen=True, slots=True)
class LinkDecision:
    request: LinkRequest
    person: str  # whom the anonymous id belongs to once decided
    link: bool  # a new link to make (False: already linked, or refused)
    refusal: str | None = None  # why not (reported naming anonymous_id)


def decide_links(
    requests: Sequence[LinkRequest],
    facts: Mapping[str, storage.IdentityFacts],
    logins: Iterable[tuple[int, str]] = (),
) -> list[LinkDecision]:
    """The decision on each request, in batch order, as if each event of the
    batch came after the previous one: a link made earlier in the batch
    counts, and so does a login (`logins`: (index, user_id) of every login of
    the batch), which makes its user a person."""
    person_of = {id_: f.person for id_, f in facts.items() if f.person is not None}
    persons = {id_ for id_, f in facts.items() if f.is_person}
    links = {r.index: r for r in requests}
    decisions: list[LinkDecision] = []
    for index, user_id in sorted({*logins, *((r.index, r.user_id) for r in requests)}):
        person = person_of.get(user_id, user_id)
        request = links.get(index)
        if request is None:
            persons.add(person)
            continue
        anonymous_id = request.anonymous_id
        current = person_of.get(anonymous_id)
        if current is not None and current != person:
            decisions.append(LinkDecision(request, current, link=False, refusal=LINKED_ELSEWHERE))
            continue  # the login is refused: it makes nobody a person
        if current is not None:
            decisions.append(LinkDecision(request, current, link=False))  # already linked
        elif anonymous_id in persons or anonymous_id == person:
            decisions.append(LinkDecision(request, person, link=False, refusal=IS_A_PERSON))
            continue
        else:
            person_of[anonymous_id] = person
            decisions.append(LinkDecision(request, person, link=True))
        persons.add(person)
    return decisions


def refusal_violation(decision: LinkDecision, field: str) -> FieldViolation:
    return FieldViolation(field=field, description=decision.refusal or "")


def link_keys(
    decisions: Iterable[LinkDecision],
    facts: Mapping[str, storage.IdentityFacts],
    batch_products: Mapping[str, Collection[str]] | None = None,
) -> set[tuple[str, str]]:
    """The (person, product) keys whose lines the links fold into: the
    products of each anonymous id's state history, and of its events in the
    batch (`batch_products`, by user id)."""
    keys: set[tuple[str, str]] = set()
    for d in decisions:
        if d.link:
            anonymous_id = d.request.anonymous_id
            keys.update((d.person, p) for p in facts[anonymous_id].products)
            keys.update((d.person, p) for p in (batch_products or {}).get(anonymous_id, ()))
    return keys


async def complete_links(conn: asyncpg.Connection, decisions: Iterable[LinkDecision]) -> int:
    """Makes the links decided (their locks held): records them, moves each
    anonymous id's rows under its person, folds the anonymous id's state
    history into the person's lines (fold_events: as late events, in
    (occurred_at, event_id) order with the person's own). Returns the number
    of events moved."""
    links = [storage.Link(d.request.anonymous_id, d.person, d.request.linked_us) for d in decisions if d.link]
    if not links:
        return 0
    moved, history = await storage.move_linked(conn, links)
    await fold_events(
        conn,
        [
            SyncEvent(h.user_id, h.product_id, h.event_id, h.occurred_us, h.event_value, None, STANDARD[h.event_type])
            for h in history
        ],
    )
    return moved


@dataclass(frozen=True, slots=True)
class LinkResult:
    already_linked: bool
    events_moved: int


class IdentityLinker:
    """LinkIdentity: one link in a transaction of its own."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def link(
        self, anonymous_id: str, user_id: str, linked_us: int, time_limit: float | None = None
    ) -> LinkResult:
        """Links `anonymous_id` to the person of `user_id`; raises
        FailedPrecondition (naming anonymous_id) when the rules refuse it."""
        deadline = None if time_limit is None else time.time() + time_limit
        request = LinkRequest(0, anonymous_id, user_id, linked_us)
        try:
            async with storage.transaction(self._pool, time_limit, deadline) as conn:
                facts = await storage.lock_identities(conn, (), (anonymous_id,), (user_id,))
                (decision,) = decide_links([request], facts)
                if decision.refusal is not None:
                    raise FailedPrecondition([refusal_violation(decision, "anonymous_id")], "cannot link")
                if not decision.link:
                    return LinkResult(already_linked=True, events_moved=0)
                # The person's key locks are taken by the fold (fold_events),
                # in one call after every bucket lock.
                moved = await complete_links(conn, [decision])
        except asyncpg.exceptions.QueryCanceledError as exc:
            if deadline is not None and time.time() >= deadline - _DEADLINE_SLACK:
                raise DeadlineExceeded("the call's deadline passed; nothing was linked") from exc
            raise
        return LinkResult(already_linked=False, events_moved=moved)
