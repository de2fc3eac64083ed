"""The exceptions the client raises, and the translation of gRPC failures into them.

Callers catch these, never grpc.RpcError, and never parse status details:
an INVALID_ARGUMENT's google.rpc.BadRequest arrives as `violations`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from interactions_client.rpc_protos import Violation, bad_request_violations

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class InteractionsError(Exception):
    """Base of every client error. `code` is the gRPC status (None for local errors)."""

    retryable = False

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgumentError(InteractionsError):
    """The server refused a request as malformed; `violations` names the fields."""

    def __init__(
        self, message: str, violations: Sequence[tuple[str, str]] = (), *, code: grpc.StatusCode | None = None
    ) -> None:
        self.violations = [Violation(field, description) for field, description in violations]
        self.reason = message  # the message without the violations
        if self.violations:
            message = f"{message}: " + "; ".join(f"{v.field} {v.description}" for v in self.violations)
        super().__init__(message, code=code)


class InvalidEventError(InvalidArgumentError):
    """An event broke the type's rules. `local` is True when pre-validation caught
    it in this process, so nothing was sent."""

    def __init__(
        self,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        *,
        code: grpc.StatusCode | None = None,
        local: bool = False,
    ) -> None:
        super().__init__(message, violations, code=code)
        self.local = local


class UnavailableError(InteractionsError):
    """The service could not be reached, or could not reach its database. Safe to
    retry: every write carries an event_id, so a resend is deduplicated."""

    retryable = True


class DeadlineExceededError(InteractionsError):
    """No answer within the deadline; the write may or may not have happened (a resend
    with the same event_id is deduplicated)."""

    retryable = True


class NotFoundError(InteractionsError):
    """What was asked for does not exist (e.g. a session or a user without events)."""


class UnauthenticatedError(InteractionsError):
    """The server wants a bearer token and got none, or one it does not know (or no longer knows)."""


class PermissionDeniedError(InteractionsError):
    """The token is valid but lacks the scope the RPC needs."""


class ConflictError(InteractionsError):
    """ABORTED: the write conflicted with a concurrent one and was rolled back
    (the channel already retried it). Safe to retry."""

    retryable = True


class OverloadedError(InteractionsError):
    """RESOURCE_EXHAUSTED: the server has no room for the call now. Retry later, with backoff."""

    retryable = True


class EventIdReusedError(InteractionsError):
    """ALREADY_EXISTS: the event's (user_id, event_id) was already logged with
    different content. Not retryable: give the event its own event_id."""


class FailedPreconditionError(InvalidArgumentError):
    """FAILED_PRECONDITION: the request is well-formed, but what is stored refuses
    it, e.g. an identity link contradicting an earlier one (`violations` names
    the field: `anonymous_id`, or `login.anonymous_id` for a login event). Not
    retryable as it is."""


class DeliveryFailedError(InteractionsError):
    """The bulk streamer gave up: the events it reports as failed were not confirmed.
    They may have been committed; resending them is safe (event_id deduplicates)."""

    def __init__(self, message: str, *, failed: int, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.failed = failed
        self.cause = cause


_BY_CODE: dict[grpc.StatusCode, type[InteractionsError]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.ALREADY_EXISTS: EventIdReusedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def status_violations(trailing_metadata: Iterable[tuple[str, Any]] | None) -> list[Violation]:
    """The BadRequest field violations in a call's trailing metadata."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return bad_request_violations(value)
    return []


def from_rpc_error(error: grpc.RpcError, *, about_event: bool = False) -> InteractionsError:
    """The client exception for a failed call (grpc and grpc.aio alike).

    `about_event`: the request carried an event, so INVALID_ARGUMENT means
    InvalidEventError rather than the more general InvalidArgumentError.
    """
    code: grpc.StatusCode = error.code()
    message = f"{code.name}: {error.details() or 'no details'}"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        violations = status_violations(error.trailing_metadata())
        if about_event:
            violations = [Violation(v.field.removeprefix("event."), v.description) for v in violations]
        return FailedPreconditionError(message, violations, code=code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = status_violations(error.trailing_metadata())
        if about_event:
            # LogEvent's paths are relative to the request ("event.event_value");
            # name the event's fields, as pre-validation does.
            violations = [Violation(v.field.removeprefix("event."), v.description) for v in violations]
            return InvalidEventError(message, violations, code=code)
        return InvalidArgumentError(message, violations, code=code)
    return _BY_CODE.get(code, InteractionsError)(message, code=code)
