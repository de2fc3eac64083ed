"""A person's stored rows (storage/_user_data.py) into ExportUserData's
responses: the same messages as the reads (CartItem as GetCart, Event as
ListUserEvents), each response at most a chunk of rows and about
`max_bytes`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import admin_service_pb2 as pb
from interactions_client.v1.user_state_service_pb2 import CartItem, Purchase, WishlistItem
from interactions_server.services._analytics_protos import fill_event
from interactions_server.storage import EventRow, UserHeader

_ROW_BYTES = 160  # about, for a row's ids and times (JSON payloads are counted as their text)


def _timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def header(row: UserHeader) -> pb.UserDataHeader:
    message = pb.UserDataHeader(
        user_id=row.person, anonymous_ids=row.anonymous_ids, exported_at=_timestamp(row.exported_at)
    )
    if row.deleted_through is not None and row.deleted_at is not None:
        message.deletion.deleted_through.CopyFrom(_timestamp(row.deleted_through))
        message.deletion.deleted_at.CopyFrom(_timestamp(row.deleted_at))
    return message


def responses(part: str, rows: Sequence[Any], max_bytes: int) -> Iterator[pb.ExportUserDataResponse]:
    """The responses of a chunk of one part's rows."""
    if part == "cart":
        yield pb.ExportUserDataResponse(
            cart=pb.UserCart(items=[CartItem(product_id=p, quantity=q, updated_at=_timestamp(u)) for p, q, u in rows])
        )
    elif part == "wishlist":
        yield pb.ExportUserDataResponse(
            wishlist=pb.UserWishlist(items=[WishlistItem(product_id=p, added_at=_timestamp(a)) for p, a in rows])
        )
    elif part == "purchases":
        yield pb.ExportUserDataResponse(
            purchases=pb.UserPurchases(
                purchases=[
                    Purchase(event_id=e, product_id=p, session_id=s or "", purchased_at=_timestamp(t))
                    for e, p, s, t in rows
                ]
            )
        )
    else:
        yield from _events(rows, max_bytes)


def _events(rows: Sequence[Any], max_bytes: int) -> Iterator[pb.ExportUserDataResponse]:
    response = pb.ExportUserDataResponse(events=pb.UserEvents())
    size = 0
    for record in rows:
        row = EventRow(*record)
        stored = response.events.events.add()
        fill_event(stored.event, row)
        stored.received_at.seconds, micros = divmod(row.received_us, 1_000_000)
        stored.received_at.nanos = micros * 1_000
        size += _ROW_BYTES + len(row.details or "") + len(row.attributes or "")
        if size >= max_bytes:
            yield response
            response, size = pb.ExportUserDataResponse(events=pb.UserEvents()), 0
    if response.events.events:
        yield response
