"""The token check on every call, as a grpc.aio interceptor (the policy itself,
without gRPC, is interactions_server.auth's TokenPolicy)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from interactions_server.auth import Caller, Refusal, TokenPolicy, is_open, set_caller
from interactions_server.rpc import _handlers as handlers

Status = tuple[grpc.StatusCode, str]


def _status(refusal: Refusal) -> Status:
    return grpc.StatusCode[refusal.code], refusal.message


class TokenAuth(TokenPolicy, grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """TokenPolicy applied to every call: a refused call ends before the
    servicer runs; an accepted one runs with its caller set."""

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | Status:
        """The caller of `method`, or the status that refuses the call."""
        outcome = self.authorize(method, metadata)
        return outcome if isinstance(outcome, Caller) else _status(outcome)

    async def intercept_service(
        self,
        continuation: handlers.Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or is_open(method):
            return handler
        return self.guarded(handler, method)

    def guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` behind the token check of `method`. Made once per method
        (rpc's chain caches it): each call's metadata is checked as it starts."""

        def decide(context: grpc.aio.ServicerContext) -> tuple[Caller | Status, Callable[[], Refusal | None]]:
            outcome = self.check(method, context.invocation_metadata())
            revoked = self.revocation_check(method, outcome) if isinstance(outcome, Caller) else _never
            return outcome, revoked

        return _guarded(handler, decide)


def _never() -> Refusal | None:
    return None


Decide = Callable[[grpc.aio.ServicerContext], tuple[Caller | Status, Callable[[], Refusal | None]]]


class _Revoked(grpc.aio.AbortError):  # type: ignore[misc]  # grpc has no type hints
    """Raised into the servicer from its request stream when the caller's token
    is revoked: an AbortError, so that the status interceptor lets it through
    (after the servicer answered what it had already accepted), and _guarded
    ends the call with the refusal."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.status = _status(refusal)


def _guarded(handler: grpc.RpcMethodHandler, decide: Decide) -> grpc.RpcMethodHandler:
    """`handler` behind the auth outcome `decide` gives each call, as a handler
    of the same streaming shape: a refused call ends before the servicer runs
    (for a client stream, before any request is read); an accepted one runs
    with its Caller set.
    A token revoked (or a scope taken away) by a reload also ends the calls
    it has open: a request stream before its next message reaches the
    servicer, a response stream before its next response."""
    behavior = handlers.behavior(handler)

    async def admit(context: grpc.aio.ServicerContext) -> Callable[[], Refusal | None]:
        outcome, revoked = decide(context)
        if not isinstance(outcome, Caller):
            await context.abort(*outcome)  # raises
        else:
            set_caller(outcome)
        return revoked

    async def rechecked(requests: AsyncIterator[Any], revoked: Callable[[], Refusal | None]) -> AsyncIterator[Any]:
        async for request in requests:
            if (refusal := revoked()) is not None:
                raise _Revoked(refusal)
            yield request

    def requests_of(request: Any, revoked: Callable[[], Refusal | None]) -> Any:
        return rechecked(request, revoked) if handler.request_streaming else request

    async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
        revoked = await admit(context)
        try:
            return await behavior(requests_of(request, revoked), context)
        except _Revoked as exc:
            await context.abort(*exc.status)

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        revoked = await admit(context)
        responses = behavior(requests_of(request, revoked), context)
        try:
            if inspect.isawaitable(responses):  # a handler that writes with context.write()
                await responses
                return
            # aclosing: a cancelled call closes the handler's generator now (its
            # cleanup, e.g. an export's cursor, runs before the call ends).
            async with contextlib.aclosing(responses) as closing:
                async for response in closing:
                    # A request stream is checked per request: its answers to
                    # requests already accepted still go out.
                    if not handler.request_streaming and (refusal := revoked()) is not None:
                        await context.abort(*_status(refusal))
                    yield response
        except _Revoked as exc:
            await context.abort(*exc.status)

    return handlers.rewrapped(handler, stream_response if handler.response_streaming else unary_response)
