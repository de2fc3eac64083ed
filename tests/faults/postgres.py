"""A PostgreSQL of a fault test's own, which the test may break.

pgserver's binaries (a dependency, so CI has them) in a fresh data directory;
the test can terminate the server's backends, restart PostgreSQL, and freeze
(SIGSTOP) or thaw (SIGCONT) the postmaster with every child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil

from tests.support import postgres_directory

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (harmless)
    import pgserver

DATABASE = "faults"


class OwnPostgres:
    """One PostgreSQL instance, with a database `faults` (`url`) for the server."""

    def __init__(self, directory: Path) -> None:
        self._server = pgserver.get_server(directory, cleanup_mode="stop")
        self.admin_url: str = self._server.get_uri()
        self.url: str = self._server.get_uri(DATABASE)
        info = self._server.get_postmaster_info()
        self.socket_path: Path = info.socket_path  # the unix socket the server listens on (no TCP)

    async def create_database(self) -> None:
        """Creates the `faults` database (empty: the server migrates it)."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await connection.close()

    async def configure(self, **settings: str) -> None:
        """ALTER SYSTEM SET each setting, then a restart applies them (call before the server starts)."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            for name, value in settings.items():
                await connection.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        finally:
            await connection.close()
        await asyncio.to_thread(self.restart)

    @property
    def postmaster(self) -> psutil.Process:
        return psutil.Process(self._server.get_postmaster_info().pid)

    def stop(self) -> None:
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user)

    def start(self) -> None:
        self._server.ensure_postgres_running()  # same data directory and socket: the same URL

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> list[psutil.Process]:
        """SIGSTOPs the postmaster and all its children; returns them for `thaw`."""
        postmaster = self.postmaster
        frozen = [postmaster, *postmaster.children(recursive=True)]
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                os.kill(process.pid, signal.SIGSTOP)
        return frozen

    @staticmethod
    def thaw(frozen: list[psutil.Process]) -> None:
        for process in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)

    async def terminate_backends(self) -> int:
        """pg_terminate_backend on every other connection to `faults`; returns how many."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            killed: int = await connection.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                DATABASE,
            )
            return killed
        finally:
            await connection.close()

    async def idle_in_transaction(self) -> int:
        """Connections to `faults` sitting idle inside a transaction."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            count: int = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'",
                DATABASE,
            )
            return count
        finally:
            await connection.close()

    def tcp_url(self, host: str, port: int) -> str:
        """The `faults` URL through host:port (a proxy in front of the unix socket)."""
        parts = urllib.parse.urlsplit(self.url)
        return parts._replace(netloc=f"postgres@{host}:{port}", query="").geturl()

    def cleanup(self) -> None:
        self._server.cleanup()


@contextlib.contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    with postgres_directory() as directory:
        postgres = OwnPostgres(directory / "pg")
        try:
            yield postgres
        finally:
            with contextlib.suppress(Exception):  # thaw whatever a failed test left frozen
                OwnPostgres.thaw([postgres.postmaster, *postgres.postmaster.children(recursive=True)])
            postgres.cleanup()
