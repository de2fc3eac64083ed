"""grpc.health.v1 status that follows the database.

Every service is SERVING while the database answers the probe
(storage.Probe: within a short timeout, on a connection of its own) and
accepts writes; NOT_SERVING when it does not answer; while it answers
read-only, only the services that merely read stay SERVING (DatabaseHealth).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from interactions_server import metrics, storage

_log = logging.getLogger("interactions_server.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_Status = int  # a HealthCheckResponse.ServingStatus value (grpc_health is untyped)


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1.Health, like grpc_health's aio servicer except that a
    Watch ends once it has sent NOT_SERVING for a shutdown: the stock one
    never returns, so each open Watch held shutdown for the whole grace period."""

    def __init__(self) -> None:
        self._statuses: dict[str, _Status] = {health.OVERALL_HEALTH: SERVING}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        last: _Status | None = None
        while True:
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                return
            async with self._changed:
                while not self._shutting_down and self._statuses.get(request.service, SERVICE_UNKNOWN) == last:
                    await self._changed.wait()

    async def set(self, service: str, status: _Status) -> None:
        await self.set_all({service: status})

    async def set_all(self, statuses: dict[str, _Status]) -> None:
        """Several services' statuses at once: no Check sees some changed and others not."""
        if self._shutting_down:
            return
        async with self._changed:
            self._statuses.update(statuses)
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service from now on; open Watches end."""
        async with self._changed:
            self._shutting_down = True
            self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
            self._changed.notify_all()


UP, READ_ONLY, DOWN = "up", "read-only", "down"  # what the probe found


class DatabaseHealth:
    """Owns the health servicer and the periodic database probe.

    The database up and writable: every service SERVING. Up but read-only (a
    standby after a failover, or default_transaction_read_only on): the
    services that only read (`read_services`) stay SERVING, the overall
    status ("") and every other service go NOT_SERVING, as their writes are
    answered UNAVAILABLE. Down: every service NOT_SERVING. When writability
    changes, `on_writability_change` runs (the server renews its pools'
    sessions, which keep the read-only state they started with)."""

    def __init__(
        self,
        dsn: str,
        services: Iterable[str],
        *,
        read_services: Iterable[str] = (),
        interval: float = 1.0,
        timeout: float = 1.0,
        statement_cache_size: int = 100,
        on_writability_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.servicer = HealthServicer()
        self._probe = storage.Probe(dsn, timeout=timeout, statement_cache_size=statement_cache_size)
        self._services = [health.OVERALL_HEALTH, *services]
        self._read_services = frozenset(read_services)
        self._interval = interval
        self._on_writability_change = on_writability_change
        self._state: str | None = None  # None until the first probe
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probes once (so the status is right before the first call), then
        keeps probing in the background."""
        await self.check()
        self._task = asyncio.create_task(self._run(), name="database-health")

    async def check(self) -> bool:
        """Probes the database once and publishes the result; returns whether it answered."""
        try:
            writable = await self._probe.check()
        except Exception as exc:  # whatever the reason, the database did not answer
            await self._publish(DOWN, f"{type(exc).__name__}: {exc}".strip())
            return False
        await self._publish(UP if writable else READ_ONLY, "")
        return True

    async def shutdown(self) -> None:
        """NOT_SERVING for every service from now on; stops probing."""
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._probe.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def _publish(self, state: str, reason: str) -> None:
        previous, self._state = self._state, state
        if state == previous:
            return
        metrics.set_database_up(state != DOWN)
        metrics.set_database_writable(state == UP)
        if state == UP:
            _log.info("database writable again" if previous == READ_ONLY else "database up")
        elif state == READ_ONLY:
            _log.warning(
                "database read-only (a standby, or default_transaction_read_only on): writes are answered "
                "UNAVAILABLE and health is NOT_SERVING but for the services that only read (%s)",
                ", ".join(sorted(self._read_services)) or "none",
            )
        else:
            _log.warning("database down: %s", reason)
        if previous is not None and state != DOWN and self._on_writability_change is not None:
            # Before the new status is seen, so that a caller who acts on it
            # meets sessions in the new state (back from down, the pools'
            # broken sessions would be replaced anyway).
            await self._on_writability_change()
        await self.servicer.set_all(
            {
                service: SERVING
                if state == UP or (state == READ_ONLY and service in self._read_services)
                else NOT_SERVING
                for service in self._services
            }
        )
