"""Client load in child processes, so that the orchestrating process stays
idle and a client can be spread over several processes when one cannot keep
up. Every child prepares its events first, reports ready, waits for the
common go signal, then runs and returns a LoadResult.

    async with LoadRun([job, ...]) as run:   # children started and ready
        ...                                  # e.g. reset the log, start meters
        outcome = await run.go(timeout)      # runs; outcome.seconds from go to the last finish
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import Any

from bench.workload import check_valid, stream_events
from interactions_client import InteractionsClient, InteractionsError
from interactions_client.results import Rejection
from interactions_client.v1.event_pb2 import Event

# gRPC shares one connection between channels of a process that have the
# same target and options (its global subchannel pool); this option opts out.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True, slots=True)
class StreamJob:
    """Streams `streams` (indices of `stream_count`) of a `total_events` workload,
    each through its own InteractionsClient(...).stream()."""

    target: str
    seed: int
    streams: tuple[int, ...]
    stream_count: int
    total_events: int
    base_time: float
    lazy: bool = False  # make events while sending (long runs) instead of before the go
    batch_size: int | None = None  # None: the streamer's default
    own_connections: bool = False  # a TCP connection per stream rather than one shared by the process
    validate: bool = True  # the client pre-validates each event (InteractionsClient's default)


@dataclass(frozen=True, slots=True)
class UnaryJob:
    """`calls` LogEvent calls by `callers` concurrent callers on one client:
    as fast as answered (rate None, closed loop) or started at `rate` calls/s
    whatever the answers (open loop)."""

    target: str
    seed: int
    worker: int
    workers: int
    total_calls: int  # of all workers; this one makes its share
    callers: int
    base_time: float
    rate: float | None = None
    connections: int = 1  # clients (each its own TCP connection when > 1) the callers are spread over


Job = StreamJob | UnaryJob


@dataclass(slots=True)
class LoadResult:
    """What one child did between the go signal and its end."""

    started: float  # time.monotonic() (one clock for every process of the machine)
    finished: float
    cpu_seconds: float
    events: int = 0  # sent by the streamer, or calls made
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # open loop: from the scheduled start, seconds
    service_times: list[float] = field(default_factory=list)  # open loop: from the actual send, seconds
    due_times: list[float] = field(default_factory=list)  # open loop: each answered call's scheduled start


@dataclass(slots=True)
class LoadOutcome:
    results: list[LoadResult]
    go_time: float

    @property
    def finished(self) -> float:
        return max(r.finished for r in self.results)

    @property
    def seconds(self) -> float:
        return max(self.finished - self.go_time, 1e-9)

    @property
    def events(self) -> int:
        return sum(r.events for r in self.results)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.results)

    @property
    def problems(self) -> int:
        """Events or calls that did not end as new, accepted writes (the workload's events are all new)."""
        return sum(r.rejected + r.failed + r.duplicate for r in self.results)

    @property
    def cpu_seconds(self) -> float:
        return sum(r.cpu_seconds for r in self.results)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def first_errors(self, limit: int = 3) -> list[str]:
        return [e for r in self.results for e in r.errors][:limit]

    def latencies(self) -> list[float]:
        return sorted(x for r in self.results for x in r.latencies)

    def service_times(self) -> list[float]:
        return sorted(x for r in self.results for x in r.service_times)


# --- the child side ------------------------------------------------------------


def _child_main(
    job: Job, position: int, ready: Any, go: multiprocessing.synchronize.Event, results: Any, timeout: float
) -> None:
    try:
        result = asyncio.run(_run_job(job, ready, go, timeout))
        results.put((position, result))
    except BaseException:
        results.put((position, traceback.format_exc()))
        ready.put("failed")


async def _run_job(job: Job, ready: Any, go: multiprocessing.synchronize.Event, wait_limit: float) -> LoadResult:
    if isinstance(job, StreamJob):
        return await _run_streams(job, ready, go, wait_limit)
    return await _run_unary(job, ready, go, wait_limit)


async def _wait_for_go(ready: Any, go: multiprocessing.synchronize.Event, wait_limit: float) -> tuple[float, float]:
    ready.put("ready")
    if not await asyncio.to_thread(go.wait, wait_limit):
        raise TimeoutError("no go signal")
    return time.monotonic(), time.process_time()


async def _run_streams(
    job: StreamJob, ready: Any, go: multiprocessing.synchronize.Event, wait_limit: float
) -> LoadResult:
    def events_of(stream: int) -> Iterable[Event]:
        events = stream_events(job.seed, stream, job.stream_count, job.total_events, job.base_time)
        if job.lazy:  # check a sample made the same way (validity does not depend on the count)
            check_valid(list(islice(stream_events(job.seed, stream, job.stream_count, 2_000, job.base_time), 2_000)))
            return events
        made = list(events)
        check_valid(made)
        return made

    workloads = [events_of(stream) for stream in job.streams]
    options = OWN_CONNECTION if job.own_connections else ()
    clients = [InteractionsClient(job.target, options=options, validate=job.validate) for _ in job.streams]
    try:
        for client in clients:  # connect before the clock starts
            await client.health()
        started, cpu = await _wait_for_go(ready, go, wait_limit)
        async with asyncio.timeout(wait_limit):
            totals = await asyncio.gather(
                *(_stream(c, w, job.batch_size) for c, w in zip(clients, workloads, strict=True))
            )
        result = LoadResult(started, time.monotonic(), time.process_time() - cpu)
    finally:
        for client in clients:
            await client.close()
    for sent, accepted, duplicate, rejected, failed, errors in totals:
        result.events += sent
        result.accepted += accepted
        result.duplicate += duplicate
        result.rejected += rejected
        result.failed += failed
        result.errors.extend(errors)
    return result


async def _stream(
    client: InteractionsClient, events: Iterable[Event], batch_size: int | None
) -> tuple[int, int, int, int, int, list[str]]:
    errors: list[str] = []

    def rejected(rejection: Rejection) -> None:
        errors.append(f"rejected: {rejection.violations}")

    if batch_size is None:  # the streamer's own default
        streamer = client.stream(raise_on_failure=False, on_rejected=rejected)
    else:
        streamer = client.stream(raise_on_failure=False, on_rejected=rejected, batch_size=batch_size)
    async with streamer:
        for event in events:
            await streamer.send(event)
    t = streamer.totals
    if t.failed:
        errors.append(f"{t.failed} events failed: {streamer.undelivered[0] if streamer.undelivered else ''}")
    return t.sent, t.accepted, t.duplicate, t.rejected, t.failed, errors[:3]


async def _run_unary(job: UnaryJob, ready: Any, go: multiprocessing.synchronize.Event, wait_limit: float) -> LoadResult:
    events = list(stream_events(job.seed, job.worker, job.workers, job.total_calls, job.base_time))
    check_valid(events)
    options = OWN_CONNECTION if job.connections > 1 else ()
    clients = [InteractionsClient(job.target, options=options) for _ in range(job.connections)]
    try:
        for client in clients:
            await client.health()  # connect before the clock starts
        started, cpu = await _wait_for_go(ready, go, wait_limit)
        result = LoadResult(started, 0.0, 0.0, events=len(events))
        async with asyncio.timeout(wait_limit):
            if job.rate is None:
                await _closed_loop(clients, iter(events), job.callers, result)
            else:
                await _open_loop(clients, events, job.rate, result)
        result.finished = time.monotonic()
        result.cpu_seconds = time.process_time() - cpu
    finally:
        for client in clients:
            await client.close()
    return result


async def _log(client: InteractionsClient, event: Event, result: LoadResult) -> bool:
    try:
        logged = await client.log(event)
    except InteractionsError as error:
        result.failed += 1
        if len(result.errors) < 3:
            result.errors.append(f"{type(error).__name__}: {error}")
        return False
    if logged.duplicate:
        result.duplicate += 1
    else:
        result.accepted += 1
    return True


async def _closed_loop(
    clients: list[InteractionsClient], events: Iterator[Event], callers: int, result: LoadResult
) -> None:
    async def caller(client: InteractionsClient) -> None:
        for event in events:  # shared: each event is taken by one caller
            await _log(client, event, result)

    await asyncio.gather(*(caller(clients[i % len(clients)]) for i in range(callers)))


async def _open_loop(clients: list[InteractionsClient], events: list[Event], rate: float, result: LoadResult) -> None:
    """Starts call i at start + i / rate, however long earlier calls take (so
    as many calls are in flight as the latency needs)."""

    async def timed(client: InteractionsClient, event: Event, due: float) -> None:
        sent = time.monotonic()
        if await _log(client, event, result):
            done = time.monotonic()
            result.latencies.append(done - due)
            result.service_times.append(done - sent)
            result.due_times.append(due)

    start = time.monotonic()
    calls: list[asyncio.Task[None]] = []
    for i, event in enumerate(events):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(timed(clients[i % len(clients)], event, due)))
    await asyncio.gather(*calls)


