"""The analytics measures (h)-(j), on a log preloaded with `analytics_events` rows.

The preload is made in SQL (like (f)'s): the workload's mix plus logins and
logouts, searches with a query and a result_count, sessions of 30 minutes,
spread over the last 28 days (two monthly partitions) and inserted in
occurred_at order, as live ingest writes them.

- (h) ExportEvents of the whole log through the shipped client's export
  iterator, against `COPY (the server's export query) TO STDOUT` of the same
  rows via asyncpg, in the same run.
- (i) ExportTrainingData of the whole log (with a half-life): seconds and the
  server's RSS while it streams.
- (j) TopSearchQueries and CountActiveUsers over the last 7 days: latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.database import UUID7_OF_OCCURRED_AT, reset_log
from bench.proc_stats import CpuMeter, CpuShares, RssSampler, RssSamples
from bench.workload import MIX, PRODUCTS, SYNCING_TYPES, USERS
from interactions_client.client import InteractionsClient
from interactions_server.storage import _analytics as analytics_storage

Progress = Callable[[str], None]

DAYS = 28  # the preload's span
WINDOW = timedelta(days=7)  # (j)
LATENCY_CALLS = 5  # timed calls of each (j) query, after one warm-up call
_EXTRA_TYPES = {"login": 2, "logout": 1}
_QUERIES = ("laptop", "Laptop ", "running shoes", "coffee grinder", "usb-c cable", "desk lamp", "gift ideas")

# Rows of one time slice [$2, $3) (epoch seconds), in occurred_at order.
_ROWS = """
SELECT user_id, event_id, event_type, session_id,
       CASE WHEN event_type IN ('search', 'page_view', 'login', 'logout') THEN NULL ELSE product_id END AS product_id,
       occurred_at,
       CASE WHEN event_type = 'search' THEN jsonb_build_object('search', jsonb_build_object(
           'query', (ARRAY[{queries}])[1 + floor(random() * {query_count})::int],
           'result_count', floor(random() * 8)::int)) END AS details,
       event_type IN ({syncing}) AS syncs_state
FROM (
    SELECT user_id, event_type, product_id, occurred_at,
           'sess-' || substr(user_id, 6) || '-' || floor(extract(epoch FROM occurred_at) / 1800)::int8 AS session_id,
           {uuid7} AS event_id
    FROM (
        SELECT 'user-' || floor({users} * power(random(), 3))::int AS user_id,
               (ARRAY[{types}])[1 + floor(random() * {type_count})::int] AS event_type,
               'sku-' || floor({products} * power(random(), 2))::int AS product_id,
               to_timestamp($2::float8 + random() * ($3::float8 - $2::float8)) AS occurred_at
        FROM generate_series(1, $1::int)
    ) AS r
) AS g
ORDER BY occurred_at
"""
_INSERT = """
WITH g AS MATERIALIZED ({rows}),
keys AS (INSERT INTO event_keys (user_id, event_id, occurred_at) SELECT user_id, event_id, occurred_at FROM g)
INSERT INTO events (user_id, event_id, event_type, session_id, product_id, event_value, occurred_at, details,
                    syncs_state)
