"""AnalyticsService on the clients: typed methods, paged iterators and self-resuming exports.

InteractionsClient and SyncInteractionsClient inherit AnalyticsMethods and
SyncAnalyticsMethods; docs/analytics.md says what each RPC computes.

An export is an iterator of rows (`async for row in client.export_events()`).
When the stream breaks (UNAVAILABLE: server restarted, connection reset,
keepalive timeout; ABORTED) it reopens the export with the resume_token of the
last response whose rows it handed out, after a backoff, at most
`ResumePolicy.attempts` times in a row without progress; so the consumer sees
every row exactly once, in order, and nothing else.
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.errors import from_rpc_error
from interactions_client.rules import CUSTOM, STANDARD
from interactions_client.v1.analytics_service_pb2 import (
    CountActiveUsersRequest,
    CountActiveUsersResponse,
    ExportedEvent,
    ExportEventsRequest,
    ExportTrainingDataRequest,
    GetSessionRequest,
    GetUserActivityRequest,
    GetUserActivityResponse,
    ListSessionsRequest,
    ListSessionsResponse,
    ListUserEventsRequest,
    ListUserEventsResponse,
    SearchQueryStats,
    Session,
    TopSearchQueriesRequest,
    TrainingRow,
)
from interactions_client.v1.event_pb2 import Event, EventType

Row = TypeVar("Row", TrainingRow, ExportedEvent)
EventTypeLike = int | str
"""An EventType number, or a stored name ("add_to_cart"; "custom" for every custom type)."""

_RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})


# --- conversions -------------------------------------------------------------


def timestamp(moment: datetime | None, field: str) -> Timestamp | None:
    """A timezone-aware datetime as a Timestamp (None stays None: an unbounded window end)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"{field} must be timezone-aware (e.g. datetime(2026, 10, 1, tzinfo=timezone.utc))")
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def duration(span: timedelta | None) -> Duration | None:
    if span is None:
        return None
    value = Duration()
    value.FromTimedelta(span)
    return value


def to_datetime(ts: Timestamp) -> datetime | None:
    """A Timestamp as an aware UTC datetime; None when unset."""
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


def event_type_number(event_type: EventTypeLike) -> EventType.ValueType:
    """An EventType number from a number or a stored name."""
    if isinstance(event_type, int):
        return cast(EventType.ValueType, event_type)
    if event_type == CUSTOM.name:
        return cast(EventType.ValueType, CUSTOM.event_type)
    rule = STANDARD.get(event_type)
    if rule is None:
        # The filter is the EventType enum, so custom types are filtered all together.
        raise ValueError(f"unknown event type {event_type!r} (a seed type, or 'custom' for every custom type)")
    return cast(EventType.ValueType, rule.event_type)


def event_type_numbers(event_types: Iterable[EventTypeLike]) -> list[EventType.ValueType]:
    return [event_type_number(t) for t in event_types]


# --- requests, shared by both clients -----------------------------------------


def training_request(
    start_time: datetime | None, end_time: datetime | None, half_life: timedelta | None, resume_token: str
) -> ExportTrainingDataRequest:
    return ExportTrainingDataRequest(
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        half_life=duration(half_life),
        resume_token=resume_token,
    )


def events_request(
    start_time: datetime | None, end_time: datetime | None, event_types: Iterable[EventTypeLike], resume_token: str
) -> ExportEventsRequest:
    return ExportEventsRequest(
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        event_types=event_type_numbers(event_types),
        resume_token=resume_token,
    )


def searches_request(start_time: datetime | None, end_time: datetime | None, limit: int) -> TopSearchQueriesRequest:
    return TopSearchQueriesRequest(
        start_time=timestamp(start_time, "start_time"), end_time=timestamp(end_time, "end_time"), limit=limit
    )


def active_users_request(start_time: datetime | None, end_time: datetime | None) -> CountActiveUsersRequest:
    return CountActiveUsersRequest(
        start_time=timestamp(start_time, "start_time"), end_time=timestamp(end_time, "end_time")
    )


