"""EventStreamService.SubscribeEvents against the real server and database:
order, cursors (resuming after any response, mid-transaction too), filters
by type and partition, bad requests, retention's oldest position, deletion,
events logged before the stream existed, one reader per process, a slow
consumer, and resuming on another server. The gap test and the process
kills are in tests/test_event_stream_gaps.py and test_event_stream_processes.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from interactions_client import FailedPreconditionError, InteractionsClient
from interactions_client.subscription import AsyncSubscription, SubscriptionBatch
from interactions_client.v1 import event_stream_service_pb2 as pb
from interactions_client.v1 import event_stream_service_pb2_grpc
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App
from interactions_server.services import event_stream
from tests.events import valid_event
from tests.support import StartServer, eventually, field_violations

VIEW, CART, CUSTOM = EventType.EVENT_TYPE_VIEW, EventType.EVENT_TYPE_ADD_TO_CART, EventType.EVENT_TYPE_CUSTOM


def events_of(users: Sequence[str], event_type: int = VIEW, *, at: float | None = None) -> list[Event]:
    """One event per user (repeats allowed), 1 ms apart from `at` (default: a minute ago)."""
    base = (time.time() - 60) if at is None else at
    events = []
    for i, user in enumerate(users):
        event = valid_event(event_type, user_id=user)
        event.occurred_at.FromMicroseconds(int(base * 1_000_000) + i * 1_000)
        events.append(event)
    return events


def stream_order(batches: Sequence[Sequence[Event]]) -> list[str]:
    """The order the stream promises for transactions written one after the
    other: by transaction, then (user_id, occurred_at, event_id) inside one
    (user ids compared in the database's collation: the tests' ids are
    ASCII, where every collation agrees, unless a test says otherwise)."""
    ids: list[str] = []
    for batch in batches:
        ids += [
            e.event_id for e in sorted(batch, key=lambda e: (e.user_id, e.occurred_at.ToMicroseconds(), e.event_id))
        ]
    return ids


def assert_transaction_order(ids: Sequence[str], batches: Sequence[Sequence[Event]]) -> None:
    """`ids` are the transactions' events one transaction after the other, each
    user's in occurred_at order (whatever the collation orders users by)."""
    assert len(ids) == sum(len(b) for b in batches)
    offset = 0
    for batch in batches:
        part = ids[offset : offset + len(batch)]
        offset += len(batch)
        assert set(part) == {e.event_id for e in batch}
        by_id = {e.event_id: e for e in batch}
        per_user: dict[str, list[int]] = {}
        for event_id in part:
            per_user.setdefault(by_id[event_id].user_id, []).append(by_id[event_id].occurred_at.ToMicroseconds())
        assert all(times == sorted(times) for times in per_user.values())


class Reader:
    """A subscription read in the background into `batches`."""

    def __init__(self, subscription: AsyncSubscription) -> None:
        self.subscription = subscription
        self.batches: list[SubscriptionBatch] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for batch in self.subscription:
            self.batches.append(batch)

    @property
    def event_ids(self) -> list[str]:
        return [e.event.event_id for b in self.batches for e in b.events]

    @property
    def events(self) -> list[Any]:
        return [e for b in self.batches for e in b.events]

    async def wait_for(self, count: int, seconds: float = 10.0) -> None:
        async def enough() -> bool:
            if self._task.done():
                self._task.result()  # raises what ended it
            return len(self.event_ids) >= count

        await eventually(enough, seconds)

    async def started(self) -> str:
        """The cursor of the first batch (the start)."""
        await eventually(lambda: _true(bool(self.batches)))
        return self.batches[0].cursor

    async def close(self) -> None:
        self.subscription.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def client(server: App) -> AsyncIterator[InteractionsClient]:
    async with InteractionsClient(server.address) as client:
        yield client


