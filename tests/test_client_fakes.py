"""Small real grpc.aio servers for the client tests that need no database: an
in-memory InteractionService (dedup by (user_id, event_id), the shared
validation, BadRequest details on INVALID_ARGUMENT) with fault switches, an
in-memory UserStateService and the standard health service.

Not a mock of grpc: the client talks to these over real loopback HTTP/2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from interactions_client.rpc_protos import Violation, encode_bad_request_status
from interactions_client.v1 import interaction_service_pb2 as svc
from interactions_client.v1 import interaction_service_pb2_grpc as svc_grpc
from interactions_client.v1 import user_state_service_pb2 as state
from interactions_client.v1 import user_state_service_pb2_grpc as state_grpc
from interactions_client.v1.event_pb2 import Event
from interactions_client.validation import validate


@dataclass
class Faults:
    """Switches a test flips to make the fake misbehave."""

    stall_streams: bool = False  # read requests, never answer
    # Commit the n-th stream request (counted over all streams), then break the
    # stream with UNAVAILABLE before answering it: the ack is lost.
    break_after_commit_at: set[int] = field(default_factory=set)
    unavailable_unary: int = 0  # fail this many unary calls with UNAVAILABLE first
    unary_delay: float = 0.0  # seconds each unary write takes
    abort_stream_with: grpc.StatusCode | None = None


class FakeInteractions(svc_grpc.InteractionServiceServicer):
    def __init__(self, faults: Faults, stored: dict[tuple[str, str], Event] | None = None) -> None:
        self.faults = faults
        # Pass the store of a previous instance to model a restart: the database survives.
        self.stored: dict[tuple[str, str], Event] = {} if stored is None else stored
        self.stream_requests = 0
        self.streams_opened = 0
        self.unary_calls = 0

    def _write(self, events: list[Event]) -> tuple[int, int, list[svc.RejectedEvent]]:
        accepted = duplicate = 0
        rejected = []
        for index, event in enumerate(events):
            violations = validate(event)
            if violations:
                rejected.append(svc.RejectedEvent(index=index, event_id=event.event_id, violations=violations))
            elif (event.user_id, event.event_id) in self.stored:
                duplicate += 1
            else:
                self.stored[(event.user_id, event.event_id)] = event
                accepted += 1
        return accepted, duplicate, rejected

    async def _unary_faults(self, context: grpc.aio.ServicerContext) -> None:
        self.unary_calls += 1
        if self.faults.unary_delay:
            await asyncio.sleep(self.faults.unary_delay)
        if self.faults.unavailable_unary > 0:
            self.faults.unavailable_unary -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database restarting")

    async def LogEvent(self, request: svc.LogEventRequest, context: grpc.aio.ServicerContext) -> svc.LogEventResponse:
        await self._unary_faults(context)
        violations = validate(request.event)
        if violations:
            found = [Violation(v.field, v.description) for v in violations]
            details = encode_bad_request_status(grpc.StatusCode.INVALID_ARGUMENT.value[0], "invalid event", found)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid event",
                trailing_metadata=(("grpc-status-details-bin", details),),
            )
        accepted, _, _ = self._write([request.event])
        return svc.LogEventResponse(event_id=request.event.event_id, duplicate=not accepted)

    async def LogEvents(
        self, request: svc.LogEventsRequest, context: grpc.aio.ServicerContext
    ) -> svc.LogEventsResponse:
        await self._unary_faults(context)
        accepted, duplicate, rejected = self._write(list(request.events))
        return svc.LogEventsResponse(accepted_count=accepted, duplicate_count=duplicate, rejected=rejected)

    async def ListEventTypes(
        self, request: svc.ListEventTypesRequest, context: grpc.aio.ServicerContext
    ) -> svc.ListEventTypesResponse:
        return svc.ListEventTypesResponse()

    async def StreamEvents(
        self, request_iterator: AsyncIterator[svc.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.StreamEventsResponse]:
        self.streams_opened += 1
        if self.faults.abort_stream_with is not None:
            await context.abort(self.faults.abort_stream_with, "refused")
        async for request in request_iterator:
            self.stream_requests += 1
            if self.faults.stall_streams:
                continue
            accepted, duplicate, rejected = self._write(list(request.events))
            if self.stream_requests in self.faults.break_after_commit_at:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield svc.StreamEventsResponse(
                sequence=request.sequence, accepted_count=accepted, duplicate_count=duplicate, rejected=rejected
            )
        if self.faults.stall_streams:
            await asyncio.Event().wait()


class FakeUserState(state_grpc.UserStateServiceServicer):
    def __init__(self) -> None:
        self.carts: dict[str, list[state.CartItem]] = {}
        self.wishlists: dict[str, list[state.WishlistItem]] = {}
        self.purchases: dict[str, list[state.Purchase]] = {}

    async def GetCart(self, request: state.GetCartRequest, context: grpc.aio.ServicerContext) -> state.GetCartResponse:
        return state.GetCartResponse(items=self.carts.get(request.user_id, []))

    async def GetWishlist(
        self, request: state.GetWishlistRequest, context: grpc.aio.ServicerContext
    ) -> state.GetWishlistResponse:
        return state.GetWishlistResponse(items=self.wishlists.get(request.user_id, []))

    async def ListPurchases(
        self, request: state.ListPurchasesRequest, context: grpc.aio.ServicerContext
    ) -> state.ListPurchasesResponse:
        if request.page_token and not request.page_token.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
        start = int(request.page_token or 0)
        size = request.page_size or 100
        rows = self.purchases.get(request.user_id, [])
        page = rows[start : start + size]
        more = start + size < len(rows)
        return state.ListPurchasesResponse(purchases=page, next_page_token=str(start + size) if more else "")


@dataclass
class FakeServer:
    address: str
    server: grpc.aio.Server
    interactions: FakeInteractions
    state: FakeUserState
    health: health.aio.HealthServicer
    faults: Faults

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


async def start_fake_server(
    port: int = 0,
    faults: Faults | None = None,
    credentials: grpc.ServerCredentials | None = None,
    stored: dict[tuple[str, str], Event] | None = None,
) -> FakeServer:
    faults = faults or Faults()
    server = grpc.aio.server()
    interactions = FakeInteractions(faults, stored)
    user_state = FakeUserState()
    health_servicer = health.aio.HealthServicer()
    svc_grpc.add_InteractionServiceServicer_to_server(interactions, server)
    state_grpc.add_UserStateServiceServicer_to_server(user_state, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        bound = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    fake = FakeServer(f"127.0.0.1:{bound}", server, interactions, user_state, health_servicer, faults)
    await fake.set_serving(True)
    return fake
