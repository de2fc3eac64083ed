"""Pooled connections that never go back to the pool broken, and transactions
bounded by the caller's deadline.

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

from interactions_server.errors import is_database_unavailable

# A statement_timeout below this is not worth starting: PostgreSQL would
# cancel it at once.
_MIN_TIMEOUT_MS = 1


def statement_timeout_ms(timeout: float) -> int:
    return max(_MIN_TIMEOUT_MS, int(timeout * 1000))


def _healthy_after(exc: BaseException) -> bool:
    """Whether the connection may go back to the pool after `exc`: PostgreSQL
    reported an error on a live connection (the pool's reset rolls back), or
    the call was cancelled (asyncpg then cancels the running statement
    in PostgreSQL, and the pool waits for that before reusing the connection)."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, asyncpg.PostgresConnectionError)


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
