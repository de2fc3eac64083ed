"""Fault 1: PostgreSQL backends terminated (pg_terminate_backend) several times
during a 50k-event bulk stream (the shipped streamer) and during 64-caller
unary load; then a full PostgreSQL restart under both loads.

Promise: callers see only retryable codes (UNAVAILABLE, ABORTED), never
INTERNAL or UNKNOWN; resending makes every event land exactly once; the
state tables equal the fold of the log.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import grpc.aio

from interactions_client.streamer import EventStreamer
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.conftest import StartApp
from tests.faults.ledger import (
    RAW_CHANNEL_OPTIONS,
    Ledger,
    TracebackCatcher,
    check_log_and_state,
    make_events,
    recording_stream_opener,
    report,
    unary_load,
)
from tests.faults.postgres import OwnPostgres

STREAM_EVENTS = 50_000
UNARY_CALLERS = 64
UNARY_EVENTS = 64 * 40
TEST_SECONDS = 300
KILL_AT = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)  # fractions of the load done when backends are terminated


class Progress:
    """Counts acknowledged events; `at(fraction)` waits until that share is done."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._changed = asyncio.Event()

    def __call__(self, count: int = 1) -> None:
        self.done += count
        self._changed.set()

    async def at(self, fraction: float) -> None:
        while self.done < fraction * self.total:
            self._changed.clear()
            await self._changed.wait()


async def stream_all(stub: InteractionServiceStub, events: list[Event], ledger: Ledger, progress: Progress) -> None:
    ledger.sending(events)
    streamer = EventStreamer(recording_stream_opener(stub, ledger), batch_size=500, max_in_flight=4, retry_timeout=60)
    async with streamer:
        for event in events:
            await streamer.send(event)
            acknowledged = streamer.totals.accepted + streamer.totals.duplicate
            if acknowledged > progress.done:
                progress(acknowledged - progress.done)
    totals = streamer.totals
    assert (totals.failed, totals.rejected) == (0, 0), totals
    assert totals.accepted + totals.duplicate == len(events), totals
    for event in events:
        ledger.acknowledge(event, duplicate=False)
    ledger.resends += totals.resent
    ledger.duplicates += totals.duplicate
    report(
        "stream",
        f"{len(events)} events, {totals.reconnects} reconnects, {totals.resent} resent, {totals.duplicate} duplicate",
    )


async def kill_backends_along(postgres: OwnPostgres, progress: Progress, killed: list[int]) -> None:
    for fraction in KILL_AT:
        await asyncio.wait_for(progress.at(fraction), TEST_SECONDS)
        killed.append(await postgres.terminate_backends())


async def test_backends_killed_under_stream_and_unary_load_then_a_restart(
    postgres: OwnPostgres, start_app: StartApp, tracebacks: TracebackCatcher
) -> None:
    app = await start_app(postgres.url)
    rnd = random.Random(1)
    ledger = Ledger()
    # Bounded: a hang fails the test instead of stalling the suite.
    async with (
        asyncio.timeout(TEST_SECONDS),
        grpc.aio.insecure_channel(app.address, options=RAW_CHANNEL_OPTIONS) as channel,
    ):
        stub = InteractionServiceStub(channel)

        # 1. A 50k-event bulk stream; backends killed six times along the way.
        events = make_events(STREAM_EVENTS, rnd, prefix="s")
        progress, killed = Progress(len(events)), []
        await asyncio.gather(
            stream_all(stub, events, ledger, progress), kill_backends_along(postgres, progress, killed)
        )
        report("stream kills", f"{len(killed)} rounds of pg_terminate_backend, {sum(killed)} backends")

        # 2. 64 concurrent unary callers; backends killed six times.
        events = make_events(UNARY_EVENTS, rnd, prefix="u")
        progress, unary_killed = Progress(len(events)), []
        await asyncio.gather(
            unary_load(stub, events, ledger, callers=UNARY_CALLERS, progress=progress),
            kill_backends_along(postgres, progress, unary_killed),
        )
        report("unary kills", f"{len(unary_killed)} rounds, {sum(unary_killed)} backends")

        # 3. A full PostgreSQL restart (fast shutdown, 1 s down) under both loads.
        stream_events = make_events(10_000, rnd, prefix="r")
        unary_events = make_events(64 * 10, rnd, prefix="v")
        progress = Progress(len(stream_events) + len(unary_events))

        async def restart() -> None:
            await progress.at(0.3)
            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(postgres.start)

        await asyncio.gather(
            stream_all(stub, stream_events, ledger, progress),
            unary_load(stub, unary_events, ledger, callers=UNARY_CALLERS, progress=progress),
            restart(),
        )

    report("backend kills + restart", ledger.figures())
    assert all(n > 0 for n in killed + unary_killed), "every round must have killed server backends"
    await check_log_and_state(postgres.url, ledger, all_acknowledged=True)
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"
