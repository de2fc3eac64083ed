"""What a benchmark run measures, and how much."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

MEASURES: dict[str, str] = {
    "a": "database ceiling: COPY into a table like the log",
    "b": "bulk ingest: StreamEvents through the shipped streamer",
    "c": "RPC ceiling: no-op LogEvent",
    "d": "unary LogEvent on the real server",
    "e": "server memory during a long stream",
    "f": "bulk ingest with rows already in the log",
    "g": "fan-out: 1, 4 and 16 concurrent streams",
    "h": "ExportEvents through the shipped client vs COPY TO STDOUT of the same rows",
    "i": "ExportTrainingData over the analytics log: seconds and server RSS",
    "j": "TopSearchQueries and CountActiveUsers over 7 days of the analytics log: latency",
    "k": "LogEvent latency at 200 calls/s while a bulk stream runs at full speed",
    "k2": "LogEvent at a quarter of its own maximum, alone and beside a full-speed stream; 1 and 2 workers",
    "l": "a late LogEvent on a (user, product) with 200k events: latency and CPU per call",
    "m": "LinkIdentity of a guest with 100 events: latency",
    "n": "bulk ingest while a per-type retention deletes a month of rows, against (b) alone",
    "r": "RecommendationService: each RPC at 50 calls/s over a preloaded log (latency, CPU per call), freshness",
    "s": "the event stream: the xid stamp's cost on (b), (b) with 8 subscribers, delivery latency, slow-consumer RSS",
}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    measures: frozenset[str] = frozenset(MEASURES)
    events: int = 100_000  # per bulk run: (a), (b), (f) and each fan-out level of (g)
    unary_calls: int = 20_000  # (c) and (d), closed loop
    latency_calls: int = 10_000  # (d), open loop at half the maximum rate
    callers: int = 64
    memory_events: int = 300_000  # (e); 2,000,000 for the full run
    preload: int = 1_000_000  # (f); 0 skips it; 10,000,000 for the full run
    fanout: tuple[int, ...] = (1, 4, 16)
    analytics_events: int = 1_000_000  # rows in the log for (h), (i), (j); 10,000,000 for the full run
    client_processes: int = 0  # client processes for the fan-out; 0: one per core, at most one per stream
    unary_processes: int = 1  # client processes sharing the unary callers
    batch_size: int | None = None  # the streamer's batch_size; None: its default
    workers: int = 1  # the server's --workers
    # Client connections per load process. Connections, not calls, are what the
    # kernel spreads over the workers of --workers N: with 1, every call of a
    # load process reaches the same worker. Above 1, each stream also gets a
    # connection of its own, and the unary callers are spread over them.
    connections: int = 1
    busy_events: int = 200_000  # (k): the bulk stream, about 10 s at full speed
    busy_calls: int = 2_000  # (k): LogEvent calls at busy_rate, as long as the stream or longer
    busy_rate: float = 200.0  # (k): calls/s
    inline_share: float = 0.25  # (k2): the LogEvent rate, as a share of its own closed-loop maximum
    inline_workers: tuple[int, ...] = (1, 2)  # (k2): the server's --workers (as many client connections)
    server_args: tuple[str, ...] = ()  # extra arguments of interactions-server (A/B runs of its settings)
    late_key_events: int = 200_000  # (l): events of the key before the late calls
    late_calls: int = 200  # (l): late LogEvent calls, one at a time
    link_guests: int = 500  # (m): guests of 100 events linked, one call each
    retention_events: int = 200_000  # (n): old page_view rows the retention deletes beside the stream
    recs_events: int = 1_000_000  # (r): rows preloaded in the log; 10,000,000 for the full run
    recs_calls: int = 500  # (r): calls of each RPC at 50 calls/s
    prevalidate: bool = True  # the bulk streams' client pre-validates (the shipped default)
    pg_defaults: bool = False  # PostgreSQL's own defaults instead of the embedded server's machine settings
    seed: int = 5
    repeat: int = 2  # runs of each throughput measure; the fastest counts (noise only slows a run down)
    profile_dir: Path | None = None  # py-spy the server during (b), (d) and (k) into this directory
    quick: bool = False

    def quick_sizes(self) -> BenchConfig:
        """Tiny sizes for a smoke test: every measure runs, none means much."""
        return replace(
            self,
            events=3_000,
            unary_calls=1_000,
            latency_calls=500,
            memory_events=10_000,
            preload=20_000,
            analytics_events=20_000,
            busy_events=20_000,
            busy_calls=200,
            late_key_events=5_000,
            late_calls=20,
            link_guests=20,
            retention_events=10_000,
            recs_events=20_000,
            recs_calls=20,
            repeat=1,
            quick=True,
        )
