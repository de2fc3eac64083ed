"""`interactions-server --workers N` (N > 1): a supervisor and N workers.

A Python gRPC server is one event loop on one core; several processes
sharing the port (SO_REUSEPORT, the kernel spreading connections over them)
is how grpc's examples/python/multiprocessing scales. The supervisor:

1. checks the port is free (before anything slow starts), and fixes port 0
   to a concrete port, as every worker must bind the same one;
2. owns the database side (embedded PostgreSQL, migrations, partition upkeep:
   once per host, see interactions_server.storage's Database);
3. spawns N workers (fresh interpreters: no gRPC object exists in the
   supervisor, see grpc's doc/fork_support.md) and replaces a worker that
   dies, with a back-off when one keeps dying at start;
4. on SIGTERM / SIGINT, sends SIGTERM to every worker (each drains: health
   NOT_SERVING, in-flight batches committed and acknowledged), waits for
   them, then stops the database;
5. exits non-zero if the embedded PostgreSQL dies (after stopping the workers).

The kernel balances per connection: one long-lived channel stays on one
worker, so a client that wants every worker opens several channels.

The supervisor is handed what to run, like uvicorn's supervisors: the
database side (`database`) and the workers' `target` (see _worker.py). It
imports neither gRPC nor the server, so it holds no gRPC state by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

from interactions_server import metrics
from interactions_server.config import ServerConfig, check_port_free, reserve_port
from interactions_server.errors import EXIT_DATABASE_DIED, StartupError
from interactions_server.process import _worker

_log = logging.getLogger("interactions_server.supervisor")

POLL_INTERVAL = 0.2  # seconds between checks of the workers
HEALTHY_AFTER = 10.0  # a worker that ran this long restarts at once; sooner, with a back-off
MAX_BACKOFF = 30.0
STOP_MARGIN = 15.0  # seconds beyond the grace before a worker that does not stop is killed


class DatabaseSide(Protocol):
    """The database side of a host (interactions_server.storage.Database)."""

    @property
    def embedded_pid(self) -> int | None: ...

    async def start(self) -> str:
        """Ready on return; the URL the workers connect to."""
        ...

    async def wait_died(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class _Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    process: BaseProcess | None = None
    report: Connection | None = None
    ready: bool = False
    started_at: float = 0.0
    restart_at: float = 0.0
    quick_failures: int = 0
    error: str | None = field(default=None)


class Supervisor:
    def __init__(
        self,
        config: ServerConfig,
        *,
        target: _worker.ServerFactory,
        database: DatabaseSide,
        log_level: str,
        log_format: str,
    ) -> None:
        self.config = config
        self._target = target
        self._database = database
        self._log_level = log_level
        self._log_format = log_format
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(1, config.workers + 1)]
        self._worker_config: ServerConfig | None = None
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Serves until SIGTERM / SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_workers)
        check_port_free(self.config.listen)  # before the embedded database starts
        listen = reserve_port(self.config.listen)
        _log.info("starting with %d workers", self.config.workers)
        exporter = metrics.serve_metrics(self.config.metrics_listen, workers=True)  # before any worker
        database = self._database
        try:
            starting = asyncio.create_task(database.start())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal during start-up
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return 0
            stopping.cancel()
            dsn = starting.result()
            self._worker_config = replace(self.config, listen=listen, database_url=dsn, reuse_port=True)
            return await self._supervise(database, listen)
        finally:
            await self._stop_workers()
            await database.stop()
            exporter.close()
            _log.info("stopped")

    async def _supervise(self, database: DatabaseSide, listen: str) -> int:
        for slot in self._slots:
            self._start(slot)
        await self._wait_ready()
        if self._stop.is_set():  # a signal while the workers were starting
            return 0
        _log.info("listening on %s with %d workers", listen, len(self._slots))
        died = asyncio.create_task(database.wait_died())
        try:
            while not self._stop.is_set():
                if died.done():
                    _log.error(
                        "the embedded PostgreSQL (pid %s) has exited; stopping the workers and exiting "
                        "(a service manager should restart this server)",
                        database.embedded_pid,
                    )
                    return EXIT_DATABASE_DIED
                self._check_workers()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), POLL_INTERVAL)
        finally:
            died.cancel()
        return 0

    def _reload_workers(self) -> None:
        """SIGHUP: every serving worker re-reads the tokens file (revocation without a restart)."""
        for slot in self._slots:
            if slot.ready and slot.process is not None and slot.process.pid is not None and slot.process.is_alive():
                os.kill(slot.process.pid, signal.SIGHUP)

    def _start(self, slot: _Slot) -> None:
        assert self._worker_config is not None
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker.run,
            args=(self._target, self._worker_config, slot.index, send, self._log_level, self._log_format),
            name=f"interactions-worker-{slot.index}",
        )
        process.start()
        send.close()  # the worker holds the sending end now
        slot.process, slot.report, slot.ready, slot.error = process, receive, False, None
        slot.started_at = time.monotonic()
        _log.info("worker %d started (pid %s)", slot.index, process.pid, extra={"worker": slot.index})

    def _read_report(self, slot: _Slot) -> None:
        if slot.report is None:
            return
        with contextlib.suppress(EOFError, OSError):
            while slot.report.poll():
                kind, detail = slot.report.recv()
                if kind == "ready":
                    slot.ready = True
                else:
                    slot.error = str(detail)

    async def _wait_ready(self) -> None:
        """Waits until every worker serves; a worker that cannot start fails the start-up."""
        deadline = time.monotonic() + self.config.startup_timeout + 30.0
        while not all(slot.ready for slot in self._slots):
            for slot in self._slots:
                self._read_report(slot)
                if slot.error is not None:
                    raise StartupError(slot.error)
                if not slot.ready and slot.process is not None and not slot.process.is_alive():
                    raise StartupError(f"worker {slot.index} exited at start-up with status {slot.process.exitcode}")
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                raise StartupError("the workers did not start in time; see the log above")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), POLL_INTERVAL)

    def _check_workers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            self._read_report(slot)
            process = slot.process
            if process is not None and not process.is_alive():
                pid, status = process.pid, process.exitcode
                self._forget(slot)
                ran = now - slot.started_at
                slot.quick_failures = 0 if ran >= HEALTHY_AFTER else slot.quick_failures + 1
                delay = 0.0 if slot.quick_failures == 0 else min(MAX_BACKOFF, 0.5 * 2**slot.quick_failures)
                slot.restart_at = now + delay
                metrics.mark_worker_dead(pid)
                _log.warning(
                    "worker %d (pid %s) exited with status %s%s; restarting it%s",
                    slot.index,
                    pid,
                    status,
                    f" ({slot.error})" if slot.error else "",
                    f" in {delay:.1f} s" if delay else "",
                    extra={"worker": slot.index, "exit_status": status},
                )
            if slot.process is None and now >= slot.restart_at:
                self._start(slot)

    def _forget(self, slot: _Slot) -> None:
        if slot.process is not None:
            slot.process.close()
        if slot.report is not None:
            slot.report.close()
        slot.process, slot.report, slot.ready = None, None, False

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker, then waits for them to drain (killing any
        that outlives the grace period by STOP_MARGIN)."""
        running = [slot.process for slot in self._slots if slot.process is not None and slot.process.is_alive()]
        if running:
            _log.info("stopping %d workers (grace %.1f s)", len(running), self.config.shutdown_grace)
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.config.shutdown_grace + STOP_MARGIN
        for process in running:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                _log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join)
        for slot in self._slots:
            self._forget(slot)


def supervise(
    config: ServerConfig, *, target: _worker.ServerFactory, database: DatabaseSide, log_level: str, log_format: str
) -> int:
    """Runs the supervisor until SIGTERM / SIGINT; returns the exit status."""
    supervisor = Supervisor(config, target=target, database=database, log_level=log_level, log_format=log_format)
    return asyncio.run(supervisor.run())
