"""interactions.v1.AdminService: deleting a user's data, purging events by
filter, and a person's data for the right of access.

A purge is bulk work (storage/_lifecycle.py: small paced transactions, each
with its count in the purge's audit record); between its batches it gives
way to interactive calls (precedence.py). Its dry run (no `force`) and the
export run on the analytics pool, apart from the connections ingest needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.rules import CUSTOM, RULES, STANDARD
from interactions_client.v1 import admin_service_pb2 as pb
from interactions_client.v1 import admin_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_client.validation import custom_type_problem
from interactions_server import storage
from interactions_server.auth import current_caller
from interactions_server.errors import InvalidArgument
from interactions_server.keyring import Keyring
from interactions_server.precedence import Precedence
from interactions_server.services import _user_data
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
MAX_PURGE_USERS = 10_000
ROWS_PER_RESPONSE = 1_000  # of an export
BYTES_PER_RESPONSE = 1 << 20  # about: an export response is sent before it grows past this

_log = logging.getLogger("interactions_server.admin")
_STANDARD = sorted(STANDARD)
# Timestamp's valid range (0001-01-01 to 9999-12-31), in seconds.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_FILTER_FIELDS = ("event_types", "custom_types", "start_time", "end_time", "user_ids")


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        keyring: Keyring,
        *,
        analytics_pool: asyncpg.Pool | None = None,
        precedence: Precedence | None = None,
        pace: storage.Pace | None = None,
        on_deleted: Callable[[str, int], None] | None = None,
    ) -> None:
        self._pool = pool
        self._analytics_pool = analytics_pool or pool  # counts and exports: long reads
        self._keyring = keyring  # the audit log's keyed hash of the user id
        self._precedence = precedence or Precedence(0)
        self._pace = pace or storage.Pace()
        # Told (user_id, the deleting transaction's id), for every id of the
        # person, once a deletion has committed: the subscriptions of this
        # process drop those users' events at once.
        self._on_deleted = on_deleted

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
            if self._on_deleted is not None:
                for deleted_id in counts.user_ids:  # the person's rows may be under another of its ids
                    self._on_deleted(deleted_id, counts.xid)
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

    async def PurgeEvents(self, request: pb.PurgeEventsRequest, context: Any) -> pb.PurgeEventsResponse:
        purge = _purge_filter(request)
        if not request.force:
            events, users = await storage.count_purge(self._analytics_pool, purge)
            return pb.PurgeEventsResponse(events=events, users=users)
        caller = current_caller()
        actor = storage.actor_of(None if caller is None else caller.name)
        subject = self._keyring.subject_hash(purge.users[0]) if len(purge.users) == 1 else None
        removed = storage.Removed(users=set())
        try:
            await storage.purge_events(
                self._pool,
                purge,
                actor=actor,
                subject=subject,
                detail={"filter": purge.describe(self._keyring.subject_hash)},
                pace=self._pace,
                removed=removed,
                turn=self._turn,
            )
        except asyncio.CancelledError:
            # The caller gave up (its deadline): what was removed stays removed, and audited.
            _log.info(
                "purge stopped by its caller after %d events (audit_log record %s); the same call again removes the rest",
                removed.events,
                removed.audit_id,
            )
            raise
        users = len(removed.users or ())
        _log.info(
            "purged %d events of %d users%s at the request of %s",
            removed.events,
            users,
            "" if removed.audit_id is None else f" (audit_log record {removed.audit_id})",
            actor,
            extra={"events": removed.events, "users": users, "audit_id": removed.audit_id},
        )
        return pb.PurgeEventsResponse(events=removed.events, users=users)

    async def _turn(self) -> None:
        """Before each batch of a purge: interactive calls first."""
        await self._precedence.bulk_turn("PurgeEvents", lambda: False)

    async def ExportUserData(
        self, request: pb.ExportUserDataRequest, context: Any
    ) -> AsyncGenerator[pb.ExportUserDataResponse, None]:
        user_id = check_id(request.user_id, "user_id")
        async with storage.snapshot(self._analytics_pool) as conn:
            header = await storage.user_header(conn, user_id)
            yield pb.ExportUserDataResponse(header=_user_data.header(header))
            for part in storage.USER_DATA_PARTS:
                async with contextlib.aclosing(
                    storage.user_data_part(conn, part, header.person, ROWS_PER_RESPONSE)
                ) as chunks:
                    async for chunk in chunks:
                        for response in _user_data.responses(part, chunk, BYTES_PER_RESPONSE):
                            await self._precedence.bulk_turn("ExportUserData", lambda: False)
                            yield response


# --- request checks: each bad field is INVALID_ARGUMENT naming it -------------------


def _invalid(field: str, description: str, message: str = "invalid request") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)], message)


def _moment(value: Timestamp, field: str) -> datetime:
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 1_000_000_000:
        raise _invalid(field, "is not a valid timestamp")
    return value.ToDatetime(UTC)


def _purge_filter(request: pb.PurgeEventsRequest) -> storage.PurgeFilter:
    filtered = (
        request.event_types,
        request.custom_types,
        request.HasField("start_time"),
        request.HasField("end_time"),
        request.user_ids,
    )
    if not any(filtered):
        raise _invalid(
            "",
            f"set at least one of {', '.join(_FILTER_FIELDS)}: a purge without a filter would remove every event",
            "an empty filter",
        )
    names: list[str] = []
    custom = False
    for i, number in enumerate(request.event_types):
        rule = RULES.get(number)
        if rule is None:
            raise _invalid(f"event_types[{i}]", f"{number} is not a known event type")
        if rule is CUSTOM:
            custom = True
        else:
            names.append(rule.name)
    for i, name in enumerate(request.custom_types):
        if (problem := custom_type_problem(name)) is not None:
            raise _invalid(f"custom_types[{i}]", problem)
    start = _moment(request.start_time, "start_time") if request.HasField("start_time") else None
    end = _moment(request.end_time, "end_time") if request.HasField("end_time") else None
    if start is not None and end is not None and start > end:
        raise _invalid("start_time", "must not be after end_time")
    if len(request.user_ids) > MAX_PURGE_USERS:
        raise _invalid("user_ids", f"has {len(request.user_ids):,} ids; a purge takes at most {MAX_PURGE_USERS:,}")
    users = tuple(sorted({check_id(u, f"user_ids[{i}]") for i, u in enumerate(request.user_ids)}))
    return storage.PurgeFilter(
        storage.TypeFilter(sorted(set(names)), custom, _STANDARD),
        tuple(sorted(set(request.custom_types))),
        start,
        end,
        users,
    )
