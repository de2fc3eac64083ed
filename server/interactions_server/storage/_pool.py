"""The pools, pooled connections that never go back to the pool broken,
transactions bounded by the caller's deadline, and the health probe's own
connection.

A connection whose operation died mid-way (the call was cancelled, the socket
broke, asyncpg's protocol is in the middle of another operation) is
terminated rather than released: the pool opens a fresh one on the next
acquire, and PostgreSQL rolls back whatever that connection had not committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from interactions_server.errors import is_database_read_only, is_database_unavailable
from interactions_server.storage._citus import CitusConnection

_log = logging.getLogger("interactions_server.server")

# A statement_timeout below this is not worth starting: PostgreSQL would
# cancel it at once.
_MIN_TIMEOUT_MS = 1
CLOSE_TIMEOUT = 5.0  # seconds a pool gets to close before its connections are terminated


async def _end_transaction(connection: asyncpg.Connection) -> None:
    """Pool reset on release. asyncpg's default also clears session state
    (RESET ALL, UNLISTEN, advisory unlock): a round trip per batch that this
    service does not need, as it keeps no session state on pooled connections."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


async def open_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    statement_cache_size: int,
    citus: bool = False,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool of the serving side. Connections that die with the database are
    dropped and replaced on the next acquire, so the pool survives a restart.
    `citus`: the database is a Citus cluster (DatabaseKind.cluster): the
    connections make the write path use the statements of _citus_write."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        reset=_end_transaction,
        statement_cache_size=statement_cache_size,
        connection_class=CitusConnection if citus else asyncpg.Connection,
        server_settings=server_settings,
    )
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    """Closes `pool`, terminating its connections if they do not close in time."""
    try:
        await asyncio.wait_for(pool.close(), timeout=CLOSE_TIMEOUT)
    except TimeoutError:
        _log.warning("database connections did not close in time; terminating them")
        pool.terminate()


def statement_timeout_ms(timeout: float) -> int:
    return max(_MIN_TIMEOUT_MS, int(timeout * 1000))


def _healthy_after(exc: BaseException) -> bool:
    """Whether the connection may go back to the pool after `exc`: PostgreSQL
    reported an error on a live connection (the pool's reset rolls back), or
    the call was cancelled (asyncpg then cancels the running statement
    in PostgreSQL, and the pool waits for that before reusing the connection).
    Not a session that refused a write as read-only: it may stay read-only
    (default_transaction_read_only is read when a session starts) after the
    database is writable again; a new session gets the database's state."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    return (
        isinstance(exc, asyncpg.PostgresError)
        and not isinstance(exc, asyncpg.PostgresConnectionError)
        and not is_database_read_only(exc)
    )


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, terminated instead of released when the block fails
    with the connection in an unknown state (see _healthy_after)."""
    async with pool.acquire() as conn:
        try:
            yield conn
        except BaseException as exc:
            if not _healthy_after(exc):
                # asyncpg may already have released a connection it saw die.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            raise


@contextlib.asynccontextmanager
async def transaction(
    pool: asyncpg.Pool, time_limit: float | None, deadline: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction whose every statement is bounded by `time_limit` seconds
    (the caller's remaining deadline; None: unbounded). A timed-out statement
    is cancelled by PostgreSQL itself, so the transaction rolls back even if
    this process has stopped waiting (or the database was frozen meanwhile).
    With `deadline` (epoch seconds), COMMIT fails instead once PostgreSQL's
    clock is past it (QueryCanceledError, nothing committed).

    BEGIN and the timeout, and the deadline check and COMMIT, each go in one
    round trip (a multi-statement simple query: a failing statement skips the
    rest). An error reported by PostgreSQL rolls back here; after any other
    failure, the pool's reset on release does (or the connection is terminated)."""
    begin = (
        "BEGIN" if time_limit is None else f"BEGIN; SET LOCAL statement_timeout = {statement_timeout_ms(time_limit)}"
    )
    commit = "COMMIT" if deadline is None else f"SELECT deadline_guard({float(deadline)!r}::float8); COMMIT"
    async with acquire(pool) as conn:
        await conn.execute(begin)
        try:
            yield conn
            await conn.execute(commit)
        except asyncpg.PostgresError as exc:
            if not isinstance(exc, asyncpg.PostgresConnectionError) and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            raise


class _QuietPoolRetries(logging.Filter):
    """asyncpg's pool logs a WARNING with a traceback each time it fails to
    reopen a connection (every 1 to 60 s while the database is down). The
    health probe already logs one WARNING when the database goes away and
    one INFO when it is back, so these are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_database_unavailable(exc)


_QUIET = _QuietPoolRetries()


def quiet_pool_logs() -> None:
    logger = logging.getLogger("asyncpg.pool")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


# Whether this session can write: not on a standby, not read-only by default
# (default_transaction_read_only, from postgresql.conf, the database, the role).
_WRITABLE = "SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only')::bool)"
PROBE_RECONNECT_SECONDS = 5.0  # the longest the probe keeps one session while the database is writable


class Probe:
    """`SELECT 1` on a connection of its own, not the pool's, so that a pool
    saturated by ingestion is not mistaken for a dead database; it also asks
    whether a session can write.

    A session reads default_transaction_read_only when it starts (from the
    database's or role's settings; postgresql.conf is re-read on reload), so
    the probe takes a new session to see what the pool's next sessions will
    get: at every check while the database is read-only (to see it become
    writable), else every PROBE_RECONNECT_SECONDS (to see `ALTER DATABASE ...
    SET default_transaction_read_only` without waiting for a restart). A
    session that was cut (terminated by an administrator, say) is replaced
    once before the database counts as not answering; one that does not
    answer in time is not."""

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float,
        statement_cache_size: int,
        reconnect_after: float = PROBE_RECONNECT_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._statement_cache_size = statement_cache_size
        self._reconnect_after = reconnect_after
        self._connection: asyncpg.Connection | None = None
        self._connected_at = 0.0
        self._writable = True

    async def check(self) -> bool:
        """True when the database answered within the timeout and accepts
        writes, False when it answered read-only; raises (and drops the
        connection) when it did not answer."""
        loop = asyncio.get_running_loop()
        stale = not self._writable or loop.time() - self._connected_at >= self._reconnect_after
        if stale:
            self.close()
        try:
            self._writable = await self._ask()
        except Exception as exc:
            self.close()
            # Already a new session, or no answer in time (a frozen or
            # unreachable database must not take two timeouts to be seen).
            if stale or isinstance(exc, TimeoutError):
                raise
            self._writable = await self._ask()  # the session was cut: one new session, then give up
        return self._writable

    async def _ask(self) -> bool:
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(
                    self._dsn, timeout=self._timeout, statement_cache_size=self._statement_cache_size
                )
                self._connected_at = asyncio.get_running_loop().time()
            writable: bool = await self._connection.fetchval(_WRITABLE, timeout=self._timeout)
        except Exception:  # whatever the reason, the database did not answer
            self.close()
            raise
        return writable

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()  # no graceful close: the database may be gone


async def renew_connections(*pools: asyncpg.Pool) -> None:
    """Replaces every connection of `pools` with a new session, when each is
    next acquired (idle ones at once, those in use when released): after the
    database turned read-only or writable, so that every session has its state."""
    for pool in pools:
        await pool.expire_connections()
