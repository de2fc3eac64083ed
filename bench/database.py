"""The benchmark's PostgreSQL: an embedded server (pgserver) in a temporary
directory, the database ceiling (COPY into a table shaped like the log), and
the helpers that put the log into a known state before a measure."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.workload import MIX, PRODUCTS, SYNCING_TYPES, USERS
from interactions_server.storage import start_tuned

CEILING_TABLE = "ceiling"
CEILING_KEYS_TABLE = "ceiling_keys"
KEY_COLUMNS = ("user_id", "event_id", "occurred_at")  # of event_keys, the log's idempotency index
LOG_ROW_COLUMNS = (  # what workload.log_row fills
    "user_id",
    "event_id",
    "event_type",
    "session_id",
    "product_id",
    "event_value",
    "occurred_at",
    "details",
    "attributes",
    "syncs_state",
)
COPY_BATCH = 1_000


class EmbeddedDatabase:
    """PostgreSQL 16 from the pgserver wheel, in a temporary directory removed at stop()."""

    def __init__(self, *, pg_defaults: bool = False) -> None:
        self.pg_defaults = pg_defaults  # PostgreSQL's own defaults rather than embedded_db's machine settings
        # Not under a 0700 temp root owned by someone else: as root, pgserver runs postgres as its own user.
        self.directory = Path(tempfile.mkdtemp(prefix="interactions-bench-"))
        self.pgdata = self.directory / "pg"
        self._server: Any = None
        self.url = ""

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (harmless)
            from pgserver.postgres_server import get_server

        # The settings interactions-server gives its own embedded database (the README's default).
        self._server = get_server(self.pgdata, cleanup_mode="stop") if self.pg_defaults else start_tuned(self.pgdata)
        self.url = str(self._server.get_uri())
        return self.url

    @property
    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self) -> None:
        try:
            if self._server is not None:
                self._server.cleanup()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


DEADLOCK_RETRIES = 10


async def reset_log(url: str) -> None:
    """Empties every table of the service (the log, its keys, the state) and
    checkpoints, so that every throughput measure starts from the same state."""
    connection = await asyncpg.connect(url)
    try:
        tables = await connection.fetch(
            "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'"
        )
        # The server's recommendations maintainer reads and writes these tables meanwhile: a TRUNCATE
        # of all of them can deadlock with one of its steps, and then either side may be the victim.
        for attempt in range(DEADLOCK_RETRIES):
            try:
                await connection.execute(f"TRUNCATE {', '.join(t[0] for t in tables)}")
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_RETRIES - 1:
                    raise
                await asyncio.sleep(0.1)
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def _has_event_keys(connection: asyncpg.Connection) -> bool:
    return bool(await connection.fetchval("SELECT to_regclass('event_keys') IS NOT NULL"))


async def fillable_columns(connection: asyncpg.Connection, table: str, known: Collection[str]) -> list[str]:
    """The columns of `table` the benchmark knows how to fill, in table order.
    Fails on a NOT NULL column without a default that it does not know (the
    schema moved on: teach bench/workload.py and the preload about it)."""
    records = await connection.fetch(
        """
        SELECT a.attname, a.attnotnull AND NOT a.atthasdef AS required
        FROM pg_attribute AS a
        WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        table,
    )
    missing = [r["attname"] for r in records if r["required"] and r["attname"] not in known]
    if missing:
        raise RuntimeError(f"{table} has required columns the benchmark cannot fill: {', '.join(missing)}")
    return [r["attname"] for r in records if r["attname"] in known]


