"""The measures (a)-(g). Each returns its figures; report.py turns them into rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import database
from bench.config import BenchConfig
from bench.load import LoadOutcome, LoadResult, LoadRun, StreamJob, UnaryJob, client_processes, split
from bench.pg_waits import PgWaitSampler, WaitSummary
from bench.proc_stats import CpuMeter, CpuShares, RssSampler, RssSamples
from bench.profiling import ProfileSummary, PySpyRecording, summarise
from bench.services import ServiceProcess
from bench.workload import log_row, stream_events

Progress = Callable[[str], None]

# Seeds per measure: the ceiling copies exactly the events of (b).
SEED_BULK, SEED_UNARY_CEILING, SEED_UNARY, SEED_LATENCY, SEED_MEMORY, SEED_GROWTH, SEED_FANOUT, SEED_WARMUP = range(8)
SEED_BUSY_BULK, SEED_BUSY_UNARY = 8, 9
SEED_INLINE_BULK, SEED_INLINE_UNARY, SEED_INLINE_MAX = 10, 11, 12


@dataclass(slots=True)
class Bench:
    """What the measures share: the configuration, the database and the server."""

    config: BenchConfig
    db: database.EmbeddedDatabase
    server: ServiceProcess
    log_dir: Path
    progress: Progress
    profiles: dict[str, Profile] = field(default_factory=dict)  # by name, with --profile

    @property
    def url(self) -> str:
        return self.db.url

    def seed(self, offset: int) -> int:
        return self.config.seed * 100 + offset

    def meter(self, server_pid: int | None = None) -> CpuMeter:
        return CpuMeter(server_pid or self.server.pid, self.db.postmaster_pid)

    def load_timeout(self, units: int) -> float:
        return 180.0 + units / 500  # generous: the run is bounded either way


@dataclass(slots=True)
class Throughput:
    """A run of `count` events or calls in `seconds`."""

    count: int
    seconds: float
    cpu: CpuShares
    problems: int = 0  # rejected, failed or erroring events/calls: any makes the figure void
    errors: list[str] = field(default_factory=list)
    processes: int = 1
    rates: list[float] = field(default_factory=list)  # every repetition's rate (best_of keeps the best run)
    wal_bytes: int = 0  # WAL written during the run
    with_keys: bool = False  # (a): the COPY wrote the keys (event_keys) too

    @property
    def rate(self) -> float:
        return self.count / self.seconds


async def best_of(times: int, run: Callable[[int], Awaitable[Throughput]]) -> Throughput:
    """Runs `run(repetition)` `times` times and keeps the fastest run: on a
    shared machine, noise only ever slows a run down."""
    runs = [await run(repetition) for repetition in range(max(times, 1))]
    best = max(runs, key=lambda r: r.rate if not r.problems else -1.0)
    best.rates = [r.rate for r in runs]
    best.problems = max(r.problems for r in runs)
    best.errors = [e for r in runs for e in r.errors][:3]
    return best


@dataclass(slots=True)
class Latency:
    rate: float  # calls/s offered
    achieved: float  # calls/s answered
    p50: float  # seconds, from the scheduled start of each call
    p99: float
    p999: float
    service_p50: float  # seconds, from the actual send
    service_p99: float
    throughput: Throughput


@dataclass(slots=True)
class Memory:
    throughput: Throughput
    rss: RssSamples


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def _throughput(outcome: LoadOutcome, cpu: CpuShares, processes: int) -> Throughput:
    return Throughput(outcome.events, outcome.seconds, cpu, outcome.problems, outcome.first_errors(), processes)


def _job_throughput(result: LoadResult, cpu: CpuShares) -> Throughput:
    """One job of a run of several, on its own clock (the CPU is the whole run's)."""
    problems = result.rejected + result.failed + result.duplicate
    return Throughput(result.events, max(result.finished - result.started, 1e-9), cpu, problems, result.errors[:3])


# --- (a) -------------------------------------------------------------------------


async def ceiling(bench: Bench) -> tuple[Throughput, Throughput]:
    """COPY of the events of (b), converted to rows before the clock starts:
    into tables like the log and its key index (the ceiling), and into a
    table like the log alone (for reference). Best of --repeat runs each."""
    n = bench.config.events
    bench.progress(f"(a) making {n:,} rows for the COPY ceiling")
    rows = [log_row(e) for e in stream_events(bench.seed(SEED_BULK), 0, 1, n, time.time())]
    times = bench.config.repeat
    with_keys = await best_of(times, lambda _: _copy(bench, rows, with_keys=True))
    events_only = await best_of(times, lambda _: _copy(bench, rows, with_keys=False))
    return with_keys, events_only


async def _copy(bench: Bench, rows: list[dict[str, Any]], *, with_keys: bool) -> Throughput:
    n = len(rows)
    async with database.CeilingTable(bench.url, with_keys=with_keys) as table:
        records = table.records(rows)
        meter = bench.meter()
        wal = await database.wal_position(bench.url)
        meter.start()
        started = time.monotonic()
        await table.copy(records)
        seconds = time.monotonic() - started
        cpu = meter.stop(0.0)  # the copying process is this one
        written = await database.wal_position(bench.url) - wal
        if (copied := await table.count()) != n:
            raise RuntimeError(f"the ceiling copied {copied} rows of {n}")
        what = "the log's table and keys" if table.with_keys else "the log's table"
    bench.progress(f"(a) COPY into {what}: {n / seconds:,.0f} rows/s ({seconds:.1f} s)")
    result = Throughput(n, seconds, cpu, with_keys=table.with_keys)
    result.wal_bytes = written
    return result


# --- (b), (e), (f), (g) ------------------------------------------------------------


async def stream_run(
    bench: Bench,
    *,
    label: str,
    seed: int,
    events: int,
    streams: int = 1,
    processes: int = 1,
    reset: bool = True,
    lazy: bool = False,
    sample_rss: bool = False,
    profile: str | None = None,
    beside: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Throughput, RssSamples | None]:
    """A bulk run of `events` events; `beside` is awaited the instant before its clock starts."""
    base_time = time.time()
    jobs: list[StreamJob | UnaryJob] = [
        StreamJob(
            bench.server.target,
            seed,
            group,
            streams,
            events,
            base_time,
            lazy,
            bench.config.batch_size,
            own_connections=bench.config.connections > 1,
            validate=bench.config.prevalidate,
        )
        for group in split(streams, processes)
    ]
    bench.progress(f"{label}: {events:,} events, {streams} stream(s) in {processes} client process(es)")
    rss: RssSamples | None = None
    profiler = Profiler(bench, profile)
    async with LoadRun(jobs, timeout=bench.load_timeout(events)) as run:
        if reset:
            await database.reset_log(bench.url)
        meter = bench.meter()
        sampler = RssSampler(bench.server.pid)
        wal = await database.wal_position(bench.url)
        async with sampler, profiler:
            if beside is not None:
                await beside()
            meter.start()
            outcome = await run.go()
            cpu = meter.stop(outcome.cpu_seconds)
        written = await database.wal_position(bench.url) - wal
        if sample_rss:
            rss = sampler.result()
    result = _throughput(outcome, cpu, processes)
    result.wal_bytes = written
    bench.progress(f"{label}: {result.rate:,.0f} events/s ({result.seconds:.1f} s)")
    return result, rss


async def bulk(bench: Bench) -> Throughput:
    async def run(repetition: int) -> Throughput:
        result, _ = await stream_run(
            bench,
            label="(b) bulk",
            seed=bench.seed(SEED_BULK),
            events=bench.config.events,
            profile="b-bulk" if repetition == 0 else None,
        )
        return result

    return await best_of(bench.config.repeat, run)


async def memory(bench: Bench) -> Memory:
    n = bench.config.memory_events
    result, rss = await stream_run(
        bench, label="(e) memory", seed=bench.seed(SEED_MEMORY), events=n, lazy=True, sample_rss=True
    )
    assert rss is not None
    return Memory(result, rss)


async def growth(bench: Bench) -> tuple[Throughput, float]:
    """Bulk throughput with `preload` rows in the log; also returns the preload's seconds."""
    n = bench.config.preload
    await database.reset_log(bench.url)
    bench.progress(f"(f) preloading {n:,} rows")
    seconds = await database.preload(bench.url, n, bench.progress)

    async def run(repetition: int) -> Throughput:  # without a reset: each repetition adds `events` rows
        result, _ = await stream_run(
            bench,
            label=f"(f) bulk after {n:,} rows",
            seed=bench.seed(SEED_GROWTH) * 100 + repetition,
            events=bench.config.events,
            reset=False,
        )
        return result

    return await best_of(bench.config.repeat, run), seconds


async def fanout(bench: Bench) -> dict[int, Throughput]:
    results: dict[int, Throughput] = {}
    for streams in bench.config.fanout:
        processes = client_processes(streams, bench.config.client_processes)

        async def run(repetition: int, streams: int = streams, processes: int = processes) -> Throughput:
            result, _ = await stream_run(
                bench,
                label=f"(g) {streams} stream(s)",
                seed=bench.seed(SEED_FANOUT) * 100 + streams,
                events=bench.config.events,
                streams=streams,
                processes=processes,
            )
            return result

        results[streams] = await best_of(bench.config.repeat, run)
    return results


async def warm_up(bench: Bench) -> None:
    """A short multi-stream run and some unary calls, so that the server's pool is
    full and its statements prepared before anything is measured."""
    await stream_run(bench, label="warm-up", seed=bench.seed(SEED_WARMUP), events=4_000, streams=4, processes=1)
    await unary_run(bench, bench.server, label="warm-up", seed=bench.seed(SEED_WARMUP) + 1, calls=640)


# --- (c), (d) ----------------------------------------------------------------------


async def unary_run(
    bench: Bench,
    service: ServiceProcess,
    *,
    label: str,
    seed: int,
    calls: int,
    rate: float | None = None,
    profile: str | None = None,
) -> tuple[LoadOutcome, Throughput]:
    config = bench.config
    processes = config.unary_processes
    callers = [len(group) for group in split(config.callers, processes)]
    base_time = time.time()
    jobs: list[StreamJob | UnaryJob] = [
        UnaryJob(
            service.target,
            seed,
            i,
            processes,
            calls,
            callers[i],
            base_time,
            None if rate is None else rate / processes,
            connections=config.connections,
        )
        for i in range(processes)
    ]
    mode = "closed loop" if rate is None else f"open loop at {rate:,.0f} calls/s"
    bench.progress(f"{label}: {calls:,} LogEvent calls, {config.callers} callers, {mode}")
    async with LoadRun(jobs, timeout=bench.load_timeout(calls * 10)) as run:
        if service is bench.server:
            await database.reset_log(bench.url)
        meter = bench.meter(service.pid)
        profiler = Profiler(bench, profile)
        wal = await database.wal_position(bench.url)
        async with profiler:
            meter.start()
            outcome = await run.go()
            cpu = meter.stop(outcome.cpu_seconds)
        written = await database.wal_position(bench.url) - wal
    result = _throughput(outcome, cpu, processes)
    result.wal_bytes = written
    bench.progress(f"{label}: {result.rate:,.0f} calls/s ({result.seconds:.1f} s)")
    return outcome, result


async def rpc_ceiling(bench: Bench) -> Throughput:
    noop = ServiceProcess.noop_server(bench.log_dir)
    await noop.start()
    try:
        await unary_run(bench, noop, label="(c) warm-up", seed=bench.seed(SEED_WARMUP) + 2, calls=640)

        async def run(repetition: int) -> Throughput:
            seed, calls = bench.seed(SEED_UNARY_CEILING), bench.config.unary_calls
            return (await unary_run(bench, noop, label="(c) RPC ceiling", seed=seed, calls=calls))[1]

        return await best_of(bench.config.repeat, run)
    finally:
        await noop.stop()


async def unary(bench: Bench) -> Throughput:
    async def run(repetition: int) -> Throughput:
        _, result = await unary_run(
            bench,
            bench.server,
            label="(d) LogEvent",
            seed=bench.seed(SEED_UNARY),
            calls=bench.config.unary_calls,
            profile="d-unary" if repetition == 0 else None,
        )
        return result

    return await best_of(bench.config.repeat, run)


async def latency(bench: Bench, max_rate: float) -> Latency:
    rate = 0.5 * max_rate
    outcome, result = await unary_run(
        bench,
        bench.server,
        label="(d) latency",
        seed=bench.seed(SEED_LATENCY),
        calls=bench.config.latency_calls,
        rate=rate,
    )
    latencies, service = outcome.latencies(), outcome.service_times()
    return Latency(
        rate,
        result.rate,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        percentile(latencies, 0.999),
        percentile(service, 0.5),
        percentile(service, 0.99),
        result,
    )


# --- (k) --------------------------------------------------------------------------


@dataclass(slots=True)
class BusyLatency:
    """(k): LogEvent at a steady rate while one bulk stream runs at full speed,
    each from a load process of its own. Only the calls scheduled while the
    stream ran count."""

    rate: float  # calls/s offered
    calls: int  # answered calls scheduled while the stream ran (the percentiles' sample)
    p50: float  # seconds, from the scheduled start of each call
    p99: float
    max: float
    service_p99: float  # seconds, from the actual send
    bulk: Throughput  # the stream during it
    unary: Throughput  # every call of the run (its problems void the figure)


async def busy_latency(bench: Bench) -> BusyLatency:
    config = bench.config
    base_time = time.time()
    stream = StreamJob(
        bench.server.target,
        bench.seed(SEED_BUSY_BULK),
        (0,),
        1,
        config.busy_events,
        base_time,
        batch_size=config.batch_size,
        own_connections=config.connections > 1,
        validate=config.prevalidate,
    )
    unary = UnaryJob(
        bench.server.target,
        bench.seed(SEED_BUSY_UNARY),
        0,
        1,
        config.busy_calls,
        1,
        base_time,
        config.busy_rate,
        connections=config.connections,
    )
    bench.progress(
        f"(k) {config.busy_calls:,} LogEvent calls at {config.busy_rate:,.0f} calls/s "
        f"during a {config.busy_events:,}-event stream"
    )
    async with LoadRun([stream, unary], timeout=bench.load_timeout(config.busy_events)) as run:
        await database.reset_log(bench.url)
        meter = bench.meter()
        wal = await database.wal_position(bench.url)
        async with Profiler(bench, "k-busy"):
            meter.start()
            outcome = await run.go()
            cpu = meter.stop(outcome.cpu_seconds)
        written = await database.wal_position(bench.url) - wal
    streamed, called = outcome.results
    bulk = _job_throughput(streamed, cpu)
    bulk.wal_bytes = written
    calls = _job_throughput(called, cpu)
    during = [
        (latency, service)
        for due, latency, service in zip(called.due_times, called.latencies, called.service_times, strict=True)
        if streamed.started <= due <= streamed.finished
    ]
    latencies = sorted(latency for latency, _ in during)
    service = sorted(s for _, s in during)
    result = BusyLatency(
        config.busy_rate,
        len(during),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[-1] if latencies else float("nan"),
        percentile(service, 0.99),
        bulk,
        calls,
    )
    bench.progress(
        f"(k) p99 {result.p99 * 1000:.1f} ms over {result.calls} calls; the stream ran at {bulk.rate:,.0f} events/s"
    )
    return result


# --- (k2) -------------------------------------------------------------------------


@dataclass(slots=True)
class CallLatency:
    """Open-loop LogEvent calls: latency from each call's scheduled start."""

    calls: int  # the calls counted (for "beside": those scheduled while the stream ran)
    p50: float
    p99: float
    max: float
    run: Throughput  # every call of the run (its problems void the figure)


@dataclass(slots=True)
class InlineLatency:
    """(k2) for one server set-up: LogEvent at a quarter of its own maximum,
    alone and beside one full-speed stream, and the stream alone and beside."""

    workers: int
    connections: int
    max_rate: float  # closed-loop LogEvent calls/s, the same set-up
    rate: float  # offered
    alone: CallLatency
    beside: CallLatency
    stream_solo: Throughput
    stream_beside: Throughput


def _latency_of(result: LoadResult, run: Throughput, window: tuple[float, float] | None = None) -> CallLatency:
    due = result.due_times
    latencies = sorted(
        latency
        for when, latency in zip(due, result.latencies, strict=True)
        if window is None or window[0] <= when <= window[1]
    )
    return CallLatency(
        len(latencies),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[-1] if latencies else float("nan"),
        run,
    )


async def _k2_run(
    bench: Bench, service: ServiceProcess, jobs: list[StreamJob | UnaryJob], label: str
) -> tuple[LoadOutcome, CpuShares]:
    bench.progress(label)
    async with LoadRun(jobs, timeout=bench.load_timeout(bench.config.busy_events)) as run:
        await database.reset_log(bench.url)
        meter = bench.meter(service.pid)
        meter.start()
        outcome = await run.go()
        cpu = meter.stop(outcome.cpu_seconds)
    return outcome, cpu


async def inline_latency(
    bench: Bench, unary_max: Throughput | None, bulk_solo: Throughput | None
) -> list[InlineLatency]:
    """(k2) with one worker and one client connection (the main server; the
    maxima of (d) and (b) when they ran), then with each other --workers of
    the configuration and as many client connections (a server of its own)."""
    results = []
    for workers in bench.config.inline_workers:
        if workers == bench.config.workers:
            server, connections = bench.server, bench.config.connections
            results.append(await _inline(bench, server, workers, connections, unary_max, bulk_solo))
            continue
        service = ServiceProcess.interactions_server(
            bench.url, bench.log_dir, workers=workers, extra=bench.config.server_args, name=f"server-{workers}w"
        )
        bench.progress(f"(k2) starting {' '.join(service.command)}")
        await service.start()
        try:
            results.append(await _inline(bench, service, workers, workers, None, None))
        finally:
            await service.stop()
    return results


async def _inline(
    bench: Bench,
    service: ServiceProcess,
    workers: int,
    connections: int,
    unary_max: Throughput | None,
    bulk_solo: Throughput | None,
) -> InlineLatency:
    config = bench.config
    where = f"(k2) {workers} worker(s), {connections} connection(s)"
    base_time = time.time()

    def stream_job(seed: int) -> StreamJob:
        return StreamJob(
            service.target,
            bench.seed(seed),
            (0,),
            1,
            config.busy_events,
            base_time,
            batch_size=config.batch_size,
            own_connections=connections > 1,
            validate=config.prevalidate,
        )

    def unary_job(seed: int, calls: int, callers: int, rate: float | None) -> UnaryJob:
        return UnaryJob(
            service.target, bench.seed(seed), 0, 1, calls, callers, base_time, rate, connections=connections
        )

    if unary_max is None or bulk_solo is None:
        outcome, _ = await _k2_run(
            bench, service, [unary_job(SEED_INLINE_MAX, config.unary_calls, config.callers, None)], f"{where}: maximum"
        )
        max_rate = outcome.rate
        outcome, cpu = await _k2_run(bench, service, [stream_job(SEED_INLINE_BULK)], f"{where}: the stream alone")
        stream_solo = _job_throughput(outcome.results[0], cpu)
    else:
        max_rate, stream_solo = unary_max.rate, bulk_solo
    rate = config.inline_share * max_rate
    # Calls for twice the stream's solo time: the stream beside them is slower.
    seconds = 2 * config.busy_events / max(stream_solo.rate, 1.0)
    calls = max(200, int(rate * seconds))
    bench.progress(f"{where}: maximum {max_rate:,.0f} calls/s, so {rate:,.0f} calls/s; {calls:,} calls alone")
    outcome, cpu = await _k2_run(bench, service, [unary_job(SEED_INLINE_UNARY, calls, 1, rate)], f"{where}: alone")
    alone = _latency_of(outcome.results[0], _job_throughput(outcome.results[0], cpu))
    outcome, cpu = await _k2_run(
        bench,
        service,
        [stream_job(SEED_INLINE_BULK), unary_job(SEED_INLINE_UNARY + 100, calls, 1, rate)],
        f"{where}: beside a {config.busy_events:,}-event stream",
    )
    streamed, called = outcome.results
    beside = _latency_of(called, _job_throughput(called, cpu), (streamed.started, streamed.finished))
    stream_beside = _job_throughput(streamed, cpu)
    bench.progress(
        f"{where}: p99 alone {alone.p99 * 1000:.1f} ms, beside {beside.p99 * 1000:.1f} ms; "
        f"the stream {stream_beside.rate:,.0f} events/s beside, {stream_solo.rate:,.0f} alone"
    )
    return InlineLatency(workers, connections, max_rate, rate, alone, beside, stream_solo, stream_beside)


# --- profiling ---------------------------------------------------------------------


@dataclass(slots=True)
class Profile:
    """Where the time went during a profiled measure."""

    python: ProfileSummary | None  # py-spy samples of the server process
    database: WaitSummary  # pg_stat_activity samples of the server's backends

    def render(self, title: str) -> str:
        python = self.python.render(f"{title}, server process (py-spy)") if self.python else "(no py-spy profile)"
        return f"{python}\n\n{self.database.render(f'{title}, database')}\n"


class Profiler:
    """py-spy on the server process and pg_stat_activity sampling while the block runs
    (nothing when `name` is None or --profile is off); `profile` is set at exit."""

    def __init__(self, bench: Bench, name: str | None) -> None:
        self.directory = bench.config.profile_dir if name is not None else None
        self.name = name or ""
        self.profile: Profile | None = None
        self._stack = contextlib.AsyncExitStack()
        self._bench = bench
        self._waits: PgWaitSampler | None = None

    async def __aenter__(self) -> Profiler:
        if self.directory is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        await self._stack.enter_async_context(PySpyRecording(self._bench.server.pid, self._raw_path))
        self._waits = await self._stack.enter_async_context(PgWaitSampler(self._bench.url))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()
        if self.directory is None or self._waits is None:
            return
        python = summarise(self._raw_path.read_text()) if self._raw_path.exists() else None
        if python is None:
            self._bench.progress(f"py-spy wrote no {self._raw_path}; see {self._raw_path.with_suffix('.log')}")
        self.profile = Profile(python, self._waits.summary())
        self._bench.profiles[self.name] = self.profile
        summary_path = self.directory / f"{self.name}-summary.txt"
        summary_path.write_text(self.profile.render(self.name))
        self._bench.progress(f"profile summary: {summary_path}")

    @property
    def _raw_path(self) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.name}.txt"
