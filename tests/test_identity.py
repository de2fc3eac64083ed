"""IdentityService and logins that link, against the real server and
database: a guest's rows move under the person at link time, later events of
the guest are the person's, reads by the guest answer the person's state,
links are permanent and single, chains resolve to the person, analytics see
the person, deletion covers every linked id, and the races between a link
and a concurrent batch of the guest's events (each side held open on purpose).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from interactions_client import FailedPreconditionError, InteractionsClient, NotFoundError
from interactions_client.rules import STANDARD
from interactions_client.v1 import identity_service_pb2 as id_pb
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.identity_service_pb2_grpc import IdentityServiceStub
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server.server import App
from tests.events import valid_event
from tests.support import eventually, field_violations
from tests.test_cli import cli

NOW = datetime.now(UTC).replace(microsecond=0)
TABLES = ("events", "event_keys", "cart_lines", "wishlist_lines", "purchase_history")


def event(
    name: str, user: str, product: str | None = "p1", value: int | None = None, *, at: int = 0, **fields: Any
) -> Event:
    """An event of `user` `at` seconds after a fixed time an hour ago."""
    if not STANDARD[name].product_allowed:
        product = None
    e = valid_event(STANDARD[name].event_type, user_id=user, product_id=product, **fields)
    if value is not None:
        e.event_value = value
    e.occurred_at.FromDatetime(NOW - timedelta(hours=1) + timedelta(seconds=at))
    return e


def login(user: str, anonymous_id: str | None = None, *, at: int = 0, **fields: Any) -> Event:
    e = event("login", user, at=at, **fields)
    if anonymous_id is not None:
        e.login.anonymous_id = anonymous_id
    return e


def guest_history(guest: str) -> list[Event]:
    """A guest's visit: a search and views in a session, a cart, a wishlist line, a purchase."""
    return [
        event("search", guest, None, at=1, session_id="g-s1"),
        event("view", guest, "p1", at=2, session_id="g-s1"),
        event("add_to_cart", guest, "p1", 2, at=3, session_id="g-s1"),
        event("add_to_cart", guest, "p2", 1, at=4),
        event("wishlist", guest, "p3", 1, at=5),
        event("purchase", guest, "p4", at=6),
    ]


async def rows(pool: asyncpg.Pool, user_id: str) -> dict[str, int]:
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t} WHERE user_id = $1", user_id) for t in TABLES}


async def cart(client: InteractionsClient, user: str) -> dict[str, int]:
    return {i.product_id: i.quantity for i in await client.get_cart(user)}


@pytest.fixture
async def client(server: App) -> Any:
    async with InteractionsClient(server.address) as client:
        yield client


async def test_a_link_moves_the_guests_rows_and_merges_the_state(server: App, client: InteractionsClient) -> None:
    assert (await client.log_many(guest_history("guest"))).accepted == 6
    # The user's own cart: p1 added before the guest's add, p2 set after it.
    mine = [event("add_to_cart", "alice", "p1", 1, at=0), event("update_cart_quantity", "alice", "p2", 5, at=10)]
    assert (await client.log_many(mine)).accepted == 2

    linked = await client.link_identity("guest", "alice")
    assert (linked.already_linked, linked.events_moved) == (False, 6)

    # One person, one fold in occurred_at order: p1 = 1 + 2, p2 = set to 5 after the guest's add.
    assert await cart(client, "alice") == {"p1": 3, "p2": 5}
    assert [i.product_id for i in await client.get_wishlist("alice")] == ["p3"]
    assert [p.product_id async for p in client.list_purchases("alice")] == ["p4"]
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)  # every key leads with the person's id
    assert (await rows(server.pool, "alice"))["events"] == 8
    # Reads by the guest answer the person's state.
    assert await cart(client, "guest") == {"p1": 3, "p2": 5}
    assert [i.product_id for i in await client.get_wishlist("guest")] == ["p3"]
    assert [p.product_id async for p in client.list_purchases("guest")] == ["p4"]
    for name in ("guest", "alice"):
        identity = await client.get_identity(name)
        assert (identity.user_id, identity.anonymous_ids) == ("alice", ["guest"])
    stranger = await client.get_identity("nobody")
    assert (stranger.user_id, stranger.anonymous_ids) == ("nobody", [])


