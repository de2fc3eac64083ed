"""interactions.v1.UserStateService: reads of the state the events maintain."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import user_state_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import InvalidArgument
from interactions_server.keyring import Keyring, invalid_token
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserStateService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A page token is the (purchased_at, event_id) of the last purchase returned
# (epoch microseconds, the UUID as text), sealed by the server's Keyring.
PURCHASES = "purchases"


class UserStateService(user_state_service_pb2_grpc.UserStateServiceServicer):
    def __init__(self, pool: asyncpg.Pool, keyring: Keyring) -> None:
        self._pool = pool
        self._keyring = keyring

    async def GetCart(self, request: pb.GetCartRequest, context: grpc.aio.ServicerContext) -> pb.GetCartResponse:
        rows = await storage.fetch_cart(self._pool, check_id(request.user_id, "user_id"))
        return pb.GetCartResponse(
            items=[
                pb.CartItem(product_id=r.product_id, quantity=r.quantity, updated_at=_timestamp(r.updated_at))
                for r in rows
            ]
        )

    async def GetWishlist(
        self, request: pb.GetWishlistRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWishlistResponse:
        rows = await storage.fetch_wishlist(self._pool, check_id(request.user_id, "user_id"))
        return pb.GetWishlistResponse(
            items=[pb.WishlistItem(product_id=r.product_id, added_at=_timestamp(r.added_at)) for r in rows]
        )

    async def ListPurchases(
        self, request: pb.ListPurchasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPurchasesResponse:
        user_id = check_id(request.user_id, "user_id")
        page_size = _page_size(request.page_size)
        after = decode_page_token(self._keyring, request.page_token) if request.page_token else None
        # One row more than the page tells whether there is a next page.
        rows = await storage.fetch_purchases(self._pool, user_id, page_size + 1, after)
        page = rows[:page_size]
        response = pb.ListPurchasesResponse(
            purchases=[
                pb.Purchase(
                    event_id=r.event_id,
                    product_id=r.product_id,
                    purchased_at=_timestamp(r.purchased_at),
                    session_id=r.session_id or "",
                )
                for r in page
            ]
        )
        if len(rows) > page_size:
            last = page[-1]
            response.next_page_token = encode_page_token(self._keyring, last.purchased_at, last.event_id)
        return response


def encode_page_token(keyring: Keyring, purchased_at: datetime, event_id: str) -> str:
    return keyring.seal(PURCHASES, (purchased_at - _EPOCH) // _MICROSECOND, event_id)


def decode_page_token(keyring: Keyring, token: str) -> tuple[datetime, str]:
    """The (purchased_at, event_id) a page token stands for; InvalidArgument if
    it is not a token this service issued."""
    micros, event_id = keyring.open(token, PURCHASES, "page_token", 2)
    if isinstance(micros, int) and not isinstance(micros, bool) and isinstance(event_id, str):
        try:
            return _EPOCH + micros * _MICROSECOND, str(uuid.UUID(event_id))
        except (OverflowError, ValueError):  # a date no purchase can have, not a UUID
            pass
    raise invalid_token("page_token")


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument([FieldViolation(field="page_size", description="must not be negative")])
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp
