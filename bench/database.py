"""The benchmark's PostgreSQL: an embedded server (pgserver) in a temporary
directory, the database ceiling (COPY into a table shaped like the log), and
the helpers that put the log into a known state before a measure."""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.workload import COPY_COLUMNS, MIX, PRODUCTS, USERS

# Every table the write path fills; emptied before each throughput measure.
LOG_TABLES = ("events", "cart_lines", "wishlist_lines", "purchase_history")
CEILING_TABLE = "ceiling"
COPY_BATCH = 1_000


class EmbeddedDatabase:
    """PostgreSQL 16 from the pgserver wheel, in a temporary directory removed at stop()."""

    def __init__(self) -> None:
        # Not under a 0700 temp root owned by someone else: as root, pgserver runs postgres as its own user.
        self.directory = Path(tempfile.mkdtemp(prefix="interactions-bench-"))
        self.pgdata = self.directory / "pg"
        self._server: Any = None
        self.url = ""

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (harmless)
            import pgserver

        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
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


async def reset_log(url: str) -> None:
    """Empties the log and the state tables, and checkpoints, so that every
    throughput measure starts from the same state."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"TRUNCATE {', '.join(LOG_TABLES)}")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def copy_ceiling(url: str, rows: Sequence[tuple[Any, ...]]) -> float:
    """Seconds to COPY `rows` in batches of COPY_BATCH into a fresh plain table
    created LIKE the log, one connection, each batch its own transaction."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {CEILING_TABLE}")
        await connection.execute(f"CREATE TABLE {CEILING_TABLE} (LIKE events INCLUDING ALL)")
        columns = list(COPY_COLUMNS)
        # Warm-up (type introspection of the first COPY), then start from an empty table.
        await connection.copy_records_to_table(CEILING_TABLE, records=rows[:10], columns=columns)
        await connection.execute(f"TRUNCATE {CEILING_TABLE}")
        await connection.execute("CHECKPOINT")
        started = time.monotonic()
        for first in range(0, len(rows), COPY_BATCH):
            await connection.copy_records_to_table(
                CEILING_TABLE, records=rows[first : first + COPY_BATCH], columns=columns
            )
        elapsed = time.monotonic() - started
        copied = await connection.fetchval(f"SELECT count(*) FROM {CEILING_TABLE}")
        if copied != len(rows):
            raise RuntimeError(f"the ceiling copied {copied} rows of {len(rows)}")
        await connection.execute(f"DROP TABLE {CEILING_TABLE}")
        return elapsed
    finally:
        await connection.close()


# Rows made in SQL, spread over the workload's users (skewed towards the low
# ids, as the workload is) and products, of the workload's types, with
# occurred_at in the current month before now.
_PRELOAD = """
INSERT INTO events (user_id, event_id, event_type, session_id, product_id, event_value, occurred_at)
SELECT 'user-' || floor({users} * power(random(), 3))::int,
       gen_random_uuid(),
       (ARRAY[{types}])[1 + floor(random() * {type_count})::int],
       NULL,
       'sku-' || floor({products} * power(random(), 2))::int,
       1,
       now() - interval '1 hour' - random() * least(now() - interval '1 hour' - date_trunc('month', now()),
                                                    interval '30 days')
FROM generate_series(1, $1)
"""
PRELOAD_CHUNK = 1_000_000


async def preload(url: str, rows: int, progress: Any = None) -> float:
    """Inserts `rows` generated rows into the log, then VACUUM ANALYZE and
    CHECKPOINT; returns the seconds it took."""
    # The types in the proportions of the mix: each name repeated by its percentage.
    types = ", ".join(f"'{name}'" for name, percent in MIX.items() for _ in range(percent))
    statement = _PRELOAD.format(users=USERS, products=PRODUCTS, types=types, type_count=sum(MIX.values()))
    started = time.monotonic()
    connection = await asyncpg.connect(url)
    try:
        done = 0
        while done < rows:
            chunk = min(PRELOAD_CHUNK, rows - done)
            await connection.execute(statement, chunk)
            done += chunk
            if progress is not None:
                progress(f"preloaded {done:,} of {rows:,} rows ({time.monotonic() - started:.0f} s)")
        await connection.execute("VACUUM ANALYZE events")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()
    return time.monotonic() - started


async def count_events(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await connection.close()
