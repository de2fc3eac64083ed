"""Operating the server: health, reflection, error mapping, graceful shutdown,
migrations and the command line."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pgserver
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.rpc import DATABASE_UNAVAILABLE_MESSAGE, INTERNAL_MESSAGE
from interactions_server.server import SERVICE_NAMES, App, ServerConfig, StartupError
from interactions_server.storage import _migrate as migrate
from interactions_server.storage import migrate_when_reachable
from tests.events import valid_event
from tests.support import (
    StartServer,
    cli,
    events_table_locked,
    eventually,
    has_blocked_writes,
    logged_event_ids,
    postgres_directory,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
VIEW = EventType.EVENT_TYPE_VIEW


# --- health ------------------------------------------------------------------


async def test_health_is_serving_for_every_service(health_stub: health_pb2_grpc.HealthStub) -> None:
    for service in ["", *SERVICE_NAMES]:
        response = await health_stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


class RestartablePostgres:
    """A PostgreSQL of the test's own, which the test may stop and start."""

    def __init__(self, directory: Path) -> None:
        self._server = pgserver.get_server(directory, cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user)

    def start(self) -> None:
        self._server.ensure_postgres_running()  # same data directory and socket: the same URL

    def cleanup(self) -> None:
        self._server.cleanup()


@pytest.fixture
def restartable_postgres() -> Iterator[RestartablePostgres]:
    with postgres_directory() as directory:
        postgres = RestartablePostgres(directory / "pg")
        yield postgres
        postgres.cleanup()


async def test_health_follows_the_database_and_the_pool_survives_a_restart(
    restartable_postgres: RestartablePostgres, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interactions_server")
    app = await start_server(database_url=restartable_postgres.url, health_interval=0.1)
    async with grpc.aio.insecure_channel(app.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        interactions = InteractionServiceStub(channel)
        user_state = UserStateServiceStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[0]))
        assert (await watch.read()).status == SERVING
        await interactions.LogEvent(pb.LogEventRequest(event=valid_event(EventType.EVENT_TYPE_ADD_TO_CART)))

        await asyncio.to_thread(restartable_postgres.stop)
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        for service in ["", *SERVICE_NAMES]:
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
        for call in (
            user_state.GetCart(state_pb.GetCartRequest(user_id="u1")),
            interactions.LogEvents(pb.LogEventsRequest(events=[valid_event(VIEW)])),
            interactions.LogEvent(pb.LogEventRequest(event=valid_event(VIEW))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert (raised.value.code(), raised.value.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                DATABASE_UNAVAILABLE_MESSAGE,
            )
        await asyncio.sleep(0.5)  # several probes while down: still one "database down" line

        await asyncio.to_thread(restartable_postgres.start)
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
        watch.cancel()
        cart = await user_state.GetCart(state_pb.GetCartRequest(user_id="u1"))  # the pool reconnected
        assert [(i.product_id, i.quantity) for i in cart.items] == [("p1", 1)]
        response = await interactions.LogEvents(pb.LogEventsRequest(events=[valid_event(VIEW)]))
        assert response.accepted_count == 1

    messages = [r.getMessage() for r in caplog.records if r.name == "interactions_server.health"]
    assert [m.split(":")[0] for m in messages] == ["database up", "database down", "database up"]


async def test_a_busy_port_fails_start_up_with_a_clear_error(server: App, start_server: StartServer) -> None:
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        await start_server(listen=f"127.0.0.1:{server.port}")
    assert await check_health(server.address) == SERVING  # the first server keeps its port


# --- reflection and error mapping --------------------------------------------


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = await call.read()
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAMES[0]))
    described = await call.read()
    await call.done_writing()

    assert {s.name for s in listed.list_services_response.service} == {
        "interactions.v1.InteractionService",
        "interactions.v1.UserStateService",
        "interactions.v1.AnalyticsService",
        "interactions.v1.IdentityService",
        "interactions.v1.AdminService",
        "interactions.v1.EventStreamService",
        "interactions.v1.RecommendationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert "interactions/v1/interaction_service.proto" in {f.name for f in files}


async def test_an_unexpected_error_is_internal_and_reveals_nothing(
    server: App, user_state_stub: UserStateServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    await server.pool.execute("ALTER VIEW user_cart RENAME TO user_cart_moved_by_test")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await user_state_stub.GetCart(state_pb.GetCartRequest(user_id="u1"))
    finally:
        await server.pool.execute("ALTER VIEW user_cart_moved_by_test RENAME TO user_cart")
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert not raised.value.trailing_metadata()  # no details, no traceback
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], asyncpg.UndefinedTableError)


