"""`python -m bench.citus`: the service on a Citus cluster against plain
PostgreSQL on the same machine, in one session, paired (docs/scaling.md).

Both databases run the same PostgreSQL binaries (CITUS_PG_BIN, default
Debian's /usr/lib/postgresql/15/bin) with the same settings: a plain node,
and a cluster of a coordinator and two workers (scripts/citus-cluster, or
--citus-url for a running one). One `interactions-server` serves each. Each
pair runs, on both, in alternating order:

- bulk: one stream of --events events through the shipped streamer, as (b);
- unary: --calls LogEvent calls by 64 callers, closed loop, as (d);
- GetCart: --getcart sequential calls through the server for users with a
  cart, latency p50 and p99 measured by the client;
- GetCart at the database (dbcart): as many storage.fetch_cart calls on one
  connection of the server's kind, p50 and p99 (no gRPC).

Noise: the load average around each run and the cores other processes used
during it (the machine is shared); CPU of the server and of each database
node per event.

    python -m bench.citus [--pairs 3] [--events 50000] [--calls 5000] [--getcart 2000] [--shards 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # before gRPC: children are spawned, never forked

import argparse
import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import database, measures
from bench.config import BenchConfig
from bench.proc_stats import CpuMeter, CpuShares, MachineCpu, tree_cpu_seconds
from bench.services import ServiceProcess
from bench.workload import PRODUCTS, USERS
from interactions_client import InteractionsClient
from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event
from interactions_server.config import ServerConfig
from interactions_server.storage import distribute

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "citus-cluster"
PG_BIN = Path(os.environ.get("CITUS_PG_BIN", "/usr/lib/postgresql/15/bin"))
# The same settings on every node, plain and cluster (the embedded server's
# choices that matter here: docs/performance.md, "Database settings").
SETTINGS = (
    "shared_buffers = 256MB",
    "max_wal_size = 4GB",
    "checkpoint_timeout = 15min",
    "wal_compression = off",
    "citus.max_cached_conns_per_worker = 16",
)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_ports(count: int) -> int:
    """A port P with P..P+count-1 free on loopback (a cluster's coordinator and workers)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")


def _as_postgres(*command: str) -> list[str]:
    """initdb and postgres refuse root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.getuid() == 0 else list(command)


def _postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split("\n", 1)[0])


class PlainNode:
    """A plain PostgreSQL of the same binaries and settings as the cluster's nodes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "plain"
        self.port = free_ports(1)
        self.url = ""

    def start(self) -> None:
        if os.getuid() == 0:
            shutil.chown(self.directory, "postgres")
        subprocess.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--locale=C.UTF-8"),
            check=True, capture_output=True,
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            lines = [f"port = {self.port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.directory}'",
                     "max_connections = 200"] + [s for s in SETTINGS if not s.startswith("citus.")]  # fmt: skip
            conf.write("\n".join(lines) + "\n")
        log = str(self.directory / "plain.log")
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", "start"), check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run(_as_postgres(str(PG_BIN / "createdb"), "-h", str(self.directory), "-p", str(self.port),
                                    "-U", "postgres", "interactions"), check=True, capture_output=True)  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/interactions"

    @property
    def postmaster_pids(self) -> list[int]:
        return [_postmaster_pid(self.data)]

    def stop(self) -> None:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"),
                       capture_output=True)  # fmt: skip


class Cluster:
    """scripts/citus-cluster in a directory of its own, or a running cluster (`url`)."""

    def __init__(self, directory: Path, shards: int, url: str | None) -> None:
        self.directory = directory / "cluster"
        self.args = ["--dir", str(self.directory), "--port", str(free_ports(3)), "--shards", str(shards)]
        for setting in SETTINGS:
            self.args += ["--conf", setting]
        self.own = url is None
        self.url = url or ""

    def start(self) -> None:
        if self.own:
            done = subprocess.run([str(CLUSTER_SCRIPT), "start", *self.args], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr.strip() or f"citus-cluster start failed ({done.returncode})")
            self.url = done.stdout.strip().splitlines()[-1]

    @property
    def postmaster_pids(self) -> list[int]:
        if not self.own:
            return []
        return [_postmaster_pid(self.directory / node) for node in ("coordinator", "worker1", "worker2")]

    def stop(self) -> None:
        if self.own:
            subprocess.run([str(CLUSTER_SCRIPT), "stop", *self.args], capture_output=True)


