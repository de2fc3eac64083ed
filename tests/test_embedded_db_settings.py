"""The embedded PostgreSQL that the README starts is sized for the machine it runs on."""

from __future__ import annotations

import asyncio
import logging
import shutil

import asyncpg
import pytest

from interactions_server.storage._embedded import (
    MB,
    SETTINGS_FILE,
    EmbeddedPostgres,
    machine_memory_bytes,
    machine_settings,
)
from tests.support import postgres_directory

GB = 1024 * MB


@pytest.mark.parametrize(
    ("memory", "shared_buffers", "effective_cache"),
    [
        (256 * MB, 128, 192),  # a tiny container: never below PostgreSQL's own default
        (2 * GB, 512, 1536),
        (24 * GB, 6 * 1024, 18 * 1024),
        (256 * GB, 8 * 1024, 192 * 1024),  # capped: the OS cache serves the rest
    ],
)
def test_sizes_follow_memory_within_bounds(memory: int, shared_buffers: int, effective_cache: int) -> None:
    settings = machine_settings(memory, 100 * GB)
    assert settings.shared_buffers_mb == shared_buffers
    assert settings.effective_cache_size_mb == effective_cache
    assert settings.max_wal_size_mb == 4 * 1024


def test_wal_size_stays_within_the_free_disk() -> None:
    assert machine_settings(8 * GB, 8 * GB).max_wal_size_mb == 2 * 1024
    assert machine_settings(8 * GB, 1 * GB).max_wal_size_mb == 1024  # never below PostgreSQL's default


async def _show(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT name, current_setting(name) AS value,"
            " CASE WHEN unit IS NULL OR name = 'checkpoint_timeout' THEN NULL"
            "  ELSE pg_size_bytes(current_setting(name)) / $1 END AS mb"
            " FROM pg_settings WHERE name = ANY($2::text[])",
            MB,
            [
                "shared_buffers",
                "effective_cache_size",
                "max_wal_size",
                "checkpoint_timeout",
                "wal_compression",
                "fsync",
                "synchronous_commit",
            ],
        )
    finally:
        await connection.close()
    return {r["name"]: str(r["mb"]) if r["mb"] is not None else r["value"] for r in rows}


async def test_embedded_database_runs_with_the_computed_settings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="interactions_server.embedded_db")
    with postgres_directory() as directory:
        embedded = EmbeddedPostgres(directory)
        for start in ("fresh data directory", "existing data directory"):
            url = await asyncio.to_thread(embedded.start)
            try:
                shown = await _show(url)
            finally:
                await asyncio.to_thread(embedded.stop)
            expected = machine_settings(machine_memory_bytes(), shutil.disk_usage(directory).free)
            assert shown == {
                "shared_buffers": str(expected.shared_buffers_mb),
                "effective_cache_size": str(expected.effective_cache_size_mb),
                "max_wal_size": str(expected.max_wal_size_mb),
                "checkpoint_timeout": f"{expected.checkpoint_timeout_min}min",
                "wal_compression": expected.wal_compression,
                "fsync": "on",
                "synchronous_commit": "on",
            }, start
        assert (directory / "postgres" / SETTINGS_FILE).exists()
    logged = [r.getMessage() for r in caplog.records if "embedded PostgreSQL settings" in r.getMessage()]
    assert len(logged) == 2 and f"shared_buffers = '{expected.shared_buffers_mb}MB'" in logged[0]
