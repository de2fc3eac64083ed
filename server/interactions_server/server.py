"""The gRPC server: services, health, reflection, database pool, lifecycle.

`App(ServerConfig(...))` is one server: `await app.start()` applies the
migrations, opens the pool, starts health probing and binds (`app.port` is
then the bound port, also when the config asks for port 0);
`await app.stop(grace)` shuts it down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from interactions_client import access
from interactions_client.v1 import (
    admin_service_pb2,
    analytics_service_pb2,
    interaction_service_pb2,
    user_state_service_pb2,
)
from interactions_server import admin, analytics, migrate, service, tls, user_state
from interactions_server.auth import TokenAuth, TokensFileError
from interactions_server.embedded_db import EmbeddedPostgres
from interactions_server.errors import is_database_unavailable, lenient_parser
from interactions_server.group_commit import GroupCommitter
from interactions_server.health import DatabaseHealth
from interactions_server.ingest import Ingestor
from interactions_server.partitions import PartitionKeeper

_log = logging.getLogger(__name__)

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
# A full batch (1,000 events) of large events exceeds gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
)

SERVICE_NAMES: tuple[str, ...] = (
    service.SERVICE_NAME,
    user_state.SERVICE_NAME,
    analytics.SERVICE_NAME,
    admin.SERVICE_NAME,
)


class StartupError(Exception):
    """The server cannot start for a reason an operator can act on."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "[::]:50051"
    database_url: str | None = None  # None: start an embedded PostgreSQL in data_dir
    data_dir: Path = Path(".interactions-data")
    shutdown_grace: float = 10.0  # seconds in-flight calls get to finish
    startup_timeout: float = 30.0  # seconds to wait for an unreachable database at start
    health_interval: float = 1.0
    health_timeout: float = 1.0
    pool_min_size: int = 2
    pool_max_size: int = 10
    analytics_pool_max_size: int = 3  # exports and window queries: never the connections ingest needs
    batches_in_flight: int = service.DEFAULT_BATCHES_IN_FLIGHT  # per stream
    tls_cert: Path | None = None  # with tls_key: serve TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mTLS)
    auth_tokens: Path | None = None  # the tokens file; None: no authentication
    reflection: bool = True


