"""The synchronous twin of InteractionsClient, for services that are not asyncio."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from types import TracebackType

import grpc

from interactions_client import batches
from interactions_client.analytics import EventTypeLike, ResumePolicy, SyncAnalyticsMethods
from interactions_client.channel import (
    DEFAULT_DEADLINE,
    ChannelOptions,
    TlsConfig,
    bearer_metadata,
    create_sync_channel,
    default_target,
    with_metadata,
)
from interactions_client.client import prevalidate, purge_request, resolve_tls
from interactions_client.errors import from_rpc_error
from interactions_client.events import EventMethods, timestamp, with_event_id
from interactions_client.recommendations import SyncRecommendationMethods
from interactions_client.results import BatchResult, Identity, LinkResult, LogResult
from interactions_client.rpc_protos import (
    HEALTH_CHECK_METHOD,
    SERVING,
    parse_health_check_status,
    serialize_health_check_request,
)
from interactions_client.streamer import RejectionCallback
from interactions_client.subscription import SUBSCRIPTION_POLICY, SyncSubscription, subscribe_request
from interactions_client.sync_streamer import SyncEventStreamer
from interactions_client.v1.admin_service_pb2 import (
    DeleteUserDataRequest,
    DeleteUserDataResponse,
    ExportUserDataRequest,
    ExportUserDataResponse,
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


class SyncInteractionsClient(EventMethods[LogResult], SyncAnalyticsMethods, SyncRecommendationMethods):
    """InteractionsClient's methods, blocking; `with SyncInteractionsClient() as client:`.

    Same parameters, results and exceptions as InteractionsClient;
    list_purchases, list_sessions, list_user_events and the exports return
    iterators. `stream()` runs the bulk streamer in a background thread with
    its own event loop (see sync_streamer.py).
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
        self.target = target or default_target()
        self.deadline = deadline
        self.validate = validate
        self._tls = resolve_tls(tls)
        self._options = options
        self._metadata = bearer_metadata(token)
        self._channel = create_sync_channel(self.target, self._tls, options)
        self._interactions = with_metadata(InteractionServiceStub(self._channel), self._metadata)
        self._state = with_metadata(UserStateServiceStub(self._channel), self._metadata)
        self._admin = with_metadata(AdminServiceStub(self._channel), self._metadata)
        self._identity = with_metadata(IdentityServiceStub(self._channel), self._metadata)
        self._analytics = with_metadata(AnalyticsServiceStub(self._channel), self._metadata)
        self._recommendations = with_metadata(RecommendationServiceStub(self._channel), self._metadata)
        self._events = with_metadata(EventStreamServiceStub(self._channel), self._metadata)
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=serialize_health_check_request,
            response_deserializer=parse_health_check_status,
        )

    def __enter__(self) -> SyncInteractionsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _deadline(self, deadline: float | None) -> float | None:
        return self.deadline if deadline is None else deadline

    # Writes.

    def _submit(self, event: Event) -> LogResult:
        return self.log(event)

    def log(self, event: Event, *, deadline: float | None = None) -> LogResult:
        """Logs one event the caller built. One without event_id is sent as a copy with a fresh one."""
        event = with_event_id(event)
        if self.validate:
            prevalidate(event)
        try:
            response = self._interactions.LogEvent(LogEventRequest(event=event), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error, about_event=True) from error
        return LogResult(response.event_id, response.duplicate)

    def log_many(self, events: Iterable[Event], *, deadline: float | None = None) -> BatchResult:
        """As InteractionsClient.log_many."""
        result = BatchResult()
        for chunk in batches.chunks(events, result, validate=self.validate):
            try:
                response = self._interactions.LogEvents(chunk.request(), timeout=self._deadline(deadline))
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
    ) -> SyncEventStreamer:
        """The bulk streamer, thread-backed: `with client.stream() as s: s.send(event)`.

        validate: pre-validate each event (default: the client's `validate`);
        False for bulk paths, where the server validates anyway (streamer.py).
        """
        return SyncEventStreamer(
            self.target,
            tls=self._tls,
            options=self._options,
            metadata=self._metadata,
            batch_size=batch_size,
            linger=linger,
            max_in_flight=max_in_flight,
            retry_timeout=retry_timeout,
            validate=self.validate if validate is None else validate,
            on_rejected=on_rejected,
            raise_on_failure=raise_on_failure,
        )

    # Reads.

    def get_cart(self, user_id: str, *, deadline: float | None = None) -> list[CartItem]:
        try:
            response = self._state.GetCart(GetCartRequest(user_id=user_id), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.items)

    def get_wishlist(self, user_id: str, *, deadline: float | None = None) -> list[WishlistItem]:
        try:
            response = self._state.GetWishlist(GetWishlistRequest(user_id=user_id), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.items)

    def list_purchases(
        self, user_id: str, *, page_size: int = 100, deadline: float | None = None
    ) -> Iterator[Purchase]:
        """Every purchase of the user, newest first, fetched page by page as the iterator advances."""
        request = ListPurchasesRequest(user_id=user_id, page_size=page_size)
        while True:
            try:
                response = self._state.ListPurchases(request, timeout=self._deadline(deadline))
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error
            yield from response.purchases
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # Identity.

    def link_identity(
        self,
        anonymous_id: str,
        user_id: str,
        *,
        occurred_at: datetime | None = None,
        deadline: float | None = None,
    ) -> LinkResult:
        """As InteractionsClient.link_identity."""
        request = LinkIdentityRequest(anonymous_id=anonymous_id, user_id=user_id, occurred_at=timestamp(occurred_at))
        try:
            response = self._identity.LinkIdentity(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return LinkResult(response.already_linked, response.events_moved)

    def get_identity(self, id_: str, *, deadline: float | None = None) -> Identity:
        """As InteractionsClient.get_identity."""
        try:
            response = self._identity.GetIdentity(GetIdentityRequest(id=id_), timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return Identity(response.user_id, list(response.anonymous_ids))

    def delete_user_data(
        self, user_id: str, *, dry_run: bool = False, deadline: float | None = None
    ) -> DeleteUserDataResponse:
        """As InteractionsClient.delete_user_data."""
        try:
            response: DeleteUserDataResponse = self._admin.DeleteUserData(
                DeleteUserDataRequest(user_id=user_id, dry_run=dry_run), timeout=self._deadline(deadline)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return response

    def purge_events(
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
        """As InteractionsClient.purge_events."""
        request = purge_request(event_types, custom_types, start_time, end_time, user_ids, force)
        try:
            response: PurgeEventsResponse = self._admin.PurgeEvents(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return response

    def export_user_data(self, user_id: str) -> Iterator[ExportUserDataResponse]:
        """As InteractionsClient.export_user_data."""
        call = self._admin.ExportUserData(ExportUserDataRequest(user_id=user_id))
        try:
            yield from call
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
    ) -> SyncSubscription:
        """As InteractionsClient.subscribe: `for batch in client.subscribe():`."""
        request = subscribe_request(event_types, start, cursor, partition)
        return SyncSubscription(self._events.SubscribeEvents, request, policy)

    def health(self, service: str = "", *, deadline: float | None = None) -> bool:
        """As InteractionsClient.health."""
        try:
            status: int = self._health_check(service, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return status == SERVING
