"""Issue 16: interactive calls before bulk work (interactions_server.precedence).

Deterministic checks of the mechanism, no timing thresholds: the database
holds the calls where the test wants them (a table lock), and the test counts
the writes waiting for it."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server import metrics
from interactions_server.precedence import Precedence
from interactions_server.services.interactions import SERVICE_NAME
from tests.events import valid_event
from tests.support import StartServer, events_table_locked, eventually


def _cart(user: str) -> Event:
    return valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=user, product_id="p1", event_value=1)


def cart_lines_locked(database_url: str) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
    """Every cart sync waits (the log's inserts do not) until the block exits."""
    return events_table_locked(database_url, "cart_lines")


def _received() -> float:
    """StreamEvents requests the server has read (this process's registry)."""
    metrics.instruments()
    registry = metrics._registry
    assert registry is not None
    labels = {"grpc_type": "bidi_stream", "grpc_service": SERVICE_NAME, "grpc_method": "StreamEvents"}
    return registry.get_sample_value("grpc_server_msg_received_total", labels) or 0.0


async def _read(count: float) -> bool:
    return _received() >= count


async def _held(lock: asyncpg.Connection) -> bool:
    """Whether a LogEvent waits for the lock of cart_lines_locked."""
    waiting: int = await lock.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'cart_lines'::regclass AND NOT granted"
    )
    return waiting >= 1


def _batch(sequence: int) -> pb.StreamEventsRequest:
    # Users of their own: no batch waits for another's sync key.
    return pb.StreamEventsRequest(sequence=sequence, events=[_cart(f"s{sequence}-{i}") for i in range(10)])


async def test_a_late_interactive_call_goes_ahead_of_a_streams_next_batch_and_the_stream_then_resumes_its_pace(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(interactive_latency_target=0.1)  # held back for 5 s at most
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        stream = stub.StreamEvents(timeout=60)
        async with cart_lines_locked(database_url):
            await stream.write(_batch(1))
            await eventually(lambda: _read(1))
        assert (await stream.read()).sequence == 1
        start = _received()
        async with cart_lines_locked(database_url) as lock:
            inline = asyncio.ensure_future(stub.LogEvent(pb.LogEventRequest(event=_cart("inline")), timeout=60))
            await eventually(lambda: _held(lock))
            await asyncio.sleep(0.15)  # the LogEvent is past its target: behind
            for sequence in range(2, 7):  # the stream at full speed: five batches at once
                await stream.write(_batch(sequence))
            await eventually(lambda: _read(start + 1))
            await asyncio.sleep(0.3)
            # The stream keeps one batch in flight and reads no further one
            # while the LogEvent is behind (without precedence: three).
            assert _received() - start == 1
        assert not (await inline).duplicate
        assert [(await stream.read()).sequence for _ in range(5)] == [2, 3, 4, 5, 6]
        # The interactive call gone, the stream takes its pace back: three batches in flight.
        start = _received()
        async with cart_lines_locked(database_url):
            for sequence in range(7, 11):
                await stream.write(_batch(sequence))
            await eventually(lambda: _read(start + 3))
            await asyncio.sleep(0.3)
            assert _received() - start == 3
        await stream.done_writing()
        assert [(await stream.read()).sequence for _ in range(4)] == [7, 8, 9, 10]
        assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK


async def test_without_a_target_the_stream_keeps_its_batches_in_flight(
    start_server: StartServer, database_url: str
) -> None:
    """The same as above with --interactive-latency-target 0: what the test above rules out."""
    app = await start_server(interactive_latency_target=0)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        stream = stub.StreamEvents(timeout=60)
        start = _received()
        async with cart_lines_locked(database_url) as lock:
            inline = asyncio.ensure_future(stub.LogEvent(pb.LogEventRequest(event=_cart("inline")), timeout=60))
            await eventually(lambda: _held(lock))
            await asyncio.sleep(0.15)
            for sequence in range(1, 6):
                await stream.write(_batch(sequence))
            await eventually(lambda: _read(start + 3))
        await inline
        await stream.done_writing()
        assert [(await stream.read()).sequence for _ in range(5)] == [1, 2, 3, 4, 5]


async def test_bulk_waits_only_while_an_interactive_call_is_behind_and_never_with_nothing_in_flight() -> None:
    precedence = Precedence(0.05)
    idle, busy = (lambda: True), (lambda: False)
    assert not precedence.behind()
    ticket = precedence.begin()
    assert not precedence.behind()  # in flight, within the target
    await precedence.bulk_turn("StreamEvents", busy)  # at once
    precedence._starts[ticket] -= 0.06  # as if it had started 60 ms ago: late
    assert precedence.behind()
    await precedence.bulk_turn("StreamEvents", idle)  # nothing in flight: bulk never stops
    held = asyncio.ensure_future(precedence.bulk_turn("StreamEvents", busy))
    await asyncio.sleep(0.02)
    assert not held.done()
    precedence.end(ticket)  # the interactive side is gone: bulk takes its capacity back
    await asyncio.wait_for(held, 1)
    assert not precedence.behind()
    again = precedence.begin()  # a new call, in time, after a late one: bulk still gives way for a while
    assert precedence.behind()
    precedence.end(again)
    assert not Precedence(0).behind()


async def test_group_commit_never_waits_for_a_connection_held_by_bulk_work(
    start_server: StartServer, database_url: str
) -> None:
    """Bulk writes leave the pool's last connections to group commit and the
    reads: with every bulk write stuck, a LogEvent is still written."""
    app = await start_server(pool_max_size=6, interactive_latency_target=0)  # bulk: 2 of the 6
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        streams = [stub.StreamEvents(timeout=60) for _ in range(4)]
        async with cart_lines_locked(database_url) as lock:
            for s, stream in enumerate(streams):
                for sequence in range(1, 4):  # twelve batches in flight, each stuck in its cart sync
                    await stream.write(_batch(100 * s + sequence))
            await eventually(lambda: _held(lock))
            view = valid_event(EventType.EVENT_TYPE_VIEW, user_id="inline", product_id="p1")
            answer = await stub.LogEvent(pb.LogEventRequest(event=view), timeout=10)
            assert not answer.duplicate
        for stream in streams:
            await stream.done_writing()
            assert [(await stream.read()).accepted_count for _ in range(3)] == [10] * 3
