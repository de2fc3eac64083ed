"""The write path through the real server: every sync rule, duplicates,
partitions, and group commit of concurrent unary calls."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from interactions_client.rules import STANDARD
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.server import App
from tests.events import valid_event
from tests.support import eventually, field_violations

NOW = datetime.now(UTC).replace(microsecond=0)


def event(name: str, product: str | None = "p1", value: int | None = None, *, at: int = 0, user: str = "u1") -> Event:
    """An event `at` seconds after a fixed recent time."""
    if not STANDARD[name].product_allowed:
        product = None
    e = valid_event(STANDARD[name].event_type, user_id=user, product_id=product)
    if value is not None:
        e.event_value = value
    e.occurred_at.FromDatetime(NOW - timedelta(hours=1) + timedelta(seconds=at))
    return e


async def log(stub: InteractionServiceStub, *events: Event) -> pb.LogEventsResponse:
    response: pb.LogEventsResponse = await stub.LogEvents(pb.LogEventsRequest(events=events))
    assert not response.rejected, response.rejected
    return response


async def cart(stub: UserStateServiceStub, user: str = "u1") -> dict[str, int]:
    response = await stub.GetCart(state_pb.GetCartRequest(user_id=user))
    return {item.product_id: item.quantity for item in response.items}


async def wishlist(stub: UserStateServiceStub, user: str = "u1") -> list[str]:
    response = await stub.GetWishlist(state_pb.GetWishlistRequest(user_id=user))
    return [item.product_id for item in response.items]


async def test_add_to_cart_adds_its_quantity(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    await log(interaction_stub, event("add_to_cart", value=2, at=1), event("add_to_cart", value=3, at=2))
    await log(interaction_stub, event("add_to_cart", "p2", at=3))  # no value: the default, 1
    assert await cart(user_state_stub) == {"p1": 5, "p2": 1}


async def test_remove_from_cart_subtracts_never_below_zero_and_zero_removes_the_line(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    await log(interaction_stub, event("add_to_cart", "p1", 5, at=1), event("add_to_cart", "p2", 5, at=1))
    await log(interaction_stub, event("add_to_cart", "p3", 2, at=1))
    await log(interaction_stub, event("remove_from_cart", "p1", 2, at=2))
    await log(interaction_stub, event("remove_from_cart", "p2", 0, at=2))  # 0 = remove all
    await log(interaction_stub, event("remove_from_cart", "p3", 9, at=2))  # floors at 0
    await log(interaction_stub, event("remove_from_cart", "p4", 1, at=2))  # nothing to remove
    assert await cart(user_state_stub) == {"p1": 3}


async def test_update_cart_quantity_sets_and_zero_deletes(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    await log(interaction_stub, event("add_to_cart", "p1", 5, at=1), event("add_to_cart", "p2", 5, at=1))
    await log(interaction_stub, event("update_cart_quantity", "p1", 2, at=2))
    await log(interaction_stub, event("update_cart_quantity", "p2", 0, at=2))
    await log(interaction_stub, event("update_cart_quantity", "p3", 7, at=2))
    assert await cart(user_state_stub) == {"p1": 2, "p3": 7}
    rows = await server.pool.fetch("SELECT product_id FROM user_cart WHERE user_id = 'u1' ORDER BY 1")
    assert [r[0] for r in rows] == ["p1", "p3"]


async def test_cart_updated_at_is_the_last_event_time(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    later = event("add_to_cart", value=1, at=20)
    await log(interaction_stub, event("add_to_cart", value=1, at=10), later)
    [item] = (await user_state_stub.GetCart(state_pb.GetCartRequest(user_id="u1"))).items
    assert item.updated_at == later.occurred_at


async def test_purchase_appends_to_history(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    first, second = event("purchase", "p1", at=1), event("purchase", "p1", at=2)
    await log(interaction_stub, first, second, event("purchase", "p2", at=3))
    response = await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="u1"))
    assert [(p.product_id, p.event_id) for p in response.purchases][1:] == [
        ("p1", second.event_id),
        ("p1", first.event_id),
    ]
    assert len(response.purchases) == 3


async def test_wishlist_one_adds_and_zero_removes(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    await log(interaction_stub, event("wishlist", "p1", 1, at=1), event("wishlist", "p2", 1, at=1))
    await log(interaction_stub, event("wishlist", "p1", 0, at=2), event("wishlist", "p3", 0, at=2))
    assert await wishlist(user_state_stub) == ["p2"]


async def test_re_adding_keeps_the_first_added_at(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    first = event("wishlist", "p1", 1, at=1)
    await log(interaction_stub, first, event("wishlist", "p1", 1, at=5))
    [item] = (await user_state_stub.GetWishlist(state_pb.GetWishlistRequest(user_id="u1"))).items
    assert item.added_at == first.occurred_at


@pytest.mark.parametrize("name", [n for n, rule in STANDARD.items() if not rule.syncs])
async def test_other_types_sync_nothing(name: str, interaction_stub: InteractionServiceStub, server: App) -> None:
    response = await log(interaction_stub, event(name))
    assert response.accepted_count == 1
    for table in ("user_cart", "user_wishlist", "purchase_history", "cart_lines", "wishlist_lines"):
        assert await server.pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert await server.pool.fetchval("SELECT event_type FROM events") == name


async def test_custom_events_are_stored_by_their_name(interaction_stub: InteractionServiceStub, server: App) -> None:
    e = valid_event(STANDARD["view"].event_type)
    e.event_type = 19  # EVENT_TYPE_CUSTOM
    e.custom_type = "gift_card_redeemed"
    await log(interaction_stub, e)
    assert await server.pool.fetchval("SELECT event_type FROM events") == "gift_card_redeemed"


async def test_the_log_row_holds_every_field(interaction_stub: InteractionServiceStub, server: App) -> None:
    e = event("search", "p9", at=3)
    e.session_id = "s1"
    e.attributes["source"] = "app"
    await log(interaction_stub, e)
    row = await server.pool.fetchrow("SELECT * FROM events")
    assert (row["user_id"], str(row["event_id"]), row["event_type"]) == ("u1", e.event_id, "search")
    assert (row["session_id"], row["product_id"], row["event_value"]) == ("s1", "p9", 1)
    assert row["occurred_at"] == e.occurred_at.ToDatetime(tzinfo=UTC)
    assert row["details"] == '{"search": {"query": "laptop"}}'
    assert row["attributes"] == '{"source": "app"}'
    assert row["received_at"] is not None


async def test_an_optional_detail_is_stored_only_when_set(
    interaction_stub: InteractionServiceStub, server: App
) -> None:
    with_count = event("search", "p9", at=1)
    with_count.search.result_count = 0  # set, even to zero: the search reported no results
    await log(interaction_stub, with_count, event("search", "p9", at=2))
    details = await server.pool.fetch("SELECT details FROM events ORDER BY occurred_at")
    assert [r["details"] for r in details] == [
        '{"search": {"query": "laptop", "result_count": 0}}',
        '{"search": {"query": "laptop"}}',
    ]


async def test_duplicates_within_and_across_batches_apply_once(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    add = event("add_to_cart", value=2, at=1)
    first = await log(interaction_stub, add, add, event("purchase", at=2))
    assert (first.accepted_count, first.duplicate_count) == (2, 1)
    again = await log(interaction_stub, add)
    assert (again.accepted_count, again.duplicate_count) == (0, 1)
    single = await interaction_stub.LogEvent(pb.LogEventRequest(event=add))
    assert single.duplicate
    assert await cart(user_state_stub) == {"p1": 2}
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 2


async def test_a_resend_without_occurred_at_is_still_a_duplicate(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    add = event("add_to_cart", value=2)
    add.ClearField("occurred_at")  # the server stamps its receive time, different on the resend
    assert not (await interaction_stub.LogEvent(pb.LogEventRequest(event=add))).duplicate
    await asyncio.sleep(0.01)
    assert (await interaction_stub.LogEvent(pb.LogEventRequest(event=add))).duplicate
    assert await cart(user_state_stub) == {"p1": 2}
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 1


async def test_the_same_event_id_with_another_time_is_a_conflict_not_a_second_copy(
    interaction_stub: InteractionServiceStub, server: App
) -> None:
    first = event("add_to_cart", value=2, at=1)
    moved = Event()
    moved.CopyFrom(first)
    moved.occurred_at.FromDatetime(datetime(2020, 5, 1, tzinfo=UTC))  # another month, another partition
    await log(interaction_stub, first)
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[moved]))
    assert (response.duplicate_count, [r.violations[0].field for r in response.rejected]) == (0, ["event_id"])
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 1


async def test_events_land_in_monthly_partitions_and_retention_drops_old_months(
    interaction_stub: InteractionServiceStub, server: App
) -> None:
    old = valid_event(STANDARD["view"].event_type)
    old.occurred_at.FromDatetime(datetime(2020, 3, 15, tzinfo=UTC))
    current = event("view")
    await log(interaction_stub, old, current)
    partitions = await server.pool.fetch("SELECT tableoid::regclass::text AS p FROM events ORDER BY occurred_at")
    # On Citus (tests/citus) a row's table is a shard of its partition: events_2026_12_102017.
    names = [re.sub(r"_\d{6,}$", "", r["p"]) for r in partitions]
    assert names == ["events_default", f"events_{current.occurred_at.ToDatetime():%Y_%m}"]

    # Resending into a partitioned log is still deduplicated.
    assert (await log(interaction_stub, old, current)).duplicate_count == 2

    async with server.pool.acquire() as conn:
        await conn.execute("SELECT ensure_event_partitions('2020-01-01', '2020-02-01')")
        dropped = await conn.fetch("SELECT * FROM drop_event_partitions_before('2020-03-01')")
    assert [r[0] for r in dropped] == ["events_2020_01", "events_2020_02"]
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 2
    # Retention by whole months: dropping April forgets the March event and its key.
    await server.pool.execute("SELECT drop_event_partitions_before('2020-04-10')")
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 1
    assert await server.pool.fetchval("SELECT count(*) FROM event_keys") == 1


async def test_concurrent_unary_calls_share_commits_and_get_their_own_results(
    interaction_stub: InteractionServiceStub, server: App
) -> None:
    good = [event("add_to_cart", f"p{i}", 1, at=i) for i in range(60)]
    bad = event("review", value=9)
    duplicate = good[0]
    calls = [interaction_stub.LogEvent(pb.LogEventRequest(event=e)) for e in [*good, bad, duplicate]]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    *good_outcomes, bad_outcome, duplicate_outcome = outcomes
    assert all(isinstance(o, pb.LogEventResponse) for o in good_outcomes)
    assert [o.event_id for o in good_outcomes] == [e.event_id for e in good]  # type: ignore[union-attr]
    assert isinstance(bad_outcome, grpc.aio.AioRpcError)
    assert bad_outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(bad_outcome)) == ["event.event_value"]
    assert isinstance(duplicate_outcome, pb.LogEventResponse)
    assert [o.duplicate for o in good_outcomes].count(True) + duplicate_outcome.duplicate == 1  # type: ignore[union-attr]
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 60
    # 62 calls in far fewer transactions: the commits were shared.
    commits = await server.pool.fetchval("SELECT count(DISTINCT xmin::text) FROM events")
    assert commits < 60


async def test_state_of_one_user_stays_consistent_under_concurrent_batches(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    # Many small concurrent batches of the same hot user and products: no
    # deadlock, no lost update.
    batches = [[event("add_to_cart", f"p{(b + i) % 3}", 1, at=b * 10 + i) for i in range(5)] for b in range(40)]
    responses = await asyncio.gather(*(log(interaction_stub, *batch) for batch in batches))
    assert sum(r.accepted_count for r in responses) == 200
    assert sum((await cart(user_state_stub)).values()) == 200


async def test_ids_are_compared_case_insensitively(interaction_stub: InteractionServiceStub) -> None:
    e = event("view")
    e.event_id = str(uuid.uuid4()).upper()
    await log(interaction_stub, e)
    e.event_id = e.event_id.lower()
    assert (await log(interaction_stub, e)).duplicate_count == 1


async def test_a_batch_waiting_for_a_state_keys_lock_folds_onto_what_its_holder_committed(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, database_url: str
) -> None:
    """The insert statement takes the state keys' locks, and the lines are read
    by a later statement: a batch that waited for another transaction's lock
    folds onto the line that transaction committed (no lost update)."""
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(7301, hashtext('u1/p1'))")
            write = asyncio.create_task(log(interaction_stub, event("add_to_cart", "p1", 2, at=5)))
            await eventually(lambda: waiting_for_key_lock(holder))
            assert not write.done()
            # What another batch's sync of an earlier event of the key would commit.
            await holder.execute(
                "INSERT INTO cart_lines VALUES ('u1', 'p1', 10, $1, $2)", NOW - timedelta(hours=2), uuid.uuid4()
            )
        assert (await write).accepted_count == 1
    finally:
        await holder.close()
    assert await cart(user_state_stub) == {"p1": 12}


async def waiting_for_key_lock(connection: asyncpg.Connection) -> bool:
    waiting: int = await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7301"
        " AND objid::int4 = hashtext('u1/p1') AND NOT granted"
    )
    return waiting > 0