SELECT user_id, event_id, event_type, session_id, product_id, 1, occurred_at, details, syncs_state FROM g
"""
_SLICE_ROWS = 250_000


def _sql_list(names: Any) -> str:
    return ", ".join(f"'{name}'" for name in names)


async def preload(url: str, rows: int, progress: Progress) -> float:
    """Fills the (empty) log with `rows` rows in time order; returns the seconds it took."""
    mix = {**MIX, **_EXTRA_TYPES}
    statement = _INSERT.format(
        rows=_ROWS.format(
            queries=_sql_list(_QUERIES),
            query_count=len(_QUERIES),
            syncing=_sql_list(SYNCING_TYPES),
            users=USERS,
            types=_sql_list(name for name, percent in mix.items() for _ in range(percent)),
            type_count=sum(mix.values()),
            products=PRODUCTS,
            uuid7=UUID7_OF_OCCURRED_AT,
        )
    )
    end = time.time() - 3600
    start = end - DAYS * 86400
    slices = max(1, -(-rows // _SLICE_ROWS))
    started = time.monotonic()
    connection = await asyncpg.connect(url)
    try:
        for i in range(slices):
            count = rows // slices + (1 if i < rows % slices else 0)
            span = (end - start) / slices
            await connection.execute(statement, count, start + i * span, start + (i + 1) * span)
            if i % 8 == 7 or i == slices - 1:
                progress(f"(h-j) preloaded {(i + 1) * 100 // slices}% of {rows:,} rows")
        await connection.execute("VACUUM ANALYZE")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()
    return time.monotonic() - started


@dataclass(slots=True)
class ExportRate:
    rows: int
    seconds: float
    cpu: CpuShares  # cores used by the server, PostgreSQL and this process (the client) meanwhile

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class TrainingExport:
    events: int  # in the log
    rows: int  # (user, product) pairs exported
    seconds: float
    rss: RssSamples
    cpu: CpuShares


@dataclass(slots=True)
class QueryLatency:
    p50: float  # seconds
    max: float
    calls: int


@dataclass(slots=True)
class AnalyticsResults:
    events: int  # rows in the log
    preload_seconds: float
    export: ExportRate | None = None  # (h) through the client
    export_ceiling: ExportRate | None = None  # (h) COPY TO STDOUT
    training: TrainingExport | None = None  # (i)
    top_searches: QueryLatency | None = None  # (j)
    active_users: QueryLatency | None = None  # (j)


async def export_events(target: str, meter: CpuMeter, expected: int, progress: Progress) -> ExportRate:
    """(h): every row of the log through InteractionsClient.export_events."""
    rows = 0
    async with InteractionsClient(target) as client:
        meter.start()
        started = time.monotonic()
        async for batch in client.export_events().batches():
            rows += len(batch)
        seconds = time.monotonic() - started
        cpu = meter.stop(0.0)
    if rows != expected:
        raise RuntimeError(f"(h) exported {rows:,} events of {expected:,}")
    progress(f"(h) ExportEvents through the client: {rows / seconds:,.0f} rows/s ({seconds:.1f} s)")
    return ExportRate(rows, seconds, cpu)


async def export_ceiling(url: str, meter: CpuMeter, expected: int, progress: Progress) -> ExportRate:
    """(h)'s ceiling: the server's own export query, COPY'd as text to this process."""
    total = 0

    async def sink(chunk: bytes) -> None:
        nonlocal total
        total += chunk.count(b"\n")

    connection = await asyncpg.connect(url)
    try:
        meter.start()
        started = time.monotonic()
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.copy_from_query(
                analytics_storage.EXPORT_EVENTS,
                None,
                None,
                [],
                False,
                [],
                None,
                None,
                output=sink,
            )
        seconds = time.monotonic() - started
        cpu = meter.stop(0.0)
    finally:
        await connection.close()
    if total != expected:
        raise RuntimeError(f"(h) COPY wrote {total:,} rows of {expected:,}")
    progress(f"(h) COPY (export query) TO STDOUT: {total / seconds:,.0f} rows/s ({seconds:.1f} s)")
    return ExportRate(total, seconds, cpu)


async def export_training(
    target: str, meter: CpuMeter, server_pid: int, events: int, progress: Progress
) -> TrainingExport:
    """(i): the whole training matrix, with a 14-day half-life."""
    rows = 0
    async with InteractionsClient(target) as client, RssSampler(server_pid) as sampler:
        meter.start()
        started = time.monotonic()
        async for batch in client.export_training_data(half_life=timedelta(days=14)).batches():
            rows += len(batch)
        seconds = time.monotonic() - started
        cpu = meter.stop(0.0)
    rss = sampler.result()
    progress(
        f"(i) ExportTrainingData: {rows:,} rows from {events:,} events in {seconds:.1f} s, "
        f"server RSS peak {rss.peak_kb / 1024:.0f} MB"
    )
    return TrainingExport(events, rows, seconds, rss, cpu)


async def _latency(label: str, call: Callable[[], Awaitable[Any]], progress: Progress) -> QueryLatency:
    await call()  # warm-up: plans and pages cached
    times = []
    for _ in range(LATENCY_CALLS):
        started = time.monotonic()
        await call()
        times.append(time.monotonic() - started)
    result = QueryLatency(statistics.median(times), max(times), len(times))
    progress(f"(j) {label}: p50 {result.p50 * 1000:.0f} ms, max {result.max * 1000:.0f} ms")
    return result


async def window_queries(target: str, progress: Progress) -> tuple[QueryLatency, QueryLatency]:
    """(j): both window queries over the last 7 days."""
    end = datetime.now(UTC)
    start = end - WINDOW
    async with InteractionsClient(target, deadline=120.0) as client:
        searches = await _latency(
            "TopSearchQueries, 7 days", lambda: client.top_search_queries(start_time=start, end_time=end), progress
        )
        active = await _latency(
            "CountActiveUsers, 7 days", lambda: client.count_active_users(start_time=start, end_time=end), progress
        )
    return searches, active


async def run(
    url: str, target: str, server_pid: int, postgres_pid: int, events: int, only: frozenset[str], progress: Progress
) -> AnalyticsResults:
    """The chosen measures of (h)-(j) on a freshly preloaded log."""
    meter = CpuMeter(server_pid, postgres_pid)
    await reset_log(url)
    progress(f"(h-j) preloading {events:,} rows over {DAYS} days")
    results = AnalyticsResults(events, await preload(url, events, progress))
    if "h" in only:
        results.export_ceiling = await export_ceiling(url, meter, events, progress)
        results.export = await export_events(target, meter, events, progress)
    if "i" in only:
        results.training = await export_training(target, meter, server_pid, events, progress)
    if "j" in only:
        results.top_searches, results.active_users = await window_queries(target, progress)
    return results
