"""The gRPC server: services, interceptors, health, reflection, lifecycle.

Two halves, so that a supervisor can own one and its workers the other:

- `Database` (interactions_server.storage): the embedded PostgreSQL, the
  migrations and the partition upkeep, once per host;
- `Server` (here): the pool, the services and the gRPC server of one process.

`App(ServerConfig(...))` is both in one process (what `--workers 1` runs):
`await app.start()` checks the port, starts the database side, then the
server (`app.port` is then the bound port, also when the config asks for port
0); `await app.stop(grace)` shuts both down gracefully.

Adding a service touches one place: SERVICES. Cross-cutting concerns are
`grpc.aio.ServerInterceptor`s chained in one place: rpc's `grpc_server`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor

from interactions_client import access
from interactions_client.v1 import (
    admin_service_pb2,
    analytics_service_pb2,
    event_stream_service_pb2,
    identity_service_pb2,
    interaction_service_pb2,
    recommendation_service_pb2,
    user_state_service_pb2,
)
from interactions_server import feed, logs, metrics, rpc, storage
from interactions_server.auth import TokensFileError
from interactions_server.config import ServerConfig, check_port_free
from interactions_server.errors import StartupError
from interactions_server.ingest import GroupCommitter, Ingestor
from interactions_server.keyring import Keyring
from interactions_server.precedence import Precedence
from interactions_server.services import (
    AdminService,
    AnalyticsService,
    EventStreamService,
    IdentityService,
    InteractionService,
    RecommendationService,
    UserStateService,
    encode_stream_event,
)
from interactions_server.services.interactions import is_interactive_batch

__all__ = ["SERVICES", "SERVICE_NAMES", "App", "Server", "ServerConfig", "StartupError"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Parts:
    """What the servicers are made of (one set per server process)."""

    config: ServerConfig
    pool: asyncpg.Pool
    analytics_pool: asyncpg.Pool  # exports and window queries: never the connections ingest needs
    recommendations_pool: asyncpg.Pool  # RecommendationService's reads: neither ingest's nor the exports'
    ingestor: Ingestor
    committer: GroupCommitter
    budget: rpc.ByteBudget  # request bytes held by all calls at once
    keyring: Keyring  # seals the tokens handed to callers; hashes the ids of the audit log
    precedence: Precedence  # interactive before bulk
    feed: feed.EventFeed  # the subscriptions' reader


# Group commit's write slots and two reads: the pool's connections that bulk
# writes (stream batches, large LogEvents) never take.
INTERACTIVE_CONNECTIONS = 4


@dataclass(frozen=True, slots=True)
class Service:
    descriptor: ServiceDescriptor
    create: Callable[[Parts], object]  # the servicer
    reads_only: bool = False  # serves on a read-only database (health stays SERVING there)
    # The interactive methods (precedence.py), by name: None for every call,
    # else a test of the request. The others are bulk or neither.
    interactive: Mapping[str, Callable[[Any], bool] | None] = field(default_factory=dict)


# Every service the server registers (health and reflection aside), in one list.
SERVICES: tuple[Service, ...] = (
    Service(
        interaction_service_pb2.DESCRIPTOR.services_by_name["InteractionService"],
        lambda parts: InteractionService(
            parts.ingestor,
            parts.committer,
            batches_in_flight=parts.config.batches_in_flight,
            budget=parts.budget,
            precedence=parts.precedence,
            stream_idle_timeout=parts.config.stream_idle_timeout,
        ),
        interactive={"LogEvent": None, "LogEvents": is_interactive_batch},
    ),
    Service(
        user_state_service_pb2.DESCRIPTOR.services_by_name["UserStateService"],
        lambda parts: UserStateService(parts.pool, parts.keyring),
        reads_only=True,
        interactive={"GetCart": None, "GetWishlist": None, "ListPurchases": None},
    ),
    Service(
        analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
        lambda parts: AnalyticsService(parts.pool, parts.analytics_pool, parts.keyring),
        reads_only=True,
        interactive={"GetSession": None, "ListSessions": None, "GetUserActivity": None, "ListUserEvents": None},
    ),
    Service(
        identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"],
        lambda parts: IdentityService(parts.pool),
        interactive={"LinkIdentity": None, "GetIdentity": None},  # a login waits for them
    ),
    Service(
        admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
        lambda parts: AdminService(
            parts.pool,
            parts.keyring,
            analytics_pool=parts.analytics_pool,
            precedence=parts.precedence,
            pace=storage.Pace(rows=parts.config.removal_batch_rows),
            on_deleted=parts.feed.note_deletion,
        ),
    ),
    Service(
        recommendation_service_pb2.DESCRIPTOR.services_by_name["RecommendationService"],
        lambda parts: RecommendationService(parts.recommendations_pool),
        reads_only=True,
        # Per-user and per-product reads, one index range each; trending is
        # a shared list (a computation now and then), neither class.
        interactive={
            "RecentlyViewed": None,
            "UserAffinities": None,
            "FrequentlyBoughtTogether": None,
            "AlsoViewed": None,
        },
    ),
    Service(
        event_stream_service_pb2.DESCRIPTOR.services_by_name["EventStreamService"],
        lambda parts: EventStreamService(parts.feed, parts.keyring),
        reads_only=True,
    ),
)
SERVICE_DESCRIPTORS: tuple[ServiceDescriptor, ...] = tuple(s.descriptor for s in SERVICES)
SERVICE_NAMES: tuple[str, ...] = tuple(d.full_name for d in SERVICE_DESCRIPTORS)
READ_SERVICE_NAMES: tuple[str, ...] = tuple(s.descriptor.full_name for s in SERVICES if s.reads_only)
INTERACTIVE: dict[str, Callable[[Any], bool] | None] = {
    f"/{s.descriptor.full_name}/{name}": applies for s in SERVICES for name, applies in s.interactive.items()
}


def required_scopes() -> dict[str, str]:
    """The scope of every served RPC, from the schema; an RPC without one stops start-up."""
    try:
        return access.required_scopes(SERVICE_DESCRIPTORS)
    except access.MissingScopeError as exc:
        raise StartupError(str(exc)) from None


@runtime_checkable
class Drainable(Protocol):
    """A servicer with long-lived calls: drain() makes them end at shutdown."""

    def drain(self) -> None: ...


class Server:
    """The serving side of one process: pool, services, gRPC server.
    start() then stop(); `port` is the bound port."""

    def __init__(self, config: ServerConfig, dsn: str) -> None:
        self.config = config
        self.dsn = dsn
        self.port = 0
        self._pool: asyncpg.Pool | None = None
        self._analytics_pool: asyncpg.Pool | None = None
        self._subscription_pool: asyncpg.Pool | None = None
        self._recommendations_pool: asyncpg.Pool | None = None
        self._feed: feed.EventFeed | None = None
        self._auth: rpc.TokenAuth | None = None
        self._health: rpc.DatabaseHealth | None = None
        self._committer: GroupCommitter | None = None
        self._servicers: list[object] = []
        self._server: grpc.aio.Server | None = None
        self._summary = logs.SummaryTask(config.log_summary_interval)
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

    @property
    def served_services(self) -> list[ServiceDescriptor]:
        """The services whose RPCs the server answers (health and reflection aside)."""
        return list(SERVICE_DESCRIPTORS)

    def reload_tokens(self) -> bool:
        """Re-reads the tokens file (the SIGHUP handler); False when it kept the old tokens."""
        if self._auth is None:
            _log.warning("no tokens file to reload (the server runs without --auth-tokens)")
            return False
        return self._auth.reload()

    async def start(self) -> None:
        """Serving on return. On failure, whatever was started is stopped."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        config = self.config
        scopes = required_scopes()
        self._auth = _token_auth(config)
        if self._auth is not None:
            self._auth.require(scopes)
        storage.quiet_pool_logs()
        citus = await _cluster(self.dsn, config)
        self._pool = await storage.open_pool(
            self.dsn,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            statement_cache_size=config.statement_cache_size,
            citus=citus,
        )
        metrics.watch_pool(self._pool)
        self._analytics_pool = await storage.open_pool(
            self.dsn,
            min_size=1,
            max_size=config.analytics_pool_max_size,
            statement_cache_size=config.statement_cache_size,
            citus=citus,
        )
        # min_size 0: no connection until a subscription reads behind the ring.
        self._subscription_pool = await storage.open_pool(
            self.dsn,
            min_size=0,
            max_size=config.subscription_pool_max_size,
            statement_cache_size=config.statement_cache_size,
        )
        self._recommendations_pool = await storage.open_pool(
            self.dsn,
            min_size=1,
            max_size=config.recommendations_pool_max_size,
            statement_cache_size=config.statement_cache_size,
            server_settings=storage.RECOMMENDATIONS_READ_SETTINGS,
        )
        pools = (self._pool, self._analytics_pool, self._subscription_pool, self._recommendations_pool)
        self._health = rpc.DatabaseHealth(
            self.dsn,
            SERVICE_NAMES,
            read_services=READ_SERVICE_NAMES,
            on_writability_change=lambda: storage.renew_connections(*pools),
            interval=config.health_interval,
            timeout=config.health_timeout,
            statement_cache_size=config.statement_cache_size,
        )
        precedence = Precedence(config.interactive_latency_target)
        self._feed = feed.EventFeed(
            self.dsn,
            self._subscription_pool,
            encode_stream_event,
            poll_interval=config.subscription_poll_interval,
            ring_bytes=config.subscription_ring_bytes,
            statement_cache_size=config.statement_cache_size,
            precedence=precedence,
        )
        ingestor = Ingestor(
            self._pool,
            bulk_connections=max(1, config.pool_max_size - INTERACTIVE_CONNECTIONS),
            precedence=precedence,
        )
        self._committer = GroupCommitter(ingestor)
        self._committer.start()
        parts = Parts(
            config,
            self._pool,
            self._analytics_pool,
            self._recommendations_pool,
            ingestor,
            self._committer,
            rpc.ByteBudget(config.max_inflight_bytes),
            await storage.load_keyring(self._pool),
            precedence,
            self._feed,
        )

        server = rpc.grpc_server(config, self._auth, precedence, INTERACTIVE)
        for entry in SERVICES:
            servicer = entry.create(parts)
            rpc.register(
                server, entry.descriptor, {m.name: getattr(servicer, m.name) for m in entry.descriptor.methods}
            )
            self._servicers.append(servicer)
        rpc.add_health_and_reflection(server, self._health.servicer, SERVICE_NAMES, reflection_on=config.reflection)
        self.port = rpc.listen(server, config)
        self._server = server
        await self._health.start()
        await server.start()
        self._summary.start()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health goes NOT_SERVING (open Watches end), no
        new calls are accepted, streams stop reading, and in-flight batches get
        `grace` seconds to commit and be acknowledged. Then the pool is
        closed. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace if grace is None else grace
        _log.info("shutting down (grace %.1f s)", grace)
        if self._health is not None:
            await self._health.shutdown()
        for servicer in self._servicers:
            if isinstance(servicer, Drainable):
                servicer.drain()
        if self._server is not None:
            await self._server.stop(grace)
        if self._committer is not None:
            await self._committer.close()
        if self._feed is not None:
            self._feed.close()
            await self._feed.wait_closed()
        for pool in (self._pool, self._analytics_pool, self._subscription_pool, self._recommendations_pool):
            if pool is not None:
                await storage.close_pool(pool)
        await self._summary.stop()


