"""The SQL of deleting a user's data (AdminService.DeleteUserData).

The matching check on the write path (an event of a deleted user at or before
the watermark is refused) is part of storage.INSERT_EVENTS, through the
resolve_users_for_ingest function of migrations/0008_identity.sql (0003's
lock_users_for_ingest, which explains the lock both sides take, with
identity resolution).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from interactions_server.keyring import SubjectHash
from interactions_server.storage._audit import DELETE_USER_DATA, AuditRecord, record_audit
from interactions_server.storage._identity import person_ids
from interactions_server.storage._pool import acquire


class DeletionCounts(NamedTuple):
    events: int
    cart_lines: int  # every line of the user's cart, emptied ones included
    wishlist_lines: int
    purchases: int
    deleted_through: datetime  # the watermark (on a dry run: what it would be)
    audit_id: int | None = None  # the audit_log record of a deletion (None on a dry run)
    xid: int = -1  # the deleting transaction's id, which orders it in the event stream (-1: a dry run)
    user_ids: tuple[str, ...] = ()  # every id the deletion marked: the person and its anonymous ids


# A user is a person and the anonymous ids linked to it (migrations/
# 0008_identity.sql): a deletion, whichever of them it names, covers them all
# (storage._identity.PERSON_IDS). Their rows live under the person once
# linked; the statements below still take every id, for rows a link has not
# moved (none, while links move rows in their own transaction).

# Step 1, before the lock: the ids' events (found through the per-user
# index events_user_time of 0002) and the state's history of them
# (migrations/0006); doing it before taking the lock keeps batches of the
# users in the lock's bucket from waiting for it. It cannot deadlock with
# them: the write path never waits for a row of either table. It only inserts
# there, and no unique index can make it wait: a history row it inserts is
# never one already stored, as the fold reads the key's stored rows (which
# it still sees) before it inserts any whose position could be taken.
_DELETE_EVENTS = """
WITH logged AS (DELETE FROM events WHERE user_id = ANY($1::text[]) RETURNING event_id, occurred_at),
     history AS (DELETE FROM state_history WHERE user_id = ANY($1::text[]))
SELECT count(*), max(occurred_at), coalesce(array_agg(event_id), '{}') FROM logged
"""

# Step 2: the same bucket keys as resolve_users_for_ingest, taken
# exclusively, in key order, in one call. A statement of its own: step 3
# must take its snapshot once the locks are held, to see the batches (and
# links) that committed while it waited.
_LOCK = """
SELECT count(pg_advisory_xact_lock(7303, b))
FROM (SELECT DISTINCT hashtext(u) & 63 AS b FROM unnest($1::text[]) AS u ORDER BY b) AS buckets
"""

# Step 3, under the locks: everything else, the links, and a watermark for
# every id: the latest of its previous one, now and the ids' latest event
# (occurred_at may be up to 5 minutes in the future), so that no event
# deleted now can come back, under any of the ids. The links go too: the
# anonymous ids are strangers from now on (their replays are refused by
# their own watermarks). Every logged event has its key in event_keys, so
# the keys of events step 1 did not see ("late": committed since) say which
# events are left to delete.
_DELETE_REST = """
WITH keys AS (DELETE FROM event_keys WHERE user_id = ANY($1::text[]) RETURNING user_id, event_id, occurred_at),
     late AS (
        SELECT k.user_id, k.event_id, k.occurred_at FROM keys AS k
        WHERE NOT EXISTS (SELECT FROM unnest($2::uuid[]) AS gone(event_id) WHERE gone.event_id = k.event_id)
     ),
     cart AS (DELETE FROM cart_lines WHERE user_id = ANY($1::text[]) RETURNING 1),
     -- The state's history rows committed since step 1, and the segments,
     -- which the write path updates (so only under the lock).
     history AS (DELETE FROM state_history WHERE user_id = ANY($1::text[])),
     segments AS (DELETE FROM state_segments WHERE user_id = ANY($1::text[])),
     wishlist AS (DELETE FROM wishlist_lines WHERE user_id = ANY($1::text[]) RETURNING 1),
     purchases AS (DELETE FROM purchase_history WHERE user_id = ANY($1::text[]) RETURNING 1),
     links AS (DELETE FROM identity_links WHERE user_id = ANY($1::text[]) OR anonymous_id = ANY($1::text[])),
     through AS (SELECT greatest(clock_timestamp(), $3::timestamptz, (SELECT max(occurred_at) FROM keys)) AS t),
     mark AS (
        INSERT INTO user_deletions AS d (user_id, deleted_through)
        SELECT DISTINCT u, through.t FROM unnest($1::text[]) AS u, through
        ON CONFLICT (user_id) DO UPDATE
        SET deleted_through = greatest(d.deleted_through, excluded.deleted_through), deleted_at = now(),
            deleted_xid = pg_current_xact_id()
        RETURNING deleted_through, deleted_xid::text::int8 AS xid
     )
