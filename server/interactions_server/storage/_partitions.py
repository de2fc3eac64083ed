"""Keeps the event log's monthly partitions ahead of the clock.

Current events must never land in the default partition: a row there for a
month would stop that month's partition from being created. So the server
creates the partitions for the months around now at start-up and then every
few hours (idempotent, and safe with several replicas doing it).

Creating a partition locks the whole event log (ACCESS EXCLUSIVE on
`events`), so it waits for every open read of it, such as a long export, and
every insert queues behind that wait. So the DDL runs under a short
lock_timeout and, when the lock is not free, gives up and retries a minute
later: months are created well ahead, so a late try costs nothing.

Under a retention policy that removes every type, the months it removes
whole are not created again (late events of such a month go to the default
partition, where retention removes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import asyncpg

from interactions_server.config import KEEP_EVERYTHING, RetentionPolicy
from interactions_server.errors import is_database_unavailable
from interactions_server.storage._events import ensure_event_partitions
from interactions_server.storage._lifecycle import RetentionPlan

_log = logging.getLogger("interactions_server.partitions")

MONTHS_BACK = 1
MONTHS_AHEAD = 2
LOCK_TIMEOUT = "1s"  # the longest the DDL may hold up the inserts queued behind it
RETRY_INTERVAL = 60.0  # seconds, after the lock was not free


class PartitionKeeper:
    def __init__(
        self, pool: asyncpg.Pool, *, interval: float = 6 * 3600, retention: RetentionPolicy = KEEP_EVERYTHING
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._retention = retention
        self._task: asyncio.Task[None] | None = None
        self._lock_busy = False  # lock busy or database read-only: logged once per run of failed tries

    async def start(self) -> None:
        done = await self.ensure()
        self._task = asyncio.create_task(self._run(done), name="partition-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def ensure(self) -> bool:
        """Creates the missing partitions; False when the event log's lock was
        not free within LOCK_TIMEOUT (nothing created, try again later)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                removed_before = RetentionPlan.of(self._retention, datetime.now(UTC)).months_before
                created = await ensure_event_partitions(conn, MONTHS_BACK, MONTHS_AHEAD, removed_before)
        except (asyncpg.LockNotAvailableError, asyncpg.ReadOnlySQLTransactionError) as exc:
            if not self._lock_busy:
                why = (
                    "the database is read-only (a standby, or default_transaction_read_only on)"
                    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError)
                    else "the event log is locked by a long transaction (an export?)"
                )
                _log.warning("event log partitions not created yet: %s; retrying every %.0f s", why, RETRY_INTERVAL)
                self._lock_busy = True
            return False
        if self._lock_busy:
            _log.info("event log partitions checked after waiting")
            self._lock_busy = False
        if created:
            _log.info("created %d monthly partition(s) of the event log", created)
        return True

    async def _run(self, done: bool) -> None:
        while True:
            await asyncio.sleep(self._interval if done else RETRY_INTERVAL)
            try:
                done = await self.ensure()
            except Exception as exc:  # retried at the next interval; health reports the database
                done = True
                if not is_database_unavailable(exc):
                    _log.exception("could not create event log partitions")
