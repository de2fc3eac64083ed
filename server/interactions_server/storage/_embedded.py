"""An embedded PostgreSQL (the `pgserver` wheel) for running without a database URL.

Meant for development and demos: the data lives in `<data_dir>/postgres`, the
server listens on a unix socket only, and it is stopped when the service stops.
One interactions-server at a time owns a data directory: it holds an exclusive
lock on `<data_dir>/interactions.lock` while it runs (pgserver alone would let
a second server attach to the first one's PostgreSQL).

PostgreSQL's own defaults (128 MB of shared_buffers, 1 GB of WAL between
checkpoints) are sized for a tiny machine; `machine_settings` sizes them from
the memory present instead, into `<pgdata>/interactions.conf`, included from
postgresql.conf (so an operator's ALTER SYSTEM still wins). Durability is
never traded: fsync and synchronous_commit keep their defaults (on).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import IO, Any, NamedTuple

from interactions_server.errors import StartupError

_log = logging.getLogger("interactions_server.embedded_db")


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
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_data_dir(self.pgdata.parent)
        # pgserver is chatty at INFO (every pg_ctl command line); keep ours only.
        logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLogger().level))
        try:
            self._server = start_tuned(self.pgdata)
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


# --- settings for the machine ---------------------------------------------------

MB = 1024 * 1024
SETTINGS_FILE = "interactions.conf"
_INCLUDE = f"include_if_exists = '{SETTINGS_FILE}'"


class MachineSettings(NamedTuple):
    """What the embedded PostgreSQL is given, from the memory and disk present."""

    memory_mb: int  # the machine's (or the cgroup's) memory, in MB
    shared_buffers_mb: int
    effective_cache_size_mb: int
    max_wal_size_mb: int
    checkpoint_timeout_min: int
    wal_compression: str

    def conf_lines(self) -> list[str]:
        return [
            f"shared_buffers = '{self.shared_buffers_mb}MB'",
            f"effective_cache_size = '{self.effective_cache_size_mb}MB'",
            f"max_wal_size = '{self.max_wal_size_mb}MB'",
            f"checkpoint_timeout = '{self.checkpoint_timeout_min}min'",
            f"wal_compression = '{self.wal_compression}'",
        ]


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is lower (a container)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            memory = min(memory, int(limit))
    return memory


def machine_settings(memory_bytes: int, disk_free_bytes: int) -> MachineSettings:
    """Sizes from the memory present, within sane bounds:
    shared_buffers a quarter of memory (128 MB to 8 GB: the log's indexes stay
    cached; above 8 GB the OS cache serves as well), effective_cache_size three
    quarters (the planner's guess of what the OS caches), max_wal_size 4 GB
    (fewer forced checkpoints under bulk load; at most a quarter of the free
    disk, at least 1 GB) and checkpoint_timeout 15 min. wal_compression stays
    off: this build has no lz4, and pglz cost PostgreSQL about 40 us of CPU
    per event once full-page images are frequent (docs/performance.md)."""
    memory_mb = memory_bytes // MB
    shared_buffers = max(128, min(8 * 1024, memory_mb // 4))
    effective_cache = max(shared_buffers, memory_mb * 3 // 4)
    max_wal = max(1024, min(4 * 1024, disk_free_bytes // MB // 4))
    return MachineSettings(memory_mb, shared_buffers, effective_cache, max_wal, 15, "off")


def start_tuned(pgdata: Path) -> Any:
    """Starts pgserver's PostgreSQL in `pgdata` with `machine_settings`; returns
    its handle. A fresh data directory (or one running with other sizes) is
    restarted once, as shared_buffers takes effect only at start."""
    from pgserver.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(pgdata.parent).free
    settings = machine_settings(machine_memory_bytes(), disk_free)
    if (pgdata / "PG_VERSION").exists():
        _write_settings(pgdata, settings)
    server = get_server(pgdata, cleanup_mode="stop")
    if _setting_mb(server, "shared_buffers") != settings.shared_buffers_mb:
        _write_settings(pgdata, settings)  # initdb ran just now, or it was running with other settings
        server.cleanup()
        server = get_server(pgdata, cleanup_mode="stop")
    _log.info(
        "embedded PostgreSQL settings for %d MB of memory: %s (fsync and synchronous_commit on)",
        settings.memory_mb,
        ", ".join(settings.conf_lines()),
    )
    return server


def _write_settings(pgdata: Path, settings: MachineSettings) -> None:
    header = (
        "# Written by interactions-server at each start, from the machine's memory (interactions_server.storage).\n"
    )
    (pgdata / SETTINGS_FILE).write_text(header + "\n".join(settings.conf_lines()) + "\n", encoding="utf-8")
    conf = pgdata / "postgresql.conf"
    text = conf.read_text(encoding="utf-8")
    if _INCLUDE not in text:
        conf.write_text(f"{text.rstrip()}\n{_INCLUDE}\n", encoding="utf-8")


def _setting_mb(server: Any, name: str) -> int | None:
    """A memory setting of the running PostgreSQL, in MB (None if it cannot be read)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    query = f"SELECT pg_size_bytes(current_setting('{name}')) / {MB}"
    try:
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-Atqc", query, server.get_uri()],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return int(done.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