async def _cluster(dsn: str, config: ServerConfig) -> bool:
    """Whether the database is a Citus cluster whose tables are distributed
    (detected once, at start): its connections then use the statements Citus
    routes to shards. Refuses a Citus worker."""
    kind = await storage.kind_of(dsn, statement_cache_size=config.statement_cache_size)
    if kind.cluster:
        _log.info("Citus %s coordinator with %d worker(s): the tables are distributed", kind.citus, kind.workers)
    elif kind.citus is not None:
        _log.warning(
            "the database has Citus %s but its tables are not distributed: they stay on this node "
            "(interactions-server distribute distributes them)",
            kind.citus,
        )
    return kind.cluster


def _token_auth(config: ServerConfig) -> rpc.TokenAuth | None:
    if config.auth_tokens is None:
        _log.warning("no --auth-tokens: the server is open, any caller may call every RPC")
        return None
    try:
        auth = rpc.TokenAuth(config.auth_tokens)
    except TokensFileError as exc:
        raise StartupError(str(exc)) from None
    _log.info("bearer tokens required; %d token(s): %s", len(auth.token_names), ", ".join(auth.token_names))
    return auth


class App:
    """The database side and one server, in one process: start() then stop()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.database = storage.Database(config)
        self.server: Server | None = None
        self._stopped = False

    @property
    def database_url(self) -> str | None:
        return self.database.url

    @property
    def port(self) -> int:
        return 0 if self.server is None else self.server.port

    @property
    def pool(self) -> asyncpg.Pool:
        if self.server is None:
            raise RuntimeError("the server is not started")
        return self.server.pool

    @property
    def address(self) -> str:
        """The listen address with the bound port, e.g. "127.0.0.1:50051"."""
        if self.server is None:
            raise RuntimeError("the server is not started")
        return self.server.address

    @property
    def served_services(self) -> list[ServiceDescriptor]:
        return list(SERVICE_DESCRIPTORS)

    def reload_tokens(self) -> bool:
        """Re-reads the tokens file (the SIGHUP handler); False when it kept the old tokens."""
        return self.server is not None and self.server.reload_tokens()

    async def start(self) -> None:
        """Ready to serve on return. On failure, whatever was started is stopped."""
        _log.info("starting")
        try:
            check_port_free(self.config.listen)  # before the embedded database starts
            dsn = await self.database.start()
            self.server = Server(self.config, dsn)
            await self.server.start()
        except BaseException:
            await self.stop(0)
            raise
        _log.info("listening on %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Stops the server (see Server.stop), then the database side."""
        if self._stopped:
            return
        self._stopped = True
        if self.server is not None:
            await self.server.stop(grace)
        await self.database.stop()
        _log.info("stopped")
