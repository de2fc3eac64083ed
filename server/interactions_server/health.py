"""grpc.health.v1 status that follows the database.

Every service is SERVING while PostgreSQL answers `SELECT 1` within a short
timeout and NOT_SERVING otherwise. The probe uses its own connection, not the
pool, so a pool saturated by ingestion is not mistaken for a dead database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import asyncpg
from grpc_health.v1 import health, health_pb2

_log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    """Owns the health servicer and the periodic database probe."""

    def __init__(self, dsn: str, services: Iterable[str], *, interval: float = 1.0, timeout: float = 1.0) -> None:
        self.servicer = health.aio.HealthServicer()
        self._dsn = dsn
        self._services = [health.OVERALL_HEALTH, *services]
        self._interval = interval
        self._timeout = timeout
        self._connection: asyncpg.Connection | None = None
        self._up: bool | None = None  # None until the first probe
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probes once (so the status is right before the first call), then
        keeps probing in the background."""
        await self.check()
        self._task = asyncio.create_task(self._run(), name="database-health")

    async def check(self) -> bool:
        """Probes the database once and publishes the result; returns it."""
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(self._dsn, timeout=self._timeout)
            await self._connection.fetchval("SELECT 1", timeout=self._timeout)
        except Exception as exc:  # whatever the reason, the database did not answer
            await self._drop_connection()
            await self._publish(False, f"{type(exc).__name__}: {exc}".strip())
            return False
        await self._publish(True, "")
        return True

    async def shutdown(self) -> None:
        """NOT_SERVING for every service from now on; stops probing."""
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_connection()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def _publish(self, up: bool, reason: str) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            _log.info("database up")
        else:
            _log.warning("database down: %s", reason)
        for service in self._services:
            await self.servicer.set(service, SERVING if up else NOT_SERVING)

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()  # no graceful close: the database may be gone
