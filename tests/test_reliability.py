"""Reliability of the core: status mapping, conflicting resends, load limits,
deadlines in the database, quiet logs. Quick, unit-level checks; the heavy
fault scenarios are in tests/faults/."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from interactions_client import InteractionsClient, limits
from interactions_client.streamer import EventStreamer
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.errors import is_conflict, is_database_read_only, is_database_unavailable
from interactions_server.ingest import fingerprint
from interactions_server.rpc import ByteBudget, ConcurrencyLimit, CoreCalls
from interactions_server.server import App
from interactions_server.services import interactions as service
from interactions_server.storage import _pool as db
from tests.events import valid_event
from tests.support import StartServer, events_table_locked, eventually, field_violations, has_blocked_writes
from tests.test_auth import TOKENS, tokens_toml

# --- one mapping, by asyncpg's exception classes ------------------------------

_EXC = asyncpg.exceptions

UNAVAILABLE_ERRORS: list[BaseException] = [
    _EXC.InterfaceError("cannot perform operation: connection is closed"),
    _EXC.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    _EXC.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    _EXC.PostgresConnectionError("connection exception"),
    _EXC.ConnectionFailureError("connection failure"),
    _EXC.CannotConnectNowError("the database system is starting up"),
    _EXC.AdminShutdownError("terminating connection due to administrator command"),
    _EXC.CrashShutdownError("terminating connection because of crash of another server process"),
    _EXC.QueryCanceledError("canceling statement due to statement timeout"),
    _EXC.TooManyConnectionsError("sorry, too many clients already"),
    _EXC.DiskFullError("could not extend file"),
    _EXC.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
    _EXC.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
    ExceptionGroup("several", [ValueError("x"), ConnectionResetError()]),
]
NOT_UNAVAILABLE_ERRORS: list[BaseException] = [
    _EXC.DataError("invalid input for query argument $1"),  # a bug: we passed a bad argument
    _EXC.CharacterNotInRepertoireError("invalid byte sequence"),  # validation must catch it first
    _EXC.UndefinedTableError("relation does not exist"),
    _EXC.DeadlockDetectedError("deadlock detected"),
    ValueError("a bug"),
]


@pytest.mark.parametrize("error", UNAVAILABLE_ERRORS, ids=lambda e: type(e).__name__)
def test_database_failures_that_are_not_the_callers_fault_are_unavailable(error: BaseException) -> None:
    assert is_database_unavailable(error)


@pytest.mark.parametrize("error", NOT_UNAVAILABLE_ERRORS, ids=lambda e: type(e).__name__)
def test_bugs_bad_input_and_conflicts_are_not_unavailable(error: BaseException) -> None:
    assert not is_database_unavailable(error)


def test_deadlocks_and_serialization_failures_are_conflicts() -> None:
    assert is_conflict(_EXC.DeadlockDetectedError("deadlock detected"))
    assert is_conflict(_EXC.SerializationError("could not serialize access"))
    assert not is_conflict(_EXC.AdminShutdownError("terminating connection"))


def test_a_read_only_database_is_its_own_kind_of_unavailable() -> None:
    read_only = _EXC.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")
    assert is_database_read_only(read_only) and is_database_unavailable(read_only)
    assert is_database_read_only(ExceptionGroup("several", [ValueError("x"), read_only]))
    assert not is_database_read_only(_EXC.AdminShutdownError("terminating connection"))


async def test_a_session_that_refused_a_write_as_read_only_is_not_pooled_again(database_url: str) -> None:
    """A session keeps the read-only default it started with; the pool must
    replace it, or writes fail after the database is writable again."""
    pool = await db.open_pool(database_url, min_size=1, max_size=1, statement_cache_size=100)
    try:
        async with db.acquire(pool) as conn:
            await conn.execute("SET default_transaction_read_only = on")  # as if it had started read-only
            pid = conn.get_server_pid()
        with pytest.raises(_EXC.ReadOnlySQLTransactionError):
            async with db.transaction(pool, 5.0) as conn:
                assert conn.get_server_pid() == pid  # the same session
                await conn.execute("CREATE TABLE never_created (x int)")
        async with db.transaction(pool, 5.0) as conn:  # a new session, writable
            assert conn.get_server_pid() != pid
            assert await conn.fetchval("SELECT current_setting('transaction_read_only')") == "off"
    finally:
        await db.close_pool(pool)


def _cart_event(user: str, quantity: int, event_id: str | None = None) -> Event:
    event = valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=user, product_id="p1", event_value=quantity)
    event.event_id = event_id or str(uuid.uuid4())
    event.occurred_at.FromSeconds(1_700_000_000)
    return event


async def test_a_connection_killed_mid_call_is_unavailable_and_discarded(
    server: App, database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    async with events_table_locked(database_url) as lock:
        call = interaction_stub.LogEvents(pb.LogEventsRequest(events=[_cart_event("u1", 1)]), timeout=10)
        await eventually(lambda: has_blocked_writes(lock, 1))
        killed = await lock.fetchval(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l"
            " WHERE l.relation = 'events'::regclass AND NOT l.granted"
        )
        assert killed == 1
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # The broken connection did not go back to the pool: the next calls work.
    for _ in range(server.config.pool_max_size + 1):
        response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[_cart_event("u1", 1)]))
        assert response.accepted_count == 1


async def test_a_read_on_a_killed_connection_is_unavailable(
    server: App, user_state_stub: UserStateServiceStub, database_url: str
) -> None:
    async with events_table_locked(database_url) as lock:
        # Every pooled connection is killed between calls: the next read on
        # one of them fails at once and must be UNAVAILABLE, never INTERNAL.
        await lock.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
    codes = set()
    for _ in range(server.config.pool_max_size):
        try:
            await user_state_stub.GetCart(state_pb.GetCartRequest(user_id="u1"))
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.add(error.code())
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    await user_state_stub.GetCart(state_pb.GetCartRequest(user_id="u1"))


# --- anything a client can send is INVALID_ARGUMENT ---------------------------


@pytest.mark.parametrize("user_id", ["u\x00", "x" * (limits.MAX_ID_LENGTH + 1)], ids=["nul", "too-long"])
async def test_every_read_refuses_a_bad_user_id_naming_it(
    server: App, user_state_stub: UserStateServiceStub, user_id: str
) -> None:
    calls = [
        user_state_stub.GetCart(state_pb.GetCartRequest(user_id=user_id)),
        user_state_stub.GetWishlist(state_pb.GetWishlistRequest(user_id=user_id)),
        user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id=user_id)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "user_id" in field_violations(failure.value)


@pytest.mark.parametrize("token", ["\x00" * 32, "A" * 31 + "\x00", "x" * 10_000])
async def test_a_page_token_with_nul_or_too_long_is_invalid_argument(
    server: App, user_state_stub: UserStateServiceStub, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="u1", page_token=token))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(failure.value)


async def test_nul_in_any_event_text_is_refused_naming_the_field(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    event = _cart_event("u\x00", 1)
    event.attributes["k"] = "v\x00"
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[event]))
    assert {v.field for v in response.rejected[0].violations} == {"user_id", "attributes[k]"}


# --- conflicting resends --------------------------------------------------------


def test_the_fingerprint_covers_the_content_as_sent_only() -> None:
    event = _cart_event("u1", 1)
    same = Event.FromString(event.SerializeToString())
    same.event_id = same.event_id.upper()  # the key is case-insensitive
    assert fingerprint(same) == fingerprint(event)
    for change in (
        lambda e: setattr(e, "event_value", 5),
        lambda e: e.ClearField("event_value"),  # absent is not the default value
        lambda e: e.ClearField("occurred_at"),  # absent is not the time the server fills in
        lambda e: setattr(e, "session_id", "s2"),
        lambda e: e.attributes.__setitem__("k", "v"),
    ):
        other = Event.FromString(event.SerializeToString())
        change(other)
        assert fingerprint(other) != fingerprint(event)
    # The attributes' order on the wire does not matter.
    a, b = Event(), Event()
    a.attributes["x"], a.attributes["y"] = "1", "2"
    b.attributes["y"], b.attributes["x"] = "2", "1"
    assert fingerprint(a) == fingerprint(b)


async def test_log_event_answers_already_exists_for_an_event_id_reused_with_other_content(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    first = _cart_event("u1", 1)
    await interaction_stub.LogEvent(pb.LogEventRequest(event=first))
    resend = await interaction_stub.LogEvent(pb.LogEventRequest(event=first))
    assert resend.duplicate
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await interaction_stub.LogEvent(pb.LogEventRequest(event=_cart_event("u1", 5, first.event_id)))
    assert failure.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "event_id" in (failure.value.details() or "")
    assert await server.pool.fetchval("SELECT quantity FROM user_cart WHERE user_id = 'u1'") == 1


async def test_batches_and_streams_reject_a_reused_event_id_naming_it(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    first = _cart_event("u1", 1)
    await interaction_stub.LogEvents(pb.LogEventsRequest(events=[first]))
    changed = _cart_event("u1", 5, first.event_id)
    fresh = _cart_event("u1", 2)

    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[first, changed, fresh]))
    assert (response.accepted_count, response.duplicate_count) == (1, 1)
    assert [(r.index, [(v.field, v.description) for v in r.violations]) for r in response.rejected] == [
        (1, [("event_id", "already used for a different event")])
    ]

    call = interaction_stub.StreamEvents()
    await call.write(pb.StreamEventsRequest(sequence=1, events=[changed]))
    answer = await call.read()
    await call.done_writing()
    assert isinstance(answer, pb.StreamEventsResponse)
    assert (answer.accepted_count, answer.duplicate_count) == (0, 0)
    assert [v.field for v in answer.rejected[0].violations] == ["event_id"]
    assert await server.pool.fetchval("SELECT quantity FROM user_cart WHERE user_id = 'u1'") == 3


async def test_within_one_batch_the_first_of_two_different_events_with_one_key_is_written(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    first = _cart_event("u1", 1)
    again = Event.FromString(first.SerializeToString())
    changed = _cart_event("u1", 5, first.event_id)
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[first, again, changed]))
    assert (response.accepted_count, response.duplicate_count) == (1, 1)
    assert [r.index for r in response.rejected] == [2]
    assert await server.pool.fetchval("SELECT event_value FROM events") == 1


async def test_a_conflicting_key_committed_while_the_batch_waits_on_it_is_caught(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    # Another writer holds the key, uncommitted, with other content: the
    # batch's insert waits on it (ON CONFLICT), then skips it; the key is not
    # in the statement's snapshot, yet it must be reported as a conflict.
    event = _cart_event("u1", 5)
    holder = await asyncpg.connect(server.database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "INSERT INTO event_keys (user_id, event_id, occurred_at, fingerprint) VALUES ($1, $2, now(), $3)",
                "u1",
                uuid.UUID(event.event_id),
                fingerprint(event) + 1,
            )
            call = asyncio.ensure_future(interaction_stub.LogEvents(pb.LogEventsRequest(events=[event])))

            async def waiting_on_the_key() -> bool:
                count: int = await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                return count >= 1

            await eventually(waiting_on_the_key)
        response = await call
    finally:
        await holder.close()
    assert (response.accepted_count, response.duplicate_count) == (0, 0)
    assert [(v.field, v.description) for v in response.rejected[0].violations] == [
        ("event_id", "already used for a different event")
    ]


async def test_keys_logged_before_fingerprints_existed_count_as_the_same_content(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    first = _cart_event("u1", 1)
    await interaction_stub.LogEvents(pb.LogEventsRequest(events=[first]))
    await server.pool.execute("UPDATE event_keys SET fingerprint = NULL")
    changed = _cart_event("u1", 5, first.event_id)
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[changed]))
    assert (response.duplicate_count, list(response.rejected)) == (1, [])


# --- bounded load and memory ------------------------------------------------------


async def test_streams_are_bounded_apart_from_calls_and_the_excess_gets_resource_exhausted_at_once(
    start_server: StartServer,
) -> None:
    """Open streams (idle ones too) never take the slots of unary calls
    (issue 17 item 4); streams beyond --max-open-streams are refused at once."""
    app = await start_server(max_concurrent_rpcs=2, max_open_streams=2)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        streams = [stub.StreamEvents() for _ in range(2)]
        for stream in streams:
            await stream.write(pb.StreamEventsRequest(sequence=1, events=[]))
            await stream.read()
        # Two streams open, the call limit 2: unary calls are still served.
        answers = await asyncio.gather(*(stub.ListEventTypes(pb.ListEventTypesRequest(), timeout=5) for _ in range(2)))
        assert all(a.event_types for a in answers)
        loop = asyncio.get_running_loop()
        started = loop.time()
        third = stub.StreamEvents(timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await third.read()
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open streams" in (failure.value.details() or "")
        assert loop.time() - started < 1.0
        for stream in streams:
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
        fourth = stub.StreamEvents(timeout=5)  # the slots are free again
        await fourth.write(pb.StreamEventsRequest(sequence=1, events=[]))
        assert (await fourth.read()).sequence == 1
        await fourth.done_writing()
        assert await fourth.code() == grpc.StatusCode.OK


async def test_with_tokens_each_client_has_its_own_bound_on_open_streams(
    start_server: StartServer, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml(TOKENS))
    app = await start_server(auth_tokens=tokens, max_open_streams=10, max_open_streams_per_client=2)

    async def opened(stub: InteractionServiceStub, token: str) -> grpc.aio.StreamStreamCall:
        call = stub.StreamEvents(metadata=(("authorization", f"Bearer {TOKENS[token][0]}"),), timeout=10)
        await call.write(pb.StreamEventsRequest(sequence=1, events=[]))
        assert (await call.read()).sequence == 1
        return call

    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        writer = [await opened(stub, "writer") for _ in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await opened(stub, "writer")
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this client has its maximum of open streams" in (failure.value.details() or "")
        other = await opened(stub, "web")  # another client is not held back by this one's streams
        await writer[0].done_writing()
        assert await writer[0].code() == grpc.StatusCode.OK
        again = await opened(stub, "writer")  # its slot is free again
        for call in (writer[1], other, again):
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK


async def test_calls_waiting_in_core_count_toward_max_concurrent_rpcs(start_server: StartServer) -> None:
    """A burst that grpc.aio has not taken yet (it takes one call per loop
    iteration) is over the limit too, though the handlers of these quick
    calls never hold more than one or two at once."""
    app = await start_server(max_concurrent_rpcs=5)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        await stub.ListEventTypes(pb.ListEventTypesRequest())
        calls = [asyncio.ensure_future(stub.ListEventTypes(pb.ListEventTypesRequest(), timeout=10)) for _ in range(60)]
        for _ in range(3):
            await asyncio.sleep(0)  # each call is sent
        time.sleep(0.5)  # noqa: ASYNC251 - holds the loop, the server's included, while core receives the burst
        answers = await asyncio.gather(*calls, return_exceptions=True)
    codes = [a.code() if isinstance(a, grpc.aio.AioRpcError) else grpc.StatusCode.OK for a in answers]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 60 - 2 * 5, codes


def test_the_limit_counts_taken_calls_only_once_channelz_no_longer_shows_the_server() -> None:
    limit = ConcurrencyLimit(5)
    limit.watch(CoreCalls(10**9))  # no such server: channelz answers ValueError
    assert not limit._over_limit()  # the first call after a pause reads nothing
    assert not limit._over_limit()  # this one, back to back, reads: refused by nobody, no error
    assert limit.core is None
    limit.active = 5
    assert limit._over_limit()


async def test_a_burst_over_max_concurrent_rpcs_is_served_or_refused_never_cancelled(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(max_concurrent_rpcs=5)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)

        async def one(i: int) -> grpc.StatusCode:
            try:
                await stub.LogEvent(pb.LogEventRequest(event=_cart_event(f"u{i}", 1)), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        async with events_table_locked(database_url) as lock:
            calls = [asyncio.ensure_future(one(i)) for i in range(60)]
            await eventually(lambda: has_blocked_writes(lock, 1))
            await asyncio.sleep(0.3)
        codes = await asyncio.gather(*calls)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) <= 5


async def test_a_unary_call_without_room_in_the_byte_budget_gets_resource_exhausted(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(max_inflight_bytes=2_000)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        async with events_table_locked(database_url) as lock:
            # Over the whole budget: granted alone, while nothing else is held.
            events = [_cart_event(f"u{i}", 1) for i in range(40)]
            held = stub.LogEvents(pb.LogEventsRequest(events=events), timeout=20)
            await eventually(lambda: has_blocked_writes(lock, 1))
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.LogEvents(pb.LogEventsRequest(events=[_cart_event("v", 1)]), timeout=5)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await held).accepted_count == 40


async def test_a_stream_reads_no_further_batch_while_the_budget_is_full(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(max_inflight_bytes=2_000)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        async with events_table_locked(database_url) as lock:
            call = stub.StreamEvents()
            for sequence in range(3):
                await call.write(
                    pb.StreamEventsRequest(sequence=sequence, events=[_cart_event(f"u{sequence}", 1)] * 25)
                )
            await eventually(lambda: has_blocked_writes(lock, 1))
            await asyncio.sleep(0.3)
            assert await has_blocked_writes(lock, 1) and not await has_blocked_writes(lock, 2)
        await call.done_writing()
        answers = [answer async for answer in call]
        assert [a.sequence for a in answers] == [0, 1, 2]


async def test_streams_whose_senders_are_idle_hold_no_budget(start_server: StartServer) -> None:
    """A stream holds budget only for the batches it has received: idle
    streams hold none, from the moment they open (issue 17 item 4)."""
    app = await start_server(max_inflight_bytes=100_000)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        idle = [stub.StreamEvents() for _ in range(6)]
        for call in idle:
            await call.wait_for_connection()
        await eventually(lambda: _streams_open(app, 6))
        assert _budget(app).used == 0
        response = await stub.LogEvents(pb.LogEventsRequest(events=[_cart_event("u1", 1)] * 25), timeout=5)
        assert response.accepted_count == 1 and response.duplicate_count == 24
        for call in idle:
            call.cancel()


def _budget(app: App) -> ByteBudget:
    assert app.server is not None
    servicer = app.server._servicers[0]
    assert isinstance(servicer, service.InteractionService)
    return servicer._budget


async def _streams_open(app: App, count: int) -> bool:
    assert app.server is not None
    servicer = app.server._servicers[0]
    assert isinstance(servicer, service.InteractionService)
    return servicer.streams_open == count


async def test_a_stream_idle_past_the_limit_is_closed_with_unavailable_unless_it_waits_for_answers(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(stream_idle_timeout=0.3)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        # A batch in flight for longer than the limit (its write blocked): the
        # stream waits for its answer, it is not idle.
        async with events_table_locked(database_url) as lock:
            busy = stub.StreamEvents(timeout=20)
            await busy.write(pb.StreamEventsRequest(sequence=1, events=[_cart_event("u1", 1)]))
            await eventually(lambda: has_blocked_writes(lock, 1))
            await asyncio.sleep(0.6)
        assert (await busy.read()).accepted_count == 1
        # Then nothing is sent: closed, with a status that says why and what to do.
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await busy.read()
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--stream-idle-timeout" in (failure.value.details() or "")
        assert asyncio.get_running_loop().time() - started < 5


async def test_the_streamer_reopens_a_stream_the_server_closed_for_idleness(start_server: StartServer) -> None:
    app = await start_server(stream_idle_timeout=0.2)
    async with InteractionsClient(app.address) as client:
        async with client.stream(linger=0.01) as streamer:
            await streamer.send(_cart_event("u1", 1))
            await eventually(lambda: _acknowledged(streamer, 1))
            await asyncio.sleep(0.6)  # closed by the server meanwhile
            await streamer.send(_cart_event("u2", 1))
        assert streamer.totals.accepted == 2 and streamer.totals.failed == 0
        assert streamer.totals.reconnects == 1


async def _acknowledged(streamer: EventStreamer, count: int) -> bool:
    return streamer.totals.accepted == count


async def test_byte_budget_grants_in_order_and_lets_an_oversized_request_through_alone() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    waiting = asyncio.create_task(budget.acquire(50))
    later = asyncio.create_task(budget.acquire(10))  # would fit, but waits its turn
    await asyncio.sleep(0)
    assert not waiting.done() and not later.done()
    assert not await budget.acquire_within(500, 0.01)
    budget.release(60)
    await asyncio.gather(waiting, later)
    assert budget.used == 60
    budget.release(60)
    await budget.acquire(500)  # larger than the budget: granted when nothing else is held
    cancelled = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    budget.release(500)
    assert budget.used == 0


# --- deadlines reach the database ------------------------------------------------


@pytest.mark.parametrize("syncing", [True, False], ids=["state-syncing", "log-only"])
async def test_a_call_past_its_deadline_rolls_back_instead_of_committing_later(
    server: App, database_url: str, interaction_stub: InteractionServiceStub, syncing: bool
) -> None:
    events = [valid_event(EventType.EVENT_TYPE_VIEW, user_id="u1", product_id="p1")]
    if syncing:
        events.append(_cart_event("u1", 1))
    async with events_table_locked(database_url) as lock:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await interaction_stub.LogEvents(pb.LogEventsRequest(events=events), timeout=0.5)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.3)
        await lock.execute("SELECT 1")
    await asyncio.sleep(0.5)
    assert await server.pool.fetchval("SELECT count(*) FROM event_keys") == 0
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))
    assert response.accepted_count == len(events)


async def test_past_its_deadline_a_statement_fails_in_postgresql(server: App) -> None:
    """The guard runs by PostgreSQL's clock: a statement that reaches the
    database after the caller's deadline (e.g. after a freeze) writes nothing."""
    guard = "SELECT deadline_guard($1::float8)"  # migrations/0004_event_fingerprints.sql
    async with server.pool.acquire() as conn:
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):
            await conn.execute(guard, time.time() - 1)
        await conn.execute(guard, time.time() + 60)