class CeilingTable:
    """Plain tables shaped and indexed like the log: `ceiling` LIKE events
    (same columns, defaults and indexes, but not partitioned) and, when the
    schema has the event_keys idempotency index, `ceiling_keys` LIKE it.

        async with CeilingTable(url, with_keys=...) as table:
            records = table.records(rows)  # workload.log_row dicts to COPY records
            await table.copy(records)      # the timed part
    """

    def __init__(self, url: str, *, with_keys: bool = True) -> None:
        self.url = url
        self.want_keys = with_keys
        self.with_keys = False  # whether the keys are copied too (set on entry)
        self.columns: list[str] = []  # the columns copied (set on entry)
        self._connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> CeilingTable:
        self._connection = connection = await asyncpg.connect(self.url)
        self.with_keys = self.want_keys and await _has_event_keys(connection)
        self.columns = await fillable_columns(connection, "events", LOG_ROW_COLUMNS)
        await connection.execute(f"DROP TABLE IF EXISTS {CEILING_TABLE}, {CEILING_KEYS_TABLE}")
        await connection.execute(f"CREATE TABLE {CEILING_TABLE} (LIKE events INCLUDING ALL)")
        if self.with_keys:
            await connection.execute(f"CREATE TABLE {CEILING_KEYS_TABLE} (LIKE event_keys INCLUDING ALL)")
        await connection.copy_records_to_table(CEILING_TABLE, records=[], columns=self.columns)  # warm-up
        await connection.execute("CHECKPOINT")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.execute(f"DROP TABLE IF EXISTS {CEILING_TABLE}, {CEILING_KEYS_TABLE}")
            finally:
                await connection.close()

    @property
    def connection(self) -> asyncpg.Connection:
        if self._connection is None:
            raise RuntimeError("use the table inside `async with`")
        return self._connection

    def records(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Rows (by column, as workload.log_row makes them) as COPY records of `columns`."""
        return [tuple(row[c] for c in self.columns) for row in rows]

    async def copy(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPY in batches of COPY_BATCH on one connection, each batch one
        transaction (the rows, and their keys when with_keys)."""
        connection = self.connection
        key_at = [self.columns.index(c) for c in KEY_COLUMNS]
        for first in range(0, len(records), COPY_BATCH):
            batch = records[first : first + COPY_BATCH]
            if not self.with_keys:
                await connection.copy_records_to_table(CEILING_TABLE, records=batch, columns=self.columns)
                continue
            keys = [
                tuple(r[i] for i in key_at) for r in batch
            ]  # cheap next to the COPY; done in the loop like the server
            async with connection.transaction():
                await connection.copy_records_to_table(CEILING_KEYS_TABLE, records=keys, columns=list(KEY_COLUMNS))
                await connection.copy_records_to_table(CEILING_TABLE, records=batch, columns=self.columns)

    async def count(self) -> int:
        count: int = await self.connection.fetchval(f"SELECT count(*) FROM {CEILING_TABLE}")
        return count


# Rows made in SQL, spread over the workload's users (skewed towards the low
# ids, as the workload is) and products, of the workload's types, with
# A UUIDv7 of the row's occurred_at, like the client's default event ids (SQL).
UUID7_OF_OCCURRED_AT = """(lpad(to_hex((extract(epoch FROM occurred_at) * 1000)::int8), 12, '0') || '7'
    || substr(md5(random()::text), 1, 3) || to_hex(8 + floor(random() * 4)::int)
    || substr(md5(random()::text), 1, 15))::uuid"""

# occurred_at in the current month before now.
_PRELOAD_ROWS = """
SELECT user_id, event_type, product_id, occurred_at,
       {uuid7} AS event_id
FROM (
    SELECT 'user-' || floor({users} * power(random(), 3))::int AS user_id,
           (ARRAY[{types}])[1 + floor(random() * {type_count})::int] AS event_type,
           'sku-' || floor({products} * power(random(), 2))::int AS product_id,
           now() - interval '1 hour' - random() * least(now() - interval '1 hour' - date_trunc('month', now()),
                                                        interval '30 days') AS occurred_at
    FROM generate_series(1, $1)
) AS r
"""
# How a preloaded row fills each column the benchmark knows.
_PRELOAD_VALUES = {
    "user_id": "user_id",
    "event_id": "event_id",
    "event_type": "event_type",
    "product_id": "product_id",
    "event_value": "1",
    "occurred_at": "occurred_at",
    "syncs_state": "event_type IN ({syncing})",
}
_PRELOAD = "INSERT INTO events ({columns}) SELECT {values} FROM ({rows}) AS g"
# With the idempotency index: the keys of the rows too, in the same statement.
_PRELOAD_WITH_KEYS = """
WITH g AS MATERIALIZED ({rows}),
keys AS (INSERT INTO event_keys (user_id, event_id, occurred_at) SELECT user_id, event_id, occurred_at FROM g)
INSERT INTO events ({columns}) SELECT {values} FROM g
"""
PRELOAD_CHUNK = 1_000_000


def _sql_list(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


async def preload(url: str, rows: int, progress: Any = None) -> float:
    """Inserts `rows` generated rows into the log (and their keys), then
    VACUUM ANALYZE and CHECKPOINT; returns the seconds it took."""
    # The types in the proportions of the mix: each name repeated by its percentage.
    types = _sql_list([name for name, percent in MIX.items() for _ in range(percent)])
    generated = _PRELOAD_ROWS.format(
        users=USERS, products=PRODUCTS, types=types, type_count=sum(MIX.values()), uuid7=UUID7_OF_OCCURRED_AT
    )
    started = time.monotonic()
    connection = await asyncpg.connect(url)
    try:
        columns = await fillable_columns(connection, "events", _PRELOAD_VALUES)
        values = [_PRELOAD_VALUES[c].format(syncing=_sql_list(SYNCING_TYPES)) for c in columns]
        template = _PRELOAD_WITH_KEYS if await _has_event_keys(connection) else _PRELOAD
        statement = template.format(rows=generated, columns=", ".join(columns), values=", ".join(values))
        done = 0
        while done < rows:
            chunk = min(PRELOAD_CHUNK, rows - done)
            await connection.execute(statement, chunk)
            done += chunk
            if progress is not None:
                progress(f"preloaded {done:,} of {rows:,} rows ({time.monotonic() - started:.0f} s)")
        await connection.execute("VACUUM ANALYZE")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()
    return time.monotonic() - started


async def wal_position(url: str) -> int:
    """The WAL insert position in bytes: the difference of two is the WAL
    written in between (exact at once, unlike pg_stat_wal, which backends
    update only every second or so)."""
    connection = await asyncpg.connect(url)
    try:
        position: int = await connection.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
        return int(position)
    finally:
        await connection.close()


async def count_events(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await connection.close()
