"""The retention policy's daily run (--retention-days, --retention-days-by-type).

One RetentionKeeper runs per host, in the database side (storage.Database:
the supervisor with --workers, the single process otherwise), beside the
partition upkeep. Every `check_interval` seconds it asks retention_schedule
(migrations/0010) whether the day's run is due, a day after the last one
started, and claims it with a lease that it renews while it works: of the
servers of a deployment, one runs it; a run whose server died is taken over
once its lease has expired, and resumes where it stopped (the removals are
idempotent and each one is committed with its audit record).

`run_retention` is also what `interactions-server retention [--dry-run]` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from interactions_server.config import RetentionPolicy
from interactions_server.errors import is_database_unavailable
from interactions_server.storage._lifecycle import (
    DEFAULT_PACE,
    Pace,
    Removed,
    RetentionPlan,
    apply_retention,
    count_retention,
)

_log = logging.getLogger("interactions_server.retention")

ACTOR = "system:retention"
PERIOD = timedelta(days=1)
LEASE = timedelta(minutes=10)
RENEW_EVERY = 60.0  # seconds between renewals of the lease while a run works

# Claims the run: when it is due (the last run started a day ago or more and
# has finished), when the last run's server is gone (unfinished, its lease
# expired), or ($4, the command) whenever no run is in progress.
_CLAIM = """
INSERT INTO retention_schedule AS s (holder, lease_until, started_at)
VALUES ($1, now() + $2::interval, now())
ON CONFLICT (only_row) DO UPDATE
SET holder = excluded.holder, lease_until = excluded.lease_until, started_at = excluded.started_at,
    finished_at = NULL
WHERE (s.finished_at IS NULL AND s.lease_until < now())
   OR (s.finished_at IS NOT NULL AND ($4::bool OR s.started_at <= now() - $3::interval))
RETURNING started_at
"""
_RENEW = "UPDATE retention_schedule SET lease_until = now() + $2::interval WHERE holder = $1 AND finished_at IS NULL"
_FINISH = "UPDATE retention_schedule SET finished_at = now(), lease_until = now() WHERE holder = $1"
_RUNNING = "SELECT holder, started_at FROM retention_schedule WHERE finished_at IS NULL AND lease_until >= now()"


class RetentionBusy(Exception):
    """Another server is applying the policy right now."""


@dataclass(slots=True)
class _Lease:
    pool: asyncpg.Pool
    holder: str
    renewed: float = 0.0

    async def claim(self, *, force: bool, period: timedelta = PERIOD) -> bool:
        claimed = await self.pool.fetchval(_CLAIM, self.holder, LEASE, period, force)
        self.renewed = time.monotonic()
        return claimed is not None

    async def beat(self) -> None:
        """Renews the lease once a minute (called between batches)."""
        if time.monotonic() - self.renewed >= RENEW_EVERY:
            await self.pool.execute(_RENEW, self.holder, LEASE)
            self.renewed = time.monotonic()

    async def finish(self) -> None:
        await self.pool.execute(_FINISH, self.holder)


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def run_retention(
    pool: asyncpg.Pool,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    trigger: str = "command",
    as_of: datetime | None = None,
    pace: Pace = DEFAULT_PACE,
) -> Removed:
    """Applies `policy` once (dry_run: only counts what it would remove) and
    logs what it removed. Raises RetentionBusy while another run is in progress."""
    plan = RetentionPlan.of(policy, as_of or datetime.now(UTC))
    if dry_run:
        removed = await count_retention(pool, plan)
        _log.info("retention (dry run) would remove %s", _summary(removed), extra=_fields(removed, policy))
        return removed
    lease = _Lease(pool, _holder())
    if not await lease.claim(force=True):
        running = await pool.fetchrow(_RUNNING)
        since = "" if running is None else f" (started at {running['started_at']:%Y-%m-%d %H:%M:%S} UTC)"
        raise RetentionBusy(f"another server is applying the retention policy now{since}; try again when it is done")
    return await _run(lease, policy, plan, trigger, pace)


async def _run(lease: _Lease, policy: RetentionPolicy, plan: RetentionPlan, trigger: str, pace: Pace) -> Removed:
    detail = {"policy": policy.describe(), "trigger": trigger}
    removed = await apply_retention(lease.pool, plan, actor=ACTOR, detail=detail, pace=pace, beat=lease.beat)
    await lease.finish()
    if removed.deferred:
        _log.warning(
            "retention left %d month(s) for its next run (%s): the event log stayed locked by a long transaction",
            len(removed.deferred),
            ", ".join(removed.deferred),
        )
    _log.info(
        "retention removed %s in %.1f s%s",
        _summary(removed),
        removed.seconds,
        "" if removed.audit_id is None else f"; audit_log record {removed.audit_id}",
        extra=_fields(removed, policy),
    )
    return removed


def _summary(removed: Removed) -> str:
    """Counts and names of types and months, never an id."""
    if not removed.events and not removed.partitions:
        return "nothing"
    types = ", ".join(f"{name} {n:,}" for name, n in sorted(removed.by_type.items()) if n)
    text = f"{removed.events:,} events" + (f" ({types})" if types else "")
    if removed.partitions:
        text += f", {len(removed.partitions)} month(s) whole ({', '.join(removed.partitions)})"
    return text


def _fields(removed: Removed, policy: RetentionPolicy) -> dict[str, object]:
    return {
        "events": removed.events,
        "by_type": dict(sorted(removed.by_type.items())),
        "partitions": removed.partitions,
        "policy": policy.describe(),
    }


class RetentionKeeper:
    """Applies the policy once a day (see the module's docstring)."""

    def __init__(
        self, pool: asyncpg.Pool, policy: RetentionPolicy, *, check_interval: float, pace: Pace = DEFAULT_PACE
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._check_interval = check_interval
        self._pace = pace
        self._lease = _Lease(pool, _holder())
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # finished runs (tests)

    def start(self) -> None:
        _log.info("retention policy: %s", _describe(self._policy))
        self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        # The first check at once: the claim says whether today's run is due.
        period = max(timedelta(seconds=1), PERIOD - timedelta(seconds=self._check_interval))
        while True:
            try:
                if await self._lease.claim(force=False, period=period):
                    plan = RetentionPlan.of(self._policy, datetime.now(UTC))
                    await _run(self._lease, self._policy, plan, "daily", self._pace)
                    self.runs += 1
            except Exception as exc:  # the next check tries again; a claimed run's lease expires
                if is_database_unavailable(exc):
                    _log.warning("retention did not run: the database is unavailable (%s); retrying later", exc)
                else:
                    _log.exception("retention failed; retrying later")
            await asyncio.sleep(self._check_interval)


def _describe(policy: RetentionPolicy) -> str:
    parts = [] if policy.days is None else [f"{policy.days} days"]
    parts += [f"{name} {days} days" for name, days in policy.by_type]
    return ", ".join(parts) if parts else "keep everything"
