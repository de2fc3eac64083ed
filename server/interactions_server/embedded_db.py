"""An embedded PostgreSQL (the `pgserver` wheel) for running without a database URL.

Meant for development and demos: the data lives in `<data_dir>/postgres`, the
server listens on a unix socket only, and it is stopped when the service stops.
One interactions-server at a time owns a data directory: it holds an exclusive
lock on `<data_dir>/interactions.lock` while it runs (pgserver alone would let
a second server attach to the first one's PostgreSQL).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from pathlib import Path
from typing import IO, Any

from interactions_server.startup import StartupError

_log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """Starts and stops one pgserver instance. The methods block (initdb and
    pg_ctl are subprocesses); call them in a thread from async code."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.expanduser().resolve() / "postgres"
        self._server: Any = None  # pgserver.PostgresServer (untyped)
        self._lock: IO[str] | None = None
        self.postmaster_pid: int | None = None

    def start(self) -> str:
        """Initializes the data directory if needed, starts PostgreSQL and
        returns its connection URI."""
        # pgserver asks platformdirs for a runtime dir it does not use here;
        # on machines without XDG_RUNTIME_DIR that only prints a warning.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        # Imported lazily: only needed without a database URL.
        from pgserver.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_data_dir(self.pgdata.parent)
        # pgserver is chatty at INFO (every pg_ctl command line); keep ours only.
        logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLogger().level))
        try:
            self._server = get_server(self.pgdata, cleanup_mode="stop")
            uri: str = self._server.get_uri()
        except BaseException:
            self._unlock()
            raise
        self.postmaster_pid = _postmaster_pid(self.pgdata)
        _log.info("started embedded PostgreSQL in %s", self.pgdata)
        return uri

    def is_running(self) -> bool:
        """Whether the postmaster started by start() is still alive."""
        if self.postmaster_pid is None:
            return False
        try:
            os.kill(self.postmaster_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, as another user
            return True
        return True

    def stop(self) -> None:
        """Stops PostgreSQL (keeping its data)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        running = self.is_running()
        try:
            server.cleanup()  # also forgets pgserver's handle when PostgreSQL is already gone
        finally:
            self._unlock()
        if running:
            _log.info("stopped embedded PostgreSQL")

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # releases the flock


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """An exclusive lock on the data directory, held while the file stays open."""
    path = data_dir / "interactions.lock"
    lock = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise StartupError(
            f"the data directory {data_dir} is in use by another interactions-server (pid {owner}): "
            "stop it, or give this one another --data-dir or a --database-url"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid on the first line of postmaster.pid (PostgreSQL's own record)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    return None
