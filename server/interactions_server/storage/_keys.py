"""The SQL of the server's keys (table server_keys, migrations/0007)."""

from __future__ import annotations

import asyncpg

from interactions_server.keyring import AUDIT, CURSOR, Keyring, new_secret

_SELECT = "SELECT purpose, version, secret FROM server_keys"
# Version 1 of each purpose, unless some server made it first: then the
# INSERT waits for that server's commit and does nothing, and both read the
# same keys back.
_CREATE = """
INSERT INTO server_keys (purpose, version, secret) VALUES ($1, 1, $2), ($3, 1, $4)
ON CONFLICT (purpose, version) DO NOTHING
"""


async def load_keyring(pool: asyncpg.Pool) -> Keyring:
    """The deployment's keys, created on the first start (race-free: every
    server starting at once reads the same keys). A database that already has
    them is only read, so a server starts on a read-only database too."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_SELECT)
        if {r["purpose"] for r in rows} < {CURSOR, AUDIT}:
            await conn.execute(_CREATE, CURSOR, new_secret(CURSOR), AUDIT, new_secret(AUDIT))
            rows = await conn.fetch(_SELECT)
    keys: dict[str, dict[int, bytes]] = {}
    for row in rows:
        keys.setdefault(row["purpose"], {})[row["version"]] = bytes(row["secret"])
    return Keyring(keys)
