"""Shared fixtures: a real PostgreSQL and the real server, in-process.

Nothing is mocked. The database is INTERACTIONS_TEST_DATABASE_URL when set (a
PostgreSQL on which the tests may create and drop databases), else a throwaway
embedded PostgreSQL (pgserver) in a temporary directory.

Fixtures, from the bottom up:

- `postgres_url` (session): the PostgreSQL server's maintenance database.
- `database_url`: a database migrated once per session and emptied (TRUNCATE)
  before each test that asks for it.
- `empty_database_url`: a brand-new database without any migration, dropped
  after the test (for migration tests).
- `start_server`: starts more servers, `await start_server(**ServerConfig
  overrides)`; each is stopped after the test.
- `server`: the real server on 127.0.0.1:<free port> against `database_url`,
  an `App`: `.address` ("127.0.0.1:PORT"), `.pool` (asyncpg), `.port`.
- `channel`, `interaction_stub`, `user_state_stub`, `health_stub`: a grpc.aio
  channel to `server` and the generated stubs on it.

Helpers for tests (BadRequest details, waiting, holding writes in flight) are
in tests/support.py; valid example events in tests/events.py.
"""

from __future__ import annotations

import os

# Before gRPC is imported (it reads this once): its fork handlers can crash a
# child forked from a thread, as pgserver forks pg_ctl. Nothing here uses gRPC
# in a forked child. The interactions-server command does the same.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# The tests' servers (and the commands they start) keep the recommendations
# fresh whatever the machine's load: a busy test machine would otherwise make
# their maintainers wait for it (ingest first, --recommendations-yield), and
# the tests that wait for the aggregates wait longer. tests/test_recommendations.py
# checks the waiting itself.
os.environ.setdefault("INTERACTIONS_RECOMMENDATIONS_YIELD", "0")

import urllib.parse
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from interactions_client.client import InteractionsClient
from interactions_client.v1 import interaction_service_pb2_grpc, user_state_service_pb2_grpc
from interactions_server.server import App, ServerConfig
from interactions_server.storage import _migrate as migrate
from tests.support import StartServer, postgres_directory
from tests.test_client_fakes import FakeServer, start_fake_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset, falls back to /tmp (harmless)
    import pgserver

# Short intervals keep tests quick: health notices a database change within
# 0.2 s, and a server with a stream left open stops within 1 s.
TEST_CONFIG = ServerConfig(
    listen="127.0.0.1:0", health_interval=0.2, health_timeout=1.0, shutdown_grace=1.0, recommendations_yield=0.0
)


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database of the same PostgreSQL server."""
    return urllib.parse.urlsplit(url)._replace(path=f"/{database}").geturl()


async def create_database(postgres_url: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return name


async def drop_database(postgres_url: str, name: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("INTERACTIONS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with postgres_directory() as directory:
        embedded = pgserver.get_server(directory / "pg", cleanup_mode="stop")
        try:
            yield embedded.get_uri()
        finally:
            embedded.cleanup()


@pytest.fixture(scope="session")
async def migrated_database_url(postgres_url: str) -> AsyncIterator[str]:
    """One migrated database for the session; use `database_url` in tests."""
    name = await create_database(postgres_url, "interactions_test")
    url = with_database(postgres_url, name)
    await migrate.migrate(url)
    yield url
    await drop_database(postgres_url, name)


@pytest.fixture
async def database_url(migrated_database_url: str) -> str:
    """The migrated test database, with every table but schema_migrations empty."""
    connection = await asyncpg.connect(migrated_database_url)
    try:
        tables = await connection.fetch(
            "SELECT quote_ident(tablename) AS name FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        if tables:
            await connection.execute(f"TRUNCATE {', '.join(t['name'] for t in tables)}")
    finally:
        await connection.close()
    return migrated_database_url


@pytest.fixture
async def empty_database_url(postgres_url: str) -> AsyncIterator[str]:
    name = await create_database(postgres_url, "interactions_empty")
    yield with_database(postgres_url, name)
    await drop_database(postgres_url, name)


@pytest.fixture
async def start_server(database_url: str) -> AsyncIterator[StartServer]:
    """`await start_server(**overrides)` starts a server with TEST_CONFIG (and
    `database_url`) changed by the ServerConfig fields given."""
    started: list[App] = []

    async def start(**overrides: Any) -> App:
        app = App(replace(TEST_CONFIG, **{"database_url": database_url, **overrides}))
        await app.start()
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        await app.stop()  # no-op for those a test stopped itself


@pytest.fixture
async def server(start_server: StartServer) -> App:
    return await start_server()


@pytest.fixture
async def channel(server: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def interaction_stub(channel: grpc.aio.Channel) -> interaction_service_pb2_grpc.InteractionServiceStub:
    return interaction_service_pb2_grpc.InteractionServiceStub(channel)


@pytest.fixture
def user_state_stub(channel: grpc.aio.Channel) -> user_state_service_pb2_grpc.UserStateServiceStub:
    return user_state_service_pb2_grpc.UserStateServiceStub(channel)


@pytest.fixture
def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


# --- the client against a fake server (tests/test_client_fakes.py) ------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    """A real grpc.aio server with in-memory servicers and injectable faults."""
    server = await start_fake_server()
    yield server
    await server.stop()


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[InteractionsClient]:
    """An InteractionsClient connected to `fake`."""
    async with InteractionsClient(fake.address) as client:
        yield client