SELECT (SELECT count(*) FROM cart), (SELECT count(*) FROM wishlist), (SELECT count(*) FROM purchases),
       (SELECT max(deleted_through) FROM mark), (SELECT max(xid) FROM mark),
       (SELECT coalesce(array_agg(user_id), '{}') FROM late),
       (SELECT coalesce(array_agg(event_id), '{}') FROM late), (SELECT coalesce(array_agg(occurred_at), '{}') FROM late)
"""

# Step 4, only when batches of the ids committed between steps 1 and 2.
_DELETE_LATE_EVENTS = """
WITH logged AS (
    DELETE FROM events AS e USING unnest($1::text[], $2::uuid[], $3::timestamptz[]) AS late(user_id, event_id, occurred_at)
    WHERE e.user_id = late.user_id AND e.event_id = late.event_id AND e.occurred_at = late.occurred_at
    RETURNING 1
)
SELECT count(*) FROM logged
"""

_COUNT = """
SELECT (SELECT count(*) FROM events WHERE user_id = ANY($1::text[])),
       (SELECT count(*) FROM cart_lines WHERE user_id = ANY($1::text[])),
       (SELECT count(*) FROM wishlist_lines WHERE user_id = ANY($1::text[])),
       (SELECT count(*) FROM purchase_history WHERE user_id = ANY($1::text[])),
       greatest(clock_timestamp(),
                (SELECT max(occurred_at) FROM event_keys WHERE user_id = ANY($1::text[])),
                (SELECT max(occurred_at) FROM events WHERE user_id = ANY($1::text[])),
                (SELECT max(deleted_through) FROM user_deletions WHERE user_id = ANY($1::text[])))
"""


async def delete_user_data(pool: asyncpg.Pool, user_id: str, *, actor: str, subject: SubjectHash) -> DeletionCounts:
    """Deletes every row of the person `user_id` belongs to (its anonymous ids
    included) and the links, and records the watermarks and the audit record
    (`actor` asked; `subject`: the keyed hash of the id named), in one transaction."""
    async with acquire(pool) as conn, conn.transaction():
        ids = await person_ids(conn, user_id)
        events, latest, deleted_ids = await conn.fetchrow(_DELETE_EVENTS, ids)
        locked: set[str] = set()
        while missing := [i for i in ids if i not in locked]:
            # A link (or another id of the person) committed before the locks
            # were granted shows now; its ids' locks are taken too (a second
            # call: rare, and a deadlock it could cause is detected and retried).
            await conn.execute(_LOCK, missing)
            locked.update(missing)
            ids = list(dict.fromkeys([*ids, *await person_ids(conn, user_id)]))
        cart, wishlist, purchases, deleted_through, xid, late_users, late_ids, late_times = await conn.fetchrow(
            _DELETE_REST, ids, deleted_ids, latest
        )
        if late_ids:
            events += await conn.fetchval(_DELETE_LATE_EVENTS, late_users, late_ids, late_times)
        counts = {"events": events, "cart_lines": cart, "wishlist_lines": wishlist, "purchases": purchases}
        record = AuditRecord(DELETE_USER_DATA, actor, subject, counts, {"deleted_through": deleted_through.isoformat()})
        audit_id = await record_audit(conn, record)
        return DeletionCounts(events, cart, wishlist, purchases, deleted_through, audit_id, xid, tuple(ids))


async def count_user_data(pool: asyncpg.Pool, user_id: str) -> DeletionCounts:
    """What delete_user_data would delete now (a dry run)."""
    async with acquire(pool) as conn:
        return DeletionCounts(*await conn.fetchrow(_COUNT, await person_ids(conn, user_id)))
