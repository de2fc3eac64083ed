"""Issue 17 item 5: channels of one process share one TCP connection (grpc's
global subchannel pool); `client.stream(connections=N)` opens N of their own."""

from __future__ import annotations

import asyncio

import psutil

from interactions_client import InteractionsClient, ParallelStreamer
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App
from tests.events import valid_event
from tests.support import StartServer


def _connections_to(app: App) -> int:
    """Established TCP connections of this process to the server's port."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == app.port and c.status == psutil.CONN_ESTABLISHED
    )


def _events(count: int, prefix: str) -> list[Event]:
    return [
        valid_event(EventType.EVENT_TYPE_VIEW, user_id=f"{prefix}{i % 50}", product_id=f"p{i}") for i in range(count)
    ]


async def test_a_parallel_streamer_opens_a_connection_per_stream_and_keeps_the_send_order_in_its_reports(
    start_server: StartServer,
) -> None:
    app = await start_server()
    before = _connections_to(app)
    events = _events(2_000, "u")
    events[250].user_id = ""  # rejected by the server (validate=False): its index is the send order's
    async with InteractionsClient(app.address, validate=False) as client:
        streamer = client.stream(connections=4, batch_size=100, linger=0.01)
        assert isinstance(streamer, ParallelStreamer)
        async with streamer:
            for i, event in enumerate(events):
                await streamer.send(event, tag=i)
            await streamer.flush()
            opened = _connections_to(app) - before
        assert opened == 4
        assert all(s.totals.accepted == 500 - (s is streamer.streamers[2]) for s in streamer.streamers)
        totals = streamer.totals
        assert (totals.sent, totals.accepted, totals.rejected, totals.failed) == (2_000, 1_999, 1, 0)
        [rejection] = streamer.rejections
        assert (rejection.index, rejection.tag, rejection.local) == (250, 250, False)
    await asyncio.sleep(0.2)
    assert _connections_to(app) == before  # its channels are closed with it


async def test_several_clients_of_one_process_share_one_connection(start_server: StartServer) -> None:
    """What the README says happens without connections=N."""
    app = await start_server()
    before = _connections_to(app)
    clients = [InteractionsClient(app.address) for _ in range(4)]
    try:
        for client in clients:
            await client.health()
        assert _connections_to(app) - before == 1
    finally:
        for client in clients:
            await client.close()
