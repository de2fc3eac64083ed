"""The settings of one server, shared by the supervisor and its workers (a
picklable value: it crosses into spawned worker processes), their defaults,
and the checks of the listen address."""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from interactions_client.rules import CUSTOM, STANDARD
from interactions_server.errors import StartupError

ASYNCPG_STATEMENT_CACHE_SIZE = 100  # asyncpg's default
DEFAULT_MAX_CONCURRENT_RPCS = 1_000
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
DEFAULT_BATCHES_IN_FLIGHT = 3
# Streams are bounded apart from calls, so that open streams (idle ones
# included) never take the slots of unary calls.
# An open stream costs about 23 KiB (grpc core's call, mostly), and after
# thousands close the C heap keeps much of it (fragmentation): 3,000 open at
# once left RSS at 1.5-2.3x its start, 1,000 at 1.0-1.2x (docs/reliability.md).
DEFAULT_MAX_OPEN_STREAMS = 1_000  # per process
DEFAULT_MAX_OPEN_STREAMS_PER_CLIENT = 100  # per authenticated client (--auth-tokens)
DEFAULT_STREAM_IDLE_TIMEOUT = 120.0  # seconds without a request, nothing in flight
DEFAULT_INTERACTIVE_LATENCY_TARGET = 0.005  # seconds (precedence.py); 0: bulk never gives way
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DEFAULT_SUBSCRIPTION_POLL_INTERVAL = 0.01  # seconds between the feed reader's polls (docs/subscribe.md)
DEFAULT_SUBSCRIPTION_RING_BYTES = 32 * 1024 * 1024


