"""A long export (an open REPEATABLE READ read of the event log) must not hold
up ingest through the partition upkeep: its DDL gives up after LOCK_TIMEOUT
instead of queueing every insert behind its wait for the lock."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest

from interactions_client.v1 import interaction_service_pb2 as isv
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server.server import App
from interactions_server.storage import _partitions as partitions
from tests.events import valid_event


def last_month_kept() -> str:
    """The name of the furthest monthly partition the keeper keeps."""
    now = datetime.now(UTC)
    month = now.month - 1 + partitions.MONTHS_AHEAD
    return f"events_{now.year + month // 12}_{month % 12 + 1:02d}"


async def test_partition_upkeep_gives_up_instead_of_blocking_ingest(
    server: App, channel: grpc.aio.Channel, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await server.pool.execute(f"DROP TABLE {last_month_kept()}")  # empty: a month ahead
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    reader = await asyncpg.connect(database_url)
    keeper = partitions.PartitionKeeper(pool)
    stub = InteractionServiceStub(channel)
    try:
        export = reader.transaction(isolation="repeatable_read", readonly=True)
        await export.start()
        await reader.fetchval("SELECT count(*) FROM events")  # holds ACCESS SHARE on the event log
        started = time.monotonic()
        upkeep = asyncio.create_task(keeper.ensure())
        await asyncio.sleep(0.2)  # the DDL now waits for the lock
        event = valid_event(EventType.EVENT_TYPE_VIEW, user_id="during-export", product_id="p1")
        await stub.LogEvent(isv.LogEventRequest(event=event), timeout=10)
        logged_after = time.monotonic() - started
        with caplog.at_level(logging.INFO, logger="interactions_server.partitions"):
            assert await asyncio.wait_for(upkeep, 10) is False  # gave up
            gave_up_after = time.monotonic() - started
            assert await keeper.ensure() is False  # still locked: logged once
        assert logged_after < 2.0 and gave_up_after < 2.0, (logged_after, gave_up_after)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].exc_info is None
        await export.rollback()  # the export ends: the next try creates the month
        assert await keeper.ensure() is True
        assert await server.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", last_month_kept())
    finally:
        await reader.close()
        await pool.close()