async def test_events_of_the_guest_after_the_link_are_the_persons(server: App, client: InteractionsClient) -> None:
    history = guest_history("guest")
    assert (await client.log_many(history)).accepted == 6
    await client.link_identity("guest", "alice")

    # A stale tab: an add older than everything, and one newer, still under the guest's id.
    late = [event("add_to_cart", "guest", "p1", 4, at=-100), event("remove_from_cart", "guest", "p2", 1, at=100)]
    assert (await client.log_many(late)).accepted == 2
    assert await cart(client, "alice") == {"p1": 6}
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)

    # A resend of the guest's events, moved or not, is a duplicate; another
    # event under one of their ids is a conflict.
    again = await client.log_many([*history, *late])
    assert (again.accepted, again.duplicate, again.rejected) == (0, 8, [])
    reused = event("add_to_cart", "guest", "p9", 1, at=50, event_id=history[2].event_id)
    conflict = await client.log_many([reused])
    assert [(v.field, v.description) for v in conflict.rejected[0].violations] == [
        ("event_id", "already used for a different event")
    ]
    assert await cart(client, "alice") == {"p1": 6}


async def test_links_are_permanent_and_single(server: App, client: InteractionsClient) -> None:
    await client.log(event("view", "guest", "p1"))
    assert (await client.link_identity("guest", "alice")).events_moved == 1
    again = await client.link_identity("guest", "alice")
    assert (again.already_linked, again.events_moved) == (True, 0)

    with pytest.raises(FailedPreconditionError) as elsewhere:
        await client.link_identity("guest", "bob")
    assert elsewhere.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [v.field for v in elsewhere.value.violations] == ["anonymous_id"]
    assert "already linked to another user" in elsewhere.value.violations[0].description

    # A person cannot become someone's anonymous id: the user of a link, or an id that logged in.
    await client.log(login("carol"))
    for person in ("alice", "carol"):
        with pytest.raises(FailedPreconditionError) as refused:
            await client.link_identity(person, "bob")
        assert [v.field for v in refused.value.violations] == ["anonymous_id"]
        assert "is a user" in refused.value.violations[0].description
    assert (await client.get_identity("bob")).anonymous_ids == []


async def test_chains_resolve_to_the_person(server: App, client: InteractionsClient) -> None:
    await client.log_many([event("add_to_cart", "a", "p1", 1, at=1), event("add_to_cart", "b", "p1", 2, at=2)])
    await client.link_identity("a", "u")
    # A login of U with another anonymous id: both belong to U.
    assert (await client.log_many([login("u", "b", at=3)])).accepted == 1
    # A link to a linked anonymous id is a link to its person.
    await client.log(event("add_to_cart", "c", "p1", 4, at=4))
    assert (await client.link_identity("c", "a")).events_moved == 1
    identity = await client.get_identity("c")
    assert (identity.user_id, identity.anonymous_ids) == ("u", ["a", "b", "c"])
    assert await cart(client, "b") == {"p1": 7}
    # A linked anonymous id is not a person: logging in as it logs in as its person.
    await client.log(login("a", at=5))
    assert [e.user_id async for e in client.list_user_events("u", event_types=["login"])] == ["u", "u"]


