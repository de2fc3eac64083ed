"""The database side of the service: the embedded PostgreSQL (when no URL is
given), the migrations, the partition upkeep and the retention policy's
daily run.

One `Database` runs per host, in the supervisor (or in the single process
with --workers 1); the workers only connect to the URL it hands them. So the
migrations, the partition upkeep and retention run once, not once per worker.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from pathlib import Path

import asyncpg

from interactions_server.config import ServerConfig
from interactions_server.errors import StartupError, is_database_unavailable
from interactions_server.storage import _citus, _migrate
from interactions_server.storage._embedded import EmbeddedPostgres
from interactions_server.storage._partitions import PartitionKeeper
from interactions_server.storage._pool import close_pool, quiet_pool_logs
from interactions_server.storage._recommendations import HostCpu, RecommendationsMaintainer
from interactions_server.storage._retention import RetentionKeeper

_log = logging.getLogger("interactions_server.database")

EMBEDDED_WATCH_INTERVAL = 1.0  # seconds between checks that the embedded PostgreSQL is alive


class Database:
    """start() returns the URL to connect to; stop() undoes it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.url: str | None = config.database_url
        self._embedded: EmbeddedPostgres | None = None
        self._pool: asyncpg.Pool | None = None  # for the partition keeper and retention only
        self._partitions: PartitionKeeper | None = None
        self.retention: RetentionKeeper | None = None
        self.recommendations: RecommendationsMaintainer | None = None

    async def start(self) -> str:
        """Ready on return: the database is up, migrated, its partitions made.
        Raises StartupError for what an operator must fix."""
        if self.url is None:
            self._embedded = EmbeddedPostgres(self.config.data_dir)
            self.url = await asyncio.to_thread(self._embedded.start)  # logs where
        dsn = self.url
        quiet_pool_logs()
        await migrate_when_reachable(self.config, dsn)
        self._pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=2, statement_cache_size=self.config.statement_cache_size
        )
        policy = self.config.retention
        self._partitions = PartitionKeeper(self._pool, retention=policy)
        await self._partitions.start()
        if not policy.keeps_everything:
            self.retention = RetentionKeeper(self._pool, policy, check_interval=self.config.retention_check_interval)
            self.retention.start()
        if self.config.recommendations_interval > 0 and await self._recommendations_here(dsn):
            local = self._embedded is not None or on_this_host(dsn)
            self.recommendations = RecommendationsMaintainer(
                dsn,
                interval=self.config.recommendations_interval,
                statement_cache_size=self.config.statement_cache_size,
                busy=HostCpu().busy_share if local else None,  # another host's load is not seen from here
                yield_seconds=self.config.recommendations_yield,
            )
            self.recommendations.start()
        return dsn

    async def _recommendations_here(self, dsn: str) -> bool:
        """Whether this database can keep the recommendations: not a Citus
        cluster (docs/scaling.md: the maintainer's windows of transaction ids
        are one node's, and its journal's trigger cannot be on a distributed table)."""
        if (
            self._embedded is None
            and (await _citus.kind_of(dsn, statement_cache_size=self.config.statement_cache_size)).cluster
        ):
            _log.warning(
                "Citus cluster: the recommendations are not maintained here (RecommendationService answers "
                "from empty aggregates); docs/scaling.md"
            )
            return False
        return True

    @property
    def embedded_pid(self) -> int | None:
        """The embedded PostgreSQL's postmaster pid; None with a database URL."""
        return None if self._embedded is None else self._embedded.postmaster_pid

    async def wait_died(self) -> None:
        """Returns when the embedded PostgreSQL has exited under the server;
        never with a database URL (an outside database may come back)."""
        if self._embedded is None:
            await asyncio.Future()  # forever, until cancelled
        while self._embedded is not None and self._embedded.is_running():  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(EMBEDDED_WATCH_INTERVAL)

    async def stop(self) -> None:
        if self.recommendations is not None:
            await self.recommendations.stop()
            self.recommendations = None
        if self.retention is not None:
            await self.retention.stop()
            self.retention = None
        if self._partitions is not None:
            await self._partitions.stop()
            self._partitions = None
        if self._pool is not None:
            await close_pool(self._pool)
            self._pool = None
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            await asyncio.to_thread(embedded.stop)


