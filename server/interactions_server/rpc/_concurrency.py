"""--max-concurrent-rpcs: calls beyond the limit are refused with
RESOURCE_EXHAUSTED at once, every time. Streams (a streaming request or
response: StreamEvents, the exports, health's Watch) are bounded apart, by
--max-open-streams (and, with tokens, --max-open-streams-per-client), so that
open streams, idle ones included, never take the slots of unary calls.

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

import contextvars
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
TOO_MANY_STREAMS = "the server has its maximum of open streams; retry later"
TOO_MANY_CLIENT_STREAMS = "this client has its maximum of open streams; close one or retry later"
SAMPLE_SECONDS = 0.01  # a channelz read costs 60-100 µs: at most 1% of the loop
BACKLOG_GAP_SECONDS = 0.005  # calls taken from a backlog come one per loop iteration, even on a slow machine

_log = logging.getLogger("interactions_server.concurrency")
# The client a stream was counted for (each call runs in a task of its own).
_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("stream_client", default=None)


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
    service sees it. Streams are counted apart (`streams`, bounded by
    `max_streams`) and left out of core's count for the unary limit. A single
    event loop: check and count need no lock."""

    def __init__(
        self, limit: int, *, max_streams: int | None = None, max_streams_per_client: int | None = None
    ) -> None:
        if limit <= 0:
            raise ValueError("the concurrent call limit must be positive")
        self.limit = limit
        self.max_streams = max_streams
        self.max_streams_per_client = max_streams_per_client
        self.active = 0  # unary calls in their handlers
        self.streams = 0  # streaming calls in their handlers
        self._client_streams: dict[str, int] = {}
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
        streaming = is_streaming(handler)
        if self.over_limit(streaming):  # before the request is read and parsed
            return self.refusal(handler)
        return handlers.rewrapped(handler, self.wrap(handler))

    def refusal(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        message = TOO_MANY_STREAMS if is_streaming(handler) else OVERLOADED
        return handlers.refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def wrap(self, handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
        """The behavior of `handler`, counted while it runs."""
        behavior = handlers.behavior(handler)
        if is_streaming(handler):
            return self._streaming(behavior)
        return self._unary(behavior)

    def over_limit(self, streaming: bool) -> bool:
        """Whether a new call is refused now (it is refused before its request is parsed)."""
        if streaming:
            if self.max_streams is not None and self.streams >= self.max_streams:
                self._core_in_flight -= 1
                return True
            return False
        if self._over_limit():
            self._core_in_flight -= 1
            return True
        return False

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
                self._core_in_flight = self.streams
        # Core's count includes this call, and the open streams (bounded apart).
        return self._core_in_flight - self.streams > self.limit

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.active >= self.limit:  # taken by calls admitted since this one was
            self._core_in_flight -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
        self.active += 1

    def _leave(self) -> None:
        self.active -= 1
        self._core_in_flight -= 1

    async def _enter_stream(self, context: grpc.aio.ServicerContext) -> None:
        if self.max_streams is not None and self.streams >= self.max_streams:
            self._core_in_flight -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY_STREAMS)
        self.streams += 1

    def _leave_stream(self) -> None:
        self.streams -= 1
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
        return _counted(behavior, self._enter_stream, self._leave_stream)

    def per_client(self, handler: grpc.RpcMethodHandler, client: Callable[[], str | None]) -> Callable[..., Any]:
        """The behavior of a streaming `handler`, bounded per client (`client()`:
        the caller's name, set by the token check that runs before it)."""
        if self.max_streams_per_client is None:
            return handlers.behavior(handler)
        bound = self.max_streams_per_client
        counts = self._client_streams

        async def enter(context: grpc.aio.ServicerContext) -> None:
            name = client()
            if name is None:
                return
            if counts.get(name, 0) >= bound:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY_CLIENT_STREAMS)
            counts[name] = counts.get(name, 0) + 1
            _CLIENT.set(name)

        def leave() -> None:
            name = _CLIENT.get()
            if name is None:
                return
            left = counts.get(name, 1) - 1
            if left:
                counts[name] = left
            else:
                counts.pop(name, None)

        return _counted(handlers.behavior(handler), enter, leave)


def is_streaming(handler: grpc.RpcMethodHandler) -> bool:
    return bool(handler.request_streaming or handler.response_streaming)


def _counted(
    behavior: Callable[..., Any],
    enter: Callable[[grpc.aio.ServicerContext], Any],
    leave: Callable[[], None],
) -> Callable[..., Any]:
    """`behavior` (a streaming one) between `await enter(context)` and `leave()`."""
    if inspect.isasyncgenfunction(inspect.unwrap(behavior)):

        async def counted_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await enter(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                leave()

        return counted_generator

    async def counted_writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # A handler that writes its responses with context.write(), or a
        # unary response to a request stream.
        await enter(context)
        try:
            return await behavior(request, context)
        finally:
            leave()

    return counted_writer
