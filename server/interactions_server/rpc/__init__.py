"""gRPC plumbing and the cross-cutting interceptors, apart from any service:
the grpc.aio server with its options and interceptor chain (`grpc_server`,
order and reasons in _grpc_server.py), the handler shapes services are
registered with (`register`), the status mapping, metrics, the concurrency
limit, the token check (auth's policy, applied), the byte budget, the
largest message, TLS, health and reflection."""

from interactions_server.rpc._auth import TokenAuth
from interactions_server.rpc._budget import EXPECTATION_SECONDS, ByteBudget, footprint
from interactions_server.rpc._concurrency import ConcurrencyLimit, CoreCalls
from interactions_server.rpc._grpc_server import KEEPALIVE_OPTIONS, SERVER_OPTIONS, grpc_server, listen
from interactions_server.rpc._handlers import register, write_unless_gone, yields_encoded
from interactions_server.rpc._health import DatabaseHealth
from interactions_server.rpc._message_size import MAX_MESSAGE_BYTES
from interactions_server.rpc._metrics import MetricsInterceptor
from interactions_server.rpc._probes import add_health_and_reflection
from interactions_server.rpc._status import DATABASE_UNAVAILABLE_MESSAGE, INTERNAL_MESSAGE

__all__ = [
    "DATABASE_UNAVAILABLE_MESSAGE",
    "EXPECTATION_SECONDS",
    "INTERNAL_MESSAGE",
    "KEEPALIVE_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "SERVER_OPTIONS",
    "ByteBudget",
    "ConcurrencyLimit",
    "CoreCalls",
    "DatabaseHealth",
    "MetricsInterceptor",
    "TokenAuth",
    "add_health_and_reflection",
    "footprint",
    "grpc_server",
    "listen",
    "register",
    "write_unless_gone",
    "yields_encoded",
]