@pytest.fixture
async def stub(server: App) -> AsyncIterator[event_stream_service_pb2_grpc.EventStreamServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield event_stream_service_pb2_grpc.EventStreamServiceStub(channel)


async def read_responses(call: Any, count: int, seconds: float = 10.0) -> list[pb.SubscribeEventsResponse]:
    responses = []
    async with asyncio.timeout(seconds):
        while len(responses) < count:
            responses.append(await call.read())
    return responses


async def events_until(call: Any, count: int, seconds: float = 10.0) -> list[pb.SubscribeEventsResponse]:
    """Responses of `call` until they hold `count` events."""
    responses: list[pb.SubscribeEventsResponse] = []
    async with asyncio.timeout(seconds):
        while sum(len(r.events) for r in responses) < count:
            responses.append(await call.read())
    return responses


# --- order and cursors ----------------------------------------------------------


async def test_events_arrive_in_stream_order_and_each_cursor_resumes_after_its_batch(
    client: InteractionsClient,
) -> None:
    reader = Reader(client.subscribe())
    start = await reader.started()
    logged = [events_of([f"u{(i * 7 + j) % 5}" for j in range(10)]) for i in range(3)]
    for batch in logged:  # one transaction after the other
        assert (await client.log_many(batch)).accepted == 10
    await reader.wait_for(30)
    assert reader.event_ids == stream_order(logged)
    assert [e.event.user_id for e in reader.events][:10] == sorted(e.user_id for e in logged[0])
    first = reader.events[0]
    assert first.received_at.seconds > 0 and first.ml_weight == 1.0  # an ExportedEvent, like the export's
    await reader.close()

    # From the start again, and from after every batch: the rest, no more, no less.
    cursors = [start] + [b.cursor for b in reader.batches]
    seen_before = 0
    for batch_index, cursor in enumerate(cursors):
        if batch_index:
            seen_before += len(reader.batches[batch_index - 1].events)
        rest = reader.event_ids[seen_before:]
        again = Reader(client.subscribe(cursor=cursor))
        await again.wait_for(len(rest))
        await asyncio.sleep(0.05)
        assert again.event_ids == rest
        await again.close()


async def test_a_response_ending_inside_a_transaction_resumes_inside_it(
    server: App, stub: event_stream_service_pb2_grpc.EventStreamServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_stream, "MAX_EVENTS", 4)
    logged = events_of([f"u{i % 4}" for i in range(10)])
    async with InteractionsClient(server.address) as client:
        assert (await client.log_many(logged)).accepted == 10
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(start=pb.START_POSITION_EARLIEST))
    responses = await events_until(call, 10)
    call.cancel()
    ids = [e.event.event_id for r in responses for e in r.events]
    assert ids == stream_order([logged])
    assert max(len(r.events) for r in responses) == 4
    for index, response in enumerate(responses):
        done = sum(len(r.events) for r in responses[: index + 1])
        if done == 10:
            break
        resumed = stub.SubscribeEvents(pb.SubscribeEventsRequest(cursor=response.cursor))
        rest = await events_until(resumed, 10 - done)
        resumed.cancel()
        assert [e.event.event_id for r in rest for e in r.events] == ids[done:]


async def test_now_starts_after_what_was_committed_and_earliest_at_the_oldest(client: InteractionsClient) -> None:
    before = events_of(["a", "b"])
    assert (await client.log_many(before)).accepted == 2
    now = Reader(client.subscribe())
    earliest = Reader(client.subscribe(start="earliest"))
    await now.started()
    after = events_of(["c"])
    assert (await client.log_many(after)).accepted == 1
    await earliest.wait_for(3)
    await now.wait_for(1)
    await asyncio.sleep(0.1)
    assert now.event_ids == [after[0].event_id]
    assert earliest.event_ids == stream_order([before, after])
    await now.close()
    await earliest.close()