MAX_RETENTION_DAYS = 36_600  # 100 years: beyond it a cutoff would leave the calendar


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long events are kept (--retention-days, --retention-days-by-type).

    `days`: every type's retention (None: kept for good); `by_type`: a
    type's own retention, overriding `days`, by catalog name or "custom"
    (every custom type). An event is removed once it occurred before the
    start of the UTC day `N` days before today: applied daily, day by day.
    A picklable value (it crosses into the supervisor's workers in ServerConfig).
    """

    days: int | None = None
    by_type: tuple[tuple[str, int], ...] = ()  # sorted by name

    @classmethod
    def of(cls, days: int | None = None, by_type: Mapping[str, int] | None = None) -> RetentionPolicy:
        """Checks every value; ValueError saying which is wrong."""
        if days is not None:
            _check_days(days, "the retention")
        for name, value in (by_type or {}).items():
            if name not in STANDARD and name != CUSTOM.name:
                raise ValueError(
                    f"unknown event type {name!r}: give a catalog name (see `interactions types`) or custom"
                )
            _check_days(value, f"the retention of {name}")
        return cls(days, tuple(sorted((by_type or {}).items())))

    @property
    def keeps_everything(self) -> bool:
        return self.days is None and not self.by_type

    def days_of(self, name: str) -> int | None:
        """The retention of a stored type name (a custom type's name: `custom`'s)."""
        key = name if name in STANDARD else CUSTOM.name
        return dict(self.by_type).get(key, self.days)

    def cutoffs(self, as_of: datetime) -> dict[str, datetime]:
        """Per catalog name and "custom": the instant before which its events
        are removed (UTC midnight, `days` before as_of's day); types kept for
        good are absent."""
        today = as_of.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        names = [*STANDARD, CUSTOM.name]
        return {n: today - timedelta(days=d) for n in names if (d := self.days_of(n)) is not None}

    def describe(self) -> dict[str, object]:
        """For logs and the audit record: {"days": 30, "by_type": {"page_view": 7}}."""
        return {"days": self.days, "by_type": dict(self.by_type)}


KEEP_EVERYTHING = RetentionPolicy()


def _check_days(value: int, what: str) -> None:
    if not 1 <= value <= MAX_RETENTION_DAYS:
        raise ValueError(f"{what} must be from 1 to {MAX_RETENTION_DAYS:,} days, got {value}")


def parse_retention_by_type(text: str) -> dict[str, int]:
    """TYPE=N[,TYPE=N...] (--retention-days-by-type); ValueError naming the bad part."""
    result: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit():
            raise ValueError(f"{part!r} is not TYPE=DAYS (e.g. page_view=7)")
        if name in result:
            raise ValueError(f"{name} is given twice")
        result[name] = int(value)
    return result


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
    # Subscriptions (EventStreamService): the reader's poll interval, the
    # bytes its ring of recent reads may hold, and the pool of the
    # subscriptions that read behind the ring (besides the reader's own connection).
    subscription_poll_interval: float = DEFAULT_SUBSCRIPTION_POLL_INTERVAL
    subscription_ring_bytes: int = DEFAULT_SUBSCRIPTION_RING_BYTES
    subscription_pool_max_size: int = 2
    # RecommendationService's reads and trending's shared computations: a
    # pool of their own, so that a storm of reads never takes a connection
    # that ingest needs (calls beyond it wait for one of these).
    recommendations_pool_max_size: int = 4
    batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT  # per stream
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # request bytes held by all calls at once
    max_concurrent_rpcs: int | None = DEFAULT_MAX_CONCURRENT_RPCS  # unary calls; the excess gets RESOURCE_EXHAUSTED
    max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS  # streaming calls, apart from max_concurrent_rpcs
    max_open_streams_per_client: int = DEFAULT_MAX_OPEN_STREAMS_PER_CLIENT  # with auth_tokens
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT  # 0: streams are never closed for idleness
    interactive_latency_target: float = DEFAULT_INTERACTIVE_LATENCY_TARGET
    event_loop: str = "asyncio"  # one of EVENT_LOOPS
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
    retention: RetentionPolicy = KEEP_EVERYTHING
    retention_check_interval: float = 3600.0  # seconds between checks whether the daily run is due
    removal_batch_rows: int = 5_000  # rows a batch of a purge aims at (storage/_lifecycle.py)
    # Seconds between steps of the recommendations' maintainer once caught up
    # (--recommendations-interval); 0: no maintainer on this host.
    recommendations_interval: float = 0.5
    # How long in a row its steps may wait while others keep the database's
    # host (this one) busy (storage's BUSY_SHARE): ingest first
    # (--recommendations-yield, docs/analytics.md "Ingest first"); 0: never.
    recommendations_yield: float = 30.0


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of a HOST:PORT listen address; "[::]" becomes "::"."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"invalid listen address {listen!r}: expected HOST:PORT, e.g. [::]:50051 or 127.0.0.1:0")
    return host.strip("[]") or "::", int(port)


def check_port_free(listen: str) -> None:
    """Fails when another program listens on `listen`'s port.

    Binds a probe socket without SO_REUSEPORT, so that it also fails against
    a program sharing its port (the workers of another interactions-server).
    Port 0 is left to the caller. Run before anything slow starts (the
    embedded database), so that a busy port is reported at once.
    """
    host, port = split_listen(listen)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {listen}: unknown host {host!r} ({exc.strerror}); fix --listen") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # Like gRPC: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {listen}: {exc.strerror.lower() if exc.strerror else exc}; "
                    "stop the program using it or choose another --listen"
                ) from exc


def reserve_port(listen: str) -> str:
    """`listen` with port 0 replaced by a port that is free now (the workers
    of a supervisor must all bind the same port)."""
    host, port = split_listen(listen)
    if port != 0:
        return listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        free: int = probe.getsockname()[1]
    return f"{listen.rpartition(':')[0]}:{free}"


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a serving process runs on: asyncio's own (None:
    asyncio.Runner's default), or uvloop ("auto": when it is installed, the
    server's `uvloop` extra). The default stays asyncio: uvloop measured no
    gain in server CPU per call here (docs/performance.md)."""
    if kind not in EVENT_LOOPS:
        raise StartupError(f"unknown event loop {kind!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if kind == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if kind == "uvloop":
            raise StartupError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
