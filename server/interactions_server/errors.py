"""The errors of the service, apart from gRPC: what servicers and the write
path raise, the start-up errors an operator can act on, and which database
failures mean "unavailable, retry" rather than a bug or a bad request.

Each exception below becomes one gRPC status (rpc/_status.py, the one place
the mapping lives): InvalidArgument → INVALID_ARGUMENT with field
violations, FailedPrecondition → FAILED_PRECONDITION with field violations,
Unavailable → UNAVAILABLE, NotFound → NOT_FOUND, AlreadyExists →
ALREADY_EXISTS, ResourceExhausted → RESOURCE_EXHAUSTED, DeadlineExceeded →
DEADLINE_EXCEEDED;
`is_database_unavailable` → UNAVAILABLE (a read-only database,
`is_database_read_only`, with a message of its own), `is_conflict` → ABORTED;
anything else → INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from interactions_client.v1.event_pb2 import FieldViolation

MAX_MESSAGE_LENGTH = 300  # of a status message

# asyncpg's exception classes for "the database cannot serve this call now"
# rather than "this request is wrong" (never message text):
# - the connection broke or was refused (OSError, TimeoutError, class 08),
#   or died mid-operation (InterfaceError, InternalClientError: "cannot
#   switch to state ..."), except the client-side argument errors below;
# - operator intervention (57: admin/crash shutdown, cannot connect now, and
#   a statement cancelled by our own deadline-derived statement_timeout);
# - insufficient resources (53), system errors (58), an idle transaction
#   timed out (25P03);
# - a read-only database (25006: a standby after a failover, or
#   default_transaction_read_only on): writes cannot commit here now.
_READ_ONLY_CLASSES: tuple[type[BaseException], ...] = (asyncpg.exceptions.ReadOnlySQLTransactionError,)
_UNAVAILABLE_CLASSES: tuple[type[BaseException], ...] = (
    *_READ_ONLY_CLASSES,
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


class FailedPrecondition(Exception):
    """The request is well-formed but the stored state refuses it; reported as
    FAILED_PRECONDITION. Either with the fields it names as BadRequest details
    (e.g. an identity link that would contradict an earlier one), or, given
    `kind`, with a google.rpc.PreconditionFailure: `kind` the violation's type
    (e.g. "RETENTION"), `subject` the field or thing it is about (e.g. a
    subscription cursor older than retention)."""

    def __init__(
        self,
        violations: Iterable[FieldViolation] = (),
        message: str = "failed precondition",
        *,
        kind: str = "",
        subject: str = "",
    ) -> None:
        self.violations = list(violations)
        self.message = message
        self.kind = kind
        self.subject = subject
        super().__init__(summarize(message, self.violations))


class Unavailable(Exception):
    """The service cannot handle the call now; the caller should retry (elsewhere)."""


class NotFound(Exception):
    """What the request names does not exist; reported as NOT_FOUND."""


def summarize(message: str, violations: Iterable[FieldViolation]) -> str:
    """A one-line human-readable status message, e.g. "invalid event: user_id is required"."""
    text = "; ".join(f"{v.field} {v.description}".lstrip() for v in violations)
    text = f"{message}: {text}" if text else message
    return text if len(text) <= MAX_MESSAGE_LENGTH else text[: MAX_MESSAGE_LENGTH - 3] + "..."


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable or not serving (retryable),
    as opposed to a bug or a bad request."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_database_unavailable(e) for e in exc.exceptions)
    return isinstance(exc, _UNAVAILABLE_CLASSES) and not isinstance(exc, _NOT_UNAVAILABLE_CLASSES)


def is_database_read_only(exc: BaseException) -> bool:
    """Whether `exc` is a write refused because the database is read-only now
    (one kind of `is_database_unavailable`: retry, here later or elsewhere)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_database_read_only(e) for e in exc.exceptions)
    return isinstance(exc, _READ_ONLY_CLASSES)


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
