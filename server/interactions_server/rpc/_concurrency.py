"""--max-concurrent-rpcs: calls beyond the limit are refused with
RESOURCE_EXHAUSTED at once, every time.

What counts is every call gRPC core holds for this server, the calls that
have arrived but that grpc.aio has not taken yet included. grpc.aio takes one
call per event-loop iteration, so when the loop is the bottleneck a burst
waits in core, not in the handlers: 2,000 concurrent calls against a limit of
100 were all served, p99 1.1 s, because the handlers never held more than a
few dozen at once. Core's count comes from channelz (calls started, less
those succeeded or failed), read at most every SAMPLE_SECONDS while calls
come back to back (a backlog is taken one call per loop iteration), and
lowered by the calls that ended since the read.

Not grpc.aio.server(maximum_concurrent_rpcs=...): it counts taken calls only,
and under a burst its limiter lets calls through after the first wave
(grpc/grpc#41531).

The CANCELLED answers a burst used to get (about 10% of 2,000 calls) were
not this limit's: gRPC core randomly drops calls waiting for grpc.aio to take
them once more than 1,000 wait (grpc.server.max_pending_requests); the
server raises that bound (_grpc_server.py, MAX_PENDING_CALLS).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc._cython import cygrpc  # channelz, as the grpcio-channelz servicer reads it

from interactions_server.rpc import _handlers as handlers

OVERLOADED = "the server is serving its maximum of concurrent calls; retry later"
SAMPLE_SECONDS = 0.01  # a channelz read costs 60-100 µs: at most 1% of the loop
BACKLOG_GAP_SECONDS = 0.005  # calls taken from a backlog come one per loop iteration, even on a slow machine

_log = logging.getLogger("interactions_server.concurrency")


class CoreCalls:
    """The calls one gRPC server's core holds: begun and not yet ended."""

    def __init__(self, server_id: int) -> None:
        self.server_id = server_id

    @staticmethod
    def server_ids() -> set[int]:
        """The channelz ids of this process's gRPC servers."""
        ids: set[int] = set()
        start = 0
        while True:
            page = json.loads(cygrpc.channelz_get_servers(start))
            ids.update(int(server["ref"]["serverId"]) for server in page.get("server", ()))
            if page.get("end", False) or not ids:
                return ids
            start = max(ids) + 1

    @classmethod
    def created_since(cls, before: set[int]) -> CoreCalls | None:
        """The one server created since `before` was read; None when that is not
        one server, or channelz is off (the limit then counts taken calls only)."""
        try:
            created = cls.server_ids() - before
        except (ValueError, KeyError):
            created = set()
        if len(created) != 1:
            _log.warning("channelz does not show this server: --max-concurrent-rpcs counts the calls taken only")
            return None
        return cls(created.pop())

    def in_flight(self) -> int:
        data = json.loads(cygrpc.channelz_get_server(self.server_id))["server"]["data"]
        ended = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
        return int(data.get("callsStarted", 0)) - ended


class ConcurrencyLimit(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Counts calls while their handler runs, and reads core's count of the
    calls it holds; a call over the limit is refused before its request is
    parsed, or, if the handlers filled up while it was read, before the
    service sees it. A single event loop: check and count need no lock."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the concurrent call limit must be positive")
        self.limit = limit
        self.active = 0
        self.core: CoreCalls | None = None  # set by watch() once the server exists
        self._core_in_flight = 0  # at the last sample, less the calls ended since
        self._sampled_at = float("-inf")
        self._last_call_at = float("-inf")

    def watch(self, core: CoreCalls | None) -> None:
        self.core = core

    async def intercept_service(
        self, continuation: handlers.Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._over_limit():  # before the request is read and parsed
            self._core_in_flight -= 1
            return handlers.refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
        wrap = self._streaming if handler.response_streaming else self._unary
        return handlers.rewrapped(handler, wrap(handlers.behavior(handler)))

    def _over_limit(self) -> bool:
        if self.active >= self.limit:
            return True
        if self.core is None:
            return False
        now = time.monotonic()
        back_to_back = now - self._last_call_at < BACKLOG_GAP_SECONDS
        self._last_call_at = now
        if now - self._sampled_at >= SAMPLE_SECONDS:
            if back_to_back:
                try:
                    self._core_in_flight = self.core.in_flight()
                except (ValueError, KeyError):  # channelz stopped answering: count the calls taken only
                    _log.warning(
                        "channelz no longer shows this server: --max-concurrent-rpcs counts the calls taken only"
                    )
                    self.core, self._core_in_flight = None, 0
                    return False
                self._sampled_at = now
            else:  # after a pause there is no backlog; the next call, if it follows at once, samples
                self._core_in_flight = 0
        return self._core_in_flight > self.limit  # the count includes this call

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.active >= self.limit:  # taken by calls admitted since this one was
            self._core_in_flight -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
        self.active += 1

    def _leave(self) -> None:
        self.active -= 1
        self._core_in_flight -= 1

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return limited

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inspect.unwrap(behavior)):

            async def limited_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._enter(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self._leave()

            return limited_generator

        async def limited_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            # A handler that writes its responses with context.write().
            await self._enter(context)
            try:
                await behavior(request, context)
            finally:
                self._leave()

        return limited_writer
