"""What only a cluster can show: `distribute` places every table and is
idempotent, the rows are spread over both workers, a worker is refused, and
the per-user reads (and one user's writes) are router queries, executed on
one shard."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from interactions_client import InteractionsClient
from interactions_client.errors import InteractionsError
from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event
from interactions_server.config import ServerConfig
from interactions_server.server import App
from interactions_server.storage import _citus, _events, distribute
from tests.citus.conftest import SHARDS, Cluster
from tests.conftest import TEST_CONFIG
from tests.support import cli

NOW = datetime.now(UTC).replace(microsecond=0)


def event(name: str, user: str, product: str = "p1", value: int = 1, *, session: str = "s1", at: int = 0) -> Event:
    e = Event(event_id=str(uuid.uuid4()), event_type=STANDARD[name].event_type, user_id=user, event_value=value)
    if STANDARD[name].product_allowed:
        e.product_id = product
    e.session_id = session
    e.occurred_at.FromDatetime(NOW - timedelta(minutes=30) + timedelta(seconds=at))
    return e


async def test_distribute_places_every_table_and_is_idempotent(database_url: str) -> None:
    again = await distribute(ServerConfig(), database_url, None)
    assert all("already distributed" in line or "kept on the coordinator" in line for line in again), again
    connection = await asyncpg.connect(database_url)
    try:
        placed = {
            r["table"]: r
            for r in await connection.fetch(
                """
                SELECT logicalrelid::regclass::text AS table, partmethod::text AS method, colocationid,
                       column_to_column_name(logicalrelid, partkey) AS column,
                       (SELECT count(*) FROM pg_dist_shard AS s WHERE s.logicalrelid = p.logicalrelid) AS shards
                FROM pg_dist_partition AS p
                """
            )
        }
        tables = await _citus.schema_tables(connection)
    finally:
        await connection.close()
    anchor = placed["events"]
    for table in tables:
        if table in _citus.DISTRIBUTED:
            row = placed[table]
            assert (row["method"], row["column"], row["colocationid"], row["shards"]) == (
                "h",
                _citus.DISTRIBUTED[table],
                anchor["colocationid"],
                SHARDS,
            ), table
        else:
            assert table in _citus.LOCAL and table not in placed, table
    # The log's monthly partitions are distributed alike.
    partitions = [t for t in placed if t.startswith("events_")]
    assert partitions and all(placed[t]["colocationid"] == anchor["colocationid"] for t in partitions)
    # A shard count other than the cluster's is refused, not silently ignored.
    with pytest.raises(Exception, match=f"already distributed in {SHARDS} shards, not 7"):
        await distribute(ServerConfig(), database_url, 7)


async def test_the_distribute_command(database_url: str) -> None:
    async with cli("distribute", "--database-url", database_url) as process:
        code = await process.finish()
    log = "".join(process.log)
    assert code == 0, log
    assert "events: already distributed by user_id" in log
    assert "user_deletions: kept on the coordinator (local)" in log


async def test_the_rows_are_spread_over_both_workers(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        result = await client.log_many([event("add_to_cart", f"user-{i}", at=i) for i in range(40)])
    assert result.accepted == 40
    rows = await server.pool.fetch(
        """
        SELECT p.nodeport, sum(r.result::int) AS rows
        FROM run_command_on_shards('cart_lines', $$SELECT count(*) FROM %s$$) AS r
        JOIN pg_dist_shard_placement AS p USING (shardid)
        GROUP BY p.nodeport
        """
    )
    assert len(rows) == 2 and all(r["rows"] > 0 for r in rows), rows
    assert sum(r["rows"] for r in rows) == 40


async def test_the_server_uses_the_cluster_statements(server: App) -> None:
    async with server.pool.acquire() as conn:
        assert _citus.on_citus(conn)


@pytest.mark.parametrize("command", ["serve", "migrate", "distribute"])
async def test_a_worker_is_refused_in_one_line(citus_cluster: Cluster, database_url: str, command: str) -> None:
    worker = citus_cluster.node_url(1)
    async with cli(command, "--listen", "127.0.0.1:0", "--database-url", worker) as process:
        code = await process.finish()
    log = "".join(process.log).strip()
    assert code == 2, log
    assert "is a Citus worker node: point --database-url at the coordinator" in log.splitlines()[-1]
    assert "Traceback" not in log and "DuplicateTable" not in log


# --- router queries -------------------------------------------------------------------


@pytest.fixture
async def single_shard_url(database_url: str) -> AsyncIterator[str]:
    """`database_url` as a role whose every query that would run on more than
    one shard fails (citus.multi_task_query_log_level = error)."""
    role = f"one_shard_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} SUPERUSER LOGIN")
        await admin.execute(f"ALTER ROLE {role} SET citus.multi_task_query_log_level = 'error'")
        yield database_url.replace("://postgres@", f"://{role}@")
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_per_user_reads_and_one_users_writes_run_on_one_shard(server: App, single_shard_url: str) -> None:
    # Another user's data on every shard, so that a query over all of them would show.
    async with InteractionsClient(server.address) as client:
        await client.log_many([event("view", f"other-{i}", at=i) for i in range(20)])
    one = App(replace(TEST_CONFIG, database_url=single_shard_url))
    await one.start()
    try:
        async with InteractionsClient(one.address) as client:
            # One user's writes: every type that syncs state, one call each, then a batch.
            for e in [
                event("add_to_cart", "u1", value=3),
                event("remove_from_cart", "u1", at=1),
                event("update_cart_quantity", "u1", value=5, at=2),
                event("wishlist", "u1", "p2", at=3),
                event("purchase", "u1", "p3", at=4),
                event("login", "u1", at=5),
            ]:
                await client.log(e)
            await client.log_many([event("view", "u1", f"p{i}", at=10 + i) for i in range(5)])
            await client.log_many([event("add_to_cart", "u1", "p1", at=-60)])  # a late event: the fold's reads
            # The per-user reads.
            assert [(i.product_id, i.quantity) for i in await client.get_cart("u1")] == [
                ("p1", 5)
            ]  # set to 5; the late add comes before it
            assert [i.product_id for i in await client.get_wishlist("u1")] == ["p2"]
            assert [p.product_id async for p in client.list_purchases("u1")] == ["p3"]
            sessions = [s async for s in client.list_sessions("u1")]
            assert [s.session_id for s in sessions] == ["s1"]
            assert (await client.get_session("u1", "s1")).session_id == "s1"
            assert sum((await client.get_user_activity("u1")).event_counts.values()) == 12
            assert len([e async for e in client.list_user_events("u1")]) == 12
            # A guest linked to u1 (the link fans out: through the other server):
            # reads by the guest answer u1's rows, still on one shard, and its
            # later events are written under u1.
            async with InteractionsClient(server.address) as linker:
                await linker.log(event("view", "guest-1", at=6))
                assert (await linker.link_identity("guest-1", "u1")).events_moved == 1
            assert [(i.product_id, i.quantity) for i in await client.get_cart("guest-1")] == [("p1", 5)]
            assert [p.product_id async for p in client.list_purchases("guest-1")] == ["p3"]
            assert [s.session_id async for s in client.list_sessions("guest-1")] == ["s1"]
            await client.log(event("view", "guest-1", "p8", at=7))
            assert sum((await client.get_user_activity("guest-1")).event_counts.values()) == 14
            assert len([e async for e in client.list_user_events("u1")]) == 14
            # The deletion's statements, and the write path's refusal of a replay.
            assert (await client.delete_user_data("u1", dry_run=True)).events_deleted == 14
            assert (await client.delete_user_data("u1")).events_deleted == 14
            replay = await client.log_many([event("view", "u1", at=20)])
            assert replay.accepted == 0 and len(replay.rejected) == 1
            # The control: analytics over everyone run on every shard, so they fail here.
            with pytest.raises(InteractionsError):
                await client.count_active_users()
    finally:
        await one.stop()


async def test_get_cart_is_a_router_query(server: App) -> None:
    async with server.pool.acquire() as conn:
        sql, person = await _citus.for_person(conn, _events.CART_SQL, "u1")  # what fetch_cart sends
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", person))
    assert "Task Count: 1" in plan, plan
