"""AdminService.DeleteUserData against the real server and database: counts,
dry run, idempotence, the deletion watermark on every write path (a replay
is refused, new activity accepted), other users untouched, the race with a
concurrent ingest of the same user, and `interactions delete-user`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from interactions_client import InteractionsClient, NotFoundError
from interactions_client.v1 import admin_service_pb2, admin_service_pb2_grpc
from interactions_client.v1 import interaction_service_pb2 as isv
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server import storage as analytics_storage
from interactions_server.server import App
from tests.events import valid_event
from tests.support import eventually, field_violations
from tests.test_cli import cli

TABLES = (
    "events",
    "event_keys",
    "cart_lines",
    "wishlist_lines",
    "purchase_history",
    "state_history",
    "state_segments",
)


def history(user_id: str) -> list[Event]:
    """A user's past: a view, two cart lines (one emptied), a wishlist line, a purchase."""
    past = time.time() - 3600
    events = [
        valid_event(EventType.EVENT_TYPE_VIEW, user_id=user_id),
        valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=user_id, product_id="p1"),
        valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=user_id, product_id="p2"),
        valid_event(EventType.EVENT_TYPE_REMOVE_FROM_CART, user_id=user_id, product_id="p2"),
        valid_event(EventType.EVENT_TYPE_WISHLIST, user_id=user_id, product_id="p3"),
        valid_event(EventType.EVENT_TYPE_PURCHASE, user_id=user_id, product_id="p1"),
    ]
    for i, event in enumerate(events):
        event.occurred_at.FromSeconds(int(past) + i)
    return events


async def rows_by_table(pool: asyncpg.Pool, user_id: str) -> dict[str, int]:
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t} WHERE user_id = $1", user_id) for t in TABLES}


@pytest.fixture
async def histories(server: App) -> dict[str, list[Event]]:
    """u1 and u2 with a history() each, logged."""
    events = {user: history(user) for user in ("u1", "u2")}
    async with InteractionsClient(server.address) as client:
        for logged in events.values():
            assert (await client.log_many(logged)).accepted == 6
    return events


@pytest.fixture
async def admin(server: App, histories: dict[str, list[Event]]) -> AsyncIterator[InteractionsClient]:
    async with InteractionsClient(server.address) as client:
        yield client


async def test_counts_dry_run_deletion_and_idempotence(server: App, admin: InteractionsClient) -> None:
    before = await rows_by_table(server.pool, "u1")
    assert before == {t: n for t, n in zip(TABLES, (6, 6, 2, 1, 1, 4, 0), strict=True)}

    started = datetime.now(UTC)
    dry = await admin.delete_user_data("u1", dry_run=True)
    assert (dry.events_deleted, dry.cart_lines_deleted, dry.wishlist_lines_deleted, dry.purchases_deleted) == (
        6,
        2,
        1,
        1,
    )
    assert dry.deleted_through.ToDatetime(UTC) >= started
    assert await rows_by_table(server.pool, "u1") == before  # a dry run deletes nothing
    assert await server.pool.fetchval("SELECT count(*) FROM user_deletions") == 0

    done = await admin.delete_user_data("u1")
    assert (done.events_deleted, done.cart_lines_deleted, done.wishlist_lines_deleted, done.purchases_deleted) == (
        6,
        2,
        1,
        1,
    )
    assert done.deleted_through.ToDatetime(UTC) >= dry.deleted_through.ToDatetime(UTC)
    assert await rows_by_table(server.pool, "u1") == dict.fromkeys(TABLES, 0)
    assert await rows_by_table(server.pool, "u2") == before  # other users untouched
    assert [i.product_id for i in await admin.get_cart("u1")] == []
    assert [i.product_id for i in await admin.get_cart("u2")] == ["p1"]

    again = await admin.delete_user_data("u1")
    assert (again.events_deleted, again.cart_lines_deleted, again.wishlist_lines_deleted, again.purchases_deleted) == (
        0,
        0,
        0,
        0,
    )
    assert again.deleted_through.ToDatetime(UTC) >= done.deleted_through.ToDatetime(UTC)


