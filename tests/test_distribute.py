"""What `interactions-server distribute` needs of the schema, checked on plain
PostgreSQL (the Citus suite, tests/citus, runs it on a real cluster): every
table says where it lives on a cluster, a distributed table's unique keys
include its distribution column (Citus requires it), and the command refuses
a database that is not a Citus coordinator, in one line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import asyncpg

from interactions_server.server import App
from interactions_server.storage import _citus
from tests.support import cli

ROOT = Path(__file__).resolve().parents[1]


async def test_every_table_of_the_schema_has_a_place_on_a_cluster(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        tables = await _citus.schema_tables(connection)
        assert _citus.unplaced(tables) == [], "add them to DISTRIBUTED or LOCAL in storage/_citus.py"
        assert set(_citus.DISTRIBUTED) | set(_citus.LOCAL) >= set(tables)
        # Every unique index of a distributed table includes its distribution column.
        keys = await connection.fetch(
            """
            SELECT c.relname AS table, i.relname AS index,
                   array(SELECT a.attname FROM pg_attribute AS a
                         WHERE a.attrelid = c.oid AND a.attnum = ANY(x.indkey)) AS columns
            FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indrelid JOIN pg_class AS i ON i.oid = x.indexrelid
            WHERE x.indisunique AND c.relname = ANY($1::text[])
            """,
            list(_citus.DISTRIBUTED),
        )
    finally:
        await connection.close()
    assert keys, "no unique index found"
    for key in keys:
        assert _citus.DISTRIBUTED[key["table"]] in key["columns"], f"{key['index']} of {key['table']}"


async def test_distribute_refuses_plain_postgresql_in_one_line(database_url: str) -> None:
    async with cli("distribute", "--database-url", database_url) as process:
        code = await process.finish()
    log = "".join(process.log).strip()
    assert code == 2, log
    assert len(log.splitlines()) == 1, log
    assert "is not a Citus coordinator (no citus extension)" in log


async def test_distribute_needs_a_database_url() -> None:
    async with cli("distribute") as process:
        code = await process.finish()
    log = "".join(process.log).strip()
    assert code == 2, log
    assert "distribute needs --database-url" in log and len(log.splitlines()) == 1


async def test_on_plain_postgresql_the_plain_statements_are_used(server: App) -> None:
    async with server.pool.acquire() as conn:
        assert not _citus.on_citus(conn)


def test_without_citus_the_cluster_script_says_how_to_get_it_in_one_line(tmp_path: Path) -> None:
    """What the Citus suite's skip line is made of (tests/citus/conftest.py)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "bin" / "postgres").symlink_to(shutil.which("true") or "/bin/true")
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "citus-cluster"),
            "start",
            "--dir",
            str(tmp_path / "c"),
            "--pg-bin",
            str(tmp_path / "bin"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "citus.so not in" in done.stderr and "build-citus.sh SRC" in done.stderr
    assert not (tmp_path / "c").exists()