async def migrate_when_reachable(config: ServerConfig, dsn: str, directory: Path | None = None) -> None:
    """Applies the migrations (of `directory`, default the shipped ones),
    waiting up to config.startup_timeout for the database to become reachable
    (it may be starting alongside this server). A database that refuses this
    server (no such database, a wrong password, a bad URL) or a migration
    (MigrationFailed: which one, and the database's error) is a StartupError
    at once."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            await _migrate.migrate(dsn, directory, statement_cache_size=config.statement_cache_size)
            return
        except StartupError:
            raise
        except Exception as exc:
            if (operator_error := database_error(exc, dsn)) is not None:
                raise operator_error from exc
            if not is_database_unavailable(exc):
                raise
            waited = loop.time() - started
            if waited >= config.startup_timeout:
                raise unreachable_database(exc, dsn, waited) from exc
            _log.warning("waiting for the database: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(min(1.0, max(0.0, config.startup_timeout - (loop.time() - started))))


def describe_database(dsn: str) -> str:
    """The database a URL points at, without its password: "user@host:port/name"."""
    try:
        url = urllib.parse.urlsplit(dsn)
        host = _host(url)
        where = f"{host}:{url.port}" if url.port else host
        user = f"{url.username}@" if url.username else ""
        return f"{user}{where}{url.path or '/'}"
    except ValueError:
        return "the --database-url"


def database_error(exc: BaseException, dsn: str) -> StartupError | None:
    """The operator's version of a failure to connect to `dsn`, or None when
    `exc` is not one (a bug, or a database that is only unreachable for now)."""
    target = describe_database(dsn)
    database = urllib.parse.urlsplit(dsn).path.lstrip("/") if "://" in dsn else ""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StartupError(
            f"database {database or '(default)'!r} does not exist ({target}): "
            f"create it (createdb {database}) or fix --database-url"
        )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StartupError(f"the database refused the password ({target}): fix the user or password in --database-url")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        # A role that does not exist, or pg_hba.conf refusing this host or user.
        return StartupError(f"the database refused the login ({target}): {exc}; fix the role in --database-url")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StartupError(f"the database role lacks a privilege ({target}): {exc}; grant it or use another role")
    if isinstance(exc, ValueError):  # asyncpg's DSN parsing (ClientConfigurationError is one too)
        return StartupError(f"invalid --database-url: {exc}; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    return None


def unreachable_database(exc: BaseException, dsn: str, waited: float) -> StartupError:
    """The database did not answer within the start-up timeout."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return StartupError(
        f"cannot reach the database at {describe_database(dsn)} after {waited:.0f} s ({reason}): "
        "check that PostgreSQL is running there and --database-url"
    )


async def distribute(config: ServerConfig, dsn: str, shard_count: int | None) -> list[str]:
    """`interactions-server distribute`: on a Citus coordinator with workers,
    applies the pending migrations, then distributes every per-user table
    co-located by user_id and keeps the others on the coordinator
    (storage/_citus.py says which and why). Idempotent. Returns what it did,
    a line per table; raises StartupError for what an operator must fix."""
    target = describe_database(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=config.startup_timeout, statement_cache_size=0)
    except Exception as exc:
        if (operator_error := database_error(exc, dsn)) is not None:
            raise operator_error from exc
        if is_database_unavailable(exc):
            raise unreachable_database(exc, dsn, 0) from exc
        raise
    try:
        kind = await _citus.refuse_worker(conn)
        if kind.citus is None:
            raise StartupError(
                f"the database at {target} is not a Citus coordinator (no citus extension): run "
                "CREATE EXTENSION citus there and on each worker, and add the workers (citus_add_node); "
                "scripts/citus-cluster starts such a cluster on one machine"
            )
        if kind.workers == 0:
            raise StartupError(
                f"the Citus coordinator at {target} has no active worker nodes: add them first "
                "(SELECT citus_add_node('HOST', PORT) on the coordinator)"
            )
        await conn.execute("SET client_min_messages = warning")  # Citus's NOTICEs about copying rows
        await _migrate.apply(conn)
        await conn.execute("SELECT pg_advisory_lock($1)", _migrate.LOCK_KEY)  # not while a runner migrates
        try:
            return await _citus.place_tables(conn, shard_count)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _migrate.LOCK_KEY)
    finally:
        await conn.close()


def _host(url: urllib.parse.SplitResult) -> str:
    """A URL's host: its netloc's, else its `host` parameter's (a Unix socket's directory), else libpq's default."""
    return url.hostname or urllib.parse.parse_qs(url.query).get("host", ["localhost"])[0]


def on_this_host(dsn: str) -> bool:
    """Whether a URL's database is on this host (a Unix socket, or a loopback address)."""
    try:
        host = _host(urllib.parse.urlsplit(dsn))
    except ValueError:
        return False
    return host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")
