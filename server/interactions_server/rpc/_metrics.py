"""go-grpc-prometheus metrics for every RPC the server handles, as a grpc.aio interceptor.

Records grpc_server_started_total, grpc_server_handled_total (with the final
code), grpc_server_msg_received_total / _sent_total (stream messages, as
go-grpc-prometheus counts them: also the single message of a unary side) and
grpc_server_handling_seconds, for every service (health and reflection too).

The wrapped handler has the shape of the original (grpc.aio dispatches on it):
a coroutine for a unary response, or for a streamed one written with
context.write(); an async generator for a streamed response that is yielded.
The final code is the one the call ends with: OK, the code of context.abort()
(or context.set_code()), UNKNOWN for an exception, CANCELLED when the call is
cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from interactions_server import metrics
from interactions_server.rpc import _handlers as handlers

# Go's codes.Code.String(), the grpc_code values dashboards expect.
_GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
}
_GO_CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"
_GO_CODE_NAMES[grpc.StatusCode.OK] = "OK"

_Behavior = Callable[..., Any]


class _Call:
    """The metrics of one RPC, from start to its final status."""

    __slots__ = ("_handling", "_labels", "_m", "_start", "received", "sent")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._m = metrics.instruments()
        started, self.received, self.sent, self._handling = self._m.grpc_children(labels)
        started.inc()
        self._start = time.perf_counter()

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        self._handling.observe(time.perf_counter() - self._start)
        code = _GO_CODE_NAMES[_final_code(context, error)]
        self._m.handled_child(self._labels, code, metrics.current_client.get()).inc()


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError) or context.cancelled():
        return grpc.StatusCode.CANCELLED
    code = context.code()  # set by context.abort() or context.set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpcio versions keep the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class _CountingContext:
    """The servicer context, counting messages read and written through it."""

    def __init__(self, context: grpc.aio.ServicerContext, call: _Call) -> None:
        self._context = context
        self._call = call

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._call.received.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _counted(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.received.inc()
        yield request


def _wrap_unary_response(behavior: _Behavior, labels: tuple[str, str, str], streaming_request: bool) -> _Behavior:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(labels)
        if streaming_request:
            request, context = _counted(request, call), _CountingContext(context, call)
        else:
            call.received.inc()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            call.finish(context, exc)
            raise
        call.finish(context, None)
        if response is not None:
            call.sent.inc()
        return response

    return handler


def _wrap_streamed_response(behavior: _Behavior, labels: tuple[str, str, str], streaming_request: bool) -> _Behavior:
    def begin(request: Any, context: grpc.aio.ServicerContext) -> tuple[_Call, Any, Any]:
        call = _Call(labels)
        if streaming_request:
            request = _counted(request, call)
        else:
            call.received.inc()
        return call, request, _CountingContext(context, call)

    if inspect.isasyncgenfunction(behavior):

        async def generator_handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, request, counting = begin(request, context)
            try:
                async for response in behavior(request, counting):
                    yield response
                    call.sent.inc()
            except BaseException as exc:
                call.finish(context, exc)
                raise
            call.finish(context, None)

        return generator_handler

    async def writer_handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        call, request, counting = begin(request, context)
        try:
            await behavior(request, counting)
        except BaseException as exc:
            call.finish(context, exc)
            raise
        call.finish(context, None)

    return writer_handler


_GRPC_TYPES: dict[handlers.Shape, str] = {
    (False, False): metrics.UNARY,
    (True, False): metrics.CLIENT_STREAM,
    (False, True): metrics.SERVER_STREAM,
    (True, True): metrics.BIDI_STREAM,
}


def wrap(handler: grpc.RpcMethodHandler, method: str) -> Callable[..., Any] | None:
    """The behavior of `handler` (the method `method`, /package.Service/Method)
    with its metrics recorded; None for a synchronous behavior (left as it is)."""
    behavior = handlers.async_behavior(handler)
    if behavior is None:
        return None
    shape = handlers.shape(handler)
    service, _, name = method.lstrip("/").rpartition("/")
    labels = (_GRPC_TYPES[shape], service, name)
    wrapper = _wrap_streamed_response if shape[1] else _wrap_unary_response
    return wrapper(behavior, labels, shape[0])


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
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
