"""interactions.v1.AnalyticsService: what the logged events are for.

Per-user reads run on the server's main pool (they are short index range
scans, like the UserStateService); an RPC that runs several queries runs them
in one READ ONLY REPEATABLE READ transaction, so that a deletion between them
cannot make them disagree. Exports and window aggregates run on a
separate small pool, so that long exports never hold the connections ingest
needs. Exports stream from a server-side cursor inside a READ ONLY
REPEATABLE READ transaction: one snapshot for the whole call, a bounded
number of rows in memory, and each response awaited by gRPC's flow control
(a slow reader slows the cursor down instead of filling the server's memory).
Before each response, an export leaves out the users deleted since its
snapshot was taken (_deleted_users.py).
Definitions: docs/analytics.md and the comments of analytics_service.proto.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import AsyncGenerator
from typing import Any

import asyncpg
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1 import analytics_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import InvalidArgument, NotFound
from interactions_server.keyring import Keyring
from interactions_server.services import _analytics_protos as protos
from interactions_server.services import _analytics_tokens as tokens
from interactions_server.services._deleted_users import DeletedSince
from interactions_server.services._event_types import type_filter
from interactions_server.services._ids import check_id
from interactions_server.services.user_state import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AnalyticsService"].full_name

DEFAULT_SEARCH_LIMIT = 20
MAX_SESSION_EVENTS = 1_000  # a GetSession timeline
MAX_DAYS = 36_600  # of a CountActiveUsers window (100 years): each day is listed
ROWS_PER_RESPONSE = 1_000  # of an export
BYTES_PER_RESPONSE = 1 << 20  # about: an export response is sent before it grows past this


# Timestamp's valid range (0001-01-01 to 9999-12-31), in seconds.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_DAY_US = 86_400_000_000


class AnalyticsService(analytics_service_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, pool: asyncpg.Pool, analytics_pool: asyncpg.Pool, keyring: Keyring) -> None:
        self._pool = pool  # per-user index lookups
        self._analytics_pool = analytics_pool  # exports and window aggregates
        self._keyring = keyring  # seals and opens the resume and page tokens

    # --- exports -------------------------------------------------------------

    async def ExportTrainingData(
        self, request: pb.ExportTrainingDataRequest, context: Any
    ) -> AsyncGenerator[pb.ExportTrainingDataResponse, None]:
        window = _window(request)
        half_life = _half_life(request.half_life) if request.HasField("half_life") else None
        after: tuple[str, str] | None = None
        if request.resume_token:
            as_of_us, after = tokens.decode_training(self._keyring, request.resume_token)
        else:
            as_of_us = window.end_us if window.end_us is not None else int(time.time() * 1_000_000)
        if window.end_us is None:
            # as_of ends the window: no event after it (future-dated, or logged
            # before a resumed call) is weighed, and a resumed call sees what
            # the first one saw.
            window = window._replace(end_us=as_of_us)
        as_of = protos.timestamp(as_of_us)
        first = True
        # aclosing: a call cancelled mid-export ends the cursor's prefetch
        # before the transaction rolls back on the same connection.
        async with (
            storage.snapshot(self._analytics_pool, analytics=True) as conn,
            contextlib.aclosing(
                storage.training_rows(conn, window, protos.ML_WEIGHTS, as_of_us, half_life, after, ROWS_PER_RESPONSE)
            ) as chunks,
        ):
            deleted = DeletedSince(self._pool, await storage.snapshot_of(conn))
            async for chunk in chunks:
                response, gone = await deleted.overlapping(functools.partial(self._training_response, chunk, as_of_us))
                if gone and any(r.user_id in gone for r in chunk):
                    chunk = [r for r in chunk if r.user_id not in gone]
                    if not chunk:
                        continue
                    response = self._training_response(chunk, as_of_us)
                if first:
                    response.as_of.CopyFrom(as_of)
                    first = False
                yield response
        if first:  # nothing (more) to export: the caller still learns as_of
            yield pb.ExportTrainingDataResponse(
                as_of=as_of, resume_token=self._keyring.seal(tokens.TRAINING, as_of_us, *(after or (None, None)))
            )

    def _training_response(self, chunk: list[storage.TrainingRow], as_of_us: int) -> pb.ExportTrainingDataResponse:
        last = chunk[-1]
        response = pb.ExportTrainingDataResponse(
            resume_token=self._keyring.seal(tokens.TRAINING, as_of_us, last.user_id, last.product_id)
        )
        protos.add_training_rows(response.rows, chunk)
        return response

    async def ExportEvents(
        self, request: pb.ExportEventsRequest, context: Any
    ) -> AsyncGenerator[pb.ExportEventsResponse, None]:
        window = _window(request)
        types = type_filter(request.event_types)
        after = (
            tokens.decode_position(self._keyring, request.resume_token, "resume_token", tokens.EVENTS)
            if request.resume_token
            else None
        )
        async with (
            storage.snapshot(self._analytics_pool, analytics=True) as conn,
            contextlib.aclosing(storage.export_events(conn, window, types, after, ROWS_PER_RESPONSE)) as chunks,
        ):
            deleted = DeletedSince(self._pool, await storage.snapshot_of(conn))
            async for chunk in chunks:
                start = 0
                while start < len(chunk):  # a chunk of large events makes several responses
                    response = pb.ExportEventsResponse()
                    build = functools.partial(
                        protos.add_exported_events, response.events, chunk, start, BYTES_PER_RESPONSE
                    )
                    end, gone = await deleted.overlapping(build)
                    if gone and any(r[0] in gone for r in itertools.islice(chunk, start, end)):  # r[0]: user_id
                        chunk, start = [r for r in chunk[start:] if r[0] not in gone], 0
                        continue  # this response again, without them
                    start = end
                    last = storage.EventRow(*chunk[start - 1])
                    response.resume_token = self._keyring.seal(tokens.EVENTS, last.occurred_us, last.event_id)
                    yield response

    # --- window aggregates -------------------------------------------------------

    async def TopSearchQueries(self, request: pb.TopSearchQueriesRequest, context: Any) -> pb.TopSearchQueriesResponse:
        window = _window(request)
        limit = _bounded(request.limit, "limit", DEFAULT_SEARCH_LIMIT)
        async with storage.snapshot(self._analytics_pool, analytics=True) as conn:
            outcomes = await storage.search_outcomes(
                conn, window, protos.CLICK_TYPES, protos.CART_TYPES, protos.PURCHASE_TYPES
            )
        return pb.TopSearchQueriesResponse(queries=protos.top_queries(outcomes, limit))

    async def CountActiveUsers(self, request: pb.CountActiveUsersRequest, context: Any) -> pb.CountActiveUsersResponse:
        window = _window(request)
        if window.start_us is not None and window.end_us is not None and window.end_us > window.start_us:
            days = (window.end_us - 1) // _DAY_US - window.start_us // _DAY_US + 1
            if days > MAX_DAYS:
                raise _invalid("end_time", f"the window has {days:,} days; CountActiveUsers lists at most {MAX_DAYS:,}")
        async with storage.snapshot(self._analytics_pool, analytics=True) as conn:
            rows = await storage.active_users(conn, window)
        response = pb.CountActiveUsersResponse()
        for row in rows:
            if row.day is None:
                response.active_users, response.logged_in_users = row.active_users, row.logged_in_users
            else:
                response.daily.add(date=row.day, active_users=row.active_users, logged_in_users=row.logged_in_users)
        return response

    # --- per user ----------------------------------------------------------------------

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.GetSessionResponse:
        user_id = check_id(request.user_id, "user_id")
        session_id = check_id(request.session_id, "session_id")
        async with storage.snapshot(self._pool) as conn:  # the summary and the timeline agree
            user_id = await storage.person_of(conn, user_id)  # a session of a linked id is its person's
            summary = protos.sessions(user_id, await storage.session_events(conn, user_id, [session_id]))
            session = summary.get(session_id)
            if session is None:
                raise NotFound(f"user {user_id!r} has no event in session {session_id!r}")
            timeline = await storage.session_timeline(conn, user_id, session_id, MAX_SESSION_EVENTS)
        protos.add_events(session.events, timeline)
        session.truncated = session.event_count > len(timeline)
        return pb.GetSessionResponse(session=session)

    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        user_id = check_id(request.user_id, "user_id")
        page_size = _bounded(request.page_size, "page_size", DEFAULT_PAGE_SIZE)
        before = tokens.decode_sessions(self._keyring, request.page_token) if request.page_token else None
        # One row more than the page tells whether there is a next page.
        async with storage.snapshot(self._pool) as conn:  # a session of the page is still there for its summary
            user_id = await storage.person_of(conn, user_id)
            starts = await storage.sessions_page(conn, user_id, before, page_size + 1)
            page = starts[:page_size]
            summaries = protos.sessions(
                user_id, await storage.session_events(conn, user_id, [s.session_id for s in page])
            )
        response = pb.ListSessionsResponse(sessions=[summaries[s.session_id] for s in page])
        if len(starts) > page_size:
            response.next_page_token = self._keyring.seal(tokens.SESSIONS, page[-1].started_us, page[-1].session_id)
        return response

    async def GetUserActivity(self, request: pb.GetUserActivityRequest, context: Any) -> pb.GetUserActivityResponse:
        user_id = check_id(request.user_id, "user_id")
        async with storage.snapshot(self._pool) as conn:
            per_type, session_count = await storage.user_activity(conn, user_id)
        if not per_type:
            raise NotFound(f"user {user_id!r} has no event")
        response = pb.GetUserActivityResponse(
            first_seen_at=protos.timestamp(min(t.first_us for t in per_type)),
            last_seen_at=protos.timestamp(max(t.last_us for t in per_type)),
            session_count=session_count,
            event_counts={t.event_type: t.events for t in per_type},
        )
        for t in per_type:
            if t.event_type == "login":
                response.login_count = t.events
                response.last_login_at.CopyFrom(protos.timestamp(t.last_us))
            elif t.event_type == "logout":
                response.logout_count = t.events
                response.last_logout_at.CopyFrom(protos.timestamp(t.last_us))
        return response

    async def ListUserEvents(self, request: pb.ListUserEventsRequest, context: Any) -> pb.ListUserEventsResponse:
        user_id = check_id(request.user_id, "user_id")
        window = _window(request)
        types = type_filter(request.event_types)
        page_size = _bounded(request.page_size, "page_size", DEFAULT_PAGE_SIZE)
        before = (
            tokens.decode_position(self._keyring, request.page_token, "page_token", tokens.USER_EVENTS)
            if request.page_token
            else None
        )
        async with self._pool.acquire() as conn:  # one statement: its own snapshot
            rows = await storage.user_events(conn, user_id, window, types, before, page_size + 1)
        page = rows[:page_size]
        response = pb.ListUserEventsResponse()
        protos.add_events(response.events, page)
        if len(rows) > page_size:
            response.next_page_token = self._keyring.seal(tokens.USER_EVENTS, page[-1].occurred_us, page[-1].event_id)
        return response


# --- request checks: each bad field is INVALID_ARGUMENT naming it -------------------


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)])


def _micros(value: Timestamp, field: str) -> int:
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 1_000_000_000:
        raise _invalid(field, "is not a valid timestamp")
    return value.seconds * 1_000_000 + value.nanos // 1_000


def _window(request: Any) -> storage.Window:
    """The request's [start_time, end_time) in epoch microseconds; start after
    end is invalid, start equal to end an empty window."""
    start_us = _micros(request.start_time, "start_time") if request.HasField("start_time") else None
    end_us = _micros(request.end_time, "end_time") if request.HasField("end_time") else None
    if start_us is not None and end_us is not None and start_us > end_us:
        raise _invalid("start_time", "must not be after end_time")
    return storage.Window(start_us, end_us)


def _half_life(value: Duration) -> float:
    if value.seconds < 0 or value.nanos < 0 or (value.seconds == 0 and value.nanos == 0):
        raise _invalid("half_life", "must be positive")
    return value.seconds + value.nanos / 1e9


def _bounded(value: int, field: str, default: int) -> int:
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise _invalid(field, f"must be from 0 (the default, {default}) to {MAX_PAGE_SIZE:,}")
    return value or default
