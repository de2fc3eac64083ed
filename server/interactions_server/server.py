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

from interactions_client.v1 import interaction_service_pb2, user_state_service_pb2
from interactions_server import db, malloc, migrate, service, user_state
from interactions_server.budget import DEFAULT_MAX_INFLIGHT_BYTES, ByteBudget
from interactions_server.concurrency import ConcurrencyLimit
from interactions_server.embedded_db import EmbeddedPostgres
from interactions_server.errors import is_database_unavailable, lenient_parser
from interactions_server.group_commit import GroupCommitter
from interactions_server.health import DatabaseHealth
from interactions_server.ingest import Ingestor
from interactions_server.message_size import MAX_MESSAGE_BYTES
from interactions_server.partitions import PartitionKeeper
from interactions_server.probes import add_health_and_reflection

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
# The largest valid request (message_size.py: 1,000 events at every bound,
# 4-byte characters): about 225 MiB. The byte budget, not this, bounds memory.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Flow-control windows stay at their initial size instead of growing
    # with the bandwidth-delay estimate: a stream that is not reading (byte
    # budget full) then has little more than one window buffered in gRPC.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
)

SERVICE_NAMES: tuple[str, ...] = (service.SERVICE_NAME, user_state.SERVICE_NAME)
DEFAULT_MAX_CONCURRENT_RPCS = 1_000


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
    batches_in_flight: int = service.DEFAULT_BATCHES_IN_FLIGHT  # per stream
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # request bytes held by all calls at once
    max_concurrent_rpcs: int | None = DEFAULT_MAX_CONCURRENT_RPCS  # the excess gets RESOURCE_EXHAUSTED


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
        self._embedded: EmbeddedPostgres | None = None
        self._health: DatabaseHealth | None = None
        self._committer: GroupCommitter | None = None
        self._partitions: PartitionKeeper | None = None
        self._interactions: service.InteractionService | None = None
        self._server: grpc.aio.Server | None = None
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
        db.quiet_pool_logs()
        malloc.tune()
        await self._migrate(dsn)
        # Connections that die with the database are dropped and replaced by
        # the pool on the next acquire, so the pool survives a restart.
        self._pool = await asyncpg.create_pool(
            dsn, min_size=config.pool_min_size, max_size=config.pool_max_size, reset=_end_transaction
        )
        self._health = DatabaseHealth(
            dsn, SERVICE_NAMES, interval=config.health_interval, timeout=config.health_timeout
        )
        ingestor = Ingestor(self._pool)
        self._committer = GroupCommitter(ingestor)
        self._committer.start()
        self._interactions = service.InteractionService(
            ingestor,
            self._committer,
            batches_in_flight=config.batches_in_flight,
            budget=ByteBudget(config.max_inflight_bytes),
        )

        limit = [] if config.max_concurrent_rpcs is None else [ConcurrencyLimit(config.max_concurrent_rpcs)]
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=limit)
        add_servicer(
            server, self._interactions, interaction_service_pb2.DESCRIPTOR.services_by_name["InteractionService"]
        )
        add_servicer(
            server,
            user_state.UserStateService(self._pool),
            user_state_service_pb2.DESCRIPTOR.services_by_name["UserStateService"],
        )
        add_health_and_reflection(server, self._health.servicer, SERVICE_NAMES)
        try:
            self.port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
            raise StartupError(f"cannot listen on {config.listen}: address in use or invalid") from exc
        self._server = server
        self._partitions = PartitionKeeper(self._pool)
        await self._partitions.start()
        await self._health.start()
        await server.start()

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
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5.0)
            except TimeoutError:
                _log.warning("database connections did not close in time; terminating them")
                self._pool.terminate()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        _log.info("stopped")
