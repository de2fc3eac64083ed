"""The one place exceptions become gRPC status codes.

Servicer methods simply raise; the server's StatusInterceptor
(status_interceptor.py) applies `abort_for` to every RPC:

- `InvalidArgument(violations)` → INVALID_ARGUMENT with `google.rpc.BadRequest`
  field violations in the status details;
- a request that did not parse (`MalformedRequest`, see `lenient_parser`) →
  INVALID_ARGUMENT, where gRPC itself would answer UNKNOWN;
- `Unavailable(message)` → UNAVAILABLE (e.g. the server is shutting down);
- `NotFound(message)` → NOT_FOUND;
- `AlreadyExists(message)` → ALREADY_EXISTS (an event id reused for other content);
- `ResourceExhausted(message)` → RESOURCE_EXHAUSTED (no room in the byte budget);
- `DeadlineExceeded(message)` → DEADLINE_EXCEEDED (our own deadline guard or
  statement_timeout cancelled the transaction);
- a database failure that is not the caller's fault (see
  `is_database_unavailable`: classified by asyncpg's exception classes) → UNAVAILABLE;
- a transaction conflict (deadlock, serialization failure) → ABORTED;
- anything else → INTERNAL with a generic message; the traceback is logged
  here and never sent to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NoReturn

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from interactions_client.v1.event_pb2 import FieldViolation

_log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE_MESSAGE = "database unavailable; retry later"
INTERNAL_MESSAGE = "internal error"
CONFLICT_MESSAGE = "transaction conflict; retry"
_MAX_MESSAGE_LENGTH = 300

# asyncpg's exception classes for "the database cannot serve this call now"
# rather than "this request is wrong" (never message text):
# - the connection broke or was refused (OSError, TimeoutError, class 08),
#   or died mid-operation (InterfaceError, InternalClientError: "cannot
#   switch to state ..."), except the client-side argument errors below;
# - operator intervention (57: admin/crash shutdown, cannot connect now, and
#   a statement cancelled by our own deadline-derived statement_timeout);
# - insufficient resources (53), system errors (58), an idle transaction
#   timed out (25P03).
_UNAVAILABLE_CLASSES: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError (pool acquire and connect timeouts)
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)
# InterfaceErrors about the arguments we passed, not the connection: bugs.
_NOT_UNAVAILABLE_CLASSES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # an argument could not be encoded
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.OutdatedSchemaCacheError,
)


EXIT_OPERATOR_ERROR = 2  # also argparse's status for a usage error
EXIT_DATABASE_DIED = 3  # the embedded PostgreSQL exited under the server


class StartupError(Exception):
    """The server cannot start for a reason an operator can act on (a port in
    use, a database that does not exist, a wrong password, an unreadable
    certificate...): `interactions-server` prints its message as one line and
    exits with EXIT_OPERATOR_ERROR, without a traceback. The message says what
    is wrong and what to do."""


class InvalidArgument(Exception):
    """The request is wrong; reported as INVALID_ARGUMENT with BadRequest details."""

    def __init__(self, violations: Iterable[FieldViolation], message: str = "invalid request") -> None:
        self.violations = list(violations)
        self.message = message
        super().__init__(summarize(message, self.violations))


class MalformedRequest:
    """Stands in for a request message whose bytes did not parse (bad UTF-8 in
    a string field, a truncated message): the StatusInterceptor turns it
    into INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """A request deserializer that never raises (gRPC would answer UNKNOWN)."""

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return parse


def check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        violation = FieldViolation(field="", description=f"the request is not a valid message: {request.error}")
        raise InvalidArgument([violation], "malformed request")


class Unavailable(Exception):
    """The service cannot handle the call now; the caller should retry (elsewhere)."""


class NotFound(Exception):
    """What the request names does not exist; reported as NOT_FOUND."""


def summarize(message: str, violations: Iterable[FieldViolation]) -> str:
    """A one-line human-readable status message, e.g. "invalid event: user_id is required"."""
    text = "; ".join(f"{v.field} {v.description}".lstrip() for v in violations)
    text = f"{message}: {text}" if text else message
    return text if len(text) <= _MAX_MESSAGE_LENGTH else text[: _MAX_MESSAGE_LENGTH - 3] + "..."


def bad_request_status(violations: Iterable[FieldViolation], message: str = "invalid request") -> grpc.Status:
    """INVALID_ARGUMENT carrying a google.rpc.BadRequest with one violation per field."""
    violations = list(violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=summarize(message, violations), details=[detail])
    return rpc_status.to_status(status)


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable or not serving (retryable),
    as opposed to a bug or a bad request."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_database_unavailable(e) for e in exc.exceptions)
    return isinstance(exc, _UNAVAILABLE_CLASSES) and not isinstance(exc, _NOT_UNAVAILABLE_CLASSES)


def is_conflict(exc: BaseException) -> bool:
    """A transaction conflict (deadlock, serialization failure): retry the call."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_conflict(e) for e in exc.exceptions)
    return isinstance(exc, asyncpg.exceptions.TransactionRollbackError | asyncpg.exceptions.LockNotAvailableError)


class AlreadyExists(Exception):
    """The request conflicts with something already stored (ALREADY_EXISTS)."""


class DeadlineExceeded(Exception):
    """The call's deadline passed and its transaction was rolled back (DEADLINE_EXCEEDED)."""


class ResourceExhausted(Exception):
    """The server has no room for the call now (RESOURCE_EXHAUSTED); retry later."""


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """Ends the RPC with the status `exc` maps to."""
    if isinstance(exc, InvalidArgument):
        await context.abort_with_status(bad_request_status(exc.violations, exc.message))
    if isinstance(exc, Unavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, AlreadyExists):
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
    if isinstance(exc, ResourceExhausted):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeadlineExceeded):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if is_database_unavailable(exc):
        # No traceback, and DEBUG only: the health probe logs one WARNING when
        # the database goes away and one INFO when it is back.
        _log.debug("%s: database unavailable: %s", method, _short(exc))
        await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE)
    if is_conflict(exc):
        _log.warning("%s: transaction conflict: %s", method, _short(exc))
        await context.abort(grpc.StatusCode.ABORTED, CONFLICT_MESSAGE)
    _log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE_LENGTH]
