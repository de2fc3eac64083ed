"""The asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from interactions_client import analytics, batches
from interactions_client.analytics import AnalyticsMethods, EventTypeLike, ResumePolicy, event_type_numbers
from interactions_client.channel import (
    DEFAULT_DEADLINE,
    ChannelOptions,
    TlsConfig,
    bearer_metadata,
    create_aio_channel,
    default_target,
    wait_until_connected,
    with_metadata,
)
from interactions_client.errors import InvalidEventError, from_rpc_error
from interactions_client.events import EventMethods, timestamp, with_event_id
from interactions_client.recommendations import RecommendationMethods
from interactions_client.results import BatchResult, Identity, LinkResult, LogResult
from interactions_client.rpc_protos import (
    HEALTH_CHECK_METHOD,
    SERVING,
    Violation,
    parse_health_check_status,
    serialize_health_check_request,
)
from interactions_client.streamer import OWN_CONNECTION_OPTION, EventStreamer, ParallelStreamer, RejectionCallback
from interactions_client.subscription import SUBSCRIPTION_POLICY, AsyncSubscription, subscribe_request
from interactions_client.v1.admin_service_pb2 import (
    DeleteUserDataRequest,
    DeleteUserDataResponse,
    ExportUserDataRequest,
    ExportUserDataResponse,
    PurgeEventsRequest,
    PurgeEventsResponse,
)
from interactions_client.v1.admin_service_pb2_grpc import AdminServiceStub
from interactions_client.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.event_stream_service_pb2_grpc import EventStreamServiceStub
from interactions_client.v1.identity_service_pb2 import GetIdentityRequest, LinkIdentityRequest
from interactions_client.v1.identity_service_pb2_grpc import IdentityServiceStub
from interactions_client.v1.interaction_service_pb2 import LogEventRequest
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.recommendation_service_pb2_grpc import RecommendationServiceStub
from interactions_client.v1.user_state_service_pb2 import (
    CartItem,
    GetCartRequest,
    GetWishlistRequest,
    ListPurchasesRequest,
    Purchase,
    WishlistItem,
)
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_client.validation import validate as validate_event


def resolve_tls(tls: TlsConfig | bool) -> TlsConfig | None:
    """True: TLS with the system's trust store; False: plaintext."""
    if isinstance(tls, TlsConfig):
        return tls
    return TlsConfig() if tls else None


def purge_request(
    event_types: Iterable[EventTypeLike],
    custom_types: Iterable[str],
    start_time: datetime | None,
    end_time: datetime | None,
    user_ids: Iterable[str],
    force: bool,
) -> PurgeEventsRequest:
    return PurgeEventsRequest(
        event_types=event_type_numbers(event_types),
        custom_types=list(custom_types),
        start_time=analytics.timestamp(start_time, "start_time"),
        end_time=analytics.timestamp(end_time, "end_time"),
        user_ids=list(user_ids),
        force=force,
    )


def prevalidate(event: Event) -> None:
    """Raises InvalidEventError (local) when `event` breaks a rule."""
    violations = validate_event(event)
    if violations:
        found = [Violation(v.field, v.description) for v in violations]
        raise InvalidEventError("invalid event", found, local=True)


