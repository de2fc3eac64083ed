"""Several server processes against one database keep every invariant.

Three `interactions-server` processes stream events of the same users at the
same time, each event sent through two different servers (a client that
failed over and resent), in different orders; the log holds each event once
and the state tables equal the fold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from datetime import UTC, datetime, timedelta

import grpc

from interactions_client.rules import STANDARD
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.ledger import check_state_is_the_fold, read_log
from tests.support import cli

SERVERS = 3
USERS = [f"mp-{i}" for i in range(4)]  # few users, so servers contend on the same state rows
PRODUCTS = [f"p{i}" for i in range(5)]
TYPES = ["add_to_cart", "add_to_cart", "remove_from_cart", "update_cart_quantity", "wishlist", "purchase", "view"]


def make_events(count: int, rnd: random.Random) -> list[Event]:
    base = datetime.now(UTC) - timedelta(hours=1)
    events = []
    for _ in range(count):
        name = rnd.choice(TYPES)
        value = {"add_to_cart": rnd.randint(1, 3), "remove_from_cart": rnd.randint(0, 2)}.get(name, 1)
        if name == "update_cart_quantity":
            value = rnd.randint(0, 4)
        elif name == "wishlist":
            value = rnd.randint(0, 1)
        event = Event(
            event_id=str(uuid.uuid4()),
            event_type=STANDARD[name].event_type,
            user_id=rnd.choice(USERS),
            product_id=rnd.choice(PRODUCTS),
            event_value=value,
        )
        event.occurred_at.FromDatetime(base + timedelta(milliseconds=rnd.randint(0, 600_000)))
        events.append(event)
    return events


async def stream(address: str, events: list[Event], batch: int) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = InteractionServiceStub(channel)
        requests = [
            pb.StreamEventsRequest(sequence=i, events=events[start : start + batch])
            for i, start in enumerate(range(0, len(events), batch))
        ]
        accepted = duplicate = 0
        async for response in stub.StreamEvents(iter(requests), timeout=120):
            assert not response.rejected
            accepted += response.accepted_count
            duplicate += response.duplicate_count
        return accepted, duplicate


async def test_three_server_processes_keep_state_equal_to_the_fold(database_url: str) -> None:
    rnd = random.Random(7)
    events = make_events(3_000, rnd)
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(cli("--listen", "127.0.0.1:0", "--database-url", database_url))
            for _ in range(SERVERS)
        ]
        addresses = [(await s.wait_for_line(r"listening on (127\.0\.0\.1:\d+)"))[1] for s in servers]
        # Each server gets two thirds of the events in its own order: every
        # event goes through two servers.
        work = []
        for i, address in enumerate(addresses):
            mine = [e for j, e in enumerate(events) if j % SERVERS != i]
            rnd.shuffle(mine)
            work.append(stream(address, mine, batch=rnd.choice([7, 50, 200])))
        results = await asyncio.gather(*work)
        for server in servers:
            server.process.terminate()
            assert await server.finish() == 0, "".join(server.log)

    assert sum(a for a, _ in results) == len(events)
    assert sum(d for _, d in results) == len(events)
    assert len(await read_log(database_url)) == len(events)
    await check_state_is_the_fold(database_url, events)
