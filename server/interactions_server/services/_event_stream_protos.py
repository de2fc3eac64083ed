"""The SubscribeEventsResponse, assembled from parts encoded once.

A subscription's events are encoded once per process (the feed keeps the
bytes with its ring of recent reads), however many subscriptions send them:
a response is the concatenation of its fields in the wire format, which is
what protobuf itself would write for the message (tests check both agree).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from interactions_client.v1 import analytics_service_pb2 as analytics_pb
from interactions_client.v1 import event_stream_service_pb2 as pb
from interactions_server.services import _analytics_protos as protos
from interactions_server.storage import StreamDeletion

# Field tags of SubscribeEventsResponse (field number << 3 | wire type 2: length-delimited).
_EVENTS_TAG = bytes([1 << 3 | 2])
_CURSOR_TAG = bytes([2 << 3 | 2])
_DELETIONS_TAG = bytes([3 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def encode_event(row: Sequence[Any]) -> bytes:
    """An ExportedEvent's bytes, from a stream row (kind, xid, part, then EventRow's fields)."""
    item = analytics_pb.ExportedEvent()
    (_, _, _, user_id, event_id, event_type, session_id, product_id, event_value, occurred_us, details, attributes,
     received_us) = row  # fmt: skip
    weight = protos._fill(item.event, user_id, event_id, event_type, session_id, product_id, event_value, occurred_us)
    if weight is not None:
        item.ml_weight = weight
    received = item.received_at
    received.seconds, micros = divmod(received_us, 1_000_000)
    received.nanos = micros * 1_000
    if details is not None or attributes is not None:
        protos._fill_json(item.event, details, attributes)
    return _field(_EVENTS_TAG, item.SerializeToString())


def response(events: Iterable[bytes], cursor: str, deletions: Iterable[StreamDeletion]) -> bytes:
    """A SubscribeEventsResponse's bytes: `events` as encode_event made them."""
    parts = list(events)
    parts.append(_field(_CURSOR_TAG, cursor.encode()))
    for deletion in deletions:
        record = pb.UserDeleted(user_id=deletion.user_id, deleted_at=protos.timestamp(deletion.deleted_at_us))
        parts.append(_field(_DELETIONS_TAG, record.SerializeToString()))
    return b"".join(parts)
