"""The commit-cutting proxy itself: it cuts right after a COMMIT, simple or
extended protocol, and the transaction is committed all the same."""

from __future__ import annotations

import asyncpg
import pytest

from tests.faults.postgres import OwnPostgres
from tests.faults.proxy import CommitCuttingProxy
from tests.support import eventually


@pytest.mark.parametrize("extended", [False, True], ids=["simple-query", "extended-protocol"])
async def test_cuts_after_commit_and_the_commit_holds(
    postgres: OwnPostgres, proxy: CommitCuttingProxy, extended: bool
) -> None:
    direct = await asyncpg.connect(postgres.url)
    try:
        await direct.execute("CREATE TABLE IF NOT EXISTS cut (n int)")
        through = await asyncpg.connect(postgres.tcp_url("127.0.0.1", proxy.port))
        proxy.arm(cuts=1)
        await through.execute("BEGIN")
        await through.execute("INSERT INTO cut VALUES (1)")
        with pytest.raises((asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError)):
            if extended:
                await through.fetch("COMMIT")  # Parse / Bind / Execute / Sync
            else:
                await through.execute("COMMIT")  # one 'Q' message
        through.terminate()
        assert proxy.cuts_done == 1
        # Committed, though never acknowledged (the backend may still be finishing it).
        await eventually(lambda: has_rows(direct, 1), seconds=5)
        # Disarmed, it forwards transparently.
        again = await asyncpg.connect(postgres.tcp_url("127.0.0.1", proxy.port))
        async with again.transaction():
            await again.execute("INSERT INTO cut VALUES (2)")
        await again.close()
        assert await direct.fetchval("SELECT count(*) FROM cut") == 2
    finally:
        await direct.execute("DROP TABLE IF EXISTS cut")
        await direct.close()


async def has_rows(connection: asyncpg.Connection, count: int) -> bool:
    return bool(await connection.fetchval("SELECT count(*) FROM cut") == count)