async def test_health_list_which_the_servicer_lacks_is_unimplemented_without_a_traceback(
    server: App, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.aio.AioRpcError) as failure:
        await channel.unary_unary("/grpc.health.v1.Health/List")(b"")
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_one_impatient_caller_does_not_fail_the_others_of_its_group_commit(
    server: App, database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    impatient, patient = _cart_event("u1", 1), _cart_event("u2", 1)
    async with events_table_locked(database_url) as lock:
        quick = asyncio.ensure_future(interaction_stub.LogEvent(pb.LogEventRequest(event=impatient), timeout=0.5))
        slow = asyncio.ensure_future(interaction_stub.LogEvent(pb.LogEventRequest(event=patient), timeout=10))
        await eventually(lambda: has_blocked_writes(lock, 1))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await quick
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not (await slow).duplicate
    # The impatient event is there at most once: a resend settles it.
    await interaction_stub.LogEvent(pb.LogEventRequest(event=impatient))
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 2


def test_statement_timeouts_are_whole_milliseconds_and_never_zero() -> None:
    assert db.statement_timeout_ms(0.0) == 1
    assert db.statement_timeout_ms(2.5) == 2500


# --- quiet logs -------------------------------------------------------------------


def test_asyncpg_pool_retry_tracebacks_are_dropped_other_warnings_kept() -> None:
    db.quiet_pool_logs()
    logger = logging.getLogger("asyncpg.pool")
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        import sys

        refused = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "retrying", (), sys.exc_info())
    plain = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "slow close", (), None)
    assert not logger.filter(refused)
    assert logger.filter(plain)


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_malformed_health_and_reflection_requests_are_invalid_argument_without_a_traceback(
    server: App, channel: grpc.aio.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a string field with an impossible length
    if method.endswith("Check"):
        call: object = channel.unary_unary(method)(garbage)
    elif method.endswith("Watch"):
        call = channel.unary_stream(method)(garbage)
    else:
        call = channel.stream_stream(method)(iter([garbage]))
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.aio.AioRpcError) as failure:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- bounds in the schema ---------------------------------------------------------


