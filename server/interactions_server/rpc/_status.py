"""The one place exceptions become gRPC status codes.

Servicers simply raise (the exceptions of interactions_server.errors); the
StatusInterceptor applies `abort_for` around every handler:

- `InvalidArgument(violations)` → INVALID_ARGUMENT with `google.rpc.BadRequest`
  field violations in the status details;
- a request that did not parse (`MalformedRequest`, see `lenient_parser`) →
  INVALID_ARGUMENT, where gRPC itself would answer UNKNOWN;
- `FailedPrecondition(violations)` → FAILED_PRECONDITION, the fields it
  names as `google.rpc.BadRequest` field violations too (read like those of
  INVALID_ARGUMENT), e.g. an identity link contradicting an earlier one;
  `FailedPrecondition(message=..., kind, subject)` → FAILED_PRECONDITION with
  a `google.rpc.PreconditionFailure` (e.g. a cursor older than retention);
- `Unavailable(message)` → UNAVAILABLE (e.g. the server is shutting down);
- `NotFound(message)` → NOT_FOUND;
- `AlreadyExists(message)` → ALREADY_EXISTS (an event id reused for other content);
- `ResourceExhausted(message)` → RESOURCE_EXHAUSTED (no room in the byte budget);
- `DeadlineExceeded(message)` → DEADLINE_EXCEEDED (our own deadline guard or
  statement_timeout cancelled the transaction);
- a database failure that is not the caller's fault (see
  `is_database_unavailable`: classified by asyncpg's exception classes) → UNAVAILABLE,
  saying so when the database is read-only (`is_database_read_only`);
- a transaction conflict (deadlock, serialization failure) → ABORTED;
- anything else → INTERNAL with a generic message; the traceback is logged
  here and never sent to the caller.

The wrapped handler keeps the shape of the original, which grpc.aio
dispatches on: a coroutine for a unary response or a response written with
context.write(), an async generator for a yielded response stream. A request
that did not parse is refused for a unary request before the servicer runs,
for a request stream message by message as the servicer reads it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server.errors import (
    MAX_MESSAGE_LENGTH,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    is_conflict,
    is_database_read_only,
    is_database_unavailable,
    summarize,
)
from interactions_server.rpc import _handlers as handlers
from interactions_server.rpc._handlers import MalformedRequest

_log = logging.getLogger("interactions_server.errors")

DATABASE_UNAVAILABLE_MESSAGE = "database unavailable; retry later"
DATABASE_READ_ONLY_MESSAGE = (
    "the database is read-only (a standby after a failover, or default_transaction_read_only on): "
    "writes cannot commit now; retry later"
)
INTERNAL_MESSAGE = "internal error"
CONFLICT_MESSAGE = "transaction conflict; retry"


def check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        violation = FieldViolation(field="", description=f"the request is not a valid message: {request.error}")
        raise InvalidArgument([violation], "malformed request")


def bad_request_status(
    violations: Iterable[FieldViolation], message: str = "invalid request", code: int = code_pb2.INVALID_ARGUMENT
) -> grpc.Status:
    """INVALID_ARGUMENT (or `code`) carrying a google.rpc.BadRequest with one violation per field."""
    violations = list(violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code, message=summarize(message, violations), details=[detail])
    return rpc_status.to_status(status)


def precondition_status(exc: FailedPrecondition) -> grpc.Status:
    """FAILED_PRECONDITION carrying a google.rpc.PreconditionFailure."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(type=exc.kind, subject=exc.subject, description=str(exc))
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(failure)
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(exc), details=[detail])
    return rpc_status.to_status(status)


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """Ends the RPC with the status `exc` maps to."""
    if isinstance(exc, InvalidArgument):
        await context.abort_with_status(bad_request_status(exc.violations, exc.message))
    if isinstance(exc, FailedPrecondition) and exc.kind:
        await context.abort_with_status(precondition_status(exc))
    if isinstance(exc, FailedPrecondition):
        await context.abort_with_status(
            bad_request_status(exc.violations, exc.message, code=code_pb2.FAILED_PRECONDITION)
        )
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
    if is_database_read_only(exc):
        # Health says it once (NOT_SERVING, one WARNING); reads go on.
        _log.debug("%s: database read-only: %s", method, _short(exc))
        await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_READ_ONLY_MESSAGE)
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
    return f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_LENGTH]


_Behavior = Callable[..., Any]


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        check_parsed(request)
        yield request


def _wrap(behavior: _Behavior, method: str, streaming_request: bool) -> _Behavior:
    def checked(request: Any) -> Any:
        if streaming_request:
            return _checked(request)
        check_parsed(request)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def generator_handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                # aclosing: if the call is cancelled while a response is being
                # sent, the servicer's own cleanup runs now.
                async with contextlib.aclosing(behavior(checked(request), context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise  # context.abort() was called: the status is already set
            except Exception as exc:
                await abort_for(exc, context, method)

        return generator_handler

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(checked(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(exc, context, method)

    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: handlers.Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        behavior = wrap(handler, handler_call_details.method)
        return handler if behavior is None else handlers.rewrapped(handler, behavior)


def wrap(handler: grpc.RpcMethodHandler, method: str) -> _Behavior | None:
    """The behavior of `handler` with its exceptions mapped to statuses; None
    for a synchronous behavior (left as it is)."""
    behavior = handlers.async_behavior(handler)
    if behavior is None:
        return None
    return _wrap(behavior, method.lstrip("/"), bool(handler.request_streaming))