# --- graceful shutdown -------------------------------------------------------


async def test_shutdown_acknowledges_batches_in_flight_then_ends_streams(
    start_server: StartServer, database_url: str
) -> None:
    app = await start_server(shutdown_grace=10.0)
    batches = {seq: [valid_event(VIEW, product_id=f"p{seq}-{i}") for i in range(5)] for seq in (1, 2, 3)}
    unary_batch = [valid_event(VIEW, product_id="unary")]
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = InteractionServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        stream = stub.StreamEvents()
        await stream.write(pb.StreamEventsRequest(sequence=1, events=batches[1]))
        assert (await stream.read()).sequence == 1

        async with events_table_locked(database_url) as lock:
            await stream.write(pb.StreamEventsRequest(sequence=2, events=batches[2]))
            await eventually(lambda: has_blocked_writes(lock, 1))
            unary = asyncio.ensure_future(stub.LogEvents(pb.LogEventsRequest(events=unary_batch)))
            await eventually(lambda: has_blocked_writes(lock, 2))

            stopping = asyncio.create_task(app.stop())
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            watch.cancel()  # as a client would: it stops using this server
            await eventually(lambda: _refuses_new_calls(stub))
            await stream.write(pb.StreamEventsRequest(sequence=3, events=batches[3]))  # never read

        # The lock is released: the batches in flight commit and are answered.
        assert (await asyncio.wait_for(unary, 5)).accepted_count == 1
        acknowledged = await asyncio.wait_for(stream.read(), 5)
        assert (acknowledged.sequence, acknowledged.accepted_count) == (2, 5)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), 5)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(stopping, 5)  # well within the 10 s grace: nothing was left to wait for

    logged = await logged_event_ids(database_url)
    assert {e.event_id for e in [*batches[1], *batches[2], *unary_batch]} <= logged
    assert not {e.event_id for e in batches[3]} & logged


async def _refuses_new_calls(stub: InteractionServiceStub) -> bool:
    try:
        await stub.ListEventTypes(pb.ListEventTypesRequest(), timeout=1)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE
    return False


# --- migrations --------------------------------------------------------------


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        records: list[asyncpg.Record] = await connection.fetch(query)
        return records
    finally:
        await connection.close()


async def test_the_repository_migrations_apply_once(empty_database_url: str) -> None:
    shipped = migrate.load()
    assert shipped, "no migrations found"
    first = await migrate.migrate(empty_database_url)
    again = await migrate.migrate(empty_database_url)
    assert [m.version for m in first] == [m.version for m in shipped]
    assert again == []
    recorded = await fetch(empty_database_url, "SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"]) for r in recorded] == [(m.version, m.name) for m in shipped]
    tables = await fetch(empty_database_url, "SELECT to_regclass('events') AS t, to_regclass('user_cart') AS c")
    assert tables[0]["t"] is not None and tables[0]["c"] is not None


async def test_concurrent_runners_apply_each_migration_exactly_once(tmp_path: Path, empty_database_url: str) -> None:
    directory = write_migrations(
        tmp_path / "migrations",
        {
            # The sleep keeps the first runner busy while the second one arrives.
            "0001_slow.sql": "CREATE TABLE slow (id int); SELECT pg_sleep(0.3);",
            "0002_counted.sql": "CREATE TABLE counted (id int); INSERT INTO counted VALUES (1);",
        },
    )
    results = await asyncio.gather(*(migrate.migrate(empty_database_url, directory) for _ in range(3)))
    assert sorted(len(applied) for applied in results) == [0, 0, 2]
    assert [r["n"] for r in await fetch(empty_database_url, "SELECT count(*) AS n FROM counted")] == [1]
    versions = await fetch(empty_database_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in versions] == [1, 2]


async def test_a_failing_migration_leaves_no_trace_and_is_retried(tmp_path: Path, empty_database_url: str) -> None:
    directory = write_migrations(
        tmp_path / "migrations",
        {"0001_ok.sql": "CREATE TABLE ok (id int);", "0002_broken.sql": "CREATE TABLE half (id int); SELECT 1/0;"},
    )
    with pytest.raises(
        migrate.MigrationFailed, match=r"migration 0002_broken\.sql failed .*division by zero"
    ) as failed:
        await migrate.migrate(empty_database_url, directory)
    assert isinstance(failed.value.__cause__, asyncpg.DivisionByZeroError)
    versions = await fetch(empty_database_url, "SELECT version FROM schema_migrations")
    assert [r["version"] for r in versions] == [1]
    assert (await fetch(empty_database_url, "SELECT to_regclass('half') AS t"))[0]["t"] is None

    (directory / "0002_broken.sql").write_text("CREATE TABLE half (id int);")
    assert [m.version for m in await migrate.migrate(empty_database_url, directory)] == [2]


