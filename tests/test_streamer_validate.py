"""The streamer without pre-validation (`client.stream(validate=False)`, for bulk
paths): a bad event is then rejected by the server instead, reported and
counted the same way, and the good events are stored."""

from __future__ import annotations

import asyncpg

from interactions_client.client import InteractionsClient
from interactions_client.streamer import EventStreamer
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App
from tests.events import valid_event

VIEW = EventType.EVENT_TYPE_VIEW


def _events() -> list[Event]:
    good = [valid_event(VIEW, user_id=f"u{i}", product_id=f"p{i}") for i in range(5)]
    bad = valid_event(VIEW, user_id="u-bad")
    bad.ClearField("product_id")  # a view names its product
    return [*good[:2], bad, *good[2:]]


async def _stream(server: App, validate: bool | None) -> EventStreamer:
    client = InteractionsClient(server.address)
    try:
        async with client.stream(validate=validate) as stream:
            for event in _events():
                await stream.send(event)
    finally:
        await client.close()
    return stream


async def test_without_prevalidation_the_server_rejects_the_bad_event(server: App, database_url: str) -> None:
    stream = await _stream(server, validate=False)
    [rejection] = stream.rejections
    assert not rejection.local  # rejected by the server, not by the client
    assert rejection.index == 2 and rejection.violations[0].field == "product_id"
    assert (stream.totals.sent, stream.totals.accepted, stream.totals.rejected) == (6, 5, 1)
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM events") == 5
    finally:
        await connection.close()


async def test_by_default_the_client_rejects_it_first(server: App) -> None:
    stream = await _stream(server, validate=None)
    [rejection] = stream.rejections
    assert rejection.local and rejection.index == 2
    assert (stream.totals.sent, stream.totals.accepted, stream.totals.rejected) == (6, 5, 1)