@dataclass(slots=True)
class NodesMeter(CpuMeter):
    """CpuMeter over several database nodes: `postgres` sums them; `nodes` has each."""

    pids: Sequence[int] = ()
    nodes: list[float] = field(default_factory=list)
    _starts: list[dict[int, float]] = field(default_factory=list)

    def start(self) -> None:
        self._starts = [tree_cpu_seconds(pid) for pid in self.pids]
        CpuMeter.start(self)

    def stop(self, client_cpu_seconds: float) -> CpuShares:
        shares = CpuMeter.stop(self, client_cpu_seconds)
        self.nodes = []
        for pid, before in zip(self.pids, self._starts, strict=True):
            now = tree_cpu_seconds(pid)
            self.nodes.append(max(sum(s - before.get(p, 0.0) for p, s in now.items()), 0.0) / shares.wall_seconds)
        shares.postgres = sum(self.nodes)
        return shares


class Side:
    """One database and the server in front of it."""

    def __init__(self, name: str, db: PlainNode | Cluster, log_dir: Path, config: BenchConfig) -> None:
        self.name = name
        self.db = db
        self.server = ServiceProcess.interactions_server(db.url, log_dir / name)
        self.config = config
        self.last_nodes: list[float] = []

    def bench(self) -> measures.Bench:
        side = self

        class _Bench(measures.Bench):
            def meter(self, server_pid: int | None = None) -> CpuMeter:
                pids = side.db.postmaster_pids
                meter = NodesMeter(server_pid or self.server.pid, pids[0] if pids else os.getpid(), pids=pids)
                side.meters.append(meter)
                return meter

        self.meters: list[NodesMeter] = []
        return _Bench(self.config, self.db, self.server, self.server.log_path.parent, _progress)  # type: ignore[arg-type]


@dataclass(slots=True)
class Run:
    side: str
    measure: str
    rate: float  # events/s or calls/s; GetCart: calls/s
    cores_server: float
    cores_postgres: float
    cores_nodes: list[float]
    cores_other: float  # noise: other processes of the machine
    load_before: float
    load_after: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    problems: int = 0


def _cart_events(users: Sequence[str]) -> Iterator[Event]:
    rnd = random.Random(3)
    for user in users:
        for _ in range(4):
            e = Event(event_type=STANDARD["add_to_cart"].event_type, user_id=user, event_value=1)  # type: ignore[arg-type]
            e.product_id = f"sku-{rnd.randrange(PRODUCTS)}"
            yield e