def user_events_request(
    user_id: str,
    start_time: datetime | None,
    end_time: datetime | None,
    event_types: Iterable[EventTypeLike],
    page_size: int,
    page_token: str,
) -> ListUserEventsRequest:
    return ListUserEventsRequest(
        user_id=user_id,
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        event_types=event_type_numbers(event_types),
        page_size=page_size,
        page_token=page_token,
    )


# --- resuming ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How an export reopens a broken stream: up to `attempts` reopenings in a row
    without a response in between, waiting initial_backoff * multiplier**n (at most
    max_backoff, with jitter) before each."""

    attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, failures: int) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        return ceiling * random.uniform(0.5, 1.0)  # jitter: many exports do not reconnect in lockstep


def resumable(error: grpc.RpcError) -> bool:
    """A failure after which the same export, reopened with its token, can go on."""
    code = error.code()
    if code in _RESUMABLE_CODES:
        return True
    # A connection torn down mid-stream can also surface as an RST_STREAM.
    return bool(code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or ""))


class Resumable:
    """A stream that reopens after a resumable failure (exports, subscriptions):
    `_failed(error)` gives the backoff before reopening, or raises the client
    error once the policy's attempts in a row without progress are spent."""

    def __init__(self, policy: ResumePolicy) -> None:
        self._policy = policy
        self._failures = 0
        self.resumes = 0
        """How many times the stream broke and was reopened."""

    def _progressed(self) -> None:
        self._failures = 0

    def _failed(self, error: grpc.RpcError) -> float:
        """The backoff before reopening; raises the client error when the stream cannot go on."""
        if not resumable(error) or self._failures >= self._policy.attempts:
            raise from_rpc_error(error) from error
        self._failures += 1
        self.resumes += 1
        return self._policy.backoff(self._failures)


class _Export(Resumable, Generic[Row]):
    """The bookkeeping of one export, shared by the async and sync iterators.

    The stream is read only when the consumer asks for more, so when it breaks
    every row received so far has been handed out, and the export reopens with
    the token of the last response received.
    """

    def __init__(self, open_stream: Callable[[Any], Any], request: Any, rows_field: str, policy: ResumePolicy) -> None:
        super().__init__(policy)
        self._open = open_stream
        self._request = request
        self._rows_field = rows_field
        self.rows = 0
        """Rows received so far."""
        self.as_of: datetime | None = None
        """ExportTrainingData: the time decay is measured from (set by the first response)."""

    @property
    def resume_token(self) -> str:
        """Continues after the last response whose rows have all been handed out
        (empty before the first); pass it to a new export to go on elsewhere. A
        consumer of rows that stops in the middle of a response's rows gets that
        response's first rows again: checkpoint after `batches()` instead."""
        return cast(str, self._request.resume_token)

    def _received(self, response: Any) -> Sequence[Row]:
        self._progressed()
        if self.as_of is None and "as_of" in response.DESCRIPTOR.fields_by_name and response.HasField("as_of"):
            self.as_of = to_datetime(response.as_of)
        rows: Sequence[Row] = getattr(response, self._rows_field)
        self.rows += len(rows)
        return rows

    def _delivered(self, response: Any) -> None:
        """Every row of `response` was handed out: a reopened stream starts after them."""
        if response.resume_token:
            self._request.resume_token = response.resume_token


class AsyncExport(_Export[Row]):
    """`async for row in export`, or `async for rows in export.batches()` (one sequence per response)."""

    async def _responses(self) -> AsyncIterator[Any]:
        while True:
            call = self._open(self._request)
            try:
                async for response in call:
                    yield response
                return
            except grpc.RpcError as error:
                delay = self._failed(error)
            finally:
                call.cancel()  # no-op when finished; stops the server's cursor when the consumer quits early
            await asyncio.sleep(delay)

    async def __aiter__(self) -> AsyncIterator[Row]:
        async for response in self._responses():
            rows = self._received(response)
            if not rows:
                self._delivered(response)
            for index, row in enumerate(rows, 1):
                if index == len(rows):
                    self._delivered(response)
                yield row

    async def batches(self) -> AsyncIterator[Sequence[Row]]:
        async for response in self._responses():
            rows = self._received(response)
            self._delivered(response)
            yield rows