async def test_a_login_links_in_a_batch_and_a_refused_one_is_rejected_alone(
    server: App, client: InteractionsClient, interaction_stub: InteractionServiceStub
) -> None:
    await client.log_many([*guest_history("guest"), event("view", "other", "p1")])
    await client.link_identity("other", "bob")
    batch = [
        event("add_to_cart", "guest", "p1", 1, at=7),  # before the login in the batch: moved by it
        login("alice", "guest", at=8),
        event("add_to_cart", "guest", "p1", 1, at=9),  # after it: the person's
        login("carol", "other", at=10),  # "other" belongs to bob: refused, nothing of it written
        event("view", "carol", "p1", at=11),
    ]
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=batch))
    assert (response.accepted_count, response.duplicate_count) == (4, 0)
    assert [(r.index, [(v.field, v.description) for v in r.violations]) for r in response.rejected] == [
        (3, [("login.anonymous_id", "is already linked to another user (links are permanent)")])
    ]
    assert await cart(client, "alice") == {"p1": 4, "p2": 1}
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)
    assert (await rows(server.pool, "carol"))["events"] == 1
    assert (await client.get_identity("guest")).user_id == "alice"
    assert (await client.get_identity("other")).user_id == "bob"

    # A resend of the whole batch: duplicates, the link already made; the refused login refused again.
    again = await interaction_stub.LogEvents(pb.LogEventsRequest(events=batch))
    assert (again.accepted_count, again.duplicate_count, [r.index for r in again.rejected]) == (0, 4, [3])

    # LogEvent: FAILED_PRECONDITION naming the event's field.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await interaction_stub.LogEvent(pb.LogEventRequest(event=login("dave", "other")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert list(field_violations(refused.value)) == ["event.login.anonymous_id"]
    with pytest.raises(FailedPreconditionError) as typed:
        await client.login("dave", anonymous_id="other")
    assert [v.field for v in typed.value.violations] == ["login.anonymous_id"]
    assert (await client.login("dave", anonymous_id="guest-of-dave")).duplicate is False
    assert (await client.get_identity("guest-of-dave")).user_id == "dave"


async def test_links_in_one_batch_are_decided_in_batch_order(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    batch = [
        login("x"),  # x logs in: a person
        login("u", "x"),  # refused: x is a user
        login("u", "a"),  # a -> u
        login("v", "a"),  # refused: a belongs to u
        login("u", "a"),  # already linked: accepted
        login("a", "b"),  # a stands for u: b -> u
    ]
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=batch))
    assert [r.index for r in response.rejected] == [1, 3]
    assert response.accepted_count == 4
    identity = IdentityServiceStub(grpc.aio.insecure_channel(server.address))
    answer = await identity.GetIdentity(id_pb.GetIdentityRequest(id="b"))
    assert (answer.user_id, list(answer.anonymous_ids)) == ("u", ["a", "b"])


