"""Exceptions become gRPC status codes for every RPC, as a grpc.aio interceptor.

The mapping itself is errors.abort_for (the one place it lives); this module
applies it around every handler, so servicers simply raise. A request whose
bytes did not parse (errors.MalformedRequest, from the lenient deserializer
the services are registered with) becomes INVALID_ARGUMENT here too, for a
unary request before the servicer runs, for a request stream message by
message as the servicer reads it.

The wrapped handler keeps the shape of the original, which grpc.aio
dispatches on: a coroutine for a unary response or a response written with
context.write(), an async generator for a yielded response stream.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from interactions_server import handlers
from interactions_server.errors import abort_for, check_parsed

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
        behavior = handlers.async_behavior(handler)
        if behavior is None:
            return handler
        method = handler_call_details.method.lstrip("/")
        return handlers.rewrapped(handler, _wrap(behavior, method, bool(handler.request_streaming)))