async def _end_transaction(connection: asyncpg.Connection) -> None:
    """Pool reset on release. asyncpg's default also clears session state
    (RESET ALL, UNLISTEN, advisory unlock): a round trip per batch that this
    service does not need, as it keeps no session state on pooled connections."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Registers `servicer` like the generated add_*_to_server, except that a
    request that does not parse reaches it as errors.MalformedRequest (and so
    INVALID_ARGUMENT) instead of failing inside gRPC as UNKNOWN."""
    handlers = {
        method.name: _HANDLER_KINDS[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=lenient_parser(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class App:
    """One server process: start() then stop(); `port` is the bound port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = 0
        self.database_url = config.database_url
        self._pool: asyncpg.Pool | None = None
        self._analytics_pool: asyncpg.Pool | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._health: DatabaseHealth | None = None
        self._committer: GroupCommitter | None = None
        self._partitions: PartitionKeeper | None = None
        self._interactions: service.InteractionService | None = None
        self._server: grpc.aio.Server | None = None
        self._auth: TokenAuth | None = None
        self.served_services: list[ServiceDescriptor] = []  # those whose RPCs the server answers
        self._stopped = False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the server is not started")
        return self._pool

    @property
    def address(self) -> str:
        """The listen address with the bound port, e.g. "127.0.0.1:50051"."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Ready to serve on return. On failure, whatever was started is stopped."""
        _log.info("starting")
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise
        _log.info("listening on %s", self.address)

    async def _start(self) -> None:
        config = self.config
        if self.database_url is None:
            self._embedded = EmbeddedPostgres(config.data_dir)
            self.database_url = await asyncio.to_thread(self._embedded.start)  # logs where
        dsn = self.database_url
        await self._migrate(dsn)
        # Connections that die with the database are dropped and replaced by
        # the pool on the next acquire, so the pool survives a restart.
        self._pool = await asyncpg.create_pool(
            dsn, min_size=config.pool_min_size, max_size=config.pool_max_size, reset=_end_transaction
        )
        self._analytics_pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=config.analytics_pool_max_size,
            reset=_end_transaction,
            server_settings=analytics.POOL_SETTINGS,
        )
        self._health = DatabaseHealth(
            dsn, SERVICE_NAMES, interval=config.health_interval, timeout=config.health_timeout
        )
        ingestor = Ingestor(self._pool)
        self._committer = GroupCommitter(ingestor)
        self._committer.start()
        self._interactions = service.InteractionService(
            ingestor, self._committer, batches_in_flight=config.batches_in_flight
        )

        self._auth = self._token_auth()
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[self._auth] if self._auth else None)
        self._serve(
            server, self._interactions, interaction_service_pb2.DESCRIPTOR.services_by_name["InteractionService"]
        )
        self._serve(
            server,
            user_state.UserStateService(self._pool),
            user_state_service_pb2.DESCRIPTOR.services_by_name["UserStateService"],
        )
        self._serve(
            server,
            analytics.AnalyticsService(self._pool, self._analytics_pool),
            analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
        )
        self._serve(
            server, admin.AdminService(self._pool), admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health.servicer, server)
        if config.reflection:
            reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._require_scopes()
        try:
            self.port = self._bind(server)
        except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
            raise StartupError(f"cannot listen on {config.listen}: address in use or invalid") from exc
        self._server = server
        self._partitions = PartitionKeeper(self._pool)
        await self._partitions.start()
        await self._health.start()
        await server.start()

    def _serve(self, server: grpc.aio.Server, servicer: object, descriptor: ServiceDescriptor) -> None:
        add_servicer(server, servicer, descriptor)
        self.served_services.append(descriptor)

    def _token_auth(self) -> TokenAuth | None:
        if self.config.auth_tokens is None:
            _log.warning("no --auth-tokens: the server is open, any caller may call every RPC")
            return None
        try:
            auth = TokenAuth(self.config.auth_tokens)
        except TokensFileError as exc:
            raise StartupError(str(exc)) from None
        _log.info("bearer tokens required; %d token(s): %s", len(auth.token_names), ", ".join(auth.token_names))
        return auth

    def _require_scopes(self) -> None:
        """The scope of every served RPC, from the schema; an RPC without one stops start-up."""
        try:
            required = access.required_scopes(self.served_services)
        except access.MissingScopeError as exc:
            raise StartupError(str(exc)) from None
        if self._auth is not None:
            self._auth.require(required)

    def _bind(self, server: grpc.aio.Server) -> int:
        config = self.config
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

    def reload_tokens(self) -> bool:
        """Re-reads the tokens file (the SIGHUP handler); False when it kept the old tokens."""
        if self._auth is None:
            _log.warning("no tokens file to reload (the server runs without --auth-tokens)")
            return False
        return self._auth.reload()

    async def _migrate(self, dsn: str) -> None:
        """Applies migrations, waiting up to startup_timeout for the database
        to become reachable (it may be starting alongside this server)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.startup_timeout
        while True:
            try:
                await migrate.migrate(dsn)
                return
            except Exception as exc:
                if not is_database_unavailable(exc) or loop.time() >= deadline:
                    raise
                _log.warning("waiting for the database: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(1.0)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health goes NOT_SERVING, no new calls are
        accepted, streams stop reading, and in-flight batches get `grace`
        seconds to commit and be acknowledged. Then the pool is closed and an
        embedded database stopped. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace if grace is None else grace
        _log.info("shutting down (grace %.1f s)", grace)
        if self._health is not None:
            await self._health.shutdown()
        if self._interactions is not None:
            self._interactions.drain()
        if self._server is not None:
            await self._server.stop(grace)
        if self._committer is not None:
            await self._committer.close()
        if self._partitions is not None:
            await self._partitions.stop()
        for pool in (self._pool, self._analytics_pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=5.0)
                except TimeoutError:
                    _log.warning("database connections did not close in time; terminating them")
                    pool.terminate()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        _log.info("stopped")