async def test_bad_requests_name_the_field(server: App, channel: grpc.aio.Channel) -> None:
    stub = IdentityServiceStub(channel)
    for request, field in [
        (id_pb.LinkIdentityRequest(user_id="u"), "anonymous_id"),
        (id_pb.LinkIdentityRequest(anonymous_id="a"), "user_id"),
        (id_pb.LinkIdentityRequest(anonymous_id="a" * 129, user_id="u"), "anonymous_id"),
        (id_pb.LinkIdentityRequest(anonymous_id="a", user_id="a"), "anonymous_id"),
        (id_pb.LinkIdentityRequest(anonymous_id="a", user_id="u\x00"), "user_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.LinkIdentity(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(bad.value)
    future = id_pb.LinkIdentityRequest(anonymous_id="a", user_id="u")
    future.occurred_at.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(grpc.aio.AioRpcError) as ahead:
        await stub.LinkIdentity(future)
    assert "occurred_at" in field_violations(ahead.value)
    with pytest.raises(grpc.aio.AioRpcError) as blank:
        await stub.GetIdentity(id_pb.GetIdentityRequest(id=" "))
    assert "id" in field_violations(blank.value)
    # A login's anonymous_id is validated like an id, and never the user itself.
    interactions = InteractionServiceStub(channel)
    for anonymous_id, description in [(" ", "must not be blank"), ("u1", "must differ from user_id")]:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await interactions.LogEvent(pb.LogEventRequest(event=login("u1", anonymous_id)))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert description in field_violations(invalid.value)["event.login.anonymous_id"]


async def test_analytics_see_the_person(server: App, client: InteractionsClient) -> None:
    await client.log_many([*guest_history("guest"), event("view", "alice", "p9", at=20, session_id="a-s1")])
    await client.log_many([login("alice", "guest", at=10, session_id="a-s1")])

    sessions = [s.session_id async for s in client.list_sessions("alice")]
    assert sessions == ["a-s1", "g-s1"]  # the guest's session is the person's
    assert [s.session_id async for s in client.list_sessions("guest")] == sessions
    assert (await client.get_session("guest", "g-s1")).user_id == "alice"
    activity = await client.get_user_activity("guest")
    assert (activity.login_count, activity.session_count, sum(activity.event_counts.values())) == (1, 2, 8)
    assert {e.user_id async for e in client.list_user_events("guest")} == {"alice"}
    active = await client.count_active_users()
    assert (active.active_users, active.logged_in_users) == (1, 1)  # one person
    [query] = await client.top_search_queries()
    assert (query.searches, query.users) == (1, 1)
    assert {r.user_id async for r in client.export_training_data()} == {"alice"}
    assert {e.event.user_id async for e in client.export_events()} == {"alice"}


async def test_deleting_the_person_deletes_every_linked_id(server: App, client: InteractionsClient) -> None:
    history = guest_history("guest")
    await client.log_many([*history, event("add_to_cart", "alice", "p1", 1, at=20)])
    await client.link_identity("guest", "alice")
    await client.log(event("add_to_cart", "guest", "p5", 1, at=30))  # after the link

    done = await client.delete_user_data("alice")
    assert (done.events_deleted, done.cart_lines_deleted, done.purchases_deleted) == (8, 3, 1)
    for user in ("alice", "guest"):
        assert await rows(server.pool, user) == dict.fromkeys(TABLES, 0)
    assert await server.pool.fetchval("SELECT count(*) FROM identity_links") == 0
    # Replays of the guest's old events are refused, as the person's are.
    replay = await client.log_many(history)
    assert (replay.accepted, len(replay.rejected)) == (0, 6)
    assert {v.field for r in replay.rejected for v in r.violations} == {"user_id"}
    # The cookie is a stranger now: new activity under it is its own.
    fresh = event("view", "guest", "p1", at=3600 + 60)
    fresh.ClearField("occurred_at")
    assert (await client.log(fresh)).duplicate is False
    assert (await client.get_identity("guest")).user_id == "guest"


async def test_deleting_a_linked_anonymous_id_deletes_the_person(server: App, client: InteractionsClient) -> None:
    await client.log_many([*guest_history("guest"), event("view", "alice", "p1", at=20)])
    await client.link_identity("guest", "alice")
    dry = await client.delete_user_data("guest", dry_run=True)
    assert dry.events_deleted == 7
    done = await client.delete_user_data("guest")
    assert done.events_deleted == 7
    assert await rows(server.pool, "alice") == dict.fromkeys(TABLES, 0)
    with pytest.raises(NotFoundError):
        await client.get_user_activity("alice")


async def test_a_link_to_a_deleted_person_drops_the_guests_events_it_covers(
    server: App, client: InteractionsClient
) -> None:
    await client.log(event("view", "alice", "p1", at=0))
    await client.log_many(guest_history("guest"))  # an hour ago: before alice's watermark
    await client.delete_user_data("alice")
    linked = await client.link_identity("guest", "alice")
    assert linked.events_moved == 0  # as if they had carried alice's id: the deletion took them
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)
    assert await cart(client, "alice") == {}


async def test_an_event_id_the_person_already_has_stays_the_persons(server: App, client: InteractionsClient) -> None:
    theirs = event("add_to_cart", "alice", "p1", 1, at=1)
    mine = event("add_to_cart", "guest", "p2", 1, at=2, event_id=theirs.event_id)
    await client.log_many([theirs, mine])
    assert (await client.link_identity("guest", "alice")).events_moved == 0
    assert await cart(client, "alice") == {"p1": 1}
    assert (await client.log_many([mine])).rejected[0].violations[0].field == "event_id"  # now a conflict
    # Two ids of one person with one event id in a batch: the person's is logged, the other a conflict.
    twin = event("view", "guest", "p1", at=3)
    pair = await client.log_many(
        [twin, event("view", "alice", "p1", at=3, event_id=twin.event_id, session_id="s-alice")]
    )
    assert (pair.accepted, [r.index for r in pair.rejected]) == (1, [0])
    newest = [e.session_id async for e in client.list_user_events("alice")]
    assert newest[0] == "s-alice"
    assert (await rows(server.pool, "alice"))["events"] == 2


# --- the races between a link and a concurrent batch of the guest's events ----------------------------


async def waiting_for_the_bucket(connection: asyncpg.Connection, user: str) -> bool:
    waiting: int = await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7303 AND objid = (hashtext($1) & 63)"
        " AND NOT granted",
        user,
    )
    return waiting > 0


