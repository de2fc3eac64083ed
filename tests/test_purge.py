"""AdminService.PurgeEvents against the real server and database: an empty
filter refused, every bad field named, the count without force equal to
the removal, filters combined (types, custom types, time, users), dedup keys
going with the events, the state untouched and a late event afterwards
folded as if nothing had been removed, the audit record, the log line
without ids, a purge racing ingest of the same users, and `interactions purge`."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from interactions_client import InteractionsClient
from interactions_client.v1 import admin_service_pb2 as apb
from interactions_client.v1.admin_service_pb2_grpc import AdminServiceStub
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server import storage
from interactions_server.server import App
from tests.support import StartServer, field_violations
from tests.test_cli import cli as client_cli
from tests.test_retention import d, ev, keys, log, logged, state

T = EventType
JAN, FEB, MAR = d("2026-01-15T00:00:00"), d("2026-02-15T00:00:00"), d("2026-03-15T00:00:00")


def custom(moment: datetime, name: str, user: str = "u1") -> Event:
    return ev(T.EVENT_TYPE_CUSTOM, moment, user=user, custom_type=name)


def sample() -> list[Event]:
    """Three users, several types, custom types, three months."""
    out: list[Event] = []
    for user in ("u1", "u2", "bot"):
        for moment in (JAN, FEB, MAR):
            out += [
                ev(T.EVENT_TYPE_VIEW, moment, user=user),
                ev(T.EVENT_TYPE_PAGE_VIEW, moment, user=user),
                ev(T.EVENT_TYPE_ADD_TO_CART, moment, user=user, product_id="p1"),
                custom(moment, "gift_card_redeemed", user),
                custom(moment, "test_ping", user),
            ]
    return out


async def purge(server: App, *, force: bool, **filters: object) -> tuple[int, int]:
    async with InteractionsClient(server.address, deadline=60) as client:
        response = await client.purge_events(force=force, **filters)  # type: ignore[arg-type]
    return response.events, response.users


async def expect_purge(server: App, events: list[Event], matches: list[Event], **filters: object) -> None:
    """The count equals the removal; exactly `matches` go, with their keys."""
    users = len({e.user_id for e in matches})
    assert await purge(server, force=False, **filters) == (len(matches), users), filters
    assert await logged(server.pool) == {e.event_id for e in events}  # counting removes nothing
    assert await purge(server, force=True, **filters) == (len(matches), users), filters
    left = {e.event_id for e in events} - {e.event_id for e in matches}
    assert await logged(server.pool) == left and await keys(server.pool) == left


async def test_an_empty_filter_is_refused(server: App, channel: grpc.aio.Channel) -> None:
    events = sample()
    await log(server, events)
    for force in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await AdminServiceStub(channel).PurgeEvents(apb.PurgeEventsRequest(force=force))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (description,) = field_violations(refused.value).values()
        assert "set at least one of event_types, custom_types, start_time, end_time, user_ids" in description
    assert len(await logged(server.pool)) == len(events)


@pytest.mark.parametrize(
    ("request_fields", "field", "text"),
    [
        ({"event_types": [0]}, "event_types[0]", "0 is not a known event type"),
        ({"event_types": [T.EVENT_TYPE_VIEW, 999]}, "event_types[1]", "999 is not a known event type"),
        ({"custom_types": ["Gift Card"]}, "custom_types[0]", "lower snake case"),
        ({"custom_types": ["view"]}, "custom_types[0]", "is a standard type"),
        ({"user_ids": ["u1", ""]}, "user_ids[1]", "is required"),
        ({"user_ids": ["u" * 129]}, "user_ids[0]", "129 characters long"),
        ({"user_ids": [f"u{i}" for i in range(10_001)]}, "user_ids", "at most 10,000"),
        ({"start_time": {"seconds": 2_000_000_000}, "end_time": {"seconds": 1}}, "start_time", "after end_time"),
        ({"end_time": {"seconds": 253_402_300_800}}, "end_time", "not a valid timestamp"),
    ],
)
async def test_every_bad_field_is_named(
    server: App, channel: grpc.aio.Channel, request_fields: dict[str, object], field: str, text: str
) -> None:
    await log(server, sample())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await AdminServiceStub(channel).PurgeEvents(apb.PurgeEventsRequest(force=True, **request_fields))  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(refused.value)
    assert list(violations) == [field] and text in violations[field]
    assert len(await logged(server.pool)) == len(sample())


async def test_filters_alone_and_combined(server: App) -> None:
    events = sample()
    await log(server, events)
    remaining = list(events)

    async def step(matches: list[Event], **filters: object) -> None:
        nonlocal remaining
        await expect_purge(server, remaining, matches, **filters)
        remaining = [e for e in remaining if e not in matches]

    # One type, one custom type, every custom type; a time window; users: and all combined.
    bot_feb_views = [
        e
        for e in remaining
        if e.user_id == "bot" and e.event_type == T.EVENT_TYPE_VIEW and e.occurred_at.ToDatetime(UTC) == FEB
    ]
    await step(bot_feb_views, event_types=["view"], user_ids=["bot"], start_time=FEB, end_time=MAR)
    pings = [e for e in remaining if e.custom_type == "test_ping" and e.occurred_at.ToDatetime(UTC) < FEB]
    await step(pings, custom_types=["test_ping"], end_time=FEB)
    january_customs_or_page_views = [
        e for e in remaining
        if e.occurred_at.ToDatetime(UTC) < FEB and e.event_type in (T.EVENT_TYPE_CUSTOM, T.EVENT_TYPE_PAGE_VIEW)
    ]  # fmt: skip
    await step(january_customs_or_page_views, event_types=["custom", "page_view"], end_time=FEB)
    march = [e for e in remaining if e.occurred_at.ToDatetime(UTC) >= MAR]
    await step(march, start_time=MAR)
    u2 = [e for e in remaining if e.user_id == "u2"]
    await step(u2, user_ids=["u2", "nobody"])
    empty: list[Event] = []
    await step(empty, start_time=JAN, end_time=JAN)  # an empty window
    assert remaining and len(await logged(server.pool)) == len(remaining)


async def test_the_state_is_unchanged_and_a_late_event_folds_as_if_nothing_had_been_removed(server: App) -> None:
    cart = [
        ev(T.EVENT_TYPE_ADD_TO_CART, JAN, product_id="p1", event_value=5),
        ev(T.EVENT_TYPE_WISHLIST, JAN, product_id="p2", event_value=1),
        ev(T.EVENT_TYPE_PURCHASE, JAN, product_id="p3"),
        ev(T.EVENT_TYPE_ADD_TO_CART, MAR, product_id="p1", event_value=1),
    ]
    await log(server, cart)
    before = await state(server.pool)
    assert await purge(server, force=True, user_ids=["u1"]) == (4, 1)
    assert await state(server.pool) == before
    await log(server, [ev(T.EVENT_TYPE_ADD_TO_CART, FEB, product_id="p1", event_value=2)])  # late: between the two
    async with InteractionsClient(server.address) as client:
        assert [(i.product_id, i.quantity) for i in await client.get_cart("u1")] == [("p1", 8)]
        assert [i.product_id for i in await client.get_wishlist("u1")] == ["p2"]
        assert [p.product_id async for p in client.list_purchases("u1")] == ["p3"]
        # A resend of a purged event is accepted again, and not folded twice.
        assert (await client.log_many(cart)).accepted == 4
        assert [(i.product_id, i.quantity) for i in await client.get_cart("u1")] == [("p1", 8)]
        assert len([p async for p in client.list_purchases("u1")]) == 1


async def test_a_deleted_users_replays_stay_refused(server: App) -> None:
    old = ev(T.EVENT_TYPE_VIEW, JAN, user="gone")
    await log(server, [old])
    async with InteractionsClient(server.address) as client:
        await client.delete_user_data("gone")
        await client.log_many([ev(T.EVENT_TYPE_VIEW, datetime.now(UTC), user="gone")])  # new activity
        assert (await client.purge_events(user_ids=["gone"], force=True)).events == 1
        result = await client.log_many([old])
    assert result.accepted == 0 and [r.violations[0].field for r in result.rejected] == ["user_id"]


async def test_a_purge_is_audited_and_logged_without_ids(server: App, caplog: pytest.LogCaptureFixture) -> None:
    user = "LEAKCHECK-user"
    await log(server, [ev(T.EVENT_TYPE_VIEW, JAN, user=user), ev(T.EVENT_TYPE_PAGE_VIEW, JAN, user=user)])
    with caplog.at_level(logging.INFO):
        assert await purge(server, force=True, user_ids=[user], event_types=["view"]) == (1, 1)
    (record,) = await storage.audit_records(server.pool, action=storage.PURGE_EVENTS)
    assert record.actor == "unauthenticated"
    keyring = await storage.load_keyring(server.pool)
    assert record.subject == keyring.subject_hash(user)
    assert record.detail["filter"]["user_hashes"] == [keyring.subject_hash(user).digest.hex()]
    assert record.counts == {"events": 1, "partitions": 0, "users": 1}
    assert record.detail["removed_by_type"] == {"view": 1} and record.detail["finished"] is True
    assert record.detail["filter"]["event_types"] == ["view"] and record.detail["filter"]["users"] == 1
    assert "LEAKCHECK" not in await server.pool.fetchval("SELECT audit_log::text FROM audit_log")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "interactions_server.admin"]
    assert line == f"purged 1 events of 1 users (audit_log record {record.id}) at the request of unauthenticated"
    assert not [r for r in caplog.records if "LEAKCHECK" in r.getMessage()]
    # Counting writes no record.
    await purge(server, force=False, user_ids=[user])
    assert len(await storage.audit_records(server.pool, action=storage.PURGE_EVENTS)) == 1


async def test_a_purge_racing_ingest_of_the_same_users(start_server: StartServer, database_url: str) -> None:
    """Every acknowledged event is either removed (counted once) or still
    logged with its key; no key without its event, none folded twice."""
    server = await start_server(removal_batch_rows=50)  # many small batches, interleaved with the writes
    users = [f"r{i}" for i in range(5)]
    base = datetime.now(UTC) - timedelta(days=3)
    batches = [
        [
            ev(T.EVENT_TYPE_ADD_TO_CART, base + timedelta(seconds=b * 100 + i), user=users[i % 5], product_id="p1")
            for i in range(100)
        ]
        for b in range(20)
    ]
    await log(server, batches[0])
    removed = 0

    async def ingest() -> None:
        async with InteractionsClient(server.address) as client:
            for batch in batches[1:]:
                assert (await client.log_many(batch)).accepted == len(batch)

    async def purging() -> None:
        nonlocal removed
        for _ in range(3):
            removed += (await purge(server, force=True, user_ids=users, event_types=["add_to_cart"]))[0]

    await asyncio.gather(ingest(), purging())
    sent = {e.event_id for batch in batches for e in batch}
    left = await logged(server.pool)
    assert removed + len(left) == len(sent) and left <= sent
    assert await keys(server.pool) == left
    async with InteractionsClient(server.address) as client:  # the state saw every event once
        quantities = {u: [i.quantity for i in await client.get_cart(u)] for u in users}
    assert quantities == {u: [len(sent) // 5] for u in users}
    # And after the race, a purge removes what is left.
    assert (await purge(server, force=True, user_ids=users))[0] == len(left)


# --- the command ---------------------------------------------------------------------------------


async def test_the_purge_command_counts_then_removes(server: App) -> None:
    events = sample()
    await log(server, events)
    common = ("--target", server.address, "purge", "--type", "page_view", "--before", "2026-02-01")
    run = await client_cli(*common)
    assert run.status == 0, run.stderr
    assert "would remove 3 events of 3 users" in run.stdout and "--force" in run.stdout
    assert len(await logged(server.pool)) == len(events)
    run = await client_cli(*common, "--force", "--json")
    assert run.status == 0, run.stderr
    assert json.loads(run.stdout) == {"events": 3, "users": 3, "removed": True}
    assert len(await logged(server.pool)) == len(events) - 3
    run = await client_cli(
        "--target", server.address, "purge", "--user", "u1", "--custom-type", "test_ping", "--since", "2026-03-01",
        "--force",
    )  # fmt: skip
    assert (run.status, run.stdout.strip()) == (0, "removed 1 events of 1 users")


async def test_the_purge_command_refuses_an_empty_filter(server: App) -> None:
    run = await client_cli("--target", server.address, "purge", "--force")
    assert run.status == 2 and "give at least one filter" in run.stderr and "Traceback" not in run.stderr


async def test_an_unknown_type_is_a_usage_error(server: App) -> None:
    run = await client_cli("--target", server.address, "purge", "--type", "pageview")
    assert run.status == 2 and "pageview" in run.stderr


async def test_a_linked_id_names_its_person(server: App) -> None:
    """A linked guest's rows live under the person: purging by either id finds them."""
    guest = [ev(T.EVENT_TYPE_PAGE_VIEW, JAN, user="cookie-9"), ev(T.EVENT_TYPE_VIEW, JAN, user="cookie-9")]
    await log(server, [*guest, ev(T.EVENT_TYPE_PAGE_VIEW, FEB, user="frank")])
    async with InteractionsClient(server.address) as client:
        await client.link_identity("cookie-9", "frank")
    assert await purge(server, force=False, user_ids=["cookie-9"], event_types=["page_view"]) == (2, 1)
    assert await purge(server, force=True, user_ids=["cookie-9", "frank"], event_types=["page_view"]) == (2, 1)
    assert await logged(server.pool) == {guest[1].event_id}
