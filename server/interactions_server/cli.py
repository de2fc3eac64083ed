"""The `interactions-server` command.

    interactions-server [serve]              # run the service (the default)
    interactions-server migrate              # apply pending migrations and exit
    interactions-server retention [--dry-run]  # apply the retention policy once (or only count) and exit
    interactions-server distribute --database-url URL [--shard-count N]
                                             # on a Citus coordinator: migrate, distribute the tables, exit
    interactions-server rebuild-recommendations  # rebuild the recommendations from the log and exit

Every flag has an environment variable default. Without a database URL an
embedded PostgreSQL is started with its data in --data-dir. With --workers N
(N > 1) a supervisor process runs N serving processes (interactions_server.process).

Exit status: 0 after a clean stop (SIGTERM / SIGINT); 2 for a usage or
operator error (one line on stderr saying what to fix, no traceback); 3 when
the embedded PostgreSQL died under the server; 1 for anything else (a bug).
"""

from __future__ import annotations

import os

# Before gRPC is imported (it reads this once): gRPC's fork handlers can crash
# a child forked from a thread (grpc/grpc#13873), which is how the embedded
# PostgreSQL runs pg_ctl. This process forks only to exec, so it needs none.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# gRPC core writes its own log lines to stderr, in its own format (a TLS
# handshake a client failed, a certificate it refused...), which breaks a JSON
# log; the service logs what an operator needs itself. Off unless the operator
# asks (GRPC_VERBOSITY=ERROR, INFO or DEBUG, with GRPC_TRACE for traces).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from interactions_client.cli.args import count
from interactions_server import logs, metrics, process
from interactions_server.config import (
    DEFAULT_INTERACTIVE_LATENCY_TARGET,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_OPEN_STREAMS,
    DEFAULT_MAX_OPEN_STREAMS_PER_CLIENT,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    EVENT_LOOPS,
    RetentionPolicy,
    loop_factory,
    parse_retention_by_type,
)
from interactions_server.errors import EXIT_DATABASE_DIED, EXIT_OPERATOR_ERROR, is_database_unavailable
from interactions_server.server import App, Server, ServerConfig, StartupError
from interactions_server.storage import (
    BUSY_SHARE,
    Database,
    EmbeddedPostgres,
    MigrationError,
    RetentionBusy,
    close_pool,
    distribute,
    migrate_when_reachable,
    open_pool,
    rebuild_now,
    run_retention,
)

_log = logging.getLogger("interactions_server")


_at_least_one = count(1)
_not_negative = count(0)


