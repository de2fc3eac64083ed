"""Both clients against the real server and PostgreSQL: every typed method
ends in the right `events` row and the right state; log_many, reads, paging,
errors and health."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interactions_client.client import InteractionsClient
from interactions_client.errors import InvalidEventError
from interactions_client.rules import STANDARD
from interactions_client.sync_client import SyncInteractionsClient
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App
from tests.test_client_events import CASES, Recorder

EVENT_COLUMNS = "event_type, session_id, product_id, event_value, occurred_at, details, attributes"


async def event_row(app: App, user_id: str, event_id: str) -> dict[str, Any]:
    row = await app.pool.fetchrow(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE user_id = $1 AND event_id = $2", user_id, uuid.UUID(event_id)
    )
    assert row is not None, f"event {event_id} of {user_id} is not in the log"
    return dict(row)


def check_row(row: dict[str, Any], method: str, args: tuple[Any, ...], expected: tuple[str, int | None, Any]) -> None:
    type_name, value, details = expected
    rule = STANDARD[type_name]
    assert row["event_type"] == type_name
    assert row["event_value"] == (rule.default_value if value is None else value)
    assert json.loads(row["attributes"]) == {"via": method}
    if rule.session_required:
        assert row["session_id"] == "s1"
    assert (row["product_id"] or None) == (getattr(Recorder(), method)(*args).product_id or None)
    if details is None:
        assert row["details"] is None
    else:
        stored = json.loads(row["details"])[rule.details]
        assert {k: stored[k] for k in details} == details


async def test_every_typed_method_lands_in_the_log(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        for method, args, expected in CASES:
            result = await getattr(client, method)(*args, attributes={"via": method})
            assert not result.duplicate
            check_row(await event_row(server, "u1", result.event_id), method, args, expected)
        custom = await client.custom("u1", "gift_card_redeemed", value=25)
        row = await event_row(server, "u1", custom.event_id)
        assert (row["event_type"], row["event_value"]) == ("gift_card_redeemed", 25)
    count = await server.pool.fetchval("SELECT count(*) FROM events")
    assert count == len(CASES) + 1


async def test_occurred_at_and_event_id_are_kept(server: App) -> None:
    at = datetime(2026, 5, 1, 8, 0, 0, 123_000, tzinfo=UTC)
    event_id = str(uuid.uuid4())
    async with InteractionsClient(server.address) as client:
        first = await client.view("u1", "p1", occurred_at=at, event_id=event_id, session_id="s7")
        again = await client.view("u1", "p1", occurred_at=at, event_id=event_id, session_id="s7")
    assert (first.event_id, first.duplicate, again.duplicate) == (event_id, False, True)
    row = await event_row(server, "u1", event_id)
    assert (row["occurred_at"], row["session_id"]) == (at, "s7")


async def test_state_follows_the_typed_methods(server: App) -> None:
    user = "state-user"
    async with InteractionsClient(server.address) as client:
        await client.add_to_cart(user, "p1", 3)
        await client.add_to_cart(user, "p2")
        await client.add_to_cart(user, "p3", 4)
        await client.remove_from_cart(user, "p1", 1)
        await client.update_cart_quantity(user, "p2", 5)
        last = await client.remove_from_cart(user, "p3", 0)  # 0 removes the line
        await client.cart_add(user, "s1", "p9")  # session-tracker types touch no state
        await client.wishlist_add(user, "w1")
        await client.wishlist_add(user, "w2")
        await client.wishlist_remove(user, "w1")
        await client.session_wishlist_add(user, "s1", "w3")
        bought = [await client.purchase(user, "p1", session_id="s1") for _ in range(2)]

        cart = {i.product_id: i.quantity for i in await client.get_cart(user)}
        wishlist = [i.product_id for i in await client.get_wishlist(user)]
        purchases = [p async for p in client.list_purchases(user)]

    assert cart == {"p1": 2, "p2": 5}
    assert wishlist == ["w2"]
    assert [p.event_id for p in purchases] == [b.event_id for b in reversed(bought)]  # newest first
    assert {(p.product_id, p.session_id) for p in purchases} == {("p1", "s1")}
    in_table = await server.pool.fetch("SELECT product_id, quantity FROM user_cart WHERE user_id = $1", user)
    assert dict((r["product_id"], r["quantity"]) for r in in_table) == cart
    assert last.event_id  # the line removal itself is logged
    assert await server.pool.fetchval("SELECT count(*) FROM user_cart WHERE product_id = 'p3'") == 0


async def test_purchases_are_read_page_by_page(server: App) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    events = [Event(event_type=EventType.EVENT_TYPE_PURCHASE, user_id="buyer", product_id=f"p{i}") for i in range(250)]
    for i, event in enumerate(events):
        event.occurred_at.FromDatetime(base + timedelta(minutes=i))
    async with InteractionsClient(server.address) as client:
        result = await client.log_many(events)
        assert result.accepted == 250
        products = [p.product_id async for p in client.list_purchases("buyer", page_size=100)]
    assert products == [f"p{i}" for i in reversed(range(250))]


async def test_log_many_and_its_rejections(server: App) -> None:
    events = [Event(event_type=EventType.EVENT_TYPE_VIEW, user_id=f"u{i % 13}", product_id="p") for i in range(2_100)]
    events[1_999].event_value = 3
    async with InteractionsClient(server.address, validate=False) as client:
        first = await client.log_many(events)
        assert (first.accepted, first.duplicate) == (2_099, 0)
        assert [(r.index, r.local, r.violations[0].field) for r in first.rejected] == [(1_999, False, "event_value")]
        # The same list again: each copy got its own event_id, so these are new.
        assert (await client.log_many(events)).accepted == 2_099
        with_ids = [
            Event(event_id=str(uuid.uuid4()), event_type=EventType.EVENT_TYPE_VIEW, user_id="x", product_id="p")
            for _ in range(3)
        ]
        assert (await client.log_many(with_ids)).accepted == 3
        assert (await client.log_many(with_ids)).duplicate == 3
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 2 * 2_099 + 3


async def test_server_violations_name_event_fields(server: App) -> None:
    async with InteractionsClient(server.address, validate=False) as client:
        with pytest.raises(InvalidEventError) as caught:
            await client.review("u1", "p1", 7)
    assert not caught.value.local
    assert [v.field for v in caught.value.violations] == ["event_value"]


async def test_health_of_the_real_server(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        assert await client.health()
        assert await client.health("interactions.v1.InteractionService")


async def test_sync_twin_against_the_real_server(server: App) -> None:
    def use() -> list[str]:
        event_ids = []
        with SyncInteractionsClient(server.address) as client:
            for method, args, _ in CASES:
                result = getattr(client, method)(*args, attributes={"via": method})
                assert not result.duplicate
                event_ids.append(result.event_id)
            assert {i.product_id: i.quantity for i in client.get_cart("u1")} == {"p1": 3}  # 2, then 0 (all), then 3
            assert client.get_wishlist("u1") == []  # added, then removed
            assert [p.product_id for p in client.list_purchases("u1")] == ["p1"]
            assert client.health()
            with client.stream(batch_size=50) as stream:
                for i in range(500):
                    stream.send(Event(event_type=EventType.EVENT_TYPE_CLICK, user_id="u2", product_id=f"p{i}"))
            assert (stream.totals.accepted, stream.totals.failed) == (500, 0)
        return event_ids

    event_ids = await asyncio.to_thread(use)
    for (method, args, expected), event_id in zip(CASES, event_ids, strict=True):
        check_row(await event_row(server, "u1", event_id), method, args, expected)
    assert await server.pool.fetchval("SELECT count(*) FROM events WHERE user_id = 'u2'") == 500


def test_client_keepalive_matches_the_server() -> None:
    from interactions_client.channel import KEEPALIVE_OPTIONS
    from interactions_server.rpc import KEEPALIVE_OPTIONS as SERVER_KEEPALIVE

    assert set(KEEPALIVE_OPTIONS) <= set(SERVER_KEEPALIVE)