async def getcart_run(side: Side, calls: int) -> tuple[float, list[float]]:
    """`calls` sequential GetCart calls through the server, over users with a cart; (calls/s, latencies)."""
    users = [f"user-{i}" for i in range(0, USERS, USERS // 200)]
    async with InteractionsClient(side.server.target) as client:
        await client.log_many(list(_cart_events(users)))
        for user in users[:20]:  # warm
            await client.get_cart(user)
        latencies = []
        started = time.perf_counter()
        for i in range(calls):
            t = time.perf_counter()
            await client.get_cart(users[i % len(users)])
            latencies.append(time.perf_counter() - t)
        return calls / (time.perf_counter() - started), sorted(latencies)


async def db_getcart_run(side: Side, calls: int) -> tuple[float, list[float]]:
    """GetCart at the database: `calls` sequential storage.fetch_cart calls on
    a pool of the server's kind (on the cluster: the person resolved on the
    coordinator, then the router query), for the users getcart_run filled."""
    from interactions_server import storage

    users = [f"user-{i}" for i in range(0, USERS, USERS // 200)]
    pool = await storage.open_pool(
        side.db.url, min_size=1, max_size=1, statement_cache_size=100, citus=side.name == "citus"
    )
    try:
        for user in users[:20]:  # warm: statements prepared
            await storage.fetch_cart(pool, user)
        latencies = []
        started = time.perf_counter()
        for i in range(calls):
            t = time.perf_counter()
            await storage.fetch_cart(pool, users[i % len(users)])
            latencies.append(time.perf_counter() - t)
        return calls / (time.perf_counter() - started), sorted(latencies)
    finally:
        await pool.close()


def _record(side: Side, name: str, result: measures.Throughput, load_before: float) -> Run:
    meter = side.meters[-1]
    cpu = result.cpu
    return Run(side.name, name, result.rate, cpu.server, cpu.postgres, list(meter.nodes), cpu.other, load_before,
               os.getloadavg()[0], problems=result.problems)  # fmt: skip


async def run_pair(sides: Sequence[Side], args: argparse.Namespace, pair: int) -> list[Run]:
    runs: list[Run] = []
    order = list(sides) if pair % 2 == 0 else list(reversed(sides))
    for side in order:
        bench = side.bench()
        load = os.getloadavg()[0]
        result, _ = await measures.stream_run(bench, label=f"{side.name} bulk", seed=500 + pair, events=args.events)
        runs.append(_record(side, "bulk", result, load))
    for side in order:
        bench = side.bench()
        load = os.getloadavg()[0]
        _, result = await measures.unary_run(bench, side.server, label=f"{side.name} unary", seed=600 + pair,
                                             calls=args.calls)  # fmt: skip
        runs.append(_record(side, "unary", result, load))
    for side in order:
        bench = side.bench()
        meter = bench.meter()
        load = os.getloadavg()[0]
        meter.start()
        rate, latencies = await getcart_run(side, args.getcart)
        cpu = meter.stop(0.0)
        p50, p99 = measures.percentile(latencies, 0.5), measures.percentile(latencies, 0.99)
        runs.append(Run(side.name, "getcart", rate, cpu.server, cpu.postgres, list(side.meters[-1].nodes), cpu.other,
                        load, os.getloadavg()[0], p50 * 1000, p99 * 1000))  # fmt: skip
        _progress(f"{side.name} GetCart: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    for side in order:
        load = os.getloadavg()[0]
        rate, latencies = await db_getcart_run(side, args.getcart)
        p50, p99 = measures.percentile(latencies, 0.5), measures.percentile(latencies, 0.99)
        runs.append(Run(side.name, "dbcart", rate, 0.0, 0.0, [], 0.0, load, os.getloadavg()[0], p50 * 1000, p99 * 1000))
        _progress(f"{side.name} GetCart at the database: p50 {p50 * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms")
    return runs


def report(runs: Sequence[Run], pairs: int) -> str:
    lines = ["measure  side     " + "  ".join(f"pair {i + 1:<14}" for i in range(pairs))]
    for measure in ("bulk", "unary", "getcart", "dbcart"):
        for side in ("plain", "citus"):
            cells = []
            for run in (r for r in runs if r.measure == measure and r.side == side):
                figure = f"p99 {run.p99_ms:.2f} ms" if run.p99_ms is not None else f"{run.rate:,.0f}/s"
                cells.append(f"{figure} (other {run.cores_other:.2f})")
            lines.append(f"{measure:8} {side:8} " + "  ".join(f"{c:<19}" for c in cells))
        plain = [r for r in runs if r.measure == measure and r.side == "plain"]
        citus = [r for r in runs if r.measure == measure and r.side == "citus"]
        if measure in ("getcart", "dbcart"):
            ratios = [c.p99_ms / p.p99_ms for p, c in zip(plain, citus, strict=True) if p.p99_ms and c.p99_ms]
            lines.append(f"{'':8} p99 citus/plain per pair: " + ", ".join(f"{x:.2f}" for x in ratios))
        else:
            ratios = [c.rate / p.rate for p, c in zip(plain, citus, strict=True)]
            lines.append(f"{'':8} citus/plain per pair: " + ", ".join(f"{x:.2f}" for x in ratios))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Run]:
    directory = Path(tempfile.mkdtemp(prefix="interactions-bench-citus-"))
    log_dir = directory / "logs"
    plain = PlainNode(directory)
    cluster = Cluster(directory, args.shards, args.citus_url)
    config = replace(BenchConfig(), batch_size=args.batch_size)
    sides: list[Side] = []
    try:
        _progress("starting plain PostgreSQL and the Citus cluster")
        plain.start()
        cluster.start()
        from interactions_server.storage import migrate

        await migrate(plain.url)
        for line in await distribute(ServerConfig(), cluster.url, None):
            _progress(f"citus: {line}")
        for name, db in (("plain", plain), ("citus", cluster)):
            (log_dir / name).mkdir(parents=True, exist_ok=True)
            side = Side(name, db, log_dir, config)
            await side.server.start()
            sides.append(side)
        for side in sides:  # warm: pools full, statements prepared
            await measures.warm_up(side.bench())
        runs: list[Run] = []
        for pair in range(args.pairs):
            runs += await run_pair(sides, args, pair)
            await database.reset_log(plain.url)
            await database.reset_log(cluster.url)
        return runs
    finally:
        for side in sides:
            await side.server.stop()
        cluster.stop()
        plain.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.citus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--events", type=int, default=50_000, help="events of each bulk run")
    parser.add_argument("--calls", type=int, default=5_000, help="LogEvent calls of each unary run")
    parser.add_argument("--getcart", type=int, default=2_000, help="GetCart calls of each latency run")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="the streamer's batch_size")
    parser.add_argument("--citus-url", help="a running cluster's coordinator instead of starting one")
    parser.add_argument("--json", type=Path, help="also write every run as JSON lines here")
    args = parser.parse_args(argv)
    _progress(f"load average before: {os.getloadavg()}; machine CPU: {MachineCpu.read()}")
    runs = asyncio.run(main_async(args))
    print(report(runs, args.pairs))
    if args.json:
        args.json.write_text("".join(json.dumps(asdict(r)) + "\n" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
