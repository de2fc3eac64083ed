"""interactions.v1.IdentityService: linking an anonymous id to its user, and
reading who an id belongs to. The link itself is the write path's
(ingest.IdentityLinker), as a login carrying LoginDetails.anonymous_id links
the same way through the Ingestor."""

from __future__ import annotations

import time

import asyncpg
import grpc

from interactions_client import limits
from interactions_client.v1 import identity_service_pb2 as pb
from interactions_client.v1 import identity_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import InvalidArgument
from interactions_server.ingest import IdentityLinker
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["IdentityService"].full_name


class IdentityService(identity_service_pb2_grpc.IdentityServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._linker = IdentityLinker(pool)

    async def LinkIdentity(
        self, request: pb.LinkIdentityRequest, context: grpc.aio.ServicerContext
    ) -> pb.LinkIdentityResponse:
        anonymous_id = check_id(request.anonymous_id, "anonymous_id")
        user_id = check_id(request.user_id, "user_id")
        if anonymous_id == user_id:
            raise _invalid("anonymous_id", "must differ from user_id (an id cannot be linked to itself)")
        result = await self._linker.link(anonymous_id, user_id, _linked_us(request), context.time_remaining())
        return pb.LinkIdentityResponse(already_linked=result.already_linked, events_moved=result.events_moved)

    async def GetIdentity(
        self, request: pb.GetIdentityRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIdentityResponse:
        identity = await storage.fetch_identity(self._pool, check_id(request.id, "id"))
        return pb.GetIdentityResponse(user_id=identity.user_id, anonymous_ids=identity.anonymous_ids)


def _linked_us(request: pb.LinkIdentityRequest) -> int:
    """occurred_at in epoch microseconds, bounded like an event's; now when absent."""
    now = time.time()
    if not request.HasField("occurred_at"):
        return int(now * 1_000_000)
    ts = request.occurred_at
    if not 0 <= ts.nanos < 1_000_000_000:
        raise _invalid("occurred_at.nanos", "must be from 0 to 999,999,999")
    if ts.seconds < 0:
        raise _invalid("occurred_at", "must not be before 1970-01-01")
    if ts.seconds > now + limits.MAX_FUTURE_SECONDS:
        raise _invalid(
            "occurred_at",
            f"is {ts.seconds - int(now)} s in the future; at most {limits.MAX_FUTURE_SECONDS} s is allowed",
        )
    return ts.seconds * 1_000_000 + ts.nanos // 1_000


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)])
