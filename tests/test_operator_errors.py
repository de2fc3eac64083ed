"""Mistakes an operator makes get one line saying what to fix, and exit status 2.

Each case runs the real `interactions-server` command; the line must be the
only ERROR in the log, and no traceback may appear.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from interactions_server.storage import database_error
from tests.conftest import with_database
from tests.support import cli, postgres_directory


async def operator_error(*args: str) -> str:
    """Runs the server with `args`; asserts exit status 2, one ERROR line and
    no traceback; returns that line."""
    async with cli(*args) as server:
        code = await server.finish()
    log = "".join(server.log)
    assert code == 2, log
    assert "Traceback" not in log, log
    errors = [line for line in server.log if " ERROR " in line or '"level": "ERROR"' in line]
    assert len(errors) == 1, log
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (without SO_REUSEPORT)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_in_use_is_reported_before_the_embedded_database_starts(busy_port: int, workers: str) -> None:
    with postgres_directory() as directory:
        data_dir = directory / "data"
        line = await operator_error(
            "--workers", workers, "--listen", f"127.0.0.1:{busy_port}", "--data-dir", str(data_dir)
        )
        assert not (data_dir / "postgres").exists()  # the embedded database was never started
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in line
    assert "choose another --listen" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "mysql://user@localhost/db",
            'invalid --database-url: invalid DSN: scheme is expected to be either "postgresql"',
        ),
        ("postgresql://user@localhost:notaport/db", "invalid --database-url: invalid literal for int()"),
    ],
)
async def test_a_malformed_database_url(url: str, expected: str) -> None:
    line = await operator_error("--listen", "127.0.0.1:0", "--database-url", url)
    assert expected in line
    assert "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE" in line


async def test_a_database_that_does_not_exist(postgres_url: str) -> None:
    url = with_database(postgres_url, "no_such_database")
    line = await operator_error("--listen", "127.0.0.1:0", "--database-url", url)
    assert "database 'no_such_database' does not exist" in line
    assert "createdb no_such_database" in line


async def test_a_role_that_does_not_exist(postgres_url: str) -> None:
    parts = urllib.parse.urlsplit(postgres_url)
    host = parts.netloc.rpartition("@")[2]
    url = parts._replace(netloc=f"no_such_role@{host}").geturl()
    line = await operator_error("--listen", "127.0.0.1:0", "--database-url", url)
    assert "the database refused the login (no_such_role@" in line
    assert "fix the role in --database-url" in line


async def test_an_unreachable_database_after_the_start_up_timeout() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://app:secret@127.0.0.1:{port}/interactions"
    line = await operator_error("--listen", "127.0.0.1:0", "--database-url", url, "--startup-timeout", "1")
    assert f"cannot reach the database at app@127.0.0.1:{port}/interactions after 1 s" in line
    assert "check that PostgreSQL is running there" in line
    assert "secret" not in line  # never the password


@pytest.mark.parametrize("command", ["migrate", "serve"])
async def test_a_migration_the_database_refuses_is_named_with_the_databases_error(
    empty_database_url: str, command: str
) -> None:
    """As after an upgrade where plpgsql no longer loads: the line says which
    migration failed and why, at once (not "cannot reach the database" after
    --startup-timeout), exit status 2, no traceback."""
    connection = await asyncpg.connect(empty_database_url)
    try:
        await connection.execute("DROP EXTENSION plpgsql")
    finally:
        await connection.close()
    line = await operator_error(
        command, "--listen", "127.0.0.1:0", "--database-url", empty_database_url, "--startup-timeout", "60"
    )
    assert "migration 0001_initial.sql failed and was rolled back" in line
    assert 'language "plpgsql" does not exist' in line and "SQLSTATE 42704" in line
    assert "cannot reach" not in line


async def test_the_migrate_command_reports_the_same_way(postgres_url: str) -> None:
    line = await operator_error("migrate", "--database-url", with_database(postgres_url, "no_such_database"))
    assert "does not exist" in line


@pytest.mark.parametrize(
    "args",
    [("--workers", "0"), ("--workers", "many"), ("--statement-cache-size", "-1"), ("--listen",)],
)
async def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    async with cli(*args) as server:
        code = await server.finish()
    assert code == 2
    assert "Traceback" not in "".join(server.log)
    assert server.log[-1].startswith("interactions-server: error:")


def test_a_wrong_password_is_named_as_such() -> None:
    # The test PostgreSQL trusts local connections, so the real refusal is
    # built here: the mapping is what decides the operator's line.
    refusal = asyncpg.InvalidPasswordError('password authentication failed for user "app"')
    error = database_error(refusal, "postgresql://app:secret@db.example:5432/interactions")
    assert error is not None
    assert str(error) == (
        "the database refused the password (app@db.example:5432/interactions): "
        "fix the user or password in --database-url"
    )


def test_a_database_error_that_is_a_bug_is_not_an_operator_error() -> None:
    assert database_error(asyncpg.UndefinedTableError("relation does not exist"), "postgresql:///x") is None


def test_the_data_directory_lock_file_is_in_the_data_directory(tmp_path: Path) -> None:
    from interactions_server.errors import StartupError
    from interactions_server.storage._embedded import _lock_data_dir

    first = _lock_data_dir(tmp_path)
    try:
        with pytest.raises(StartupError, match="is in use by another interactions-server"):
            _lock_data_dir(tmp_path)
    finally:
        first.close()
    _lock_data_dir(tmp_path).close()  # free again once the holder closed it
