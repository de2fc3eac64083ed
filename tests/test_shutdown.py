"""Shutdown is not held by calls that would wait forever: an open health
Watch and an idle stream end at once instead of using the whole grace period."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.events import valid_event
from tests.support import StartServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_an_open_watch_and_an_idle_stream_do_not_hold_shutdown(start_server: StartServer) -> None:
    app = await start_server(shutdown_grace=20.0)
    async with grpc.aio.insecure_channel(app.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        stream = InteractionServiceStub(channel).StreamEvents()
        await stream.write(pb.StreamEventsRequest(sequence=1, events=[valid_event(EventType.EVENT_TYPE_VIEW)]))
        assert (await stream.read()).sequence == 1  # then the client sends nothing more

        began = time.monotonic()
        await asyncio.wait_for(app.stop(), 10)
        assert time.monotonic() - began < 5  # far from the 20 s grace

        assert (await watch.read()).status == NOT_SERVING
        assert await watch.read() is grpc.aio.EOF  # the Watch ended, with OK
        assert await watch.code() == grpc.StatusCode.OK
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
