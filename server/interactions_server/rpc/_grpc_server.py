"""The grpc.aio server as this service builds it: its options, its interceptor
chain (the one place it is put together, and in which order) and its port.

The chain, outermost first; each call goes through them in this order:

1. MetricsInterceptor: outermost, so that it sees the final status of every
   call, the refusals of the two below included (a RESOURCE_EXHAUSTED or
   UNAUTHENTICATED is counted like any other code).
2. ConcurrencyLimit (--max-concurrent-rpcs): refuses a call beyond the limit
   before anything else works on it; a refusal is cheap, its request never
   parsed. Before authentication, so that a burst of unauthenticated calls is
   bounded too.
3. TokenAuth (--auth-tokens): refuses a call without a valid token or scope
   before it reaches the services; sets the caller (its name becomes the
   `client` label and log field) for what runs inside it.
4. StatusInterceptor: innermost, around the servicer: the exceptions a
   servicer raises become status codes, and a request that did not parse
   becomes INVALID_ARGUMENT. Refusals from above never reach it.
"""

from __future__ import annotations

import logging

import grpc

from interactions_server.config import ServerConfig
from interactions_server.errors import StartupError
from interactions_server.rpc import _tls as tls
from interactions_server.rpc._concurrency import ConcurrencyLimit, CoreCalls
from interactions_server.rpc._message_size import MAX_MESSAGE_BYTES
from interactions_server.rpc._metrics import MetricsInterceptor
from interactions_server.rpc._status import StatusInterceptor

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


def interceptor_chain(
    limit: ConcurrencyLimit | None, auth: grpc.aio.ServerInterceptor | None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors, outermost first, in the order the module docstring gives."""
    optional = [interceptor for interceptor in (limit, auth) if interceptor is not None]
    return [MetricsInterceptor(), *optional, StatusInterceptor()]


def grpc_server(config: ServerConfig, auth: grpc.aio.ServerInterceptor | None) -> grpc.aio.Server:
    """A grpc.aio server with the options and the interceptor chain, no service yet."""
    limit = None if config.max_concurrent_rpcs is None else ConcurrencyLimit(config.max_concurrent_rpcs)
    servers_before = CoreCalls.server_ids() if limit is not None else set()
    server = grpc.aio.server(interceptors=interceptor_chain(limit, auth), options=server_options(config))
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