class SyncExport(_Export[Row]):
    """`for row in export`, or `for rows in export.batches()` (one sequence per response)."""

    def _responses(self) -> Iterator[Any]:
        while True:
            call = self._open(self._request)
            try:
                yield from call
                return
            except grpc.RpcError as error:
                delay = self._failed(error)
            finally:
                call.cancel()
            time.sleep(delay)

    def __iter__(self) -> Iterator[Row]:
        for response in self._responses():
            rows = self._received(response)
            if not rows:
                self._delivered(response)
            for index, row in enumerate(rows, 1):
                if index == len(rows):
                    self._delivered(response)
                yield row

    def batches(self) -> Iterator[Sequence[Row]]:
        for response in self._responses():
            rows = self._received(response)
            self._delivered(response)
            yield rows


# --- the client methods --------------------------------------------------------


class AnalyticsMethods(ABC):
    """The AnalyticsService methods of InteractionsClient.

    Time windows are [start_time, end_time) of timezone-aware datetimes (None:
    unbounded). Event types are EventType numbers or stored names. Unary calls
    and each page get the client's deadline unless `deadline` is given; exports
    have none (a dead peer is noticed by keepalive, and the export resumes).
    """

    _analytics: Any  # the AnalyticsServiceStub on the client's channel

    @abstractmethod
    def _deadline(self, deadline: float | None) -> float | None: ...

    async def _call(self, method: Any, request: Message, deadline: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def export_training_data(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        half_life: timedelta | None = None,
        resume_token: str = "",
        policy: ResumePolicy = ResumePolicy(),
    ) -> AsyncExport[TrainingRow]:
        """TrainingRows ordered by (user_id, product_id); `.as_of` once the first row arrived."""
        request = training_request(start_time, end_time, half_life, resume_token)
        return AsyncExport(self._analytics.ExportTrainingData, request, "rows", policy)

    def export_events(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        resume_token: str = "",
        policy: ResumePolicy = ResumePolicy(),
    ) -> AsyncExport[ExportedEvent]:
        """ExportedEvents ordered by (occurred_at, event_id); every type when `event_types` is empty."""
        request = events_request(start_time, end_time, event_types, resume_token)
        return AsyncExport(self._analytics.ExportEvents, request, "events", policy)

    async def top_search_queries(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int = 0,
        deadline: float | None = None,
    ) -> list[SearchQueryStats]:
        """Most searched first; `limit` 0 means the server's default (20)."""
        request = searches_request(start_time, end_time, limit)
        response = await self._call(self._analytics.TopSearchQueries, request, deadline)
        return list(response.queries)

    async def get_session(self, user_id: str, session_id: str, *, deadline: float | None = None) -> Session:
        """Raises NotFoundError when the user has no event in that session."""
        request = GetSessionRequest(user_id=user_id, session_id=session_id)
        response = await self._call(self._analytics.GetSession, request, deadline)
        return cast(Session, response.session)

    async def list_sessions_page(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", deadline: float | None = None
    ) -> ListSessionsResponse:
        request = ListSessionsRequest(user_id=user_id, page_size=page_size, page_token=page_token)
        return cast(ListSessionsResponse, await self._call(self._analytics.ListSessions, request, deadline))

    async def list_sessions(
        self, user_id: str, *, page_size: int = 0, deadline: float | None = None
    ) -> AsyncIterator[Session]:
        """Every session of the user, newest first, page by page (`deadline` is per page)."""
        token = ""
        while True:
            page = await self.list_sessions_page(user_id, page_size=page_size, page_token=token, deadline=deadline)
            for session in page.sessions:
                yield session
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def get_user_activity(self, user_id: str, *, deadline: float | None = None) -> GetUserActivityResponse:
        """Raises NotFoundError for a user with no event."""
        request = GetUserActivityRequest(user_id=user_id)
        return cast(GetUserActivityResponse, await self._call(self._analytics.GetUserActivity, request, deadline))

    async def count_active_users(
        self, *, start_time: datetime | None = None, end_time: datetime | None = None, deadline: float | None = None
    ) -> CountActiveUsersResponse:
        request = active_users_request(start_time, end_time)
        return cast(CountActiveUsersResponse, await self._call(self._analytics.CountActiveUsers, request, deadline))

    async def list_user_events_page(
        self,
        user_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        page_size: int = 0,
        page_token: str = "",
        deadline: float | None = None,
    ) -> ListUserEventsResponse:
        request = user_events_request(user_id, start_time, end_time, event_types, page_size, page_token)
        return cast(ListUserEventsResponse, await self._call(self._analytics.ListUserEvents, request, deadline))

    async def list_user_events(
        self,
        user_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        page_size: int = 0,
        deadline: float | None = None,
    ) -> AsyncIterator[Event]:
        """Every event of the user in the window, newest first, page by page."""
        request = user_events_request(user_id, start_time, end_time, event_types, page_size, "")
        while True:
            page = await self._call(self._analytics.ListUserEvents, request, deadline)
            for event in page.events:
                yield event
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token


class SyncAnalyticsMethods(ABC):
    """AnalyticsMethods, blocking: the same methods, iterators instead of async iterators."""

    _analytics: Any

    @abstractmethod
    def _deadline(self, deadline: float | None) -> float | None: ...

    def _call(self, method: Any, request: Message, deadline: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def export_training_data(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        half_life: timedelta | None = None,
        resume_token: str = "",
        policy: ResumePolicy = ResumePolicy(),
    ) -> SyncExport[TrainingRow]:
        request = training_request(start_time, end_time, half_life, resume_token)
        return SyncExport(self._analytics.ExportTrainingData, request, "rows", policy)

    def export_events(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        resume_token: str = "",
        policy: ResumePolicy = ResumePolicy(),
    ) -> SyncExport[ExportedEvent]:
        request = events_request(start_time, end_time, event_types, resume_token)
        return SyncExport(self._analytics.ExportEvents, request, "events", policy)

    def top_search_queries(
        self,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int = 0,
        deadline: float | None = None,
    ) -> list[SearchQueryStats]:
        request = searches_request(start_time, end_time, limit)
        return list(self._call(self._analytics.TopSearchQueries, request, deadline).queries)

    def get_session(self, user_id: str, session_id: str, *, deadline: float | None = None) -> Session:
        request = GetSessionRequest(user_id=user_id, session_id=session_id)
        return cast(Session, self._call(self._analytics.GetSession, request, deadline).session)

    def list_sessions_page(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", deadline: float | None = None
    ) -> ListSessionsResponse:
        request = ListSessionsRequest(user_id=user_id, page_size=page_size, page_token=page_token)
        return cast(ListSessionsResponse, self._call(self._analytics.ListSessions, request, deadline))

    def list_sessions(self, user_id: str, *, page_size: int = 0, deadline: float | None = None) -> Iterator[Session]:
        token = ""
        while True:
            page = self.list_sessions_page(user_id, page_size=page_size, page_token=token, deadline=deadline)
            yield from page.sessions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def get_user_activity(self, user_id: str, *, deadline: float | None = None) -> GetUserActivityResponse:
        request = GetUserActivityRequest(user_id=user_id)
        return cast(GetUserActivityResponse, self._call(self._analytics.GetUserActivity, request, deadline))

    def count_active_users(
        self, *, start_time: datetime | None = None, end_time: datetime | None = None, deadline: float | None = None
    ) -> CountActiveUsersResponse:
        request = active_users_request(start_time, end_time)
        return cast(CountActiveUsersResponse, self._call(self._analytics.CountActiveUsers, request, deadline))

    def list_user_events_page(
        self,
        user_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        page_size: int = 0,
        page_token: str = "",
        deadline: float | None = None,
    ) -> ListUserEventsResponse:
        request = user_events_request(user_id, start_time, end_time, event_types, page_size, page_token)
        return cast(ListUserEventsResponse, self._call(self._analytics.ListUserEvents, request, deadline))

    def list_user_events(
        self,
        user_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventTypeLike] = (),
        page_size: int = 0,
        deadline: float | None = None,
    ) -> Iterator[Event]:
        request = user_events_request(user_id, start_time, end_time, event_types, page_size, "")
        while True:
            page = self._call(self._analytics.ListUserEvents, request, deadline)
            yield from page.events
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token
