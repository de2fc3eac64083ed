"""--max-concurrent-rpcs: calls beyond the limit are refused with
RESOURCE_EXHAUSTED at once, every time.

Not grpc.aio.server(maximum_concurrent_rpcs=...): under a burst its limiter
lets calls through after the first wave (grpc/grpc#41531).

The CANCELLED answers a burst used to get (about 10% of 2,000 calls) were
not this limit's: gRPC core randomly drops calls waiting for grpc.aio to take
them once more than 1,000 wait (grpc.server.max_pending_requests); the
server raises that bound (server.py, MAX_PENDING_CALLS).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from interactions_server import handlers

OVERLOADED = "the server is serving its maximum of concurrent calls; retry later"

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class ConcurrencyLimit(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Counts calls while their handler runs; one over the limit is aborted
    before the service sees it. A single event loop: check and count need no lock."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the concurrent call limit must be positive")
        self.limit = limit
        self.active = 0

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrap = self._streaming if handler.response_streaming else self._unary
        return handlers.rewrapped(handler, wrap(handlers.behavior(handler)))

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.active >= self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
        self.active += 1

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return limited

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inspect.unwrap(behavior)):

            async def limited_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._enter(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.active -= 1

            return limited_generator

        async def limited_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            # A handler that writes its responses with context.write().
            await self._enter(context)
            try:
                await behavior(request, context)
            finally:
                self.active -= 1

        return limited_writer