# --- the parent side -----------------------------------------------------------


class LoadRun:
    """Starts one child per job and waits until each is ready (events made,
    connected); `go()` starts them all at once and collects their results."""

    def __init__(self, jobs: list[Job], *, timeout: float) -> None:
        self.jobs = jobs
        self.timeout = timeout
        context = multiprocessing.get_context("spawn")  # no fork: gRPC and asyncpg live in the parent
        self._ready = context.Queue()
        self._results = context.Queue()
        self._go = context.Event()
        self._processes = [
            context.Process(
                target=_child_main, args=(job, position, self._ready, self._go, self._results, timeout), daemon=True
            )
            for position, job in enumerate(jobs)
        ]

    async def __aenter__(self) -> LoadRun:
        for process in self._processes:
            process.start()
        for _ in self._processes:
            if await self._get(self._ready) != "ready":
                raise RuntimeError(f"a load process failed before the start:\n{(await self._get(self._results))[1]}")
        return self

    async def go(self) -> LoadOutcome:
        go_time = time.monotonic()
        self._go.set()
        by_job: dict[int, LoadResult] = {}
        for _ in self._processes:
            position, result = await self._get(self._results)
            if not isinstance(result, LoadResult):
                raise RuntimeError(f"a load process failed:\n{result}")
            by_job[position] = result
        return LoadOutcome([by_job[i] for i in range(len(self.jobs))], go_time)  # in the order of the jobs

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process in self._processes:
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5.0)

    async def _get(self, source: Any) -> Any:
        try:
            return await asyncio.to_thread(source.get, True, self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from the load processes within {self.timeout:.0f} s") from None


def client_processes(streams: int, requested: int) -> int:
    """Processes for `streams` streams: `requested`, or by default one per core, at most one per stream."""
    return max(1, min(streams, requested or (os.cpu_count() or 1)))


def split(items: int, parts: int) -> list[tuple[int, ...]]:
    """Round-robin assignment of `items` indices to `parts` groups."""
    return [tuple(range(part, items, parts)) for part in range(parts)]
