"""Resume and page tokens of the AnalyticsService, sealed by the server's
Keyring (interactions_server.keyring): opaque to callers, carrying no id in
clear, refused when edited. The kind of a token is bound into its seal, so
that a token of one RPC is refused by another. Anything that does not open
to the expected shape is INVALID_ARGUMENT naming the token's field.
"""

from __future__ import annotations

import uuid

from interactions_server.keyring import Keyring, invalid_token

TRAINING = "training"  # [as_of us, last user_id | null, last product_id | null]
EVENTS = "events"  # [last occurred_at us, last event_id]
USER_EVENTS = "user_events"  # [last occurred_at us, last event_id]
SESSIONS = "sessions"  # [last started_at us, last session_id]


def _micros(value: object, field: str) -> int:
    # bool is an int in Python; a timestamp is not.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 253_402_300_800_000_000:
        raise invalid_token(field)
    return value


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise invalid_token(field)
    return value


def _event_id(value: object, field: str) -> str:
    try:
        return str(uuid.UUID(_text(value, field)))
    except ValueError as exc:
        raise invalid_token(field) from exc


def decode_training(keyring: Keyring, token: str) -> tuple[int, tuple[str, str] | None]:
    """(as_of us, the last (user_id, product_id) sent or None)."""
    as_of, user_id, product_id = keyring.open(token, TRAINING, "resume_token", 3)
    if user_id is None and product_id is None:
        return _micros(as_of, "resume_token"), None
    return _micros(as_of, "resume_token"), (_text(user_id, "resume_token"), _text(product_id, "resume_token"))


def decode_position(keyring: Keyring, token: str, field: str, kind: str) -> tuple[int, str]:
    """(occurred_at us, event_id) of the last event sent (kinds EVENTS, USER_EVENTS)."""
    occurred, event_id = keyring.open(token, kind, field, 2)
    return _micros(occurred, field), _event_id(event_id, field)


def decode_sessions(keyring: Keyring, token: str) -> tuple[int, str]:
    """(started_at us, session_id) of the last session sent."""
    started, session_id = keyring.open(token, SESSIONS, "page_token", 2)
    return _micros(started, "page_token"), _text(session_id, "page_token")
