"""Who makes the current call: set by the token check for the duration of
each authenticated call, read by the services (the event types a caller may
log, the audit trail of a deletion)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from interactions_client.rules import RULES
from interactions_client.v1.event_pb2 import Event, FieldViolation
from interactions_server import metrics

TYPE_NOT_ALLOWED = "not allowed for this client"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the current call: a token's name and the event types it may
    log; and its token's digest, to find it again after a reload."""

    name: str
    event_types: frozenset[str] | None
    digest: bytes = field(default=b"", repr=False)


# Set for the duration of each authenticated call. grpc.aio runs every call
# in its own task, and tasks copy the context, so calls never see each other's.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("interactions_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being handled; None when tokens are off."""
    return _CALLER.get()


def allowed_event_types() -> frozenset[str] | None:
    """The event type names the current caller may log; None: any."""
    caller = _CALLER.get()
    return None if caller is None else caller.event_types


def set_caller(caller: Caller) -> None:
    """Makes `caller` the caller of the current call (and its name the call's
    `client` in metrics and logs)."""
    _CALLER.set(caller)
    metrics.current_client.set(caller.name)  # the token's name, never its secret


def event_type_violation(event: Event, allowed: frozenset[str] | None) -> FieldViolation | None:
    """The violation for an event whose type the caller may not log, else None.
    An unknown type is left to validation, which names it already."""
    if allowed is None or event.event_type not in RULES:
        return None
    if RULES[event.event_type].name in allowed:
        return None
    return FieldViolation(field="event_type", description=TYPE_NOT_ALLOWED)