async def test_a_replay_is_refused_and_new_activity_accepted(
    server: App, admin: InteractionsClient, channel: grpc.aio.Channel, histories: dict[str, list[Event]]
) -> None:
    done = await admin.delete_user_data("u1")
    watermark = done.deleted_through.ToDatetime(UTC)
    stub = InteractionServiceStub(channel)
    old = [*histories["u1"][:3], *history("u1")[3:]]  # a resend, and new ids with old times (an import)
    replay = [*histories["u2"], *old]  # u2's resend is a duplicate, nothing else

    # Batch: every u1 event refused naming user_id; u2's are duplicates.
    response = await stub.LogEvents(isv.LogEventsRequest(events=replay))
    assert (response.accepted_count, response.duplicate_count) == (0, 6)
    assert [r.index for r in response.rejected] == list(range(6, 12))
    expected = f"data of this user deleted through {watermark.isoformat()}"
    assert {(v.field, v.description) for r in response.rejected for v in r.violations} == {("user_id", expected)}

    # Unary: INVALID_ARGUMENT on event.user_id.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LogEvent(isv.LogEventRequest(event=old[1]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value) == {"event.user_id": expected}

    # Stream: the same per batch, and the stream goes on.
    stream = stub.StreamEvents()
    await stream.write(isv.StreamEventsRequest(sequence=1, events=old[:3]))
    fresh = valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id="u1", product_id="p9")  # occurred_at: now
    fresh.ClearField("occurred_at")
    await stream.write(isv.StreamEventsRequest(sequence=2, events=[old[3], fresh]))
    first, second = await stream.read(), await stream.read()
    await stream.done_writing()
    assert (first.accepted_count, len(first.rejected)) == (0, 3)
    assert (second.accepted_count, [r.index for r in second.rejected]) == (1, [0])

    # New activity after the deletion is accepted and syncs state again.
    assert [(i.product_id, i.quantity) for i in await admin.get_cart("u1")] == [("p9", 1)]
    assert await rows_by_table(server.pool, "u1") == {t: n for t, n in zip(TABLES, (1, 1, 1, 0, 0, 1, 0), strict=True)}


async def test_the_watermark_covers_events_from_the_near_future(server: App, admin: InteractionsClient) -> None:
    ahead = valid_event(EventType.EVENT_TYPE_VIEW, user_id="u1")
    ahead.occurred_at.FromDatetime(datetime.now(UTC) + timedelta(minutes=4))
    await admin.log(ahead)
    done = await admin.delete_user_data("u1")
    assert done.deleted_through.ToDatetime(UTC) >= ahead.occurred_at.ToDatetime(UTC)
    assert done.events_deleted == 7
    result = await admin.log_many([ahead])
    assert [r.violations[0].field for r in result.rejected] == ["user_id"]


async def test_an_ingest_waiting_on_a_deletion_sees_its_watermark(
    server: App, admin: InteractionsClient, database_url: str
) -> None:
    """The race: a batch of the user whose statement starts while a deletion
    holds the lock must be refused once the deletion commits."""
    deleter = await asyncpg.connect(database_url)
    try:
        async with deleter.transaction():
            await deleter.execute("SELECT pg_advisory_xact_lock(7303, hashtext('u1') & 63)")
            await deleter.execute("INSERT INTO user_deletions (user_id, deleted_through) VALUES ('u1', now())")
            write = asyncio.create_task(admin.log_many(history("u1")))
            await eventually(lambda: waiting_for_the_lock(deleter))
            assert not write.done()
        result = await write
    finally:
        await deleter.close()
    assert (result.accepted, len(result.rejected)) == (0, 6)


async def test_a_deletion_waits_for_an_ingest_of_the_user_in_flight(
    server: App, admin: InteractionsClient, database_url: str
) -> None:
    """The other side: a batch that took the lock first (while the deletion
    was already deleting the events it could see) commits, then the deletion
    deletes what it wrote too."""
    now = datetime.now(UTC)
    writer = await asyncpg.connect(database_url)
    try:
        async with writer.transaction():
            # What storage.INSERT_EVENTS and the state sync do for one event of u1, uncommitted.
            await writer.fetch("SELECT * FROM lock_users_for_ingest(ARRAY['u1'])")
            await writer.execute(
                """
                WITH k AS (INSERT INTO event_keys (user_id, event_id, occurred_at) VALUES ('u1', $1, $2)),
                     h AS (INSERT INTO state_history VALUES ('u1', 'p7', 'cart_lines', $2, $1, 'add_to_cart', 1)),
                     s AS (INSERT INTO state_segments VALUES ('u1', 'p7', 'cart_lines', $2, $1, 1, 1, 0))
                INSERT INTO events (user_id, event_id, event_type, event_value, occurred_at, syncs_state)
                VALUES ('u1', $1, 'add_to_cart', 1, $2, true)
                """,
                uuid.uuid4(),
                now,
            )
            deletion = asyncio.create_task(admin.delete_user_data("u1"))
            await eventually(lambda: waiting_for_the_lock(writer))
            assert not deletion.done()
        done = await deletion
    finally:
        await writer.close()
    assert done.events_deleted == 7
    assert await rows_by_table(server.pool, "u1") == dict.fromkeys(TABLES, 0)
    assert done.deleted_through.ToDatetime(UTC) >= now