async def test_a_migration_the_database_refuses_is_reported_at_once_naming_it(
    tmp_path: Path, empty_database_url: str
) -> None:
    """A library PostgreSQL cannot load (as when plpgsql would not load after an
    upgrade: SQLSTATE 58P01, a "system error" class that also means a
    database in trouble) is the migration's failure, reported at once, not
    30 s of waiting ending in "cannot reach the database"."""
    directory = write_migrations(
        tmp_path / "migrations",
        {
            "0001_ok.sql": "CREATE TABLE ok (id int);",
            "0002_needs_a_library.sql": "CREATE FUNCTION f() RETURNS int AS '$libdir/no_such_library', 'f' LANGUAGE C;",
        },
    )
    config = ServerConfig(database_url=empty_database_url, startup_timeout=30)
    started = time.monotonic()
    with pytest.raises(StartupError) as failed:
        await migrate_when_reachable(config, empty_database_url, directory)
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert message.startswith("migration 0002_needs_a_library.sql failed and was rolled back: ")
    assert "no_such_library" in message and "SQLSTATE 58P01" in message
    assert "cannot reach" not in message
    versions = await fetch(empty_database_url, "SELECT version FROM schema_migrations")
    assert [r["version"] for r in versions] == [1]


@pytest.mark.parametrize("name", ["1-initial.sql", "0001_initial.SQL.sql", "initial.sql"])
def test_a_misnamed_migration_file_is_an_error(tmp_path: Path, name: str) -> None:
    directory = write_migrations(tmp_path / "migrations", {"0001_ok.sql": "", name: ""})
    with pytest.raises(migrate.MigrationError, match=r"0001_description\.sql"):
        migrate.load(directory)


def test_a_repeated_migration_version_is_an_error(tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "migrations", {"0001_a.sql": "", "001_b.sql": ""})
    with pytest.raises(migrate.MigrationError, match="used twice"):
        migrate.load(directory)


# --- the command line ----------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str]:
    async with cli(*args) as process:
        code = await process.finish()
        return code, "".join(process.log)


async def test_migrate_command_is_idempotent(empty_database_url: str) -> None:
    code, log = await run_cli("migrate", "--database-url", empty_database_url)
    assert code == 0, log
    assert "applied migration 0001_initial" in log
    code, log = await run_cli("migrate", "--database-url", empty_database_url)
    assert code == 0, log
    assert "applied migration" not in log
    assert "schema is up to date" in log
    recorded = await fetch(empty_database_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in recorded] == [m.version for m in migrate.load()]


async def check_health(address: str) -> Any:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_serve_command_stops_cleanly_on_sigterm(database_url: str) -> None:
    async with cli("--listen", "127.0.0.1:0", "--database-url", database_url) as server:
        listening = await server.wait_for_line(r"listening on (127\.0\.0\.1:\d+)")
        assert await check_health(listening[1]) == SERVING
        server.process.send_signal(signal.SIGTERM)
        code = await server.finish()
    log = "".join(server.log)
    assert code == 0, log
    assert "shutting down" in log and log.rstrip().endswith("stopped")


async def test_serve_command_without_database_url_runs_an_embedded_postgres() -> None:
    with postgres_directory() as directory:
        await check_embedded_postgres(directory / "data")


async def check_embedded_postgres(data_dir: Path) -> None:
    async with cli("--listen", "127.0.0.1:0", "--data-dir", str(data_dir)) as server:
        listening = await server.wait_for_line(r"listening on (127\.0\.0\.1:\d+)")
        assert await check_health(listening[1]) == SERVING
        pgdata = data_dir / "postgres"
        assert (pgdata / "postmaster.pid").exists()
        server.process.send_signal(signal.SIGINT)
        code = await server.finish()
    log = "".join(server.log)
    assert code == 0, log
    assert f"started embedded PostgreSQL in {pgdata.resolve()}" in log
    assert "stopped embedded PostgreSQL" in log
    assert not (pgdata / "postmaster.pid").exists()  # PostgreSQL is down, its data kept
    assert (pgdata / "PG_VERSION").exists()
