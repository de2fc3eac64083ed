"""Resume and page tokens of the AnalyticsService.

A token is opaque to callers: the urlsafe base64 (unpadded) of a small JSON
array whose first element names what it continues, so that a token of one
RPC is refused by another. Anything that does not decode to the expected
shape is INVALID_ARGUMENT naming the token's field.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server.errors import InvalidArgument

TRAINING = "training"  # [kind, as_of us, last user_id | null, last product_id | null]
EVENTS = "events"  # [kind, last occurred_at us, last event_id]
USER_EVENTS = "user_events"  # [kind, last occurred_at us, last event_id]
SESSIONS = "sessions"  # [kind, last started_at us, last session_id]

_MAX_TOKEN_LENGTH = 2_048


def encode(kind: str, *parts: object) -> str:
    raw = json.dumps([kind, *parts], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _invalid(field: str) -> InvalidArgument:
    violation = FieldViolation(field=field, description="is not a token from a previous response of this RPC")
    return InvalidArgument([violation], f"invalid {field.replace('_', ' ')}")


def _parts(token: str, field: str, kind: str, count: int) -> list[Any]:
    if len(token) > _MAX_TOKEN_LENGTH:
        raise _invalid(field)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        parts = json.loads(raw)
    except (ValueError, binascii.Error) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _invalid(field) from exc
    if not isinstance(parts, list) or len(parts) != count + 1 or parts[0] != kind:
        raise _invalid(field)
    return parts[1:]


def _micros(value: object, field: str) -> int:
    # bool is an int in Python; a timestamp is not.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 253_402_300_800_000_000:
        raise _invalid(field)
    return value


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _invalid(field)
    return value


def _event_id(value: object, field: str) -> str:
    try:
        return str(uuid.UUID(_text(value, field)))
    except ValueError as exc:
        raise _invalid(field) from exc


def decode_training(token: str) -> tuple[int, tuple[str, str] | None]:
    """(as_of us, the last (user_id, product_id) sent or None)."""
    as_of, user_id, product_id = _parts(token, "resume_token", TRAINING, 3)
    if user_id is None and product_id is None:
        return _micros(as_of, "resume_token"), None
    return _micros(as_of, "resume_token"), (_text(user_id, "resume_token"), _text(product_id, "resume_token"))


def decode_position(token: str, field: str, kind: str) -> tuple[int, str]:
    """(occurred_at us, event_id) of the last event sent (kinds EVENTS, USER_EVENTS)."""
    occurred, event_id = _parts(token, field, kind, 2)
    return _micros(occurred, field), _event_id(event_id, field)


def decode_sessions(token: str) -> tuple[int, str]:
    """(started_at us, session_id) of the last session sent."""
    started, session_id = _parts(token, "page_token", SESSIONS, 2)
    return _micros(started, "page_token"), _text(session_id, "page_token")
