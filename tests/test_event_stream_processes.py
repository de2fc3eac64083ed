"""Subscriptions across process deaths, with real server processes: the server
killed (SIGKILL) between two responses and another started, resumed with
the cursor; a worker of `--workers 2` killed under its subscription, which
the client resumes by itself. Each time the stream the consumer saw, put
together, is the log in stream order: nothing lost, nothing twice but (when
the consumer resumes from the response before its last) that response."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from interactions_client import InteractionsClient, UnavailableError
from interactions_client.v1 import event_stream_service_pb2 as pb
from interactions_client.v1 import event_stream_service_pb2_grpc
from tests.support import ServerProcess, cli
from tests.test_event_stream import events_of
from tests.test_workers import LISTENING, OWN_CONNECTION, connection_owners, worker_pids

LISTENING_ONE = r"listening on (127\.0\.0\.1:\d+)"


async def logged(server: ServerProcess, pattern: str) -> None:
    """Returns once the server has logged a line matching `pattern` (before now, or later)."""
    if not any(re.search(pattern, line) for line in server.log):
        await server.wait_for_line(pattern)


async def log_order(database_url: str) -> list[str]:
    """Every event of the log, in stream order, read from the database."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT event_id::text FROM events ORDER BY xid, user_id, occurred_at, event_id")
    finally:
        await connection.close()
    return [r[0] for r in rows]


@contextlib.asynccontextmanager
async def writing(address: str, stop: asyncio.Event) -> AsyncIterator[list[str]]:
    """Logs batches of 20 events until `stop`, retrying a batch that fails
    (a resend is a duplicate, harmless); yields the acknowledged ids."""
    acknowledged: list[str] = []

    async def write() -> None:
        async with InteractionsClient(address, options=OWN_CONNECTION, deadline=5) as client:
            sequence = 0
            while not stop.is_set():
                batch = events_of([f"u{(sequence + j) % 9}" for j in range(20)])
                while not stop.is_set():
                    try:
                        await client.log_many(batch)
                    except UnavailableError:
                        await asyncio.sleep(0.1)
                    else:
                        acknowledged.extend(e.event_id for e in batch)
                        break
                sequence += 1
                await asyncio.sleep(0.01)

    task = asyncio.create_task(write())
    try:
        yield acknowledged
    finally:
        stop.set()
        await task


async def test_a_server_killed_between_responses_loses_nothing_on_resume(database_url: str) -> None:
    async with cli("--listen", "127.0.0.1:0", "--database-url", database_url) as first:
        address = (await first.wait_for_line(LISTENING_ONE))[1]
        async with grpc.aio.insecure_channel(address) as channel:
            call = event_stream_service_pb2_grpc.EventStreamServiceStub(channel).SubscribeEvents(
                pb.SubscribeEventsRequest()
            )
            responses = [await call.read()]
            stop = asyncio.Event()
            async with writing(address, stop):
                async with asyncio.timeout(20):
                    while sum(1 for r in responses if r.events) < 5:
                        responses.append(await call.read())
                # Between two responses: the consumer has these, the server dies.
                first.process.kill()
                await first.process.wait()
                stop.set()
    seen = [e.event.event_id for r in responses for e in r.events]
    last, before_last = responses[-1], responses[-2]

    async with cli("--listen", "127.0.0.1:0", "--database-url", database_url) as second:
        address = (await second.wait_for_line(LISTENING_ONE))[1]
        async with InteractionsClient(address) as client:
            # More events after the restart, then the resumed streams.
            assert (await client.log_many(events_of([f"v{j}" for j in range(30)]))).accepted == 30
            expected = await log_order(database_url)
            for cursor, repeated in ((last.cursor, []), (before_last.cursor, [e.event.event_id for e in last.events])):
                resumed: list[str] = []
                subscription = client.subscribe(cursor=cursor)
                async with asyncio.timeout(20):
                    async for batch in subscription:
                        resumed += [e.event.event_id for e in batch.events]
                        if len(seen) - len(repeated) + len(resumed) >= len(expected):
                            break
                # Nothing lost; nothing twice, but the last response when resumed from the one before.
                assert resumed[: len(repeated)] == repeated
                assert seen + resumed[len(repeated) :] == expected
        second.process.send_signal(signal.SIGTERM)
        assert await second.finish() == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from /proc")
async def test_a_killed_worker_s_subscription_resumes_by_itself_on_a_live_one(database_url: str) -> None:
    async with cli("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url) as server:
        address = (await server.wait_for_line(LISTENING))[1]
        for worker in (1, 2):
            await logged(server, rf"worker {worker} \(pid \d+\) serving on")
        async with InteractionsClient(address, options=OWN_CONNECTION) as client:
            subscription = client.subscribe()
            batches = aiter(subscription)
            await anext(batches)
            pids = worker_pids(server)
            (victim,) = connection_owners(int(address.rsplit(":", 1)[1]), set(pids.values()))
            received: list[str] = []
            stop = asyncio.Event()
            async with writing(address, stop) as acknowledged:
                async with asyncio.timeout(30):
                    while len(received) < 200:
                        received += [e.event.event_id for e in (await anext(batches)).events]
                    os.kill(victim, signal.SIGKILL)
                    killed_at = len(received)
                    while subscription.resumes == 0 or len(received) < killed_at + 200:
                        received += [e.event.event_id for e in (await anext(batches)).events]
            await logged(server, rf"\(pid {victim}\) exited with status -9; restarting it")
            expected = await log_order(database_url)
            async with asyncio.timeout(20):
                while len(received) < len(expected):
                    received += [e.event.event_id for e in (await anext(batches)).events]
            assert subscription.resumes >= 1
            assert received == expected  # nothing lost, nothing twice, in stream order
            assert set(acknowledged) <= set(received)
            subscription.close()
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)
