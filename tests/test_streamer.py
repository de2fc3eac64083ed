"""The bulk streamer against a real gRPC server with in-memory servicers
(test_client_fakes.py): batching, acknowledgement accounting, resend after
lost acknowledgements and restarts, backpressure, giving up, cancellation,
and the thread-backed synchronous twin.

The same promise against the real server and PostgreSQL is in
test_streamer_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from interactions_client.client import InteractionsClient
from interactions_client.errors import DeliveryFailedError, InteractionsError
from interactions_client.results import Rejection
from interactions_client.streamer import EventStreamer, StreamTotals
from interactions_client.sync_client import SyncInteractionsClient
from interactions_client.v1.event_pb2 import Event, EventType
from tests.test_client_fakes import FakeServer, start_fake_server

VIEW = EventType.EVENT_TYPE_VIEW


def view(i: int, *, user: str | None = None) -> Event:
    return Event(event_type=VIEW, user_id=user or f"u{i % 50}", product_id=f"p{i}")


def assert_balanced(totals: StreamTotals) -> None:
    assert totals.sent == totals.accepted + totals.duplicate + totals.rejected + totals.failed
    assert totals.unresolved == 0


async def test_every_event_is_acknowledged(client: InteractionsClient, fake: FakeServer) -> None:
    async with client.stream(batch_size=200) as stream:
        for i in range(5_000):
            await stream.send(view(i))
    assert stream.totals == StreamTotals(sent=5_000, accepted=5_000)
    assert len(fake.interactions.stored) == 5_000
    assert fake.interactions.stream_requests == 25  # closed by size: 5,000 / 200
    assert fake.interactions.streams_opened == 1


async def test_linger_closes_a_partial_batch(client: InteractionsClient, fake: FakeServer) -> None:
    async with client.stream(batch_size=500, linger=0.05) as stream:
        for i in range(3):
            await stream.send(view(i))
        await asyncio.sleep(0.3)  # no flush, no exit: the linger timer sends them
        assert len(fake.interactions.stored) == 3
        assert stream.totals.accepted == 3
        for i in range(3, 5):
            await stream.send(view(i))
    assert stream.totals == StreamTotals(sent=5, accepted=5)


async def test_flush_waits_for_every_acknowledgement(client: InteractionsClient, fake: FakeServer) -> None:
    async with client.stream(linger=60) as stream:
        for i in range(10):
            await stream.send(view(i))
        await stream.flush()
        assert stream.totals.accepted == 10 and stream.buffered == 0


async def test_lost_acknowledgements_are_resent_and_count_as_duplicates(
    client: InteractionsClient, fake: FakeServer
) -> None:
    # Requests 3 and 7 are committed, then their stream breaks before the answer.
    fake.faults.break_after_commit_at = {3, 7}
    async with client.stream(batch_size=100, max_in_flight=4, linger=60) as stream:  # batches close by size only
        for i in range(2_000):
            await stream.send(view(i))
    totals = stream.totals
    assert_balanced(totals)
    assert len(fake.interactions.stored) == 2_000
    assert totals.duplicate == 200  # the two batches whose answers were lost
    assert totals.accepted == 1_800
    assert totals.resent >= 200
    assert fake.interactions.streams_opened == 3
    assert totals.reconnects == 2


async def test_rejections_are_reported_with_their_tags(fake: FakeServer) -> None:
    seen: list[Rejection] = []
    events = [view(i) for i in range(10)]
    events[2].product_id = ""
    events[7].event_value = 5  # a view's value must be 1
    for validate in (True, False):
        seen.clear()
        async with (
            InteractionsClient(fake.address, validate=validate) as client,
            client.stream(on_rejected=seen.append) as stream,
        ):
            for i, event in enumerate(events):
                await stream.send(event, tag=f"line {i}")
        assert [(r.index, r.tag, r.local, r.violations[0].field) for r in seen] == [
            (2, "line 2", validate, "product_id"),
            (7, "line 7", validate, "event_value"),
        ]
        assert stream.rejections == []  # a callback replaces the list
        assert stream.totals.rejected == 2
        assert_balanced(stream.totals)


async def test_rejections_collect_without_a_callback(client: InteractionsClient) -> None:
    async with client.stream() as stream:
        await stream.send(Event(event_type=VIEW, user_id="u1"))
    assert [r.violations[0].field for r in stream.rejections] == ["product_id"]


async def test_send_blocks_while_the_window_is_full(client: InteractionsClient, fake: FakeServer) -> None:
    fake.faults.stall_streams = True  # reads every batch, answers none
    stream = client.stream(batch_size=100, max_in_flight=3)
    sent = 0

    async def produce() -> None:
        nonlocal sent
        async with stream:
            for i in range(100_000):
                await stream.send(view(i))
                sent += 1

    producer = asyncio.create_task(produce())
    previous = -1
    while sent != previous:  # until send stops returning
        previous = sent
        await asyncio.sleep(0.3)
    assert not producer.done()
    assert stream.in_flight == 3
    assert sent == stream.buffered == (3 + 1) * 100  # three batches in flight plus a full open one
    assert fake.interactions.stream_requests == 3

    producer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await producer
    # Cancelled: nothing was acknowledged, so everything is reported as failed.
    assert stream.totals.failed == sent == len(stream.undelivered)
    assert_balanced(stream.totals)


async def test_gives_up_after_the_retry_time_and_reports_what_failed(fake: FakeServer) -> None:
    async with InteractionsClient(fake.address) as client:
        stream = client.stream(batch_size=100, retry_timeout=1.0)
        started = 0.0
        with pytest.raises(DeliveryFailedError) as caught:
            async with stream:
                for i in range(1_000):
                    await stream.send(view(i))
                await stream.flush()
                fake.faults.stall_streams = True
                for i in range(1_000, 1_250):
                    await stream.send(view(i), tag=i)
                await asyncio.sleep(0.1)
                await fake.stop()  # and it never comes back
                started = time.monotonic()
    assert 0.9 <= time.monotonic() - started < 10
    totals = stream.totals
    assert (totals.accepted, totals.failed) == (1_000, 250)
    assert caught.value.failed == 250
    assert sorted(u.tag for u in stream.undelivered) == list(range(1_000, 1_250))  # type: ignore[type-var]
    assert_balanced(totals)
    with pytest.raises(RuntimeError):
        await stream.send(view(0))


async def test_positions_count_every_send_including_local_rejections(fake: FakeServer) -> None:
    fake.faults.stall_streams = True
    async with InteractionsClient(fake.address) as client:
        stream = client.stream(linger=0.01)

        async def body() -> None:
            async with stream:
                await stream.send(view(0), tag="a")
                await stream.send(Event(event_type=VIEW, user_id="u1"), tag="bad")  # rejected locally
                await stream.send(view(2), tag="c")
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(body())
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [(r.index, r.tag) for r in stream.rejections] == [(1, "bad")]
    assert [(u.index, u.tag) for u in stream.undelivered] == [(0, "a"), (2, "c")]


async def test_send_after_giving_up_raises(fake: FakeServer) -> None:
    fake.faults.stall_streams = True
    async with InteractionsClient(fake.address) as client:
        stream = client.stream(batch_size=10, linger=0.01, retry_timeout=0.3, raise_on_failure=False)
        async with stream:
            await stream.send(view(0))
            await asyncio.sleep(0.1)
            await fake.stop()
            with pytest.raises(DeliveryFailedError):
                for i in range(1, 1_000):
                    await stream.send(view(i))
                    await asyncio.sleep(0.01)
    assert stream.totals.failed >= 1
    assert_balanced(stream.totals)


async def test_a_status_that_cannot_heal_gives_up_at_once(client: InteractionsClient, fake: FakeServer) -> None:
    fake.faults.abort_stream_with = grpc.StatusCode.UNAUTHENTICATED
    started = time.monotonic()
    stream = client.stream(retry_timeout=30)
    with pytest.raises(DeliveryFailedError) as caught:
        async with stream:
            await stream.send(view(1))
    assert time.monotonic() - started < 5
    assert isinstance(caught.value.cause, InteractionsError)
    assert caught.value.cause.code == grpc.StatusCode.UNAUTHENTICATED
    assert stream.totals.failed == 1 and fake.interactions.streams_opened == 1


async def test_no_raise_on_failure_reports_in_totals(client: InteractionsClient, fake: FakeServer) -> None:
    fake.faults.abort_stream_with = grpc.StatusCode.PERMISSION_DENIED
    async with client.stream(raise_on_failure=False) as stream:
        await stream.send(view(1))
    assert stream.totals.failed == 1


async def test_resends_after_a_server_restart_on_the_same_port(fake: FakeServer) -> None:
    port = int(fake.address.rsplit(":", 1)[1])
    stored = fake.interactions.stored  # the "database" outlives the server
    replacement: list[FakeServer] = []

    async def restart() -> None:
        await fake.stop()
        await asyncio.sleep(0.3)
        replacement.append(await start_fake_server(port, stored=stored))

    async with InteractionsClient(fake.address) as client:
        async with client.stream(batch_size=250) as stream:
            for i in range(20_000):
                await stream.send(view(i))
                if i == 8_000:
                    restarting = asyncio.create_task(restart())
            await restarting
        await replacement[0].stop()
    assert_balanced(stream.totals)
    assert stream.totals.failed == 0
    assert stream.totals.accepted + stream.totals.duplicate == 20_000 == len(stored)


async def test_misuse() -> None:
    with pytest.raises(ValueError):
        EventStreamer(lambda: None, batch_size=1_001)
    with pytest.raises(ValueError):
        EventStreamer(lambda: None, max_in_flight=0)
    with pytest.raises(RuntimeError):
        await EventStreamer(lambda: None).send(view(1))


async def test_sync_streamer(fake: FakeServer) -> None:
    fake.faults.break_after_commit_at = {2}

    def stream_from_a_thread() -> StreamTotals:
        # A long linger: batches close by size only, so the broken one holds exactly 100 events.
        with SyncInteractionsClient(fake.address) as client, client.stream(batch_size=100, linger=60) as stream:
            for i in range(1_000):
                stream.send(view(i))
            stream.send(Event(event_type=VIEW, user_id="u1"))  # rejected locally
            stream.flush()
            assert stream.totals.accepted + stream.totals.duplicate == 1_000
        return stream.totals

    totals = await asyncio.to_thread(stream_from_a_thread)
    assert (totals.accepted, totals.duplicate, totals.rejected) == (900, 100, 1)
    assert len(fake.interactions.stored) == 1_000
