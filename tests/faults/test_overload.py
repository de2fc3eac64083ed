"""Fault 5: overload. 2,000 concurrent unary calls, then 200 concurrent streams
opened and abandoned, 2,000 streams in all, against the `interactions-server`
command (a subprocess, so that its RSS can be measured) started with
--max-concurrent-rpcs.

Promise: the excess is refused with RESOURCE_EXHAUSTED (retryable), never
queued without bound, never INTERNAL or UNKNOWN; afterwards the RSS is back
within 20% of its start, no connection sits idle in a transaction, and the
next call is served in under 50 ms. The start is measured after a warm-up
with the same mix within the limit; the RSS of the cold server is reported
too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import psutil

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.ledger import (
    CLIENT_SIDE,
    CLIENT_WRITE_FAILED,
    OK,
    RAW_CHANNEL_OPTIONS,
    Ledger,
    check_log_and_state,
    log_until_acknowledged,
    make_events,
    report,
)
from tests.faults.postgres import OwnPostgres

MAX_CONCURRENT_RPCS = 100
UNARY_CALLS = 2_000
BATCH_CALLS = 400  # of the 2,000: LogEvents of 25 events; the rest LogEvent
STREAMS = 2_000
STREAMS_AT_ONCE = 200
WARM_CALLS = 200  # calls, then abandoned streams, half the limit at a time, before the start is measured
CHANNELS = 8
RSS_TOLERANCE = 1.2
NEXT_CALL_SECONDS = 0.05
DETAILS: dict[str, str] = {}  # the first status message seen per code


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    log_path: Path
    address: str

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def interactions_server(database_url: str, *args: str) -> AsyncIterator[ServerProcess]:
    """`interactions-server --database-url URL --listen 127.0.0.1:0 ARGS`, its log in a file
    (a pipe nobody reads during the load could fill and stall the server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERACTIONS_")}
    with tempfile.TemporaryDirectory() as directory:
        log_path = Path(directory) / "server.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "interactions_server.cli",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                *args,
                env=env,
                stderr=log,
            )
        try:
            async with asyncio.timeout(30):
                while not (match := re.search(r"listening on (127\.0\.0\.1:\d+)", log_path.read_text())):
                    if process.returncode is not None:
                        raise AssertionError(f"the server exited:\n{log_path.read_text()}")
                    await asyncio.sleep(0.05)
            yield ServerProcess(process, log_path, match[1])
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def timed_call(
    stub: InteractionServiceStub, events: list[Event], ledger: Ledger
) -> tuple[str, float, list[Event]]:
    ledger.sending(events)
    started = time.perf_counter()
    try:
        if len(events) == 1:
            answer = await stub.LogEvent(pb.LogEventRequest(event=events[0]), timeout=30)
            ledger.acknowledge(events[0], answer.duplicate)
        else:
            batch = await stub.LogEvents(pb.LogEventsRequest(events=events), timeout=30)
            assert not batch.rejected
            for event in events:
                ledger.acknowledge(event, duplicate=False)
        code = OK
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        DETAILS.setdefault(code, error.details() or "")
    ledger.answered(code)
    return code, time.perf_counter() - started, events


async def abandon_stream(stub: InteractionServiceStub, events: list[Event], ledger: Ledger, rnd: random.Random) -> str:
    """Opens a stream, writes a batch or two, and walks away (cancels) mid-way."""
    ledger.sending(events)
    call = stub.StreamEvents(timeout=30)
    code = "abandoned"
    try:
        half = len(events) // 2
        await call.write(pb.StreamEventsRequest(sequence=1, events=events[:half]))
        if rnd.random() < 0.5:
            await call.write(pb.StreamEventsRequest(sequence=2, events=events[half:]))
        if rnd.random() < 0.3:
            await call.read()  # sometimes after one acknowledgement
        await asyncio.sleep(rnd.random() * 0.02)
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        ledger.answered(code, error.details())  # see ledger.CLIENT_WRITE_FAILED
        if (code, error.details()) == ("INTERNAL", CLIENT_WRITE_FAILED):
            code = CLIENT_SIDE
        DETAILS.setdefault(f"stream {code}", error.details() or "")
    except asyncio.InvalidStateError:  # the server ended the call (refused it) before a write: its status
        code = (await call.code()).name
        DETAILS.setdefault(f"stream {code}", await call.details() or "")
        ledger.answered(code)
    finally:
        call.cancel()
    return code


