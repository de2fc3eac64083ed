"""Fault 6: conflicting resends. The same (user_id, event_id) with different
content is not a duplicate.

Promise: a resend with the same content is answered `duplicate`; with
different content it is rejected (ALREADY_EXISTS on LogEvent, a per-event
rejection naming `event_id` in LogEvents and StreamEvents); within one batch
the first is written and the second rejected. What the server filled in (a
missing occurred_at) is not part of the content. The log keeps the first
content; the state is its fold.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import grpc
import grpc.aio
import pytest

from interactions_client.rules import STANDARD
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.conftest import StartApp
from tests.faults.ledger import (
    OK,
    RAW_CHANNEL_OPTIONS,
    Ledger,
    TracebackCatcher,
    check_log_and_state,
    make_events,
    report,
)
from tests.faults.postgres import OwnPostgres

ADD_TO_CART = STANDARD["add_to_cart"].event_type
VIEW = STANDARD["view"].event_type
QUANTITY_TYPES = {STANDARD[n].event_type for n in ("add_to_cart", "remove_from_cart", "update_cart_quantity")}


def changed(event: Event, rnd: random.Random) -> Event:
    """The same key with different client-set content."""
    other = Event()
    other.CopyFrom(event)
    match rnd.randrange(4):
        case 0 if event.event_type in QUANTITY_TYPES:
            other.event_value = event.event_value + 5
        case 1:
            other.product_id = event.product_id + "-other"
        case 2:
            other.occurred_at.seconds -= 1
        case _:
            other.attributes["campaign"] = "spring"
    return other


def names_event_id(rejected: pb.RejectedEvent) -> bool:
    return any(v.field.endswith("event_id") and "different event" in v.description for v in rejected.violations)


async def test_conflicting_resends_are_rejected(
    postgres: OwnPostgres, start_app: StartApp, tracebacks: TracebackCatcher
) -> None:
    app = await start_app(postgres.url)
    rnd = random.Random(6)
    ledger = Ledger()
    async with grpc.aio.insecure_channel(app.address, options=RAW_CHANNEL_OPTIONS) as channel:
        stub = InteractionServiceStub(channel)

        # Unary: quantity 1, then the same id with quantity 5 (the example).
        first = Event(event_id=str(uuid.uuid4()), event_type=ADD_TO_CART, user_id="c1", product_id="p1", event_value=1)
        first.occurred_at.GetCurrentTime()
        ledger.sending([first])
        response = await stub.LogEvent(pb.LogEventRequest(event=first))
        ledger.answered(OK)
        ledger.acknowledge(first, response.duplicate)
        assert not response.duplicate
        same = await stub.LogEvent(pb.LogEventRequest(event=first))
        ledger.answered(OK)
        assert same.duplicate, "the same content again is a duplicate"
        ledger.duplicates += 1
        conflicting = Event()
        conflicting.CopyFrom(first)
        conflicting.event_value = 5
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.LogEvent(pb.LogEventRequest(event=conflicting))
        ledger.answered(raised.value.code())
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS, raised.value.details()

        # A missing occurred_at is filled in by the server: not part of the content.
        undated = Event(event_id=str(uuid.uuid4()), event_type=VIEW, user_id="c1", product_id="p1")
        ledger.sending([undated])
        assert not (await stub.LogEvent(pb.LogEventRequest(event=undated))).duplicate
        await asyncio.sleep(0.01)
        assert (await stub.LogEvent(pb.LogEventRequest(event=undated))).duplicate
        ledger.answered(OK)
        ledger.answered(OK)
        ledger.acknowledge(undated, duplicate=False)
        ledger.duplicates += 1

        # Many at once: every resend with changed content is rejected, unary.
        events = make_events(300, rnd, prefix="k")
        ledger.sending(events)
        answers = await asyncio.gather(*(stub.LogEvent(pb.LogEventRequest(event=e)) for e in events))
        for event, answer in zip(events, answers, strict=True):
            ledger.answered(OK)
            ledger.acknowledge(event, answer.duplicate)
        codes = await asyncio.gather(*(unary_code(stub, changed(e, rnd)) for e in events))
        for code in codes:
            ledger.answered(code)
        assert set(codes) == {grpc.StatusCode.ALREADY_EXISTS.name}, codes

        # Batched: a batch of conflicting resends (against the log) and, within
        # the batch, pairs with the same key and different content.
        fresh = make_events(200, rnd, prefix="b")
        ledger.sending(fresh)
        conflicts = [changed(e, rnd) for e in events[:100]]
        twins = [changed(e, rnd) for e in fresh[:100]]
        batch = [*fresh, *conflicts, *twins]  # 500, within the batch limit
        response = await stub.LogEvents(pb.LogEventsRequest(events=batch))
        ledger.answered(OK)
        rejected = {r.index: r for r in response.rejected}
        assert set(rejected) == set(range(200, 400)), sorted(set(rejected) ^ set(range(200, 400)))[:10]
        assert all(names_event_id(r) for r in rejected.values()), list(rejected.values())[:2]
        assert all(rejected[i].event_id == batch[i].event_id for i in rejected)
        assert (response.accepted_count, response.duplicate_count) == (200, 0)
        for event in fresh:
            ledger.acknowledge(event, duplicate=False)

        # Streamed: the same, one request per kind.
        requests = [
            pb.StreamEventsRequest(sequence=1, events=[changed(e, rnd) for e in fresh[100:]]),
            pb.StreamEventsRequest(sequence=2, events=fresh[100:]),  # same content: duplicates
        ]
        responses = [r async for r in stub.StreamEvents(iter(requests), timeout=30)]
        ledger.answered(OK)
        assert [len(r.rejected) for r in responses] == [100, 0]
        assert all(names_event_id(r) for r in responses[0].rejected)
        assert (responses[1].accepted_count, responses[1].duplicate_count) == (0, 100)
        ledger.duplicates += 100

    report("conflicting resends", ledger.figures())
    await check_log_and_state(postgres.url, ledger, all_acknowledged=True)  # the log kept the first content
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"


async def unary_code(stub: InteractionServiceStub, event: Event) -> str:
    try:
        await stub.LogEvent(pb.LogEventRequest(event=event))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return OK
