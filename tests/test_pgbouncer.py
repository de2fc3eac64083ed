"""The service behind pgbouncer in transaction mode: --statement-cache-size 0.

In transaction mode consecutive statements of one client connection may run
on different server connections, so asyncpg's named prepared statements
would not be found; with a statement cache of 0 asyncpg uses unnamed ones.
The pgbouncer test runs a real pgbouncer when its binary is installed; the
cache-off test runs against PostgreSQL directly, always.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.server import App
from interactions_server.storage import _migrate as migrate
from tests.events import valid_event
from tests.support import StartServer, postgres_directory

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
)
ADD = EventType.EVENT_TYPE_ADD_TO_CART


async def exercise(app: App) -> None:
    """Every kind of database work: a unary write with a state sync (a
    transaction with advisory locks), a stream, and reads."""
    async with grpc.aio.insecure_channel(app.address) as channel:
        interactions = InteractionServiceStub(channel)
        user_state = UserStateServiceStub(channel)
        for _ in range(3):  # the same statements again: a cached prepared statement would be reused
            await interactions.LogEvent(pb.LogEventRequest(event=valid_event(ADD, user_id="pgb", product_id="p1")))
        batches = [
            pb.StreamEventsRequest(sequence=i, events=[valid_event(ADD, user_id="pgb", product_id=f"s{i}")])
            for i in range(5)
        ]
        acknowledged = [r.sequence async for r in interactions.StreamEvents(iter(batches))]
        assert acknowledged == list(range(5))
        results = await asyncio.gather(
            *(interactions.LogEvent(pb.LogEventRequest(event=valid_event(ADD, user_id="pgb"))) for _ in range(20))
        )
        assert not any(r.duplicate for r in results)
        cart = await user_state.GetCart(state_pb.GetCartRequest(user_id="pgb"))
        assert {i.product_id: i.quantity for i in cart.items} == {"p1": 23, **{f"s{i}": 1 for i in range(5)}}


async def test_the_service_works_with_the_statement_cache_off(start_server: StartServer) -> None:
    app = await start_server(statement_cache_size=0)
    await exercise(app)
    async with app.pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
        assert await connection.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0


async def test_the_statement_cache_is_on_by_default(start_server: StartServer) -> None:
    """The other side of the test above: it would show nothing if asyncpg
    never left named statements behind."""
    app = await start_server()
    async with app.pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
        assert await connection.fetchval("SELECT count(*) FROM pg_prepared_statements") > 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def pgbouncer(postgres_url: str) -> AsyncIterator[str]:
    """A pgbouncer in transaction mode in front of `postgres_url`'s server;
    yields the URL of the test database through it (database from the path)."""
    assert PGBOUNCER is not None
    url = urllib.parse.urlsplit(postgres_url)
    socket_dir = urllib.parse.parse_qs(url.query).get("host", [url.hostname or "localhost"])[0]
    port = free_port()
    with postgres_directory() as directory:
        directory.chmod(0o777)  # pgbouncer runs as an unprivileged user when started as root
        config = directory / "pgbouncer.ini"
        config.write_text(
            f"""
[databases]
* = host={socket_dir} port={url.port or 5432} user={url.username or "postgres"}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 4
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""
        )
        config.chmod(0o644)
        user = ["-u", "pgserver"] if os.geteuid() == 0 else []
        process = await asyncio.create_subprocess_exec(PGBOUNCER, *user, str(config))
        try:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                        break
                    assert process.returncode is None, (directory / "pgbouncer.log").read_text()
                    await asyncio.sleep(0.05)
            yield f"postgresql://{url.username or 'postgres'}@127.0.0.1:{port}{url.path}"
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 10)


@pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (apt-get install pgbouncer)")
async def test_the_service_works_behind_pgbouncer_in_transaction_mode(
    database_url: str, start_server: StartServer
) -> None:
    through = urllib.parse.urlsplit(database_url)
    async with pgbouncer(database_url) as bouncer_url:
        connection = await asyncpg.connect(bouncer_url, statement_cache_size=0)
        try:  # the connection goes through pgbouncer to the test database
            assert await connection.fetchval("SELECT current_database()") == through.path.lstrip("/")
        finally:
            await connection.close()
        app = await start_server(database_url=bouncer_url, statement_cache_size=0)
        await exercise(app)
        await app.stop()


async def test_an_up_to_date_schema_is_checked_without_the_migration_lock(database_url: str) -> None:
    """Behind pgbouncer in transaction mode a session lock can stay held on a
    server connection; a start that has nothing to apply takes none."""
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrate.LOCK_KEY)
        assert await asyncio.wait_for(migrate.migrate(database_url), 5) == []  # did not wait for the lock
    finally:
        await holder.close()
