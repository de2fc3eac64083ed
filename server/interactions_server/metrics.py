"""Prometheus metrics: definitions, multiprocess set-up, the /metrics exporter.

One process (the default): the metrics live in an in-process registry and
`start_exporter` serves it. Several worker processes: the supervisor calls
`setup_multiprocess(directory)` before starting them; every process then writes
its values to files in that directory (prometheus-client's multiprocess mode)
and the supervisor's exporter sums them with MultiProcessCollector. Gauges
declare how they combine across workers (`multiprocess_mode`); the live ones
of a worker that exits are dropped by `mark_worker_dead(pid)`.

The metric objects are created on first use in each process, after the mode
is known, so a supervisor that imports this module but never records anything
writes no values of its own (its zero gauges would distort `livemin`).

The code that records calls the small functions below (count_events,
observe_commit, ...), never prometheus-client directly. An event is counted
once its call has an outcome for it: a call that fails as a whole (a batch
over the size limit, a request that does not parse, the database down)
counts no events, only in grpc_server_handled_total with its code.

Label cardinality stays bounded: `event_type` is the catalog name, and every
custom type counts as "custom" (its custom_type is caller-chosen text); an
event_type outside the catalog, which can only be rejected, counts as
"unknown" ("unspecified" for 0). `client` is `current_client`, set by an
authentication interceptor to the token's name (never its secret); without
auth it is "" (Prometheus drops an empty label).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from pathlib import Path
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import asyncpg
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

from interactions_client.rules import RULES
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.config import split_listen
from interactions_server.errors import StartupError

_log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The name of the authenticated client of the current call ("" without auth).
# The security issue's auth interceptor sets it; metrics and logs read it.
current_client: ContextVar[str] = ContextVar("current_client", default="")

# go-grpc-prometheus label names and values, so that existing dashboards work.
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"
OUTCOMES = (ACCEPTED, DUPLICATE, REJECTED)

_TYPE_LABELS: dict[int, str] = {number: rule.name for number, rule in RULES.items()}
_TYPE_LABELS[EventType.EVENT_TYPE_UNSPECIFIED] = "unspecified"
_UNKNOWN_TYPE = "unknown"

POOL_SAMPLE_INTERVAL = 1.0  # seconds between samples of the database pool
_MAX_CACHED_CHILDREN = 10_000


class _Metrics:
    """Every metric of the service; one instance per process (see instruments())."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        # gRPC, as go-grpc-prometheus names them.
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS, registry=r)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code", "client"),
            registry=r,
        )
        self.received = Counter(
            "grpc_server_msg_received_total", "Stream messages received on the server.", GRPC_LABELS, registry=r
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total", "Stream messages sent by the server.", GRPC_LABELS, registry=r
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC calls, from start to the final status.",
            GRPC_LABELS,
            registry=r,
        )
        # The service's own.
        self.events = Counter(
            "interactions_events_total",
            "Events received, by catalog type and outcome (accepted, duplicate, rejected).",
            ("event_type", "outcome", "client"),
            registry=r,
        )
        self.batch_events = Histogram(
            "interactions_batch_events",
            "Valid events per database write (a group commit of LogEvent calls is one write).",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "interactions_commit_seconds",
            "Seconds per database write of a batch, until committed.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.streams_open = Gauge(
            "interactions_streams_open", "StreamEvents calls open.", registry=r, multiprocess_mode="livesum"
        )
        self.subscriptions_open = Gauge(
            "interactions_subscriptions_open",
            "SubscribeEvents calls open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.group_commit_queue = Gauge(
            "interactions_group_commit_queue",
            "LogEvent events waiting for a group-commit write.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_connections = Gauge(
            "interactions_db_pool_connections",
            "Database pool connections by state (idle, in_use), sampled every second.",
            ("state",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.database_up = Gauge(
            "interactions_database_up",
            "1 while the health probe reaches the database (with workers: every live worker's probe).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.database_writable = Gauge(
            "interactions_database_writable",
            "1 while the health probe finds the database accepting writes (0: down, or read-only: a standby, "
            "default_transaction_read_only on; with workers: every live worker's probe).",
            registry=r,
            multiprocess_mode="livemin",
        )
        # Interactive before bulk (precedence.py).
        self.bulk_held = Counter(
            "interactions_bulk_held_seconds_total",
            "Seconds bulk work (a stream's next batch, an export's next response) waited for interactive calls.",
            ("grpc_method",),
            registry=r,
        )
        self.interactive_queue = Histogram(
            "interactions_interactive_queue_seconds",
            "Seconds a LogEvent waited in the server before its group-commit write started.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.streams_closed_idle = Counter(
            "interactions_streams_closed_idle_total",
            "StreamEvents calls the server closed after --stream-idle-timeout without a request.",
            registry=r,
        )
        self._grpc_children: dict[tuple[str, str, str], tuple[Counter, Counter, Counter, Histogram]] = {}
        self._handled_children: dict[tuple[str, ...], Counter] = {}

    def handled_child(self, labels: tuple[str, str, str], code: str, client: str) -> Counter:
        """grpc_server_handled_total for one method, code and client (cached: labels() takes a lock)."""
        key = (*labels, code, client)
        child = self._handled_children.get(key)
        if child is None:
            if len(self._handled_children) >= _MAX_CACHED_CHILDREN:  # clients are few; stay bounded anyway
                self._handled_children.clear()
            child = self._handled_children[key] = self.handled.labels(*key)
        return child

    def grpc_children(self, labels: tuple[str, str, str]) -> tuple[Counter, Counter, Counter, Histogram]:
        """started, received, sent and handling for one method (cached: labels() takes a lock)."""
        children = self._grpc_children.get(labels)
        if children is None:
            children = self._grpc_children[labels] = (
                self.started.labels(*labels),
                self.received.labels(*labels),
                self.sent.labels(*labels),
                self.handling.labels(*labels),
            )
        return children


_current: _Metrics | None = None
_registry: CollectorRegistry | None = None  # the in-process registry (one-process mode)
_tally: Tally[tuple[str, str]] = Tally()  # (rpc, outcome) -> events, for the periodic log summary
_pool_watchers: set[asyncio.Task[None]] = set()

# No *_created series: noise on every scrape.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def _multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def instruments() -> _Metrics:
    global _current, _registry
    if _current is None:
        if _multiprocess_dir() is None:
            _registry = CollectorRegistry(auto_describe=True)
            _current = _Metrics(_registry)
        else:
            _current = _Metrics(None)  # values go to files; the exporter reads them
    return _current


def setup_multiprocess(directory: Path | None) -> None:
    """Switches this process, and the processes it starts after this call, to
    multiprocess metrics in `directory` (emptied first); None: a temporary
    directory removed at exit. Call before any worker starts."""
    global _current, _registry
    if directory is None:
        path = Path(tempfile.mkdtemp(prefix="interactions-metrics-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    else:
        path = directory
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    # prometheus-client picks its value class when it is imported; it may have
    # been imported before the directory was known.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _current, _registry = None, None


def mark_worker_dead(pid: int | None) -> None:
    """Drops the live gauges of a worker that exited (its counters stay summed)."""
    if pid is not None and (path := _multiprocess_dir()) is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class Exporter(Protocol):
    port: int

    def close(self) -> None: ...


class _NoExporter:
    port = 0

    def close(self) -> None:
        pass


def serve_metrics(listen: str | None, *, workers: bool = False) -> Exporter:
    """--metrics-listen: serves /metrics on `listen`, or nothing when None.
    workers=True (a supervisor, before its first worker starts): sets up
    multiprocess mode in a temporary directory and sums over the workers.
    Raises StartupError when the address cannot be bound."""
    if listen is None:
        return _NoExporter()
    if workers:
        setup_multiprocess(None)
    try:
        return start_exporter(listen)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {listen}: {exc.strerror or exc}; "
            "stop the program using it or choose another --metrics-listen"
        ) from exc


class _HttpExporter:
    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_exporter(listen: str) -> Exporter:
    """Serves /metrics on `listen` (HOST:PORT, port 0 picks one) from a thread:
    the sum over all workers in multiprocess mode, this process's registry
    otherwise. Raises OSError when the address cannot be bound."""
    host, port = split_listen(listen)
    if _multiprocess_dir() is None:
        instruments()
        registry = _registry
        assert registry is not None
    else:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    exporter = _HttpExporter(server, thread)
    _log.info("serving metrics on http://%s:%d/metrics", listen.rpartition(":")[0], exporter.port)
    return exporter


# --- recording -------------------------------------------------------------


def event_type_label(event_type: int) -> str:
    return _TYPE_LABELS.get(event_type, _UNKNOWN_TYPE)


def count_events(rpc: str, events: Sequence[Event], duplicate: Sequence[bool], rejected: Iterable[int]) -> None:
    """Counts the outcome of each event of a call: `rejected` are indexes into
    `events`, `duplicate[i]` tells the others apart."""
    rejected = set(rejected)
    by_label: Tally[tuple[int, str]] = Tally()
    for i, (event, dup) in enumerate(zip(events, duplicate, strict=False)):
        outcome = REJECTED if i in rejected else DUPLICATE if dup else ACCEPTED
        by_label[event.event_type, outcome] += 1
    client = current_client.get()
    counter = instruments().events
    for (event_type, outcome), n in by_label.items():
        counter.labels(event_type_label(event_type), outcome, client).inc(n)
        _tally[rpc, outcome] += n


def take_event_tally() -> dict[tuple[str, str], int]:
    """Events by (rpc, outcome) since the previous call, in this process."""
    tally = dict(_tally)
    _tally.clear()
    return tally


def observe_commit(events: int, seconds: float) -> None:
    m = instruments()
    m.batch_events.observe(events)
    m.commit_seconds.observe(seconds)


def stream_opened() -> None:
    instruments().streams_open.inc()


def stream_closed() -> None:
    instruments().streams_open.dec()


def subscription_opened() -> None:
    instruments().subscriptions_open.inc()


def subscription_closed() -> None:
    instruments().subscriptions_open.dec()


def group_commit_queued(delta: int) -> None:
    """`delta` events joined (positive) or left (negative) the group-commit queue."""
    instruments().group_commit_queue.inc(delta)


def bulk_held(rpc: str, seconds: float) -> None:
    instruments().bulk_held.labels(rpc).inc(seconds)


def interactive_queued(seconds: Sequence[float]) -> None:
    """The queue times of the LogEvent calls of one group-commit write."""
    histogram = instruments().interactive_queue
    for s in seconds:
        histogram.observe(s)


def stream_closed_idle() -> None:
    instruments().streams_closed_idle.inc()


def set_database_up(up: bool) -> None:
    instruments().database_up.set(1 if up else 0)


def set_database_writable(writable: bool) -> None:
    instruments().database_writable.set(1 if writable else 0)


def watch_pool(pool: asyncpg.Pool, interval: float = POOL_SAMPLE_INTERVAL) -> None:
    """Samples the pool's idle and in-use connections every `interval` seconds
    until the pool closes (a sample at scrape time would not work across
    processes)."""
    task = asyncio.get_running_loop().create_task(_sample_pool(pool, interval), name="pool-metrics")
    _pool_watchers.add(task)
    task.add_done_callback(_pool_watchers.discard)


async def _sample_pool(pool: asyncpg.Pool, interval: float) -> None:
    gauge = instruments().pool_connections
    idle, in_use = gauge.labels("idle"), gauge.labels("in_use")
    last = (0, 0)
    try:
        while not pool.is_closing():
            size, free = pool.get_size(), pool.get_idle_size()
            sample = (free, size - free)
            # Deltas, so that several pools in one process (tests) add up.
            idle.inc(sample[0] - last[0])
            in_use.inc(sample[1] - last[1])
            last = sample
            await asyncio.sleep(interval)
    finally:
        idle.dec(last[0])
        in_use.dec(last[1])