async def test_list_event_types_returns_the_bounds_limits_reads(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    response = await interaction_stub.ListEventTypes(pb.ListEventTypesRequest())
    assert response.bounds == limits.BOUNDS
    assert (response.bounds.max_batch_events, response.bounds.max_id_length) == (
        limits.MAX_BATCH_EVENTS,
        limits.MAX_ID_LENGTH,
    )


def test_the_readme_bounds_table_matches_the_schema() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| field | bound |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = dict(line.strip("|").split(" | ", 1) for line in table.splitlines())
    b = limits.BOUNDS
    expected = {
        "`user_id`, `product_id`, `session_id`": f"non-blank, ≤ {b.max_id_length:,} characters, no NUL",
        "quantities (`event_value` of cart types, `cart_action.quantity`)": f"≤ {b.max_quantity:,}",
        "`occurred_at`": f"not before 1970, at most {b.max_future_seconds // 60} minutes in the future; "
        "the server's receive time when absent",
        "`search.query`": f"required and non-blank for search, ≤ {b.max_query_length:,} characters",
        "`page_view.page_path`, `page_view.referrer`": f"≤ {b.max_url_length:,} characters",
        "`product_name`, `action`": f"≤ {b.max_text_length:,} characters",
        "`attributes`": f"≤ {b.max_attributes} entries, key ≤ {b.max_attribute_key_length}, "
        f"value ≤ {b.max_attribute_value_length:,} characters",
        "a batch (`LogEvents`, one `StreamEvents` request)": f"≤ {b.max_batch_events:,} events",
    }
    assert {k.strip(): v.strip() for k, v in rows.items() if k.strip() in expected} == expected
