"""The settings of one server, shared by the supervisor and its workers (a
picklable value: it crosses into spawned worker processes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from interactions_server.budget import DEFAULT_MAX_INFLIGHT_BYTES
from interactions_server.service import DEFAULT_BATCHES_IN_FLIGHT

ASYNCPG_STATEMENT_CACHE_SIZE = 100  # asyncpg's default
DEFAULT_MAX_CONCURRENT_RPCS = 1_000


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "[::]:50051"
    database_url: str | None = None  # None: start an embedded PostgreSQL in data_dir
    data_dir: Path = Path(".interactions-data")
    shutdown_grace: float = 10.0  # seconds in-flight calls get to finish
    startup_timeout: float = 30.0  # seconds to wait for an unreachable database at start
    health_interval: float = 1.0
    health_timeout: float = 1.0
    pool_min_size: int = 2
    pool_max_size: int = 10
    analytics_pool_max_size: int = 3  # exports and window queries: never the connections ingest needs
    batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT  # per stream
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # request bytes held by all calls at once
    max_concurrent_rpcs: int | None = DEFAULT_MAX_CONCURRENT_RPCS  # the excess gets RESOURCE_EXHAUSTED
    # asyncpg's prepared-statement cache per connection; 0 for pgbouncer in
    # transaction mode, where a connection's statements do not follow it.
    statement_cache_size: int = ASYNCPG_STATEMENT_CACHE_SIZE
    # SO_REUSEPORT: only for the workers of one supervisor, so that a second
    # server on a busy port fails instead of sharing it.
    reuse_port: bool = False
    workers: int = 1
    metrics_listen: str | None = None  # HOST:PORT of /metrics; None: no metrics endpoint
    log_summary_interval: float = 60.0  # seconds between event summaries in the log; 0: none
    tls_cert: Path | None = None  # with tls_key: serve TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mTLS)
    auth_tokens: Path | None = None  # the tokens file; None: no authentication
    reflection: bool = True
