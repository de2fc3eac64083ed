"""The gap test: many concurrent writers, a committer held open on purpose, and
a subscriber that must still see its event, and every user's events in the
order they were committed.

Writers commit out of the order in which they got their transaction ids: the
slow transaction takes its id first, inserts, and waits while every other
writer commits after it. A reader that trusted what it had seen (a sequence,
or the highest id so far) would pass over the slow transaction's event and
never come back; the stream reads only below the oldest transaction still
running, so it holds everything after the slow one back until it commits.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from interactions_client import InteractionsClient
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server import storage
from interactions_server.server import App
from tests.events import valid_event
from tests.test_event_stream import Reader

WRITERS = 8
SECONDS = 1.5


def slow_event_columns(user_id: str) -> storage.EventColumns:
    columns = storage.EventColumns.empty()
    for column, value in zip(
        columns,
        (user_id, str(uuid.uuid4()), "view", None, "p1", 1, int(time.time() * 1e6), None, None, False, 0),
        strict=True,
    ):
        column.append(value)  # type: ignore[attr-defined]
    return columns


async def test_a_slow_committer_is_not_skipped_and_each_user_arrives_in_commit_order(
    server: App, database_url: str
) -> None:
    async with InteractionsClient(server.address) as client:
        reader = Reader(client.subscribe())
        await reader.started()
        logged: dict[str, list[str]] = {}  # user -> event ids, in the order the writer's commits were acknowledged
        stop = asyncio.Event()

        async def writer(index: int) -> None:
            sequence = 0
            while not stop.is_set():
                users = [f"w{index}-u{j}" for j in range(3)]
                kind = sequence % 3
                if kind == 0:  # a LogEvents batch: one transaction
                    batch = in_order(
                        [valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=u) for u in users for _ in range(4)]
                    )
                    result = await client.log_many(batch)
                    assert result.accepted == len(batch)
                elif kind == 1:  # LogEvent calls, group-committed with the other writers'
                    batch = [valid_event(EventType.EVENT_TYPE_VIEW, user_id=u) for u in users]
                    for event in batch:
                        assert not (await client.log(event)).duplicate
                else:  # a bulk stream batch
                    batch = in_order(
                        [valid_event(EventType.EVENT_TYPE_CLICK, user_id=u) for u in users for _ in range(5)]
                    )
                    async with client.stream() as streamer:
                        for event in batch:
                            await streamer.send(event)
                for event in batch:
                    logged.setdefault(event.user_id, []).append(event.event_id)
                sequence += 1

        def in_order(batch: list[Event]) -> list[Event]:
            """Inside one transaction a user's events come by occurred_at: the order of the list."""
            base = int(time.time() * 1e6)
            for offset, event in enumerate(batch):
                event.occurred_at.FromMicroseconds(base + offset)
            return batch

        writers = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
        await asyncio.sleep(0.3)

        # The slow committer: takes its xid, inserts one event, and waits
        # while the writers go on committing after it.
        slow = await asyncpg.connect(database_url)
        transaction = slow.transaction()
        await transaction.start()
        columns = slow_event_columns("slow-user")
        assert (await storage.insert_events(slow, columns)).new
        slow_xid = int(await slow.fetchval("SELECT pg_current_xact_id()::text"))
        held_at = len(reader.event_ids)
        await asyncio.sleep(SECONDS)
        # Meanwhile nothing committed after it started was delivered: the stream holds it back.
        async with storage.acquire(server.pool) as conn:
            committed_after = await conn.fetchval("SELECT count(*) FROM events WHERE xid > $1", slow_xid)
        assert committed_after > 100
        during = set(reader.event_ids[held_at:])
        async with storage.acquire(server.pool) as conn:
            xids = dict(
                await conn.fetch("SELECT event_id::text, xid FROM events WHERE event_id::text = ANY($1)", list(during))
            )
        assert all(xid < slow_xid for xid in xids.values())
        await transaction.commit()
        await slow.close()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*writers)

        total = sum(len(ids) for ids in logged.values()) + 1
        await reader.wait_for(total, seconds=20)
        await asyncio.sleep(0.2)
        delivered = reader.event_ids
        assert len(delivered) == len(set(delivered)) == total  # everything, once
        assert columns.event_id[0] in delivered  # the slow committer's event
        by_user: dict[str, list[str]] = {}
        for event in reader.events:
            by_user.setdefault(event.event.user_id, []).append(event.event.event_id)
        for user, ids in logged.items():
            assert by_user[user] == ids, user  # commit order, per user
        await reader.close()
