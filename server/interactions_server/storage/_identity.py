"""The SQL of identity links (IdentityService, and logins carrying
LoginDetails.anonymous_id): the locks and facts a link is decided on, the
move of an anonymous id's rows under its person, and the reads.

A link runs in one transaction, in this order (migrations/0008_identity.sql
explains the locks): lock_identities (deletion-bucket locks, then the facts),
move_linked, then the fold of the anonymous id's state history into the
person's lines, which takes their state-sync key locks (ingest.fold_events;
a batch's insert statement has taken them already). Resolution on the write
path itself is part of storage.INSERT_EVENTS (resolve_users_for_ingest).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import asyncpg

from interactions_server.storage._citus import on_citus

_TS_TO_US = "(extract(epoch FROM {}) * 1000000)::int8"
_US_TO_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"


class IdentityFacts(NamedTuple):
    """What a link is decided on, for one anonymous id or target, read under its locks."""

    person: str | None  # the person it is linked to; None: not linked
    is_person: bool  # ids are linked to it, or it logged in
    products: tuple[str, ...]  # of its own state-syncing events (anonymous ids only)


async def lock_identities(
    conn: asyncpg.Connection, users: Collection[str], anonymous_ids: Collection[str], targets: Collection[str]
) -> dict[str, IdentityFacts]:
    """Takes the deletion-bucket locks of a link (exclusive for `anonymous_ids`,
    shared for `users`, `targets` and the targets' persons), then returns the
    facts of every anonymous id and target."""
    records = await conn.fetch(
        "SELECT id, person, is_person, products FROM lock_identities($1::text[], $2::text[], $3::text[])",
        list(users),
        list(anonymous_ids),
        list(targets),
    )
    return {r["id"]: IdentityFacts(r["person"], r["is_person"], tuple(r["products"] or ())) for r in records}


class MovedEvent(NamedTuple):
    """An event of the state's history (migrations/0006) moved under its
    person, as the fold reads it."""

    user_id: str  # the person
    product_id: str
    occurred_us: int
    event_id: str
    event_type: str
    event_value: int


class Link(NamedTuple):
    anonymous_id: str
    user_id: str  # the person
    linked_us: int  # occurred_at of the link, epoch microseconds


# Records the links and moves each anonymous id's rows under its person, in
# one statement: dedup keys, events and purchases (as DELETE ... RETURNING
# and INSERT: on a distributed table, a row's distribution column cannot be
# updated), and drops its state lines, the state's history of them and its
# segments: the caller folds the history rows returned into the person's
# lines (the state's history, not the log, which retention cuts, is what the
# lines are the fold of; purchases move as rows for the same reason). An
# event at or before the person's deletion watermark is dropped, not moved
# (as if it had carried the person's id: the deletion would have taken it),
# and so is one whose event_id the person already has (the person's event
# stays; a resend of the moved one is then a conflict).
_MOVE = f"""
WITH moves AS (
    SELECT m.a, m.p, m.t,
           coalesce((SELECT d.deleted_through FROM user_deletions AS d WHERE d.user_id = m.p),
                    '-infinity') AS through
    FROM unnest($1::text[], $2::text[], $3::int8[]) AS m(a, p, t)
), links AS (
    INSERT INTO identity_links (anonymous_id, user_id, linked_at)
    SELECT a, p, {_US_TO_TS.format("t")} FROM moves ORDER BY a
    ON CONFLICT DO NOTHING
), keys_out AS (
    DELETE FROM event_keys AS k USING moves AS m WHERE k.user_id = m.a
    RETURNING m.p, m.through, k.event_id, k.occurred_at, k.fingerprint
), keys_in AS (
    INSERT INTO event_keys (user_id, event_id, occurred_at, fingerprint)
    SELECT p, event_id, occurred_at, fingerprint FROM keys_out WHERE occurred_at > through
    ORDER BY p, event_id
    ON CONFLICT DO NOTHING
    RETURNING user_id, event_id
), events_out AS (
    DELETE FROM events AS e USING moves AS m WHERE e.user_id = m.a
    RETURNING m.p, e.event_id, e.event_type, e.session_id, e.product_id, e.event_value, e.occurred_at,
              e.details, e.attributes, e.syncs_state, e.received_at
), events_in AS (
    INSERT INTO events (user_id, event_id, event_type, session_id, product_id, event_value, occurred_at,
                        details, attributes, syncs_state, received_at)
    SELECT o.p, o.event_id, o.event_type, o.session_id, o.product_id, o.event_value, o.occurred_at,
           o.details, o.attributes, o.syncs_state, o.received_at
    FROM events_out AS o JOIN keys_in AS k ON k.user_id = o.p AND k.event_id = o.event_id
    RETURNING 1
), purchases_out AS (
    DELETE FROM purchase_history AS h USING moves AS m WHERE h.user_id = m.a
    RETURNING m.p, m.through, h.purchased_at, h.event_id, h.product_id, h.session_id
), purchases_in AS (
    INSERT INTO purchase_history (user_id, purchased_at, event_id, product_id, session_id)
    SELECT o.p, o.purchased_at, o.event_id, o.product_id, o.session_id FROM purchases_out AS o
    WHERE o.purchased_at > o.through
      AND NOT EXISTS (SELECT FROM event_keys AS k WHERE k.user_id = o.p AND k.event_id = o.event_id)
    ORDER BY o.p, o.purchased_at, o.event_id
    ON CONFLICT DO NOTHING
), history_out AS (
    DELETE FROM state_history AS h USING moves AS m WHERE h.user_id = m.a
    RETURNING m.p, m.through, h.product_id, h.occurred_at, h.event_id, h.event_type, h.event_value
), segments AS (
    DELETE FROM state_segments AS g USING moves AS m WHERE g.user_id = m.a
), cart AS (
    DELETE FROM cart_lines AS l USING moves AS m WHERE l.user_id = m.a
), wishlist AS (
    DELETE FROM wishlist_lines AS l USING moves AS m WHERE l.user_id = m.a
)
-- One row without an event_id: the count of moved events; then the history rows to fold.
SELECT NULL AS user_id, NULL AS product_id, (SELECT count(*) FROM events_in) AS occurred_us,
       NULL AS event_id, NULL AS event_type, NULL::int8 AS event_value
UNION ALL
SELECT o.p, o.product_id, {_TS_TO_US.format("o.occurred_at")}, o.event_id::text, o.event_type, o.event_value
FROM history_out AS o
WHERE o.occurred_at > o.through
  AND NOT EXISTS (SELECT FROM event_keys AS k WHERE k.user_id = o.p AND k.event_id = o.event_id)
"""


async def move_linked(conn: asyncpg.Connection, links: Sequence[Link]) -> tuple[int, list[MovedEvent]]:
    """Records `links` and moves each anonymous id's rows under its person
    (its locks held: lock_identities and the state-sync key locks); returns
    how many events moved and the anonymous ids' state history, under the
    person, which the caller folds into the person's lines. On a Citus
    cluster: _citus_write.move_linked, the same in statements Citus runs."""
    if on_citus(conn):
        from interactions_server.storage import _citus_write  # imports this module

        return await _citus_write.move_linked(conn, links)
    records = await conn.fetch(
        _MOVE,
        [link.anonymous_id for link in links],
        [link.user_id for link in links],
        [link.linked_us for link in links],
    )
    moved, history = 0, []
    for r in records:
        if r["event_id"] is None:
            moved = int(r["occurred_us"])
        else:
            history.append(MovedEvent(*r))
    return moved, history


class Identity(NamedTuple):
    user_id: str  # the person
    anonymous_ids: list[str]


_IDENTITY = """
WITH p AS (SELECT person_of($1) AS person)
SELECT p.person, array(SELECT l.anonymous_id FROM identity_links AS l
                       WHERE l.user_id = p.person ORDER BY l.anonymous_id COLLATE "C") FROM p
"""


async def fetch_identity(pool: asyncpg.Pool, id_: str) -> Identity:
    """The person `id_` belongs to and the anonymous ids linked to it."""
    person, anonymous_ids = await pool.fetchrow(_IDENTITY, id_)
    return Identity(person, list(anonymous_ids))


async def person_of(conn: asyncpg.Connection | asyncpg.Pool, id_: str) -> str:
    """The person `id_` belongs to (`id_` itself when it is not linked)."""
    person: str = await conn.fetchval("SELECT person_of($1)", id_)
    return person


# The ids of the person `$1` belongs to: the person first, then its anonymous ids.
PERSON_IDS = """
WITH p AS (SELECT person_of($1) AS person)
SELECT array[p.person] || array(SELECT l.anonymous_id FROM identity_links AS l
                                WHERE l.user_id = p.person ORDER BY l.anonymous_id) FROM p
"""


async def person_ids(conn: asyncpg.Connection | asyncpg.Pool, id_: str) -> list[str]:
    """The person `id_` belongs to, then the anonymous ids linked to it."""
    ids: list[str] = await conn.fetchval(PERSON_IDS, id_)
    return ids