async def test_now_while_the_reader_runs_starts_at_its_current_position_not_where_it_started(
    client: InteractionsClient,
) -> None:
    """A later subscription from now does not get what the process's reader
    read before it (it used to start where the reader had started: with a
    reader running for a while, far behind the ring, every new subscriber
    reading the backlog from the database by itself)."""
    first = Reader(client.subscribe())
    await first.started()
    before = events_of(["a", "b"])
    assert (await client.log_many(before)).accepted == 2
    await first.wait_for(2)  # the reader has read them: its position is past them
    later = Reader(client.subscribe())
    await later.started()
    after = events_of(["c"])
    assert (await client.log_many(after)).accepted == 1
    await first.wait_for(3)
    await later.wait_for(1)
    await asyncio.sleep(0.1)
    assert later.event_ids == [after[0].event_id]
    assert first.event_ids == stream_order([before, after])
    await later.close()
    await first.close()


# --- filters ---------------------------------------------------------------------------


def partition_of(user_id: str, count: int) -> int:
    """The documented hash: SHA-256 of the UTF-8 user_id, first 4 bytes big-endian, modulo count."""
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:4], "big") % count


async def test_partitions_together_are_the_whole_stream_and_types_filter(client: InteractionsClient) -> None:
    users = [f"user-{i}" for i in range(40)] + ["Zoë ✓", "guest:ab/cd"]
    logged = [
        events_of(users, VIEW),
        events_of(users[::2], CART),
        events_of(users[1::3], CUSTOM),
        events_of(users[::-1], VIEW),
    ]
    whole = Reader(client.subscribe(start="earliest"))
    parts = [Reader(client.subscribe(start="earliest", partition=(i, 3))) for i in range(3)]
    carts = Reader(client.subscribe(start="earliest", event_types=["add_to_cart"]))
    custom = Reader(client.subscribe(start="earliest", event_types=["custom", EventType.EVENT_TYPE_ADD_TO_CART]))
    for batch in logged:
        assert (await client.log_many(batch)).accepted == len(batch)
    total = sum(len(b) for b in logged)
    await whole.wait_for(total)
    await carts.wait_for(len(logged[1]))
    await custom.wait_for(len(logged[1]) + len(logged[2]))
    for index, part in enumerate(parts):
        await part.wait_for(sum(1 for b in logged for e in b if partition_of(e.user_id, 3) == index))
    await asyncio.sleep(0.1)

    assert_transaction_order(whole.event_ids, logged)
    # Every event in exactly one partition, the documented one, and each
    # partition in the whole stream's order.
    seen: dict[str, int] = {}
    for index, part in enumerate(parts):
        for event in part.events:
            assert event.event.event_id not in seen
            seen[event.event.event_id] = index
            assert partition_of(event.event.user_id, 3) == index
        assert part.event_ids == [i for i in whole.event_ids if i in set(part.event_ids)]
    assert set(seen) == set(whole.event_ids)
    assert all(len(p.event_ids) for p in parts)
    assert carts.event_ids == stream_order([logged[1]])
    assert sorted(custom.event_ids) == sorted(e.event_id for e in logged[1] + logged[2])
    for reader in (whole, carts, custom, *parts):
        await reader.close()


async def test_bad_requests_name_their_field(
    stub: event_stream_service_pb2_grpc.EventStreamServiceStub, client: InteractionsClient
) -> None:
    good = await Reader(client.subscribe()).started()
    tampered = good[:-3] + ("AAA" if good[-3:] != "AAA" else "BBB")
    cases = {
        "cursor": [
            pb.SubscribeEventsRequest(cursor="not a cursor"),
            pb.SubscribeEventsRequest(cursor=tampered),
            pb.SubscribeEventsRequest(cursor=good + "x"),
        ],
        "partition_count": [
            pb.SubscribeEventsRequest(partition_count=-1),
            pb.SubscribeEventsRequest(partition_count=event_stream.MAX_PARTITIONS + 1),
        ],
        "partition": [
            pb.SubscribeEventsRequest(partition=3, partition_count=3),
            pb.SubscribeEventsRequest(partition=-1, partition_count=3),
            pb.SubscribeEventsRequest(partition=1),
        ],
        "event_types": [pb.SubscribeEventsRequest(event_types=[999])],
        "start": [pb.SubscribeEventsRequest(start=7)],  # type: ignore[arg-type]
    }
    for field, requests in cases.items():
        for request in requests:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.SubscribeEvents(request).read()
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, request)
            assert field in field_violations(failure.value), (field, request)