async def test_a_batch_of_the_guest_waits_for_a_link_in_flight(
    server: App, client: InteractionsClient, database_url: str
) -> None:
    """A link holds the guest's lock exclusively until it commits: a batch of
    the guest that starts meanwhile waits, then sees the link and stores its
    events under the person (without the lock it would store them under the
    guest, after the link had moved the guest's rows)."""
    linker = await asyncpg.connect(database_url)
    try:
        async with linker.transaction():
            # What a link does first (lock_identities), then its link row, uncommitted.
            await linker.fetch("SELECT * FROM lock_identities('{}', ARRAY['guest'], ARRAY['alice'])")
            await linker.execute(
                "INSERT INTO identity_links (anonymous_id, user_id, linked_at) VALUES ('guest', 'alice', now())"
            )
            write = asyncio.create_task(client.log_many([event("add_to_cart", "guest", "p1", 2, at=5)]))
            await eventually(lambda: waiting_for_the_bucket(linker, "guest"))
            assert not write.done()
        assert (await write).accepted == 1
    finally:
        await linker.close()
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)
    assert await cart(client, "alice") == {"p1": 2}


async def test_a_link_waits_for_a_batch_of_the_guest_in_flight(
    server: App, client: InteractionsClient, database_url: str
) -> None:
    """The other side: a batch of the guest that took the guest's lock first
    (held in flight, after its insert statement, by a lock on cart_lines that
    its state sync waits for) commits, then the link moves what it wrote too
    (without the lock the link would not wait for it, and the batch's rows
    would stay under the guest)."""
    await client.log(event("add_to_cart", "guest", "p1", 1, at=1))
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE cart_lines IN ACCESS EXCLUSIVE MODE")
            write = asyncio.create_task(client.log_many([event("add_to_cart", "guest", "p1", 4, at=2)]))
            await eventually(lambda: waiting_for_cart_lines(holder))  # its insert statement done
            link = asyncio.create_task(client.link_identity("guest", "alice"))
            await eventually(lambda: waiting_for_the_bucket(holder, "guest"))
            assert not link.done()
    finally:
        await holder.close()
    assert (await write).accepted == 1
    assert (await link).events_moved == 2
    assert await rows(server.pool, "guest") == dict.fromkeys(TABLES, 0)
    assert await cart(client, "alice") == {"p1": 5}  # the fold of both, the held one included


async def waiting_for_cart_lines(connection: asyncpg.Connection) -> bool:
    waiting: int = await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'cart_lines'::regclass AND NOT granted"
    )
    return waiting > 0


async def test_the_link_and_identity_commands(server: App, client: InteractionsClient) -> None:
    target = ("--target", server.address)
    await client.log_many(guest_history("guest"))
    run = await cli("link", "guest", "alice", *target)
    assert run.status == 0, run.stderr
    assert run.stdout == "linked guest to alice: 6 events moved\n"
    again = await cli("link", "--anon", "guest", "--user", "alice", "--json", *target)
    assert json.loads(again.stdout) == {
        "anonymous_id": "guest",
        "user_id": "alice",
        "already_linked": True,
        "events_moved": 0,
    }
    refused = await cli("link", "guest", "bob", "--json", *target)
    assert refused.status == 1
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert [v["field"] for v in error["violations"]] == ["anonymous_id"]
    shown = await cli("identity", "guest", "--json", *target)
    assert json.loads(shown.stdout) == {"user_id": "alice", "anonymous_ids": ["guest"]}
    table = await cli("identity", "--id", "alice", *target)
    assert table.status == 0 and "guest" in table.stdout
    logged = await cli("log", "--type", "login", "--user", "bob", "--anonymous-id", "cookie-9", *target)
    assert logged.status == 0, logged.stderr
    assert (await client.get_identity("cookie-9")).user_id == "bob"
    missing = await cli("link", "guest", *target)
    assert missing.status == 2 and "USER" in missing.stderr
