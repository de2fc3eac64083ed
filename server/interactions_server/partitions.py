"""Keeps the event log's monthly partitions ahead of the clock.

Current events must never land in the default partition: a row there for a
month would stop that month's partition from being created. So the server
creates the partitions for the months around now at start-up and then every
few hours (idempotent, and safe with several replicas doing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from interactions_server import storage
from interactions_server.errors import is_database_unavailable

_log = logging.getLogger(__name__)

MONTHS_BACK = 1
MONTHS_AHEAD = 2


class PartitionKeeper:
    def __init__(self, pool: asyncpg.Pool, *, interval: float = 6 * 3600) -> None:
        self._pool = pool
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._ensure()
        self._task = asyncio.create_task(self._run(), name="partition-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _ensure(self) -> None:
        created = await storage.ensure_event_partitions(self._pool, MONTHS_BACK, MONTHS_AHEAD)
        if created:
            _log.info("created %d monthly partition(s) of the event log", created)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._ensure()
            except Exception as exc:  # retried at the next interval; health reports the database
                if not is_database_unavailable(exc):
                    _log.exception("could not create event log partitions")
