"""The RPC ceiling: InteractionService with a LogEvent that does nothing.

`python -m bench.noop_server --listen 127.0.0.1:PORT` serves it (and
grpc.health.v1) with the real server's channel options, so that the benchmark can compare LogEvent on the
real server with the cost of the gRPC round trip alone (same messages, same
client, same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import interaction_service_pb2_grpc
from interactions_server.rpc import SERVER_OPTIONS


class NoopInteractionService(interaction_service_pb2_grpc.InteractionServiceServicer):
    async def LogEvent(self, request: pb.LogEventRequest, context: Any) -> pb.LogEventResponse:
        return pb.LogEventResponse(event_id=request.event.event_id, duplicate=False)


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    interaction_service_pb2_grpc.add_InteractionServiceServicer_to_server(
        NoopInteractionService(),  # type: ignore[abstract]  # the other methods answer UNIMPLEMENTED
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # SERVING for ""
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description="a no-op InteractionService (the benchmark's RPC ceiling)")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
