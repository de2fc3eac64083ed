"""The `interactions-server` command.

    interactions-server [serve]   # run the service (the default)
    interactions-server migrate   # apply pending migrations and exit

Every flag has an environment variable default. Without a database URL an
embedded PostgreSQL is started with its data in --data-dir.
"""

from __future__ import annotations

import os

# Before gRPC is imported (it reads this once): gRPC's fork handlers can crash
# a child forked from a thread (grpc/grpc#13873), which is how the embedded
# PostgreSQL runs pg_ctl. This process forks only to exec, so it needs none.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from interactions_server import migrate
from interactions_server.budget import DEFAULT_MAX_INFLIGHT_BYTES
from interactions_server.embedded_db import EmbeddedPostgres
from interactions_server.errors import is_database_unavailable
from interactions_server.server import DEFAULT_MAX_CONCURRENT_RPCS, App, ServerConfig, StartupError

_log = logging.getLogger("interactions_server")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="interactions-server", description="Runs the Interactions gRPC service, or applies its migrations."
    )
    parser.add_argument(
        "command", nargs="?", choices=("serve", "migrate"), default="serve", help="what to do (default: serve)"
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
        "--shutdown-grace",
        type=float,
        default=float(env("INTERACTIONS_SHUTDOWN_GRACE", "10")),
        help="seconds in-flight calls get to finish on SIGTERM (env INTERACTIONS_SHUTDOWN_GRACE; default %(default)s)",
    )
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
        help="calls served at once; the excess gets RESOURCE_EXHAUSTED "
        "(env INTERACTIONS_MAX_CONCURRENT_RPCS; default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    config = ServerConfig(
        listen=args.listen,
        database_url=args.database_url,
        data_dir=args.data_dir,
        shutdown_grace=args.shutdown_grace,
        max_inflight_bytes=args.max_inflight_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
    )
    command = _migrate if args.command == "migrate" else _serve
    try:
        return asyncio.run(command(config))
    except (StartupError, migrate.MigrationError) as exc:
        _log.error("%s", exc)
        return 1
    except Exception as exc:
        if is_database_unavailable(exc):
            _log.error("cannot reach the database: %s: %s", type(exc).__name__, exc)
        else:
            _log.exception("failed")
        return 1


async def _serve(config: ServerConfig) -> int:
    app = App(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
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
    await stop_requested.wait()
    await app.stop()
    return 0


async def _migrate(config: ServerConfig) -> int:
    embedded = None
    dsn = config.database_url
    if dsn is None:
        embedded = EmbeddedPostgres(config.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        await migrate.migrate(dsn)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
