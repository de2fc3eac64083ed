"""--event-loop: the serving process on asyncio's loop (the default) or on uvloop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from interactions_client import InteractionsClient
from interactions_client.v1.event_pb2 import EventType
from interactions_server.config import loop_factory
from interactions_server.errors import StartupError
from tests.events import valid_event
from tests.faults.test_overload import interactions_server


def test_the_loop_factory_of_each_choice() -> None:
    assert loop_factory("asyncio") is None
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("auto") is uvloop.new_event_loop  # installed here (the dev extra)
    with pytest.raises(StartupError):
        loop_factory("trio")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_the_server_serves_and_stops_cleanly_on_either_loop(database_url: str, loop: str) -> None:
    async with interactions_server(database_url, "--event-loop", loop) as server:
        async with InteractionsClient(server.address) as client:
            event = valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=f"loop-{loop}", product_id="p1")
            assert not (await client.log(event)).duplicate
            async with client.stream(linger=0.01) as streamer:
                for i in range(50):
                    await streamer.send(
                        valid_event(EventType.EVENT_TYPE_VIEW, user_id=f"loop-{loop}", product_id=f"p{i}")
                    )
            assert streamer.totals.accepted == 50
            assert len(await client.get_cart(f"loop-{loop}")) == 1
        server.process.terminate()
        assert await asyncio.wait_for(server.process.wait(), 20) == 0
        assert "Traceback" not in server.log()
