"""InteractionService semantics around the write path: what each RPC answers,
and StreamEvents' contract (acknowledged once committed, in request order,
a bounded number of batches in flight, cancellation cleans up)."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from interactions_client.rules import RULES
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server.config import DEFAULT_BATCHES_IN_FLIGHT
from interactions_server.server import App
from tests.events import valid_event
from tests.support import (
    blocked_writes,
    events_table_locked,
    eventually,
    has_blocked_writes,
    logged_event_ids,
    no_blocked_writes,
)

VIEW = EventType.EVENT_TYPE_VIEW


async def test_list_event_types_is_the_rule_catalog(interaction_stub: InteractionServiceStub) -> None:
    response = await interaction_stub.ListEventTypes(pb.ListEventTypesRequest())
    assert [(t.event_type, t.name, t.rule) for t in response.event_types] == [
        (r.event_type, r.name, r.proto) for r in RULES.values()
    ]
    assert {t.name for t in response.event_types} >= {"view", "add_to_cart", "purchase", "logout", "custom"}


async def test_log_event_answers_the_id_and_whether_it_was_a_duplicate(
    database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    event = valid_event(VIEW)
    first = await interaction_stub.LogEvent(pb.LogEventRequest(event=event))
    again = await interaction_stub.LogEvent(pb.LogEventRequest(event=event))
    assert (first.event_id, first.duplicate) == (event.event_id, False)
    assert (again.event_id, again.duplicate) == (event.event_id, True)
    assert await logged_event_ids(database_url) == {event.event_id}


async def test_log_event_without_an_id_gets_one_assigned(
    database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    response = await interaction_stub.LogEvent(pb.LogEventRequest(event=valid_event(VIEW, event_id="")))
    assert uuid.UUID(response.event_id)
    assert await logged_event_ids(database_url) == {response.event_id}


async def test_log_events_counts_accepted_and_duplicate_events(interaction_stub: InteractionServiceStub) -> None:
    events = [valid_event(VIEW) for _ in range(3)]
    await interaction_stub.LogEvents(pb.LogEventsRequest(events=events[:1]))
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))
    assert (response.accepted_count, response.duplicate_count, list(response.rejected)) == (2, 1, [])
    empty = await interaction_stub.LogEvents(pb.LogEventsRequest())
    assert (empty.accepted_count, empty.duplicate_count) == (0, 0)


def batch(size: int) -> list[Event]:
    return [valid_event(VIEW, product_id=f"p{i}") for i in range(size)]


async def test_stream_answers_every_request_in_order_once_committed(
    database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    # Sequences are the client's: answered as given, in request order, whatever their values.
    sequences = [40, 7, 7, 1000, 3, 12, 0, 99, 5, 61]
    batches = [batch(size) for size in (500, 1, 0, 250, 3, 1000, 2, 1, 40, 9)]
    call = interaction_stub.StreamEvents()
    for sequence, events in zip(sequences, batches, strict=True):
        await call.write(pb.StreamEventsRequest(sequence=sequence, events=events))
    await call.done_writing()
    responses = [response async for response in call]

    assert [r.sequence for r in responses] == sequences
    assert [r.accepted_count for r in responses] == [len(b) for b in batches]
    assert await call.code() == grpc.StatusCode.OK
    logged = await logged_event_ids(database_url)
    assert logged == {e.event_id for b in batches for e in b}


async def test_stream_resent_batch_is_answered_as_duplicates(interaction_stub: InteractionServiceStub) -> None:
    events = batch(10)
    call = interaction_stub.StreamEvents()
    await call.write(pb.StreamEventsRequest(sequence=1, events=events))
    await call.write(pb.StreamEventsRequest(sequence=2, events=events))
    await call.done_writing()
    responses = [r async for r in call]
    assert [r.sequence for r in responses] == [1, 2]
    # The two batches may be written concurrently: either one may be the first to commit.
    assert sorted((r.accepted_count, r.duplicate_count) for r in responses) == [(0, 10), (10, 0)]


async def test_stream_writes_a_bounded_number_of_batches_at_once(
    database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    assert DEFAULT_BATCHES_IN_FLIGHT > 1  # overlapping writes is what makes streams fast (field notes)
    batches = [batch(3) for _ in range(8)]
    call = interaction_stub.StreamEvents()
    async with events_table_locked(database_url) as lock:
        for sequence, events in enumerate(batches):
            await call.write(pb.StreamEventsRequest(sequence=sequence, events=events))
        # Several batches write concurrently, each on its own connection...
        await eventually(lambda: has_blocked_writes(lock, DEFAULT_BATCHES_IN_FLIGHT))
        await asyncio.sleep(0.3)
        # ...but no more than the bound, however many the client has sent.
        assert await blocked_writes(lock) == DEFAULT_BATCHES_IN_FLIGHT
    await call.done_writing()
    assert [r.sequence async for r in call] == list(range(8))
    assert len(await logged_event_ids(database_url)) == 24


async def test_a_cancelled_stream_releases_its_connections(
    server: App, database_url: str, interaction_stub: InteractionServiceStub
) -> None:
    call = interaction_stub.StreamEvents()
    async with events_table_locked(database_url) as lock:
        for sequence in range(5):
            await call.write(pb.StreamEventsRequest(sequence=sequence, events=batch(2)))
        await eventually(lambda: has_blocked_writes(lock, DEFAULT_BATCHES_IN_FLIGHT))
        call.cancel()
        # The server cancels the blocked writes: their connections go back to the pool.
        await eventually(lambda: no_blocked_writes(lock))
    await eventually(lambda: _pool_idle(server))
    assert (await interaction_stub.LogEvents(pb.LogEventsRequest(events=batch(1)))).accepted_count == 1


async def _pool_idle(server: App) -> bool:
    return bool(server.pool.get_idle_size() == server.pool.get_size())
