"""The one check of an id a read or an admin call names (user_id, session_id):
the write path's bounds (interactions_client.limits), so that any id an event
could have been logged with is accepted, and any other is INVALID_ARGUMENT
naming the field, never a database error."""

from __future__ import annotations

from interactions_client import limits
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server.errors import InvalidArgument


def check_id(value: str, field: str) -> str:
    """`value` when it is a valid id; else raises InvalidArgument naming `field`."""
    if not value or value.isspace():
        raise _invalid(field, "is required")
    if len(value) > limits.MAX_ID_LENGTH:
        raise _invalid(field, f"is {len(value)} characters long; the limit is {limits.MAX_ID_LENGTH}")
    if "\x00" in value:
        raise _invalid(field, "must not contain NUL characters")
    return value


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)])
