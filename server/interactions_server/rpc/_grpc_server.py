"""The grpc.aio server as this service builds it: its options, its interceptor
chain (the one place it is put together, and in which order) and its port.

The chain is one interceptor (`Chain`): grpc.aio runs every interceptor's
intercept_service on every call, so the four steps below are composed once
per method, at its first call, and the wrapped handler is reused; per call
only the concurrency check runs before the handler is returned. Each call
goes through the steps in this order, outermost first:

1. metrics (rpc/_metrics.py): outermost, so that it sees the final status of
   every call, the refusals of the steps below included (a
   RESOURCE_EXHAUSTED or UNAUTHENTICATED is counted like any other code).
2. the concurrency limit (--max-concurrent-rpcs for unary calls,
   --max-open-streams for streams): refuses a call beyond the limit before
   anything else works on it; a refusal is cheap, its request never parsed.
   Before authentication, so that a burst of unauthenticated calls is
   bounded too. Interactive calls (precedence.py) are counted from here.
3. the token check (--auth-tokens, rpc/_auth.py): refuses a call without a
   valid token or scope before it reaches the services; sets the caller (its
   name becomes the `client` label and log field) for what runs inside it;
   then a client's streams are bounded (--max-open-streams-per-client).
4. status (rpc/_status.py): innermost, around the servicer: the exceptions a
   servicer raises become status codes, and a request that did not parse
   becomes INVALID_ARGUMENT. Refusals from above never reach it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from interactions_server.auth import current_caller, is_open
from interactions_server.config import ServerConfig
from interactions_server.errors import StartupError
from interactions_server.precedence import Precedence
from interactions_server.rpc import _handlers as handlers
from interactions_server.rpc import _metrics, _status
from interactions_server.rpc import _tls as tls
from interactions_server.rpc._auth import TokenAuth
from interactions_server.rpc._concurrency import ConcurrencyLimit, CoreCalls, is_streaming
from interactions_server.rpc._message_size import MAX_MESSAGE_BYTES

_log = logging.getLogger("interactions_server.server")

# Keepalive for long-lived streams. Clients should send keepalive pings no
# more often than every min_recv_ping_interval (10 s), or the server counts
# "ping strikes" and closes the connection with GOAWAY too_many_pings; the
# client library copies these values.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),  # ping an idle connection every 30 s
    ("grpc.keepalive_timeout_ms", 10_000),  # and drop it when the ack takes over 10 s
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging during long silent streams
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # tolerate client pings every 10 s
)
MAX_PENDING_CALLS = 100_000  # beyond this many calls queued in core at once, core cancels the excess
# The largest valid request (_message_size.py: 1,000 events at every bound,
# 4-byte characters): about 225 MiB. The byte budget, not this, bounds memory.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Flow-control windows stay at their initial size instead of growing
    # with the bandwidth-delay estimate: a stream that is not reading (byte
    # budget full) then has little more than one window buffered in gRPC.
    ("grpc.http2.bdp_probe", 0),
    # Calls that arrived but that grpc.aio has not yet taken (it takes them
    # one at a time) wait in core's pending queue; past 1,000 (core's default)
    # core drops them at random and the client sees CANCELLED, a code it does
    # not retry. Under a burst the queue must hold them until the concurrency
    # limit refuses them with RESOURCE_EXHAUSTED.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
)


def server_options(config: ServerConfig) -> tuple[tuple[str, int], ...]:
    """SERVER_OPTIONS, sharing the port (SO_REUSEPORT) only among the workers of one supervisor."""
    return (*SERVER_OPTIONS[:-1], ("grpc.so_reuseport", int(config.reuse_port)))


# Which calls are interactive (precedence.py), by method path: None for every
# call of the method, else a test of its request (e.g. a small LogEvents).
Interactive = Mapping[str, Callable[[Any], bool] | None]


@dataclass(frozen=True, slots=True)
class _Entry:
    handler: grpc.RpcMethodHandler
    refusal: grpc.RpcMethodHandler | None  # what a call over the limit gets (None: no limit)
    streaming: bool


class Chain(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """The interceptor chain of the module docstring as one interceptor,
    each method's handler wrapped once and reused."""

    def __init__(
        self,
        *,
        limit: ConcurrencyLimit | None = None,
        auth: TokenAuth | None = None,
        precedence: Precedence | None = None,
        interactive: Interactive | None = None,
    ) -> None:
        self.limit = limit
        self._auth = auth
        self._precedence = precedence
        self._interactive = interactive or {}
        self._entries: dict[str, _Entry] = {}

    async def intercept_service(
        self, continuation: handlers.Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        entry = self._entries.get(method)
        if entry is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # an unknown method (UNIMPLEMENTED): nothing is kept for it
                return None
            entry = self._entries[method] = self._build(handler, method)
        if entry.refusal is not None and self.limit is not None and self.limit.over_limit(entry.streaming):
            return entry.refusal  # before the request is read and parsed
        return entry.handler

    def _build(self, handler: grpc.RpcMethodHandler, method: str) -> _Entry:
        streaming = is_streaming(handler)
        status = _status.wrap(handler, method)
        if status is None:  # a synchronous behavior (none here): left as it is
            return _Entry(handler, None, streaming)
        h = handlers.rewrapped(handler, status)
        limit = self.limit
        if self._auth is not None and not is_open(method):
            if streaming and limit is not None:
                h = handlers.rewrapped(h, limit.per_client(h, _client_name))
            h = self._auth.guarded(h, method)
        if self._precedence is not None and self._precedence.enabled and method in self._interactive:
            h = handlers.rewrapped(h, _interactive(handlers.behavior(h), self._precedence, self._interactive[method]))
        refusal = None
        if limit is not None:
            refusal = limit.refusal(h)
            h = handlers.rewrapped(h, limit.wrap(h))
        counted = _metrics.wrap(h, method)
        assert counted is not None
        return _Entry(handlers.rewrapped(h, counted), refusal, streaming)


def _client_name() -> str | None:
    caller = current_caller()
    return None if caller is None else caller.name


def _interactive(
    behavior: Callable[..., Any], precedence: Precedence, applies: Callable[[Any], bool] | None
) -> Callable[..., Any]:
    """A unary-response behavior counted as interactive while it runs (when `applies` to its request)."""

    async def interactive(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if applies is not None and not applies(request):
            return await behavior(request, context)
        ticket = precedence.begin()
        try:
            return await behavior(request, context)
        finally:
            precedence.end(ticket)

    return interactive


def grpc_server(
    config: ServerConfig,
    auth: TokenAuth | None,
    precedence: Precedence | None = None,
    interactive: Interactive | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with the options and the interceptor chain, no service yet."""
    limit = None
    if config.max_concurrent_rpcs is not None:
        limit = ConcurrencyLimit(
            config.max_concurrent_rpcs,
            max_streams=config.max_open_streams,
            max_streams_per_client=config.max_open_streams_per_client,
        )
    chain = Chain(limit=limit, auth=auth, precedence=precedence, interactive=interactive)
    servers_before = CoreCalls.server_ids() if limit is not None else set()
    server = grpc.aio.server(interceptors=[chain], options=server_options(config))
    if limit is not None:
        limit.watch(CoreCalls.created_since(servers_before))
    return server


def listen(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Adds the listening port and returns it: TLS (mTLS with a client CA)
    when certificates are given, else plaintext."""
    try:
        return _add_port(server, config)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise StartupError(
            f"cannot listen on {config.listen}: address in use or invalid; "
            "stop the program using it or choose another --listen"
        ) from exc


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
        return int(server.add_insecure_port(config.listen))
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError("--tls-cert and --tls-key go together")
    try:
        credentials = tls.server_credentials(tls.TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
    except tls.TlsFilesError as exc:
        raise StartupError(f"TLS: {exc}") from None
    _log.info("TLS%s", " with client certificates (mTLS)" if config.tls_client_ca else "")
    return int(server.add_secure_port(config.listen, credentials))
