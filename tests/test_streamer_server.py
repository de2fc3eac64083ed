"""The streamer's promise against the real server and PostgreSQL: a 50,000-event
stream survives an abrupt server restart in the middle, and afterwards the log
holds every event exactly once and the state tables equal the fold."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import asyncpg

from interactions_client.client import InteractionsClient
from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App

StartServer = Callable[..., Awaitable[App]]  # the `start_server` fixture of conftest.py
BASE = datetime(2026, 2, 1, tzinfo=UTC)
NAMES = {rule.event_type: name for name, rule in STANDARD.items()}


def random_events(count: int, seed: int = 7) -> list[Event]:
    """Cart, wishlist, purchase and view events of 300 users, in time order."""
    rng = random.Random(seed)
    kinds: list[tuple[str, Callable[[], int | None]]] = [
        ("add_to_cart", lambda: rng.randint(1, 3)),
        ("remove_from_cart", lambda: rng.randint(0, 2)),
        ("update_cart_quantity", lambda: rng.randint(0, 5)),
        ("wishlist", lambda: rng.randint(0, 1)),
        ("purchase", lambda: None),
        ("view", lambda: None),
    ]
    events = []
    for i in range(count):
        name, value = rng.choice(kinds)
        event = Event(
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            event_type=cast(EventType.ValueType, STANDARD[name].event_type),
            user_id=f"user{rng.randrange(300)}",
            product_id=f"p{rng.randrange(8)}",
        )
        event.occurred_at.FromDatetime(BASE + timedelta(milliseconds=i))
        if (v := value()) is not None:
            event.event_value = v
        events.append(event)
    return events


@dataclass
class Fold:
    cart: dict[tuple[str, str], tuple[int, datetime]] = field(default_factory=dict)
    wishlist: dict[tuple[str, str], datetime] = field(default_factory=dict)
    purchases: set[tuple[str, str, str]] = field(default_factory=set)


def fold(events: Iterable[Event]) -> Fold:
    """The state the events mean, applied in (occurred_at, event_id) order."""
    out = Fold()
    for e in sorted(events, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id)):
        key, at, name, v = (
            (e.user_id, e.product_id),
            e.occurred_at.ToDatetime(tzinfo=UTC),
            NAMES[e.event_type],
            e.event_value,
        )
        quantity = out.cart.get(key, (0, at))[0]
        if name == "add_to_cart":
            out.cart[key] = (quantity + v, at)
        elif name == "remove_from_cart":
            out.cart[key] = (0 if v == 0 else max(quantity - v, 0), at)
        elif name == "update_cart_quantity":
            out.cart[key] = (v, at)
        elif name == "wishlist" and v == 1:
            out.wishlist.setdefault(key, at)
        elif name == "wishlist":
            out.wishlist.pop(key, None)
        elif name == "purchase":
            out.purchases.add((e.user_id, e.event_id, e.product_id))
    out.cart = {k: qa for k, qa in out.cart.items() if qa[0] > 0}
    return out


async def stored_state(pool: asyncpg.Pool) -> Fold:
    cart = await pool.fetch("SELECT user_id, product_id, quantity, updated_at FROM user_cart")
    wishlist = await pool.fetch("SELECT user_id, product_id, added_at FROM user_wishlist")
    purchases = await pool.fetch("SELECT user_id, event_id::text, product_id FROM purchase_history")
    return Fold(
        cart={(r["user_id"], r["product_id"]): (r["quantity"], r["updated_at"]) for r in cart},
        wishlist={(r["user_id"], r["product_id"]): r["added_at"] for r in wishlist},
        purchases={(r["user_id"], r["event_id"], r["product_id"]) for r in purchases},
    )


async def test_stream_survives_an_abrupt_server_restart(server: App, start_server: StartServer) -> None:
    events = random_events(50_000)
    apps = [server]

    async def restart() -> None:
        await apps[0].stop(0)  # no grace: in-flight calls are cut off, acknowledgements lost
        apps.append(await start_server(listen=f"127.0.0.1:{server.port}"))

    async with InteractionsClient(server.address) as client, client.stream() as stream:
        restarting: asyncio.Task[None] | None = None
        for i, event in enumerate(events):
            await stream.send(event)
            if i == 20_000:
                restarting = asyncio.create_task(restart())
        assert restarting is not None
        await restarting
    totals = stream.totals
    assert (totals.sent, totals.failed, totals.rejected) == (50_000, 0, 0)
    assert totals.accepted + totals.duplicate == 50_000
    assert totals.reconnects >= 1 and totals.resent > 0

    pool = apps[-1].pool
    logged = await pool.fetch("SELECT user_id, event_id::text FROM events")
    assert len(logged) == 50_000
    assert {(r["user_id"], r["event_id"]) for r in logged} == {(e.user_id, e.event_id) for e in events}
    assert await stored_state(pool) == fold(events)
