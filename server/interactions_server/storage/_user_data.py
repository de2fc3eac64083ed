"""The SQL of a person's data for the right of access (AdminService.ExportUserData).

Every read runs on one connection in one READ ONLY REPEATABLE READ
transaction (storage.snapshot): the parts of an export agree with each
other. Each part streams from a server-side cursor, `chunk` rows at a time,
so that a person with millions of events is exported in bounded memory. The
same rows as the reads return (GetCart, GetWishlist, ListPurchases,
ListUserEvents): the same views and columns, the same orders.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import NamedTuple

import asyncpg

from interactions_server.storage._analytics import _EVENT_COLUMNS, _prefetched


class UserHeader(NamedTuple):
    person: str  # the id asked for, or the user it is linked to
    anonymous_ids: list[str]  # linked to the person
    exported_at: datetime  # the snapshot's instant
    deleted_through: datetime | None  # the person's deletion watermark, if they were deleted
    deleted_at: datetime | None


# The person an id belongs to (person_of, migrations/0008_identity.sql: the
# rows of a linked anonymous id live under its person), the anonymous ids
# linked to them, and their deletion record.
_HEADER = """
WITH p AS (SELECT person_of($1) AS person)
SELECT p.person,
       array(SELECT l.anonymous_id FROM identity_links AS l WHERE l.user_id = p.person
             ORDER BY l.anonymous_id COLLATE "C"),
       now(), d.deleted_through, d.deleted_at
FROM p LEFT JOIN user_deletions AS d ON d.user_id = p.person
"""

_PARTS = {
    "cart": "SELECT product_id, quantity, updated_at FROM user_cart WHERE user_id = $1 ORDER BY product_id",
    "wishlist": "SELECT product_id, added_at FROM user_wishlist WHERE user_id = $1 ORDER BY added_at, product_id",
    "purchases": """
        SELECT event_id::text, product_id, session_id, purchased_at FROM purchase_history
        WHERE user_id = $1 ORDER BY purchased_at DESC, event_id DESC
    """,
    # EventRow's fields, in its order: the per-user index's range, oldest first.
    "events": f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = $1 ORDER BY occurred_at, event_id",
}
USER_DATA_PARTS = tuple(_PARTS)


async def user_header(conn: asyncpg.Connection, user_id: str) -> UserHeader:
    return UserHeader(*await conn.fetchrow(_HEADER, user_id))


async def user_data_part(
    conn: asyncpg.Connection, part: str, person: str, chunk: int
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """One part of USER_DATA_PARTS of the person, `chunk` rows at a time
    (`conn` in the export's transaction)."""
    cursor = await conn.cursor(_PARTS[part], person)
    async with contextlib.aclosing(_prefetched(cursor, chunk)) as chunks:
        async for records in chunks:
            yield records
