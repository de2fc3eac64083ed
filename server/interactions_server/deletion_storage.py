"""The SQL of deleting a user's data (AdminService.DeleteUserData).

The matching check on the write path (an event of a deleted user at or before
the watermark is refused) is part of storage.INSERT_EVENTS, through the
lock_users_for_ingest function of migrations/0003_user_deletion.sql, which
also explains the lock both sides take.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg


class DeletionCounts(NamedTuple):
    events: int
    cart_lines: int  # every line of the user's cart, emptied ones included
    wishlist_lines: int
    purchases: int
    deleted_through: datetime  # the watermark (on a dry run: what it would be)


# The same bucket key as lock_users_for_ingest, taken exclusively.
_LOCK = "SELECT pg_advisory_xact_lock(7303, hashtext($1) & 63)"

# The watermark: the latest of the previous one, now and the user's latest
# event (occurred_at may be up to 5 minutes in the future), so that no event
# deleted now can be accepted again.
_DELETE = """
WITH keys AS (DELETE FROM event_keys WHERE user_id = $1 RETURNING occurred_at),
     logged AS (DELETE FROM events WHERE user_id = $1 RETURNING occurred_at),
     cart AS (DELETE FROM cart_lines WHERE user_id = $1 RETURNING 1),
     wishlist AS (DELETE FROM wishlist_lines WHERE user_id = $1 RETURNING 1),
     purchases AS (DELETE FROM purchase_history WHERE user_id = $1 RETURNING 1),
     mark AS (
        INSERT INTO user_deletions AS d (user_id, deleted_through)
        SELECT $1, greatest(clock_timestamp(), (SELECT max(occurred_at) FROM keys),
                            (SELECT max(occurred_at) FROM logged))
        ON CONFLICT (user_id) DO UPDATE
        SET deleted_through = greatest(d.deleted_through, excluded.deleted_through), deleted_at = now()
        RETURNING deleted_through
     )
SELECT (SELECT count(*) FROM logged), (SELECT count(*) FROM cart), (SELECT count(*) FROM wishlist),
       (SELECT count(*) FROM purchases), (SELECT deleted_through FROM mark)
"""

_COUNT = """
SELECT (SELECT count(*) FROM events WHERE user_id = $1),
       (SELECT count(*) FROM cart_lines WHERE user_id = $1),
       (SELECT count(*) FROM wishlist_lines WHERE user_id = $1),
       (SELECT count(*) FROM purchase_history WHERE user_id = $1),
       greatest(clock_timestamp(),
                (SELECT max(occurred_at) FROM event_keys WHERE user_id = $1),
                (SELECT max(occurred_at) FROM events WHERE user_id = $1),
                (SELECT deleted_through FROM user_deletions WHERE user_id = $1))
"""


async def delete_user_data(pool: asyncpg.Pool, user_id: str) -> DeletionCounts:
    """Deletes every row of the user and records the watermark, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        # A statement of its own: the DELETEs must take their snapshot after
        # the lock is held, to see the ingests that committed while it waited.
        await conn.execute(_LOCK, user_id)
        return DeletionCounts(*await conn.fetchrow(_DELETE, user_id))


async def count_user_data(pool: asyncpg.Pool, user_id: str) -> DeletionCounts:
    """What delete_user_data would delete now (a dry run)."""
    return DeletionCounts(*await pool.fetchrow(_COUNT, user_id))