async def waiting_for_the_lock(connection: asyncpg.Connection) -> bool:
    waiting: int = await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = (hashtext('u1') & 63) AND NOT granted"
    )
    return waiting > 0


async def test_the_delete_user_command(server: App, admin: InteractionsClient) -> None:
    target = ("--target", server.address)
    dry = await cli("delete-user", "u1", "--dry-run", "--json", *target)
    assert dry.status == 0, dry.stderr
    counts = json.loads(dry.stdout)
    assert (counts["events"], counts["cart_lines"], counts["dry_run"]) == (6, 2, True)
    run = await cli("delete-user", "u1", *target)
    assert run.status == 0, run.stderr
    assert "deleted" in run.stdout and "events of u1 up to" in run.stdout
    assert (await rows_by_table(server.pool, "u1"))["events"] == 0
    bad = await cli("delete-user", " ", *target)
    assert bad.status == 1 and "user_id" in bad.stderr


async def test_analytics_are_blind_to_a_deleted_user(server: App, admin: InteractionsClient) -> None:
    # Searches and a session for both users, so that every analytics read has something of u1 to show.
    extra = {
        user: [
            valid_event(EventType.EVENT_TYPE_SEARCH, user_id=user, session_id="s1"),
            valid_event(EventType.EVENT_TYPE_LOGIN, user_id=user, session_id="s1"),
        ]
        for user in ("u1", "u2")
    }
    for events in extra.values():
        assert (await admin.log_many(events)).accepted == 2

    async def exported() -> tuple[set[str], set[str]]:
        events = {e.event.user_id async for e in admin.export_events()}
        training = {r.user_id async for r in admin.export_training_data()}
        return events, training

    assert await exported() == ({"u1", "u2"}, {"u1", "u2"})
    assert (await admin.count_active_users()).active_users == 2
    searches_before = sum(q.searches for q in await admin.top_search_queries())
    assert searches_before == 2

    await admin.delete_user_data("u1")

    assert await exported() == ({"u2"}, {"u2"})
    active = await admin.count_active_users()
    assert (active.active_users, active.logged_in_users) == (1, 1)
    assert sum(q.searches for q in await admin.top_search_queries()) == 1
    assert [e async for e in admin.list_user_events("u1")] == []
    assert [s async for s in admin.list_sessions("u1")] == []
    with pytest.raises(NotFoundError):
        await admin.get_user_activity("u1")
    with pytest.raises(NotFoundError):
        await admin.get_session("u1", "s1")
    assert (await admin.get_user_activity("u2")).login_count == 1  # the other user is untouched


@pytest.mark.parametrize("user_id", ["", "   ", "u" * 129, "a\x00b"])
@pytest.mark.parametrize("dry_run", [True, False])
async def test_a_bad_user_id_is_invalid_argument(channel: grpc.aio.Channel, user_id: str, dry_run: bool) -> None:
    """The same id check as the analytics reads (interactions_server.services._ids)."""
    stub = admin_service_pb2_grpc.AdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DeleteUserData(admin_service_pb2.DeleteUserDataRequest(user_id=user_id, dry_run=dry_run))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "user_id" in field_violations(refused.value)


async def test_a_deletion_between_the_queries_of_a_read_is_not_seen(
    server: App, admin: InteractionsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListSessions and GetSession run two queries; a deletion committed
    between them must not make them disagree (a KeyError, INTERNAL): both
    read one snapshot, taken by the first."""
    for user in ("gone", "gone too"):
        events = [valid_event(EventType.EVENT_TYPE_LOGIN, user_id=user, session_id=f"s{i}") for i in range(3)]
        assert (await admin.log_many(events)).accepted == 3
    deleted: list[int] = []

    def deleting_after(query: Any, user: str) -> Any:
        async def query_then_delete(*args: Any) -> Any:
            rows = await query(*args)
            if not deleted:  # on another connection, committed before the read's next query
                deleted.append((await admin.delete_user_data(user)).events_deleted)
            return rows

        return query_then_delete

    monkeypatch.setattr(analytics_storage, "sessions_page", deleting_after(analytics_storage.sessions_page, "gone"))
    sessions = [s async for s in admin.list_sessions("gone")]
    assert deleted == [3]
    assert sorted(s.session_id for s in sessions) == ["s0", "s1", "s2"]

    deleted.clear()
    monkeypatch.setattr(
        analytics_storage, "session_events", deleting_after(analytics_storage.session_events, "gone too")
    )
    session = await admin.get_session("gone too", "s1")
    assert deleted == [3]
    assert session.event_count == len(session.events) == 1