# --- retention ------------------------------------------------------------------------


async def test_a_cursor_older_than_retention_is_refused_with_the_oldest_position(
    server: App, client: InteractionsClient, stub: event_stream_service_pb2_grpc.EventStreamServiceStub
) -> None:
    await server.pool.execute("SELECT ensure_event_partitions('2020-01-01', '2020-01-31')")
    reader = Reader(client.subscribe())
    before = await reader.started()
    old = events_of(["a", "b"], at=1_579_000_000.0)  # January 2020
    recent = events_of(["c"])
    assert (await client.log_many(old)).accepted == 2
    assert (await client.log_many(recent)).accepted == 1
    await reader.wait_for(3)
    after_old = reader.batches[-1].cursor
    await reader.close()
    assert await server.pool.fetchval("SELECT count(*) FROM drop_event_partitions_before('2021-01-01')") == 1

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SubscribeEvents(pb.SubscribeEventsRequest(cursor=before)).read()
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(failure.value)
    assert status is not None
    precondition = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(precondition)
    assert [(v.type, v.subject) for v in precondition.violations] == [("RETENTION", "cursor")]
    oldest = failure.value.details().split("cursor ")[-1].split(" ")[0]

    # The oldest position, and the earliest, go on without the removed events.
    for resumed in (client.subscribe(cursor=oldest), client.subscribe(start="earliest")):
        again = Reader(resumed)
        await again.wait_for(1)
        await asyncio.sleep(0.1)
        assert again.event_ids == [recent[0].event_id]
        await again.close()
    # A cursor past everything removed is still good.
    later = Reader(client.subscribe(cursor=after_old))
    await later.started()
    await later.close()
    # The client raises FailedPreconditionError, and does not retry it.
    with pytest.raises(FailedPreconditionError, match="oldest position available"):
        async for _ in client.subscribe(cursor=before):
            pass