class InteractionsClient(EventMethods[Coroutine[Any, Any, LogResult]], AnalyticsMethods, RecommendationMethods):
    """Logs interactions and reads user state; `async with InteractionsClient() as client:`.

    Every typed method (`view`, `add_to_cart`, ... see EventMethods) is a
    coroutine returning a LogResult. The AnalyticsService methods (export_events,
    get_session, ...) come from AnalyticsMethods (analytics.py). Failures raise InteractionsError
    subclasses (errors.py). A unary call gets `deadline` seconds (the gRPC
    deadline, None for none) unless the call passes its own `deadline`; UNAVAILABLE is retried by the channel (writes are
    idempotent by event_id).

    target: host:port; default INTERACTIONS_TARGET or localhost:50051.
    tls: a TlsConfig, True for TLS with the system's roots, False for plaintext.
    validate: check events locally first, so a bad one fails without a round trip.
    options: extra channel arguments (override the defaults of channel.py).
    token: a bearer token, sent on every call and stream (servers started with --auth-tokens).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        tls: TlsConfig | bool = False,
        deadline: float | None = DEFAULT_DEADLINE,
        validate: bool = True,
        options: ChannelOptions = (),
        token: str | None = None,
    ) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Otherwise the channel binds to a loop that asyncio.run() later replaces,
            # and the first call fails with an obscure "attached to a different loop".
            raise RuntimeError(
                "create InteractionsClient inside a coroutine (a grpc.aio channel belongs to the event loop "
                "that made it), or use SyncInteractionsClient"
            ) from None
        self.target = target or default_target()
        self.deadline = deadline
        self.validate = validate
        self._tls = resolve_tls(tls)
        self._options = tuple(options)
        self._channel = create_aio_channel(self.target, self._tls, options)
        metadata = bearer_metadata(token)
        self._metadata = metadata
        self._interactions = with_metadata(InteractionServiceStub(self._channel), metadata)
        self._state = with_metadata(UserStateServiceStub(self._channel), metadata)
        self._admin = with_metadata(AdminServiceStub(self._channel), metadata)
        self._identity = with_metadata(IdentityServiceStub(self._channel), metadata)
        self._analytics = with_metadata(AnalyticsServiceStub(self._channel), metadata)
        self._recommendations = with_metadata(RecommendationServiceStub(self._channel), metadata)
        self._events = with_metadata(EventStreamServiceStub(self._channel), metadata)
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=serialize_health_check_request,
            response_deserializer=parse_health_check_status,
        )

    async def connect(self, *, deadline: float | None = None) -> None:
        """Connects now instead of at the first call. Raises UnavailableError ("cannot connect to
        TARGET") when the first attempt fails or none completes within `deadline` seconds (default: the client's)."""
        await wait_until_connected(self._channel, self.target, self._deadline(deadline))

    async def __aenter__(self) -> InteractionsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _deadline(self, deadline: float | None) -> float | None:
        return self.deadline if deadline is None else deadline

    # Writes.

    async def _submit(self, event: Event) -> LogResult:
        return await self.log(event)

    async def log(self, event: Event, *, deadline: float | None = None) -> LogResult:
        """Logs one event the caller built. One without event_id is sent as a copy with a fresh one."""
        event = with_event_id(event)
        if self.validate:
            prevalidate(event)
        try:
            response = await self._interactions.LogEvent(LogEventRequest(event=event), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error, about_event=True) from error
        return LogResult(response.event_id, response.duplicate)

    async def log_many(self, events: Iterable[Event], *, deadline: float | None = None) -> BatchResult:
        """Logs events in calls of at most limits.MAX_BATCH_EVENTS; bad events are
        reported in `rejected` (local=True when pre-validation caught them).

        On a failed call it raises; earlier calls are committed, and resending
        the whole list is safe (duplicates are recognised by event_id).
        """
        result = BatchResult()
        for chunk in batches.chunks(events, result, validate=self.validate):
            try:
                response = await self._interactions.LogEvents(chunk.request(), timeout=self._deadline(deadline))
            except grpc.RpcError as error:
                raise from_rpc_error(error, about_event=True) from error
            batches.fold(result, chunk, response)
        return batches.finish(result)

    def stream(
        self,
        *,
        batch_size: int = 500,
        linger: float = 0.02,
        max_in_flight: int = 8,
        retry_timeout: float = 60.0,
        on_rejected: RejectionCallback | None = None,
        raise_on_failure: bool = True,
        validate: bool | None = None,
        connections: int = 1,
    ) -> EventStreamer | ParallelStreamer:
        """The bulk streamer (streamer.py): `async with client.stream() as s: await s.send(event)`.

        validate: pre-validate each event (default: the client's `validate`).
        False saves the client about half its CPU per event (streamer.py); the
        server validates anyway, and a bad event comes back in the rejections.
        connections: above 1, a ParallelStreamer of that many streams, each on
        a TCP connection of its own (channels of one process otherwise share
        one connection), so that `interactions-server --workers N` gets the
        streams on several workers; the events are dealt a batch at a time.
        """
        validate = self.validate if validate is None else validate
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if connections == 1:
            return EventStreamer(
                self._interactions.StreamEvents,
                batch_size=batch_size,
                linger=linger,
                max_in_flight=max_in_flight,
                retry_timeout=retry_timeout,
                validate=validate,
                on_rejected=on_rejected,
                raise_on_failure=raise_on_failure,
            )
        options = (*self._options, OWN_CONNECTION_OPTION)
        channels = [create_aio_channel(self.target, self._tls, options) for _ in range(connections)]

        def streamers(report: RejectionCallback) -> list[EventStreamer]:
            return [
                EventStreamer(
                    with_metadata(InteractionServiceStub(channel), self._metadata).StreamEvents,
                    batch_size=batch_size,
                    linger=linger,
                    max_in_flight=max_in_flight,
                    retry_timeout=retry_timeout,
                    validate=validate,
                    on_rejected=report,
                    raise_on_failure=False,
                )
                for channel in channels
            ]

        async def close() -> None:
            for channel in channels:
                await channel.close()

        return ParallelStreamer(
            streamers, batch_size=batch_size, on_rejected=on_rejected, raise_on_failure=raise_on_failure, close=close
        )

    # Reads.

    async def get_cart(self, user_id: str, *, deadline: float | None = None) -> list[CartItem]:
        try:
            response = await self._state.GetCart(GetCartRequest(user_id=user_id), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.items)

    async def get_wishlist(self, user_id: str, *, deadline: float | None = None) -> list[WishlistItem]:
        try:
            response = await self._state.GetWishlist(
                GetWishlistRequest(user_id=user_id), timeout=self._deadline(deadline)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.items)

    async def list_purchases(
        self, user_id: str, *, page_size: int = 100, deadline: float | None = None
    ) -> AsyncIterator[Purchase]:
        """Every purchase of the user, newest first, fetched page by page (`deadline` is per page)."""
        request = ListPurchasesRequest(user_id=user_id, page_size=page_size)
        while True:
            try:
                response = await self._state.ListPurchases(request, timeout=self._deadline(deadline))
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error
            for purchase in response.purchases:
                yield purchase
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # Identity.

    async def link_identity(
        self,
        anonymous_id: str,
        user_id: str,
        *,
        occurred_at: datetime | None = None,
        deadline: float | None = None,
    ) -> LinkResult:
        """Links `anonymous_id` (a guest's id) to `user_id`: from then on its
        events, cart, wishlist and purchases are the user's, and reads by it
        answer the user's (IdentityService.LinkIdentity, scope
        `identity:write`). Raises FailedPreconditionError when it is linked to
        another user, or is a user itself."""
        request = LinkIdentityRequest(anonymous_id=anonymous_id, user_id=user_id, occurred_at=timestamp(occurred_at))
        try:
            response = await self._identity.LinkIdentity(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return LinkResult(response.already_linked, response.events_moved)

    async def get_identity(self, id_: str, *, deadline: float | None = None) -> Identity:
        """The person `id` belongs to and the anonymous ids linked to it (GetIdentity)."""
        try:
            response = await self._identity.GetIdentity(GetIdentityRequest(id=id_), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return Identity(response.user_id, list(response.anonymous_ids))

    # Administration (a token with the `admin` scope).

    async def delete_user_data(
        self, user_id: str, *, dry_run: bool = False, deadline: float | None = None
    ) -> DeleteUserDataResponse:
        """Deletes everything stored about the user (dry_run: only counts it); see AdminService."""
        try:
            response: DeleteUserDataResponse = await self._admin.DeleteUserData(
                DeleteUserDataRequest(user_id=user_id, dry_run=dry_run), timeout=self._deadline(deadline)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return response

    async def purge_events(
        self,
        *,
        event_types: Iterable[EventTypeLike] = (),
        custom_types: Iterable[str] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        user_ids: Iterable[str] = (),
        force: bool = False,
        deadline: float | None = None,
    ) -> PurgeEventsResponse:
        """Removes the events that match every filter given from the log (without
        `force`: only counts them); see AdminService.PurgeEvents. A large purge
        takes a while: give it a `deadline` that covers it (what a call removed
        before its deadline stays removed; calling again removes the rest)."""
        request = purge_request(event_types, custom_types, start_time, end_time, user_ids, force)
        try:
            response: PurgeEventsResponse = await self._admin.PurgeEvents(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return response

    async def export_user_data(self, user_id: str) -> AsyncIterator[ExportUserDataResponse]:
        """Everything stored about a person, part by part (AdminService.ExportUserData):
        a header, then cart, wishlist, purchases and events. No deadline (it streams)."""
        call = self._admin.ExportUserData(ExportUserDataRequest(user_id=user_id))
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()

    def subscribe(
        self,
        *,
        event_types: Iterable[EventTypeLike] = (),
        start: str = "now",
        cursor: str = "",
        partition: tuple[int, int] | None = None,
        policy: ResumePolicy = SUBSCRIPTION_POLICY,
    ) -> AsyncSubscription:
        """Every event committed from `start` ("now" or "earliest": the oldest still in
        the log) or after `cursor` (from a batch of an earlier subscription; wins over
        `start`), as batches (docs/subscribe.md): `async for batch in client.subscribe():`.
        `event_types`: only these (stored names or EventType numbers; "custom" for every
        custom type); `partition`: (index, count), only the users whose stable hash falls
        in that partition. Resumes by itself after UNAVAILABLE; store `batch.cursor`."""
        request = subscribe_request(event_types, start, cursor, partition)
        return AsyncSubscription(self._events.SubscribeEvents, request, policy)

    async def health(self, service: str = "", *, deadline: float | None = None) -> bool:
        """grpc.health.v1 Check: True when the service reports SERVING.
        Raises (e.g. UnavailableError) when the server cannot be asked."""
        try:
            status: int = await self._health_check(service, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return status == SERVING
