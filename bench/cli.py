"""`python -m bench`: runs the benchmark and prints the table (or JSON)."""

from __future__ import annotations

import os

# Before gRPC is imported: this process forks only to exec (pgserver's pg_ctl,
# the server, spawned load processes), so gRPC's fork handlers are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench import analytics, identity, late_events, measures, recommendations, retention, subscribe
from bench.config import MEASURES, BenchConfig
from bench.database import EmbeddedDatabase
from bench.report import Results, render, to_json
from bench.services import ServiceProcess


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _measure_set(text: str) -> frozenset[str]:
    chosen = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = chosen - MEASURES.keys()
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"measures are letters of {','.join(MEASURES)}; got {text!r}")
    return chosen


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _workers_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1 like 1,2; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchConfig()
    measures_help = "; ".join(f"{k}: {v}" for k, v in MEASURES.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark of the Interactions service: every figure is a ratio against a ceiling "
        "measured in the same run on this machine (docs/performance.md).",
    )
    parser.add_argument("--only", type=_measure_set, help=f"comma-separated measures to run ({measures_help})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    parser.add_argument("--events", type=_positive, help=f"events per bulk run (default {defaults.events:,})")
    parser.add_argument(
        "--unary-calls", type=_positive, help=f"calls per closed-loop unary run (default {defaults.unary_calls:,})"
    )
    parser.add_argument(
        "--latency-calls",
        type=_positive,
        help=f"calls of the open-loop latency run (default {defaults.latency_calls:,})",
    )
    parser.add_argument("--callers", type=_positive, help=f"concurrent unary callers (default {defaults.callers})")
    parser.add_argument(
        "--memory-events",
        type=_positive,
        help=f"events of the memory stream (default {defaults.memory_events:,}; full run 2000000)",
    )
    parser.add_argument(
        "--preload",
        type=_not_negative,
        help=f"rows in the log for (f) (default {defaults.preload:,}; full run 10000000; 0 skips)",
    )
    parser.add_argument(
        "--analytics-events",
        type=_positive,
        help=f"rows in the log for (h), (i), (j) (default {defaults.analytics_events:,}; full run 10000000)",
    )
    parser.add_argument(
        "--client-processes",
        type=_not_negative,
        help="client processes for the fan-out (default: one per core, at most one per stream)",
    )
    parser.add_argument(
        "--unary-processes",
        type=_positive,
        help=f"client processes sharing the unary callers (default {defaults.unary_processes})",
    )
    parser.add_argument(
        "--batch-size", type=_positive, help="the streamer's batch_size (default: the streamer's own default)"
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        help=f"runs of each throughput measure, the best kept (default {defaults.repeat}; --quick and --profile: 1)",
    )
    parser.add_argument("--seed", type=int, help=f"workload seed (default {defaults.seed})")
    parser.add_argument("--workers", type=_positive, help=f"the server's --workers (default {defaults.workers})")
    parser.add_argument(
        "--connections",
        type=_positive,
        help="client connections per load process; above 1 each stream has its own and the unary callers "
        f"are spread over them, so that --workers N gets work on every worker (default {defaults.connections})",
    )
    parser.add_argument(
        "--busy-events", type=_positive, help=f"(k): events of the bulk stream (default {defaults.busy_events:,})"
    )
    parser.add_argument(
        "--busy-calls",
        type=_positive,
        help=f"(k): LogEvent calls at {defaults.busy_rate:,.0f}/s, only those during the stream count "
        f"(default {defaults.busy_calls:,})",
    )
    parser.add_argument("--link-guests", type=_positive, help=f"(m): guests linked (default {defaults.link_guests:,})")
    parser.add_argument(
        "--retention-events",
        type=_positive,
        help=f"(n): old page_view rows the retention deletes (default {defaults.retention_events:,})",
    )
    parser.add_argument(
        "--recs-events",
        type=_positive,
        help=f"(r): rows preloaded in the log (default {defaults.recs_events:,}; full run 10000000)",
    )
    parser.add_argument(
        "--recs-calls", type=_positive, help=f"(r): calls of each RPC at 50 calls/s (default {defaults.recs_calls:,})"
    )
    parser.add_argument(
        "--k2-workers",
        type=_workers_list,
        help="(k2): the server set-ups, as --workers values, each with as many client connections (default 1,2)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument of interactions-server, e.g. --server-arg=--interactive-latency-target=0 "
        "(repeatable; for A/B runs of its settings)",
    )
    parser.add_argument(
        "--late-key-events",
        type=_positive,
        help=f"(l): events on the key before the late calls (default {defaults.late_key_events:,})",
    )
    parser.add_argument(
        "--late-calls", type=_positive, help=f"(l): late LogEvent calls (default {defaults.late_calls})"
    )
    parser.add_argument(
        "--no-prevalidate",
        dest="prevalidate",
        action="store_false",
        help="bulk streams from a client made with validate=False (the server validates anyway)",
    )
    parser.add_argument(
        "--pg-defaults",
        action="store_true",
        help="PostgreSQL's own defaults instead of the settings the embedded server sizes for the machine",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the server with py-spy during (b), (d) and (k); raw profiles and summaries go to DIR",
    )
    return parser


def config_from(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig()
    if args.quick:
        config = config.quick_sizes()
    overrides = {
        "measures": args.only,
        "events": args.events,
        "unary_calls": args.unary_calls,
        "latency_calls": args.latency_calls,
        "callers": args.callers,
        "memory_events": args.memory_events,
        "preload": args.preload,
        "analytics_events": args.analytics_events,
        "client_processes": args.client_processes,
        "unary_processes": args.unary_processes,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "repeat": args.repeat,
        "profile_dir": args.profile,
        "workers": args.workers,
        "connections": args.connections,
        "busy_events": args.busy_events,
        "busy_calls": args.busy_calls,
        "server_args": tuple(args.server_arg) or None,
        "inline_workers": args.k2_workers,
        "late_key_events": args.late_key_events,
        "late_calls": args.late_calls,
        "link_guests": args.link_guests,
        "retention_events": args.retention_events,
        "recs_events": args.recs_events,
        "recs_calls": args.recs_calls,
        # The two switches override only when given (None: the config's own value).
        "prevalidate": None if args.prevalidate else False,
        "pg_defaults": True if args.pg_defaults else None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.profile_dir is not None and args.repeat is None:
        config = replace(config, repeat=1)  # a profile of one run, and no time lost
    return config


def code_version() -> str:
    """The commit of the working tree, "+changes" when the service's code differs from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = git("status", "--porcelain", "--", "server", "client", "migrations")
    return f"{commit}+changes" if changed else commit


async def run(config: BenchConfig) -> Results:
    results = Results(
        load_before=os.getloadavg(),
        code=code_version(),
        profiled=config.profile_dir is not None,
        repeat=config.repeat,
        callers=config.callers,
        workers=config.workers,
        connections=config.connections,
        prevalidate=config.prevalidate,
        pg_defaults=config.pg_defaults,
        server_args=config.server_args,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="interactions-bench-logs-"))
    db = EmbeddedDatabase(pg_defaults=config.pg_defaults)
    server: ServiceProcess | None = None
    try:
        _progress("starting the embedded PostgreSQL")
        await asyncio.to_thread(db.start)
        server = ServiceProcess.interactions_server(db.url, log_dir, workers=config.workers, extra=config.server_args)
        _progress(f"starting {' '.join(server.command)}")
        await server.start()
        bench = measures.Bench(config, db, server, log_dir, _progress)
        await _measure(bench, results)
        results.profiles = bench.profiles
    except BaseException:
        if server is not None:
            _progress(f"server log (tail):\n{server.log_tail()}")
        raise
    finally:
        if server is not None:
            await server.stop()
        await asyncio.to_thread(db.stop)
        shutil.rmtree(log_dir, ignore_errors=True)
    results.load_after = os.getloadavg()
    return results


async def _measure(bench: measures.Bench, results: Results) -> None:
    """The chosen measures, in an order where each finds the log as it needs
    it: (f) comes last, as its preload stays in the log."""
    config, only = bench.config, bench.config.measures
    await measures.warm_up(bench)
    if "a" in only:
        results.ceiling, results.ceiling_events_only = await measures.ceiling(bench)
    if only & {"b", "f", "n"}:  # (f) and (n) are measured against (b)
        results.bulk = await measures.bulk(bench)
    if "c" in only:
        results.rpc_ceiling = await measures.rpc_ceiling(bench)
    if "d" in only:
        results.unary = await measures.unary(bench)
        results.latency = await measures.latency(bench, results.unary.rate)
    if "k" in only:
        results.busy = await measures.busy_latency(bench)
    if "k2" in only:
        results.inline = await measures.inline_latency(bench, results.unary, results.bulk)
    if "l" in only:
        results.late = await late_events.run(bench)
    if "m" in only:
        results.link = await identity.link_latency(bench)
    if "n" in only:
        results.retention = await retention.run(bench)
    if "r" in only:
        results.recommendations = await recommendations.run(bench)
    if "s" in only:  # before (e), (g) and (f): its first part needs no subscriber on the log
        results.subscription = await subscribe.run(bench)
    if "e" in only:
        results.memory = await measures.memory(bench)
    if "g" in only:
        results.fanout = await measures.fanout(bench)
    if only & {"h", "i", "j"}:  # on a log of their own, emptied first
        server = bench.server
        results.analytics = await analytics.run(
            bench.url, server.target, server.pid, bench.db.postmaster_pid, config.analytics_events, only, bench.progress
        )
    if "f" in only:
        if config.preload > 0:
            results.growth, results.preload_seconds = await measures.growth(bench)
            results.preload_rows = config.preload
        else:
            results.skipped["f"] = "--preload 0"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    results = asyncio.run(run(config))
    _progress(f"done in {time.monotonic() - started:.0f} s")
    table = render(results)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(to_json(results), indent=2))
    else:
        print(table)
    return 0