# --- deletion -------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["DeleteUserData", "another process", "DeleteUserData of a linked guest id"])
async def test_after_a_deletion_no_event_of_the_user_comes_and_subscribers_are_told(
    server: App, client: InteractionsClient, through: str
) -> None:
    """A subscriber that stops reading holds the server's read-ahead of the
    user's events (the ring); the user's data is deleted; what comes next
    holds a UserDeleted record, and none of those events after it. Deleted
    by DeleteUserData in this process (known at once) or by another process
    (known at the reader's next poll), or in this process naming a guest id
    linked to the user (the events are stored under the person: every id of
    the person is dropped, and each gets its record)."""
    told_ids = ["doomed"]
    if through == "DeleteUserData of a linked guest id":
        assert (await client.link_identity("doomed-guest", "doomed")).events_moved == 0
        told_ids = ["doomed", "doomed-guest"]
    # Flow control without the window growing: the transport holds little.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65_536)]
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
        call = stub.SubscribeEvents(pb.SubscribeEventsRequest())
        await call.read()  # the start
        doomed = [events_of(["doomed"] * 1000) for _ in range(5)]
        kept = events_of(["kept"] * 500)
        for batch in [*doomed, kept]:
            assert (await client.log_many(batch)).accepted == len(batch)
        first = await call.read()
        assert {e.event.user_id for e in first.events} == {"doomed"}
        await asyncio.sleep(0.5)  # the reader has read everything into the ring
        if through == "DeleteUserData":
            assert (await client.delete_user_data("doomed")).events_deleted == 5000
        elif through == "DeleteUserData of a linked guest id":
            assert (await client.delete_user_data("doomed-guest")).events_deleted == 5000
        else:
            from interactions_server import storage
            from interactions_server.keyring import Keyring

            subject = Keyring.generate().subject_hash("doomed")
            assert (await storage.delete_user_data(server.pool, "doomed", actor="test", subject=subject)).events == 5000
            await asyncio.sleep(0.2)  # the reader's next poll learns of it
        after = [*events_of(["doomed"], at=time.time() + 1)]
        assert (await client.log_many(after)).accepted == 1
        responses = [first]
        async with asyncio.timeout(10):
            while not any(e.event.event_id == after[0].event_id for e in responses[-1].events):
                responses.append(await call.read())
        call.cancel()
    told = [i for i, r in enumerate(responses) if r.deletions]
    assert len(told) == 1 and sorted(d.user_id for d in responses[told[0]].deletions) == told_ids
    assert responses[told[0]].deletions[0].deleted_at.seconds > 0
    doomed_ids = {e.event_id for b in doomed for e in b}
    later = [e.event.event_id for r in responses[told[0] + 1 :] for e in r.events]
    assert not doomed_ids & set(later)  # nothing of the deleted data after the record
    assert after[0].event_id in later  # new activity is delivered
    delivered = [e.event.event_id for r in responses for e in r.events if e.event.event_id in doomed_ids]
    # What the transport held (the response in flight, one window) may still
    # arrive; what the server still held did not: far from all 5,000.
    assert len(delivered) <= 2_600, len(delivered)
    assert {e.event_id for e in kept} <= {e.event.event_id for r in responses for e in r.events}

    # A subscriber that comes later never sees the deleted events, and is told too.
    earliest = Reader(client.subscribe(start="earliest"))
    await earliest.wait_for(501)
    await asyncio.sleep(0.1)
    assert not doomed_ids & set(earliest.event_ids)
    assert sorted(d.user_id for b in earliest.batches for d in b.deletions) == told_ids
    assert earliest.event_ids[-1] == after[0].event_id  # after its deletion, in stream order
    await earliest.close()


async def test_a_linked_guest_s_events_are_delivered_under_the_person(client: InteractionsClient) -> None:
    """Events are delivered as stored: a guest's events before its link under
    the guest; the link moves them under the person, and they come again
    (same event_id, user_id the person) at the link's place; what is logged
    for the guest after the link comes as the person's."""
    reader = Reader(client.subscribe())
    await reader.started()
    before = events_of(["guest-7", "guest-7"])
    assert (await client.log_many(before)).accepted == 2
    await reader.wait_for(2)
    assert [(e.event.event_id, e.event.user_id) for e in reader.events] == [(e.event_id, "guest-7") for e in before]
    assert (await client.link_identity("guest-7", "person-7")).events_moved == 2
    later = events_of(["guest-7"], at=time.time())
    assert (await client.log_many(later)).accepted == 1
    await reader.wait_for(5)
    await asyncio.sleep(0.1)
    moved = [(e.event.event_id, e.event.user_id) for e in reader.events[2:]]
    assert moved == [*((e.event_id, "person-7") for e in before), (later[0].event_id, "person-7")]
    await reader.close()


# --- the log from before the stream, the reader, a slow consumer ---------------------------


async def test_events_logged_before_the_stream_existed_come_first_from_the_earliest(
    server: App, client: InteractionsClient, stub: event_stream_service_pb2_grpc.EventStreamServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    legacy = events_of([f"old-{i % 3}" for i in range(7)])
    assert (await client.log_many(legacy)).accepted == 7
    await server.pool.execute("UPDATE events SET xid = 0")  # as migration 0009 left them
    new = events_of(["new"])
    assert (await client.log_many(new)).accepted == 1
    monkeypatch.setattr(event_stream, "MAX_EVENTS", 3)  # the old ones come page by page
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(start=pb.START_POSITION_EARLIEST))
    responses = await events_until(call, 8)
    call.cancel()
    ids = [e.event.event_id for r in responses for e in r.events]
    assert ids == stream_order([legacy, new])
    # From the middle of the old ones.
    middle = next(r.cursor for r in responses if r.events)
    resumed = stub.SubscribeEvents(pb.SubscribeEventsRequest(cursor=middle))
    rest = await events_until(resumed, 5)
    resumed.cancel()
    assert [e.event.event_id for r in rest for e in r.events] == ids[3:]


