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
from interactions_server.keyring import Keyring
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AdminService"].full_name

_log = logging.getLogger("interactions_server.admin")


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, pool: asyncpg.Pool, keyring: Keyring) -> None:
        self._pool = pool
        self._keyring = keyring  # the audit log's keyed hash of the user id

    async def DeleteUserData(self, request: pb.DeleteUserDataRequest, context: Any) -> pb.DeleteUserDataResponse:
        user_id = check_id(request.user_id, "user_id")
        if request.dry_run:
            counts = await storage.count_user_data(self._pool, user_id)
        else:
            caller = current_caller()
            actor = storage.actor_of(None if caller is None else caller.name)
            counts = await storage.delete_user_data(
                self._pool, user_id, actor=actor, subject=self._keyring.subject_hash(user_id)
            )
            # The audit trail is the audit_log record, committed with the
            # deletion; the log names the record, never the user.
            _log.info(
                "deleted the data of a user (%d events; audit_log record %d) at the request of %s",
                counts.events,
                counts.audit_id,
                actor,
                extra={"audit_id": counts.audit_id},
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
