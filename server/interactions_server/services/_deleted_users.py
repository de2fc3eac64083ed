"""What a long-lived read leaves out: the users deleted after its snapshot.

An export reads one REPEATABLE READ snapshot for the whole call (one
consistent position to resume from), so a DeleteUserData that commits while
it runs is invisible to it, and the deleted user's rows would keep streaming
out of the snapshot. Before each response, the export asks, on another
connection (outside its snapshot), which deletions committed that its
snapshot does not see (storage.users_deleted_since: one indexed range of
user_deletions, migrations/0007), and leaves those users' rows out of it.
One query per response (at most 1,000 rows or about 1 MiB), never per row,
sent while the response is built.

So a response that starts after DeleteUserData returned carries none of the
user's rows. A response already built, waiting for the caller to read it
(gRPC's flow control), may: two at most per export (one queued in gRPC,
one waiting to be queued; tests/test_export_deletion.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import asyncpg

from interactions_server import storage

_Built = TypeVar("_Built")


class DeletedSince:
    """The users deleted since `snapshot` (of an export's transaction), asked anew by `check()`."""

    def __init__(self, pool: asyncpg.Pool, snapshot: str) -> None:
        self._pool = pool  # not the export's connection: its snapshot would not see the deletions
        self._snapshot = snapshot
        self.users: frozenset[str] = frozenset()

    async def check(self) -> frozenset[str]:
        """Call before each response; the users to leave out of it."""
        self.users = await storage.users_deleted_since(self._pool, self._snapshot)
        return self.users

    async def overlapping(self, build: Callable[[], _Built]) -> tuple[_Built, frozenset[str]]:
        """`build()` (the next response, CPU work) while the check for it is
        in flight, so that the check's round trip costs the export no time;
        both results. If the response holds rows of users now deleted, the
        caller builds it again without them."""
        check = asyncio.ensure_future(self.check())
        try:
            await asyncio.sleep(0)  # the check's query is sent before the CPU work starts
            built = build()
            return built, await check
        except BaseException:
            check.cancel()
            raise