async def feed_readers(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'interactions-feed' AND datname = current_database()"
    )
    return count


async def test_subscriptions_of_a_process_share_one_reader_which_stops_when_they_end(
    server: App, client: InteractionsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interactions_server.feed import _feed

    monkeypatch.setattr(_feed, "IDLE_STOP", 0.2)
    readers = [Reader(client.subscribe(partition=(i, 8))) for i in range(8)]
    for reader in readers:
        await reader.started()
    logged = events_of([f"u{i}" for i in range(200)])
    assert (await client.log_many(logged)).accepted == 200
    await eventually(lambda: _true(sum(len(r.event_ids) for r in readers) == 200))
    assert await feed_readers(server.pool) == 1
    for reader in readers:
        await reader.close()
    await eventually(lambda: _is(feed_readers(server.pool), 0))


async def _is(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_a_consumer_slower_than_the_ring_reads_behind_it_and_misses_nothing(
    start_server: StartServer,
) -> None:
    """With a ring of about 100 kB, a consumer that stalls while 20,000 events
    are logged falls behind it; it then reads the database a response at a
    time and joins the ring again."""
    server = await start_server(subscription_ring_bytes=100_000)
    async with InteractionsClient(server.address) as client:
        fast = Reader(client.subscribe())
        slow = client.subscribe()
        batches = aiter(slow)
        start = await anext(batches)
        logged = [events_of([f"u{(i + j) % 50}" for j in range(1000)]) for i in range(20)]
        for batch in logged:
            assert (await client.log_many(batch)).accepted == 1000
        await fast.wait_for(20_000, seconds=30)
        feed = server.server._feed  # type: ignore[union-attr]
        assert feed is not None and feed._ring_nbytes <= 100_000 + 2 * 1_000 * 400  # at most one read over
        received: list[str] = []
        async with asyncio.timeout(30):
            while len(received) < 20_000:
                received += [e.event.event_id for e in (await anext(batches)).events]
        assert received == fast.event_ids == stream_order(logged)
        assert start.cursor
        # Live again: a new event reaches both.
        more = events_of(["late"])
        assert (await client.log_many(more)).accepted == 1
        async with asyncio.timeout(10):
            while more[0].event_id not in received:
                received += [e.event.event_id for e in (await anext(batches)).events]
        slow.close()
        await fast.close()


async def test_a_subscription_resumes_on_another_server_when_its_own_shuts_down(
    start_server: StartServer,
) -> None:
    first = await start_server()
    second = await start_server()
    async with InteractionsClient(first.address) as writer, InteractionsClient(first.address) as reader_client:
        subscription = reader_client.subscribe()
        batches = aiter(subscription)
        await anext(batches)
        logged = [events_of([f"u{j}" for j in range(5)]) for _ in range(2)]
        assert (await writer.log_many(logged[0])).accepted == 5
        received: list[str] = []
        async with asyncio.timeout(10):
            while len(received) < 5:
                received += [e.event.event_id for e in (await anext(batches)).events]
        cursor = subscription.cursor
        await first.stop()
        # The stream ended with UNAVAILABLE; its client would retry the
        # same address. Another server takes the cursor.
        async with InteractionsClient(second.address) as other:
            assert (await other.log_many(logged[1])).accepted == 5
            resumed = Reader(other.subscribe(cursor=cursor))
            await resumed.wait_for(5)
            await asyncio.sleep(0.1)
            assert received + resumed.event_ids == stream_order(logged)
            await resumed.close()


async def test_a_subscriber_that_leaves_mid_response_ends_quietly(
    server: App, client: InteractionsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Flow control holds the server's write of a response when the subscriber
    leaves: the call ends, and nothing is logged (gRPC logs a failed write of a
    yielded response as an error with its traceback)."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65_536)]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                call = event_stream_service_pb2_grpc.EventStreamServiceStub(channel).SubscribeEvents(
                    pb.SubscribeEventsRequest()
                )
                await call.read()
                assert (await client.log_many(events_of(["busy"] * 1000))).accepted == 1000
                await call.read()
                await asyncio.sleep(0.3)  # the server is writing the next response
                call.cancel()
        await eventually(lambda: _true(server.server is not None and not server.server._feed.subscriptions))  # type: ignore[union-attr]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_the_retention_policy_records_the_oldest_position_for_whole_months_and_rows(
    server: App, client: InteractionsClient
) -> None:
    """The lifecycle's removals (issue 21) record what they removed: a month
    detached whole and rows deleted inside a month by a shorter per-type
    retention both move the oldest position available past them."""
    from dataclasses import replace
    from datetime import UTC, datetime

    from interactions_server import storage
    from interactions_server.config import RetentionPolicy

    await server.pool.execute("SELECT ensure_event_partitions('2025-01-01', '2025-03-31')")
    before = await Reader(client.subscribe()).started()
    january = events_of(["a", "b"], at=datetime(2025, 1, 15, tzinfo=UTC).timestamp())
    page = events_of(["c"], EventType.EVENT_TYPE_PAGE_VIEW, at=datetime(2025, 3, 5, tzinfo=UTC).timestamp())
    kept = events_of(["d"], at=datetime(2025, 3, 9, tzinfo=UTC).timestamp())
    for batch in (january, page, kept):
        assert (await client.log_many(batch)).accepted == len(batch)
    xids = dict(await server.pool.fetch("SELECT event_id::text, xid FROM events"))
    policy = RetentionPolicy.of(30, {"page_view": 7})
    fast = replace(storage.Pace(), rows=3, pause=0.0, min_pause=0.0)
    removed = await storage.run_retention(server.pool, policy, as_of=datetime(2025, 3, 13, 12, tzinfo=UTC), pace=fast)
    assert removed.events == 3 and removed.partitions == ["events_2025_01"]
    horizon = await server.pool.fetchval("SELECT removed_through FROM event_stream_horizon")
    assert horizon == max(xids[e.event_id] for e in january + page) < xids[kept[0].event_id]
    with pytest.raises(FailedPreconditionError, match="oldest position available"):
        async for _ in client.subscribe(cursor=before):
            pass
    earliest = Reader(client.subscribe(start="earliest"))
    await earliest.wait_for(1)
    await asyncio.sleep(0.1)
    assert earliest.event_ids == [kept[0].event_id]
    await earliest.close()


async def test_a_purge_records_the_oldest_position_too(client: InteractionsClient) -> None:
    """A purge (issue 21: AdminService.PurgeEvents of one user's events) moves
    the oldest position available past what it removed: a cursor from before
    the purged event is refused, one from after it goes on, and the earliest
    start no longer holds it."""
    reader = Reader(client.subscribe())
    before = await reader.started()
    purged = events_of(["purged"])
    assert (await client.log_many(purged)).accepted == 1
    await reader.wait_for(1)
    after_purged = reader.batches[-1].cursor
    kept = events_of(["kept"])
    assert (await client.log_many(kept)).accepted == 1
    await reader.wait_for(2)
    await reader.close()
    assert (await client.purge_events(user_ids=["purged"], force=True)).events == 1
    with pytest.raises(FailedPreconditionError, match="oldest position available"):
        async for _ in client.subscribe(cursor=before):
            pass
    for resumed in (Reader(client.subscribe(cursor=after_purged)), Reader(client.subscribe(start="earliest"))):
        await resumed.wait_for(1)
        await asyncio.sleep(0.1)
        assert resumed.event_ids == [kept[0].event_id]
        await resumed.close()
