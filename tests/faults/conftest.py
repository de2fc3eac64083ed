"""Fixtures of the fault suite: a PostgreSQL of each test's own, a COMMIT-cutting
proxy in front of it, the real server in-process against it, and a catcher of
logged tracebacks.

Every test in tests/faults/ carries the `faults` marker (`scripts/test -m faults`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from interactions_server.server import App, ServerConfig
from tests.faults.ledger import FIGURES, TracebackCatcher
from tests.faults.postgres import OwnPostgres, own_postgres
from tests.faults.proxy import CommitCuttingProxy

FAULTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FAULTS_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("fault-suite figures (docs/reliability.md)")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
async def postgres() -> AsyncIterator[OwnPostgres]:
    """A fresh PostgreSQL with an empty database `faults` (the server migrates it)."""
    with own_postgres() as pg:
        await pg.create_database()
        yield pg


@pytest.fixture
async def proxy(postgres: OwnPostgres) -> AsyncIterator[CommitCuttingProxy]:
    """A TCP proxy to `postgres` that can cut connections right after a COMMIT."""
    proxy = CommitCuttingProxy(postgres.socket_path)
    await proxy.start()
    yield proxy
    await proxy.close()


StartApp = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_app() -> AsyncIterator[StartApp]:
    """`await start_app(database_url, **ServerConfig overrides)`: the real server on
    127.0.0.1:<free port>; stopped after the test."""
    started: list[App] = []

    async def start(database_url: str, **overrides: Any) -> App:
        config = ServerConfig(
            listen="127.0.0.1:0",
            database_url=database_url,
            health_interval=0.2,
            health_timeout=1.0,
            shutdown_grace=1.0,
        )
        app = App(replace(config, **overrides))
        await app.start()
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        await app.stop()


@pytest.fixture
def tracebacks() -> Iterator[TracebackCatcher]:
    """Every log record with a traceback while the test runs (from any logger)."""
    catcher = TracebackCatcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    try:
        yield catcher
    finally:
        root.removeHandler(catcher)
