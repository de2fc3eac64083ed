"""interactions.v1.AdminService: deleting a user's data."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import admin_service_pb2 as pb
from interactions_client.v1 import admin_service_pb2_grpc
from interactions_server import storage
from interactions_server.auth import current_caller
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AdminService"].full_name

_log = logging.getLogger("interactions_server.admin")


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def DeleteUserData(self, request: pb.DeleteUserDataRequest, context: Any) -> pb.DeleteUserDataResponse:
        user_id = check_id(request.user_id, "user_id")
        if request.dry_run:
            counts = await storage.count_user_data(self._pool, user_id)
        else:
            counts = await storage.delete_user_data(self._pool, user_id)
            caller = current_caller()
            # The user id is logged: it is the operator's audit trail of deletions.
            _log.info(
                "deleted the data of user %r through %s (%d events) at the request of %s",
                user_id,
                counts.deleted_through.isoformat(),
                counts.events,
                "an unauthenticated caller (tokens off)" if caller is None else f"token {caller.name}",
            )
        deleted_through = Timestamp()
        deleted_through.FromDatetime(counts.deleted_through)
        return pb.DeleteUserDataResponse(
            events_deleted=counts.events,
            cart_lines_deleted=counts.cart_lines,
            wishlist_lines_deleted=counts.wishlist_lines,
            purchases_deleted=counts.purchases,
            deleted_through=deleted_through,
        )
