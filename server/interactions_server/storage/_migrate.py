"""Schema migrations: plain numbered SQL files, applied in order, once.

Files are named `NNNN_description.sql` (e.g. `0001_events.sql`). Each pending
file runs in its own transaction together with its row in `schema_migrations`,
so a failing file leaves no trace and is retried on the next start. Runners
hold a PostgreSQL advisory lock while they work, so replicas starting at the
same time apply every file exactly once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from interactions_server.errors import StartupError
from interactions_server.storage import _citus

_log = logging.getLogger("interactions_server.migrate")

# pg_advisory_lock key shared by every runner of this service ("interact").
LOCK_KEY = 0x696E_7465_7261_6374
_FILE_NAME = re.compile(r"(?P<version>\d+)_(?P<name>[A-Za-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migrations directory or one of its files is not usable as is."""


class MigrationFailed(StartupError):
    """PostgreSQL refused a migration (rolled back; nothing of it applied):
    the message names the file and gives the database's error. Not retried:
    the database answered, and waiting will not change its answer."""

    def __init__(self, step: str, exc: asyncpg.PostgresError) -> None:
        self.step = step
        super().__init__(f"{step} failed and was rolled back: {describe_postgres_error(exc)}; fix that and start again")


# The connection went away, or the server is shutting down or starting up:
# the database did not answer the migration (retried by the caller).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


def describe_postgres_error(exc: asyncpg.PostgresError) -> str:
    """PostgreSQL's own words: "message (SQLSTATE xxxxx, ClassName); hint: ...".
    Not its DETAIL, which can quote a row's values (ids stay out of the log)."""
    text = f"{exc.args[0] if exc.args else exc} (SQLSTATE {exc.sqlstate}, {type(exc).__name__})"
    return f"{text}; hint: {exc.hint}" if exc.hint else text


def _refused(step: str, exc: BaseException) -> BaseException:
    """`exc` as a MigrationFailed when PostgreSQL answered it, else as it is."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _CONNECTION_LOST):
        return MigrationFailed(step, exc)
    return exc


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def default_directory() -> Path:
    """The migrations shipped in the wheel (`interactions_server/migrations`),
    else those at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]  # interactions_server/
    packaged = package / "migrations"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "migrations"  # server/interactions_server/ -> the checkout


def load(directory: Path | None = None) -> list[Migration]:
    """The migrations in `directory`, by version. Fails on a misnamed .sql file
    or a repeated version rather than silently skipping one."""
    directory = default_directory() if directory is None else directory
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"migration file name must look like 0001_description.sql: {path.name}")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                f"migration version {version} is used twice: {migrations[version].path.name}, {path.name}"
            )
        migrations[version] = Migration(version, match["name"], path)
    return [migrations[v] for v in sorted(migrations)]


async def apply(connection: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    """Applies the pending migrations on `connection`; returns those it applied.
    On a Citus worker node it refuses (StartupError) before reading anything:
    the schema there is the coordinator's to change. On a Citus cluster whose
    tables are distributed, the tables new migrations create are placed too
    (storage/_citus.py), so an upgrade needs no second command."""
    migrations = load(directory)
    kind = await _citus.refuse_worker(connection)
    # Up to date (every start but the first after an upgrade): no lock. Behind
    # pgbouncer in transaction mode a session lock could be taken on one
    # server connection and released on another, staying held for good.
    if await connection.fetchval("SELECT to_regclass('schema_migrations')") is not None:
        done = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
        if all(m.version in done for m in migrations):
            _warn_unknown(done, migrations)
            return []
    # A session-level lock: other runners wait here until this one is done,
    # then find nothing left to do.
    await connection.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        try:
            await connection.execute(_CREATE_TABLE)
        except Exception as exc:  # a read-only database, a role that may not create tables...
            raise _refused("creating the table schema_migrations", exc) from exc
        applied_versions = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
        _warn_unknown(applied_versions, migrations)
        applied: list[Migration] = []
        for migration in migrations:
            if migration.version in applied_versions:
                continue
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            except Exception as exc:
                # Reported once, by whoever called (the command's one line).
                raise _refused(f"migration {migration.path.name}", exc) from exc
            _log.info("applied migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
        if applied and kind.cluster:
            for line in await _citus.place_tables(connection, None):
                _log.info("citus: %s", line)
        return applied
    finally:
        if not connection.is_closed():
            await connection.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


def _warn_unknown(applied_versions: set[int], migrations: list[Migration]) -> None:
    unknown = applied_versions - {m.version for m in migrations}
    if unknown:
        _log.warning("the database has migrations this server does not know: %s", sorted(unknown))


async def migrate(
    dsn: str, directory: Path | None = None, *, connect_timeout: float = 10.0, statement_cache_size: int = 100
) -> list[Migration]:
    """Connects to `dsn`, applies the pending migrations and disconnects."""
    connection = await asyncpg.connect(dsn, timeout=connect_timeout, statement_cache_size=statement_cache_size)
    try:
        applied = await apply(connection, directory)
    finally:
        await connection.close()
    if not applied:
        _log.info("schema is up to date")
    return applied
