"""Helpers for tests against the real server and database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from interactions_server.server import App

StartServer = Callable[..., Awaitable[App]]
"""The `start_server` fixture: `await start_server(**ServerConfig overrides)`."""


async def eventually(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Waits until `condition()` holds; fails the test after `seconds`."""
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110 - polls state outside this process
            await asyncio.sleep(0.05)


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of a failed call, by field.

    Fails the test when the status carries no BadRequest: every
    INVALID_ARGUMENT of this service names the offending fields.
    """
    status = rpc_status.from_call(error)  # also checks code and message match the details
    assert status is not None, f"no rich status details in {error.code()}: {error.details()}"
    violations: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.update({v.field: v.description for v in bad_request.field_violations})
    assert violations, f"no BadRequest in the status details of {error.code()}: {error.details()}"
    return violations


async def logged_event_ids(database_url: str) -> set[str]:
    """The event_id of every row of the event log."""
    connection = await asyncpg.connect(database_url)
    try:
        return {str(r["event_id"]) for r in await connection.fetch("SELECT event_id FROM events")}
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def events_table_locked(database_url: str, table: str = "events") -> AsyncIterator[asyncpg.Connection]:
    """Blocks every write to `table` (every insert into the log by default)
    until the block exits, so that a test can hold batches in flight. Yields
    the connection holding the lock."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            yield connection
    finally:
        await connection.close()


async def blocked_writes(lock: asyncpg.Connection) -> int:
    """How many transactions wait for the lock of `events_table_locked`."""
    count: int = await lock.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted"
    )
    return count


async def has_blocked_writes(lock: asyncpg.Connection, count: int) -> bool:
    return await blocked_writes(lock) >= count


async def no_blocked_writes(lock: asyncpg.Connection) -> bool:
    return await blocked_writes(lock) == 0


@contextlib.contextmanager
def postgres_directory() -> Iterator[Path]:
    """A new directory for a PostgreSQL data directory, removed afterwards.

    Not under pytest's tmp_path: run as root, pgserver runs postgres as the
    user `pgserver`, and every pytest session start makes pytest's temp root
    private (0700) again, which would cut a running postgres off its files.
    """
    directory = Path(tempfile.mkdtemp(prefix="interactions-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class ServerProcess:
    """`python -m interactions_server.cli ...` with its log (stderr) read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []

    async def wait_for_line(self, pattern: str, seconds: float = 30.0) -> re.Match[str]:
        assert self.process.stderr is not None
        async with asyncio.timeout(seconds):
            while True:
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    raise AssertionError(f"exited before logging {pattern!r}:\n{''.join(self.log)}")
                self.log.append(line)
                if match := re.search(pattern, line):
                    return match

    async def finish(self, seconds: float = 30.0) -> int:
        """Waits for the process to exit; returns its exit code."""
        assert self.process.stderr is not None
        async with asyncio.timeout(seconds):
            self.log.extend((await self.process.stderr.read()).decode().splitlines(keepends=True))
            return await self.process.wait()


@contextlib.asynccontextmanager
async def cli(*args: str) -> AsyncIterator[ServerProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERACTIONS_")}
    env["INTERACTIONS_LOG_FORMAT"] = "text"  # stderr is a pipe (JSON by default); tests read text unless they ask
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interactions_server.cli", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield ServerProcess(process)
    finally:
        if process.returncode is None:  # the test failed: stop it, embedded PostgreSQL included
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
