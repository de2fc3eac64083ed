"""One worker process of `interactions-server --workers N`.

Spawned (a fresh interpreter, no inherited gRPC state) by the supervisor,
which owns the database side and hands each worker the database URL, a fixed
port to share with SO_REUSEPORT and what to serve: `target(config, dsn)`, a
`Serving` (interactions_server.server.Server; pickled by reference, so that
the worker, not the supervisor, imports it and gRPC with it). A worker serves
until SIGTERM, then stops gracefully (see Server.stop). It reports to the
supervisor on a pipe: ("ready", port) once serving, or ("error", message)
when it cannot start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

from interactions_server import logs
from interactions_server.config import ServerConfig, loop_factory
from interactions_server.errors import EXIT_OPERATOR_ERROR, StartupError
from interactions_server.process._malloc import memory_returned

_log = logging.getLogger("interactions_server.worker")

PARENT_CHECK_INTERVAL = 1.0  # seconds between checks that the supervisor is alive


class Serving(Protocol):
    """What a worker serves (interactions_server.server.Server)."""

    port: int

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...

    def reload_tokens(self) -> bool: ...


ServerFactory = Callable[[ServerConfig, str], Serving]  # (config, database URL) -> not yet started


def run(
    target: ServerFactory, config: ServerConfig, index: int, report: Connection, log_level: str, log_format: str
) -> None:
    """The worker's entry point (a multiprocessing target); exits the process."""
    # Ctrl-C in a terminal reaches the whole process group: the supervisor
    # alone decides, and tells the workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(log_format, log_level, worker=index)  # the same set-up as the supervisor's
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        status = runner.run(_serve(target, config, index, report))
    sys.exit(status)


async def _serve(target: ServerFactory, config: ServerConfig, index: int, report: Connection) -> int:
    assert config.database_url is not None, "the supervisor hands workers a database URL"
    async with memory_returned():
        return await _serve_until_stopped(target(config, config.database_url), index, report)


async def _serve_until_stopped(server: Serving, index: int, report: Connection) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
    try:
        await server.start()
    except StartupError as exc:
        report.send(("error", str(exc)))
        return EXIT_OPERATOR_ERROR
    except Exception as exc:
        _log.exception("worker %d could not start", index)
        report.send(("error", f"worker {index} could not start: {type(exc).__name__}: {exc}"))
        return 1
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)  # forwarded by the supervisor
    report.send(("ready", server.port))
    _log.info("worker %d (pid %d) serving on %s", index, os.getpid(), server.address)
    await stop.wait()
    orphan_watch.cancel()
    await server.stop()
    _log.info("worker %d (pid %d) stopped", index, os.getpid())
    return 0


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Stops this worker if its supervisor is gone (killed with SIGKILL), so
    that no worker keeps serving without a supervisor."""
    while os.getppid() == parent:  # noqa: ASYNC110 - another process's state
        await asyncio.sleep(PARENT_CHECK_INTERVAL)
    _log.warning("the supervisor (pid %d) is gone; stopping", parent)
    stop.set()
