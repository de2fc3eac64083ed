"""Client of the Interactions service: generated stubs (``interactions_client.v1``),
the rule catalog (``rules``), event validation (``validation``), the asyncio and
synchronous clients, the bulk streamer and the ``interactions`` command."""

from interactions_client.channel import TlsConfig
from interactions_client.client import InteractionsClient
from interactions_client.errors import (
    ConflictError,
    DeadlineExceededError,
    DeliveryFailedError,
    EventIdReusedError,
    FailedPreconditionError,
    InteractionsError,
    InvalidArgumentError,
    InvalidEventError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from interactions_client.results import BatchResult, Identity, LinkResult, LogResult, Rejection
from interactions_client.rpc_protos import Violation
from interactions_client.rules import RULES, STANDARD, TypeRule
from interactions_client.streamer import EventStreamer, ParallelStreamer, StreamTotals, Undelivered
from interactions_client.sync_client import SyncInteractionsClient
from interactions_client.sync_streamer import SyncEventStreamer
from interactions_client.v1.event_pb2 import Event, EventType, FieldViolation
from interactions_client.validation import validate

__all__ = [
    "RULES",
    "STANDARD",
    "BatchResult",
    "ConflictError",
    "DeadlineExceededError",
    "DeliveryFailedError",
    "Event",
    "EventIdReusedError",
    "EventStreamer",
    "EventType",
    "FailedPreconditionError",
    "FieldViolation",
    "Identity",
    "InteractionsClient",
    "InteractionsError",
    "InvalidArgumentError",
    "InvalidEventError",
    "LinkResult",
    "LogResult",
    "NotFoundError",
    "OverloadedError",
    "ParallelStreamer",
    "PermissionDeniedError",
    "Rejection",
    "StreamTotals",
    "SyncEventStreamer",
    "SyncInteractionsClient",
    "TlsConfig",
    "TypeRule",
    "UnauthenticatedError",
    "UnavailableError",
    "Undelivered",
    "Violation",
    "validate",
]
