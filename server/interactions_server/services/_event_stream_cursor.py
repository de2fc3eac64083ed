"""The subscription's cursor: a stream position, sealed (opaque, tamper-proof).

A cursor is a position in the whole stream (storage.StreamPosition): the
transaction id, and inside it the last event's (user_id, occurred_at,
event_id) when a response ended within a transaction. Any filter may resume
from it, on any worker or host: the sealing key is the deployment's.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from interactions_client import limits
from interactions_server.errors import InvalidArgument
from interactions_server.keyring import invalid_token
from interactions_server.storage import StreamKey, StreamPosition

KIND = "subscription"
FIELD = "cursor"
_MAX_XID = (1 << 63) - 1
_US_RANGE = (-62_135_596_800_000_000, 253_402_300_800_000_000)  # Timestamp's: 0001-01-01 to 10000-01-01


class Sealer(Protocol):
    """Seals parts into an opaque token and opens it (raising InvalidArgument
    naming `field`): the server's keyring.Keyring."""

    def seal(self, kind: str, *parts: Any) -> str: ...

    def open(self, token: str, kind: str, field: str, count: int | None = None) -> list[Any]: ...


def encode(sealer: Sealer, position: StreamPosition) -> str:
    if position.key is None:
        return sealer.seal(KIND, position.xid)
    return sealer.seal(KIND, position.xid, *position.key)


def _invalid() -> InvalidArgument:
    return invalid_token(FIELD)


def _int(value: object, upper: int, lower: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lower <= value < upper:
        raise _invalid()
    return value


def decode(sealer: Sealer, token: str) -> StreamPosition:
    """The position `token` holds; InvalidArgument naming `cursor` for anything else."""
    parts = sealer.open(token, KIND, FIELD)
    if len(parts) == 1:
        return StreamPosition(_int(parts[0], _MAX_XID))
    if len(parts) != 4:
        raise _invalid()
    xid, user_id, occurred_us, event_id = parts
    if not isinstance(user_id, str) or not user_id or len(user_id) > limits.MAX_ID_LENGTH or "\x00" in user_id:
        raise _invalid()
    try:
        event = str(uuid.UUID(event_id)) if isinstance(event_id, str) else None
    except ValueError:
        event = None
    if event is None:
        raise _invalid()
    return StreamPosition(_int(xid, _MAX_XID), StreamKey(user_id, _int(occurred_us, _US_RANGE[1], _US_RANGE[0]), event))
