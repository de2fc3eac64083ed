"""The largest request a client can validly send, derived from the bounds.

The server's maximum receive message size is this figure rather than a round
number: a valid batch is never refused by gRPC, and nothing larger is read.
Lengths are bounded in characters, so the worst case is every character
taking 4 bytes in UTF-8.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client import limits
from interactions_client.v1.event_pb2 import Event, EventType

_WIDE = "\U0010ffff"  # a character of 4 bytes in UTF-8
_MAX_VARINT_BYTES = 10
# An events entry's framing: its tag (1 byte) and length (a varint).
_ENTRY_FRAMING = 1 + 5


def largest_event() -> Event:
    """An event at every bound at once (no single type takes all of it, so
    this is an upper bound on the largest valid event)."""
    event = Event(
        event_id="00000000-0000-0000-0000-000000000000",
        user_id=_WIDE * limits.MAX_ID_LENGTH,
        session_id=_WIDE * limits.MAX_ID_LENGTH,
        product_id=_WIDE * limits.MAX_ID_LENGTH,
        custom_type="a" * limits.MAX_CUSTOM_TYPE_LENGTH,  # lower snake case: ASCII
        event_type=max(EventType.values()),
        event_value=-1,  # a negative int64 takes the most varint bytes
        occurred_at=Timestamp(seconds=2**40, nanos=999_999_999),
    )
    for i in range(limits.MAX_ATTRIBUTES):
        key = f"{i:03d}".ljust(limits.MAX_ATTRIBUTE_KEY_LENGTH, _WIDE)
        event.attributes[key] = _WIDE * limits.MAX_ATTRIBUTE_VALUE_LENGTH
    details = [_details_size(member) for member in Event.DESCRIPTOR.oneofs_by_name["details"].fields]
    largest_member = max(details)[1]
    _fill_details(event, largest_member)
    return event


def _fill_details(event: Event, member: str) -> None:
    payload = getattr(event, member)
    for field in payload.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            setattr(payload, field.name, _WIDE * _text_bound(member, field.name))
        elif field.cpp_type in (field.CPPTYPE_INT32, field.CPPTYPE_INT64):
            setattr(payload, field.name, -1)
        elif field.cpp_type in (field.CPPTYPE_UINT32, field.CPPTYPE_UINT64):
            setattr(payload, field.name, 2**32 - 1 if field.cpp_type == field.CPPTYPE_UINT32 else 2**64 - 1)


def _details_size(member: object) -> tuple[int, str]:
    name: str = member.name  # type: ignore[attr-defined]
    event = Event()
    _fill_details(event, name)
    return event.ByteSize(), name


def _text_bound(member: str, field: str) -> int:
    bounds = {
        ("search", "query"): limits.MAX_QUERY_LENGTH,
        ("page_view", "page_path"): limits.MAX_URL_LENGTH,
        ("page_view", "referrer"): limits.MAX_URL_LENGTH,
    }
    return bounds.get((member, field), limits.MAX_TEXT_LENGTH)


def largest_batch_bytes() -> int:
    """Bytes of a StreamEventsRequest (the largest request) of MAX_BATCH_EVENTS largest events."""
    per_event = largest_event().ByteSize() + _ENTRY_FRAMING
    sequence = 1 + _MAX_VARINT_BYTES
    return sequence + limits.MAX_BATCH_EVENTS * per_event


MAX_MESSAGE_BYTES = largest_batch_bytes()