def _workers(text: str) -> int:
    """--workers: a positive number, or "auto" for the number of cores."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _at_least_one(text)


def _log_format(text: str) -> str | None:
    """--log-format: text or json; "auto" (or empty) lets logs.configure choose."""
    value = text.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in logs.FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(logs.FORMATS)}, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _retention_days(text: str) -> int | None:
    """--retention-days: a number of days; empty: keep everything."""
    if not text.strip():
        return None
    try:
        value = int(text)
        RetentionPolicy.of(value)
    except ValueError as exc:
        detail = str(exc) if text.strip().lstrip("-").isdigit() else f"expected a number of days, got {text!r}"
        raise argparse.ArgumentTypeError(detail) from None
    return value


def _retention_by_type(text: str) -> dict[str, int]:
    """--retention-days-by-type: TYPE=N[,TYPE=N...]."""
    try:
        by_type = parse_retention_by_type(text)
        RetentionPolicy.of(None, by_type)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return by_type


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="interactions-server",
        description="Runs the Interactions gRPC service, applies its migrations, or applies the retention policy.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "migrate", "retention", "distribute", "rebuild-recommendations"),
        default="serve",
        help="what to do (default: serve); retention: apply the retention policy once and exit; "
        "distribute: on a Citus coordinator, apply the migrations and distribute the tables by user_id "
        "(docs/scaling.md); rebuild-recommendations: rebuild the recommendations' aggregates from the log and exit",
    )
    parser.add_argument(
        "--shard-count",
        type=_at_least_one,
        help="distribute: shards of the distributed tables (default: the cluster's citus.shard_count; "
        "see docs/scaling.md for advice)",
    )
    parser.add_argument(
        "--recommendations-interval",
        type=_seconds,
        metavar="SECONDS",
        default=env("INTERACTIONS_RECOMMENDATIONS_INTERVAL", "0.5"),
        help="seconds between steps of the recommendations' maintainer once it has caught up; 0: no maintainer "
        "on this host (env INTERACTIONS_RECOMMENDATIONS_INTERVAL; default %(default)s)",
    )
    parser.add_argument(
        "--recommendations-yield",
        type=_seconds,
        metavar="SECONDS",
        default=env("INTERACTIONS_RECOMMENDATIONS_YIELD", "30"),
        help="how long in a row the maintainer's steps may wait while others keep the database's host (when "
        f"it is this one) at least {BUSY_SHARE:.0%}% busy, a bulk ingest at full speed: ingest first; 0: never "
        "(env INTERACTIONS_RECOMMENDATIONS_YIELD; default %(default)s)",
    )
    parser.add_argument(
        "--retention-days",
        type=_retention_days,
        metavar="N",
        default=env("INTERACTIONS_RETENTION_DAYS", ""),
        help="remove events older than N days, once a day (env INTERACTIONS_RETENTION_DAYS; default: keep everything)",
    )
    parser.add_argument(
        "--retention-days-by-type",
        type=_retention_by_type,
        metavar="TYPE=N[,TYPE=N...]",
        default=env("INTERACTIONS_RETENTION_DAYS_BY_TYPE", ""),
        help="a type's own retention in days, overriding --retention-days; catalog names or custom "
        "(env INTERACTIONS_RETENTION_DAYS_BY_TYPE)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with retention: only count what the policy would remove",
    )
    parser.add_argument(
        "--listen",
        default=env("INTERACTIONS_LISTEN", "[::]:50051"),
        help="address to serve on, HOST:PORT; port 0 picks a free one (env INTERACTIONS_LISTEN; default %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        default=env("INTERACTIONS_DATABASE_URL") or None,
        help="PostgreSQL URL (env INTERACTIONS_DATABASE_URL); when unset, an embedded PostgreSQL is started",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env("INTERACTIONS_DATA_DIR", ".interactions-data")),
        help="data directory of the embedded PostgreSQL (env INTERACTIONS_DATA_DIR; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=env("INTERACTIONS_LOG_LEVEL", "INFO").upper(),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="(env INTERACTIONS_LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        type=_log_format,
        metavar="{text,json}",
        default=env("INTERACTIONS_LOG_FORMAT", "auto"),
        help="text, or json: one JSON object per line (env INTERACTIONS_LOG_FORMAT; "
        "default text when stderr is a terminal, json otherwise)",
    )
    parser.add_argument(
        "--log-summary-interval",
        type=_seconds,
        metavar="SECONDS",
        default=env("INTERACTIONS_LOG_SUMMARY_INTERVAL", f"{logs.DEFAULT_SUMMARY_INTERVAL:g}"),
        help="seconds between summaries of the events handled, in the log; 0 for none "
        "(env INTERACTIONS_LOG_SUMMARY_INTERVAL; default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=env("INTERACTIONS_METRICS_LISTEN") or None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics, summed over the workers "
        "(env INTERACTIONS_METRICS_LISTEN; default: no metrics endpoint)",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=env("INTERACTIONS_WORKERS", "1"),
        help="serving processes sharing the port; 'auto' = one per core (env INTERACTIONS_WORKERS; default 1)",
    )
    parser.add_argument(
        "--statement-cache-size",
        type=_not_negative,
        default=env("INTERACTIONS_STATEMENT_CACHE_SIZE", "100"),
        help="prepared statements cached per database connection; 0 behind pgbouncer in transaction mode "
        "(env INTERACTIONS_STATEMENT_CACHE_SIZE; default 100)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=float(env("INTERACTIONS_STARTUP_TIMEOUT", "30")),
        help="seconds to wait at start for a database that does not answer yet "
        "(env INTERACTIONS_STARTUP_TIMEOUT; default %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(env("INTERACTIONS_SHUTDOWN_GRACE", "10")),
        help="seconds in-flight calls get to finish on SIGTERM (env INTERACTIONS_SHUTDOWN_GRACE; default %(default)s)",
    )
    _add_security_options(parser)
    parser.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=int(env("INTERACTIONS_MAX_INFLIGHT_BYTES", str(DEFAULT_MAX_INFLIGHT_BYTES))),
        help="request bytes all calls may hold at once; streams wait, unary calls get RESOURCE_EXHAUSTED "
        "(env INTERACTIONS_MAX_INFLIGHT_BYTES; default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=int(env("INTERACTIONS_MAX_CONCURRENT_RPCS", str(DEFAULT_MAX_CONCURRENT_RPCS))),
        help="unary calls served at once; the excess gets RESOURCE_EXHAUSTED "
        "(env INTERACTIONS_MAX_CONCURRENT_RPCS; default %(default)s)",
    )
    parser.add_argument(
        "--max-open-streams",
        type=_at_least_one,
        default=env("INTERACTIONS_MAX_OPEN_STREAMS", str(DEFAULT_MAX_OPEN_STREAMS)),
        help="streams (StreamEvents, exports, Watch) open at once, apart from --max-concurrent-rpcs; the excess "
        "gets RESOURCE_EXHAUSTED (env INTERACTIONS_MAX_OPEN_STREAMS; default %(default)s)",
    )
    parser.add_argument(
        "--max-open-streams-per-client",
        type=_at_least_one,
        default=env("INTERACTIONS_MAX_OPEN_STREAMS_PER_CLIENT", str(DEFAULT_MAX_OPEN_STREAMS_PER_CLIENT)),
        help="with --auth-tokens: streams one client (token) may have open at once "
        "(env INTERACTIONS_MAX_OPEN_STREAMS_PER_CLIENT; default %(default)s)",
    )
    parser.add_argument(
        "--stream-idle-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=env("INTERACTIONS_STREAM_IDLE_TIMEOUT", f"{DEFAULT_STREAM_IDLE_TIMEOUT:g}"),
        help="a StreamEvents call that sends no request for this long, with nothing in flight, is closed "
        "with UNAVAILABLE; 0: never (env INTERACTIONS_STREAM_IDLE_TIMEOUT; default %(default)s)",
    )
    parser.add_argument(
        "--interactive-latency-target",
        type=_seconds,
        metavar="SECONDS",
        default=env("INTERACTIONS_INTERACTIVE_LATENCY_TARGET", f"{DEFAULT_INTERACTIVE_LATENCY_TARGET:g}"),
        help="while an interactive call (LogEvent, state reads) takes longer than this, bulk work (streams, "
        "exports) gives way; 0: never (env INTERACTIONS_INTERACTIVE_LATENCY_TARGET; default %(default)s)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=env("INTERACTIONS_EVENT_LOOP", "asyncio"),
        help="the event loop of each serving process: asyncio's, uvloop (pip install interactions-server[uvloop]), "
        "or auto: uvloop when installed (env INTERACTIONS_EVENT_LOOP; default %(default)s)",
    )
    return parser


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    """TLS, tokens and reflection (README, "Deploying securely")."""
    env = os.environ.get

    def path(name: str) -> Path | None:
        value = env(name)
        return Path(value) if value else None

    add = parser.add_argument
    add(
        "--tls-cert",
        type=Path,
        default=path("INTERACTIONS_TLS_CERT"),
        help="PEM certificate chain; with --tls-key the server speaks TLS only (env INTERACTIONS_TLS_CERT)",
    )
    add("--tls-key", type=Path, default=path("INTERACTIONS_TLS_KEY"), help="PEM private key (env INTERACTIONS_TLS_KEY)")
    add(
        "--tls-client-ca",
        type=Path,
        default=path("INTERACTIONS_TLS_CLIENT_CA"),
        help="PEM CA: clients must present a certificate it signed (mTLS) (env INTERACTIONS_TLS_CLIENT_CA)",
    )
    add(
        "--auth-tokens",
        type=Path,
        default=path("INTERACTIONS_AUTH_TOKENS"),
        help="TOML tokens file; calls need a bearer token of it; re-read on SIGHUP (env INTERACTIONS_AUTH_TOKENS)",
    )
    add(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=env("INTERACTIONS_NO_REFLECTION", "").lower() not in ("1", "true", "yes"),
        help="do not serve gRPC reflection (env INTERACTIONS_NO_REFLECTION=1)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = args.log_format or logs.default_format()
    logs.configure(log_format, args.log_level)
    config = ServerConfig(
        listen=args.listen,
        database_url=args.database_url,
        data_dir=args.data_dir,
        shutdown_grace=args.shutdown_grace,
        startup_timeout=args.startup_timeout,
        statement_cache_size=args.statement_cache_size,
        workers=args.workers,
        metrics_listen=args.metrics_listen,
        log_summary_interval=args.log_summary_interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=args.auth_tokens,
        reflection=args.reflection,
        max_inflight_bytes=args.max_inflight_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_open_streams=args.max_open_streams,
        max_open_streams_per_client=args.max_open_streams_per_client,
        stream_idle_timeout=args.stream_idle_timeout,
        interactive_latency_target=args.interactive_latency_target,
        event_loop=args.event_loop,
        retention=RetentionPolicy.of(args.retention_days, args.retention_days_by_type),
        recommendations_interval=args.recommendations_interval,
        recommendations_yield=args.recommendations_yield,
    )
    if args.dry_run and args.command != "retention":
        _log.error("--dry-run is an option of `interactions-server retention`")
        return EXIT_OPERATOR_ERROR
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(config))
        if args.command == "retention":
            return asyncio.run(_retention(config, dry_run=args.dry_run))
        if args.command == "rebuild-recommendations":
            return asyncio.run(_rebuild_recommendations(config))
        if args.command == "distribute":
            return asyncio.run(_distribute(config, args.shard_count))
        if args.shard_count is not None:
            raise StartupError("--shard-count is an option of `interactions-server distribute`")
        if config.workers > 1:
            return process.supervise(
                config, target=Server, database=Database(config), log_level=args.log_level, log_format=log_format
            )
        with (
            contextlib.closing(metrics.serve_metrics(config.metrics_listen)),
            asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner,
        ):
            return runner.run(_serve(config))
    except (StartupError, MigrationError, RetentionBusy) as exc:
        _log.error("%s", exc)
        return EXIT_OPERATOR_ERROR
    except Exception as exc:
        if is_database_unavailable(exc):
            _log.error("cannot reach the database: %s: %s", type(exc).__name__, exc)
        else:
            _log.exception("failed")
        return 1


async def _serve(config: ServerConfig) -> int:
    async with process.memory_returned():
        return await _serve_app(App(config))


async def _serve_app(app: App) -> int:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload_tokens)  # revocation without a restart
    # A signal during start-up (e.g. while waiting for the database) stops it too.
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting  # start() stops what it had started
        return 0
    stopping.cancel()
    starting.result()  # raises a start-up failure
    died = asyncio.create_task(app.database.wait_died())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait((died, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if died.done():
        _log.error(
            "the embedded PostgreSQL (pid %s) has exited; stopping (a service manager should restart this server)",
            app.database.embedded_pid,
        )
        await app.stop()
        return EXIT_DATABASE_DIED
    died.cancel()
    await app.stop()
    return 0


@contextlib.asynccontextmanager
async def _migrated(config: ServerConfig) -> AsyncIterator[str]:
    """The database URL, migrated (an embedded PostgreSQL started for the block when there is no URL)."""
    embedded = None
    dsn = config.database_url
    if dsn is None:
        embedded = EmbeddedPostgres(config.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        await migrate_when_reachable(config, dsn)
        yield dsn
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _migrate(config: ServerConfig) -> int:
    async with _migrated(config):
        return 0


async def _retention(config: ServerConfig, *, dry_run: bool) -> int:
    """Applies the policy once (or counts), prints what it removed."""
    policy = config.retention
    if policy.keeps_everything:
        _log.error("no retention policy: give --retention-days N and/or --retention-days-by-type TYPE=N")
        return EXIT_OPERATOR_ERROR
    async with _migrated(config) as dsn:
        pool = await open_pool(dsn, min_size=1, max_size=2, statement_cache_size=config.statement_cache_size)
        try:
            removed = await run_retention(pool, policy, dry_run=dry_run)
        finally:
            await close_pool(pool)
    rows = [(name, f"{n:,}") for name, n in sorted(removed.by_type.items()) if n]
    rows.append(("events", f"{removed.events:,}"))
    rows.append(("whole months", ", ".join(removed.partitions) or "none"))
    if removed.deferred:
        rows.append(("left for the next run", ", ".join(removed.deferred)))
    if removed.audit_id is not None:
        rows.append(("audit_log record", str(removed.audit_id)))
    width = max(len(name) for name, _ in rows)
    verb = "would remove (dry run)" if dry_run else "removed"
    sys.stdout.write(f"retention {verb}:\n" + "".join(f"  {name:<{width}}  {value}\n" for name, value in rows))
    return 0


async def _distribute(config: ServerConfig, shard_count: int | None) -> int:
    if config.database_url is None:
        raise StartupError("distribute needs --database-url: the URL of the Citus coordinator")
    for line in await distribute(config, config.database_url, shard_count):
        _log.info("%s", line)
    _log.info("the tables are distributed; start the servers against the coordinator")
    return 0


async def _rebuild_recommendations(config: ServerConfig) -> int:
    """Rebuilds the aggregates from the log in one transaction (reads go on
    from the old ones until it commits; a running maintainer waits)."""
    async with _migrated(config) as dsn:
        started = time.monotonic()
        result = await rebuild_now(dsn, statement_cache_size=config.statement_cache_size)
    sys.stdout.write(f"recommendations rebuilt from {result.applied:,} events in {time.monotonic() - started:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