async def test_overload_is_refused_and_leaves_nothing_behind(postgres: OwnPostgres) -> None:
    rnd = random.Random(5)
    ledger = Ledger()
    async with (
        interactions_server(postgres.url, "--max-concurrent-rpcs", str(MAX_CONCURRENT_RPCS)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(server.address, options=RAW_CHANNEL_OPTIONS))
            for _ in range(CHANNELS)
        ]
        stubs = [InteractionServiceStub(c) for c in channels]
        for stub in stubs:  # warm every channel and every write RPC
            await log_until_acknowledged(stub, make_events(1, rnd, prefix="w")[0], ledger)
            await timed_call(stub, make_events(25, rnd, prefix="w"), ledger)
            warm = make_events(40, rnd, prefix="w")
            ledger.sending(warm)
            async for answer in stub.StreamEvents(iter([pb.StreamEventsRequest(sequence=1, events=warm)]), timeout=30):
                assert answer.accepted_count == len(warm)
                for event in warm:
                    ledger.acknowledge(event, duplicate=False)
        await asyncio.sleep(0.5)
        rss_cold = server.rss
        # Then the same mix within the limit (half of it at a time), so that
        # what only concurrency allocates once (the pool's connections and
        # their statements, malloc's and pymalloc's heaps at that size) is in
        # the start: RSS_TOLERANCE is about what the overload leaves behind.
        warm_slots = asyncio.Semaphore(MAX_CONCURRENT_RPCS // 2)

        async def warm_call(i: int) -> None:
            async with warm_slots:
                await timed_call(stubs[i % CHANNELS], make_events(25 if i % 5 == 0 else 1, rnd, prefix="x"), ledger)

        async def warm_stream(i: int) -> None:
            async with warm_slots:
                await abandon_stream(stubs[i % CHANNELS], make_events(40, rnd, prefix="y"), ledger, rnd)

        await asyncio.gather(*(warm_call(i) for i in range(WARM_CALLS)))
        await asyncio.gather(*(warm_stream(i) for i in range(WARM_CALLS)))
        await asyncio.sleep(2.5)  # a malloc trim (every 2 s) has run
        rss_start = server.rss

        # 1. 2,000 concurrent unary calls.
        phase_started = time.perf_counter()
        calls = [
            timed_call(stubs[i % CHANNELS], make_events(25 if i < BATCH_CALLS else 1, rnd, prefix="c"), ledger)
            for i in range(UNARY_CALLS)
        ]
        results = await asyncio.gather(*calls)
        rss_peak = server.rss
        codes = [code for code, _, _ in results]
        refused = sorted(seconds for code, seconds, _ in results if code == "RESOURCE_EXHAUSTED")
        served = sorted(seconds for code, seconds, _ in results if code == OK)
        report(
            "overload unary",
            f"{UNARY_CALLS} concurrent calls (limit {MAX_CONCURRENT_RPCS}): {codes.count(OK)} OK, "
            f"{len(refused)} RESOURCE_EXHAUSTED; served p50 {_ms(served, 0.5)} p99 {_ms(served, 0.99)}, "
            f"refused p50 {_ms(refused, 0.5)} p99 {_ms(refused, 0.99)}",
        )
        resend_slots = asyncio.Semaphore(32)

        async def resend(event: Event, stub: InteractionServiceStub) -> None:
            async with resend_slots:
                await log_until_acknowledged(stub, event, ledger)
                ledger.resends += 1

        refused_events = [e for code, _, events in results if code != OK for e in events]  # their callers resend
        await asyncio.gather(*(resend(e, stubs[i % CHANNELS]) for i, e in enumerate(refused_events)))
        unary_seconds = time.perf_counter() - phase_started
        phase_started = time.perf_counter()

        # 2. 200 streams at a time opened and abandoned, 2,000 in all.
        slots = asyncio.Semaphore(STREAMS_AT_ONCE)

        async def one(i: int) -> str:
            async with slots:
                return await abandon_stream(stubs[i % CHANNELS], make_events(40, rnd, prefix="a"), ledger, rnd)

        stream_codes = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        stream_seconds = time.perf_counter() - phase_started
        rss_after_streams = server.rss
        report(
            "overload streams",
            f"{STREAMS} streams, {STREAMS_AT_ONCE} at a time, abandoned, in {stream_seconds:.1f} s "
            f"(unary phase with resends {unary_seconds:.1f} s): "
            f"{ {c: stream_codes.count(c) for c in sorted(set(stream_codes))} }",
        )

        # Afterwards: memory returns, no transaction is left open, the next call is quick.
        loop = asyncio.get_running_loop()
        settle_until = loop.time() + 15
        while server.rss > RSS_TOLERANCE * rss_start and loop.time() < settle_until:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.25)
        rss_end = server.rss
        idle_until = loop.time() + 5
        while (idle := await postgres.idle_in_transaction()) and loop.time() < idle_until:  # noqa: ASYNC110 - the database
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        next_code, _, _ = await timed_call(stubs[1], make_events(1, rnd, prefix="n"), ledger)
        next_call = time.perf_counter() - started
        log = server.log()

    mib = 1024 * 1024
    report(
        "overload memory",
        f"RSS cold {rss_cold / mib:.0f} MiB, start (warm) {rss_start / mib:.0f} MiB, after the unary burst {rss_peak / mib:.0f} MiB, after the streams "
        f"{rss_after_streams / mib:.0f} MiB, settled {rss_end / mib:.0f} MiB ({rss_end / rss_start:.3f} of the start, {rss_end / rss_cold:.3f} of cold); idle in transaction {idle}; "
        f"next call {next_call * 1000:.1f} ms; {ledger.figures()}",
    )
    # Asserted only now, so that a failing run still prints every figure.
    report("overload status messages", repr(DETAILS))
    report(
        "overload server log",
        f"{log.count('Traceback')} tracebacks; warnings and errors: "
        f"{[line for line in log.splitlines() if ' ERROR ' in line or ' WARNING ' in line][:3]}",
    )
    assert set(codes) <= {OK, "RESOURCE_EXHAUSTED"}, ({c: codes.count(c) for c in set(codes)}, DETAILS)
    assert refused, "the calls beyond --max-concurrent-rpcs must be refused with RESOURCE_EXHAUSTED"
    assert set(stream_codes) <= {"abandoned", "RESOURCE_EXHAUSTED", CLIENT_SIDE}, (
        {c: stream_codes.count(c) for c in set(stream_codes)},
        DETAILS,
    )
    assert rss_end <= RSS_TOLERANCE * rss_start, f"RSS {rss_end / mib:.0f} MiB, start {rss_start / mib:.0f} MiB"
    assert idle == 0, f"{idle} connections idle in transaction"
    assert next_code == OK
    assert next_call < NEXT_CALL_SECONDS, f"the next call took {next_call * 1000:.1f} ms"
    await check_log_and_state(postgres.url, ledger)
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert " ERROR " not in log, log[log.index(" ERROR ") - 100 :][:3000]


def _ms(seconds: list[float], quantile: float) -> str:
    if not seconds:
        return "-"
    if len(seconds) == 1:
        return f"{seconds[0] * 1000:.0f} ms"
    return f"{statistics.quantiles(seconds, n=100, method='inclusive')[round(quantile * 100) - 1] * 1000:.0f} ms"
