"""Fault 3: PostgreSQL frozen (SIGSTOP on the postmaster and every backend) for
longer than the callers' deadlines, then thawed (SIGCONT).

Promise: a call answered DEADLINE_EXCEEDED was rolled back, or its commit
raced the deadline (committed no later than the deadline, give or take the
clock slack), in which case its resend is answered `duplicate`; never two
copies, and never a commit long after the caller gave up. Callers with a
deadline longer than the freeze are served once it thaws: one caller's
deadline does not fail the others sharing its group-commit batch.

When each event was committed is read from PostgreSQL itself
(track_commit_timestamp on this test's own instance).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

import asyncpg
import grpc
import grpc.aio

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.conftest import StartApp
from tests.faults.ledger import (
    OK,
    RAW_CHANNEL_OPTIONS,
    Ledger,
    TracebackCatcher,
    check_log_and_state,
    key,
    log_until_acknowledged,
    make_events,
    report,
)
from tests.faults.postgres import OwnPostgres

SHORT_DEADLINE = 1.5  # seconds: shorter than the freeze
LONG_DEADLINE = 30.0
FREEZE = 4.0
SLACK = 0.5  # seconds a commit may follow the caller's deadline and still count as racing it
LOOPS = 24  # callers with the short deadline, calling in a loop before, during and after the freeze
LONG_CALLERS = 16


@dataclass
class Call:
    events: list[Event]
    started: float  # wall clock (time.time()), comparable with PostgreSQL's commit timestamps
    deadline: float
    long: bool
    code: str = ""


async def call(stub: InteractionServiceStub, events: list[Event], seconds: float, ledger: Ledger) -> Call:
    ledger.sending(events)
    now = time.time()
    record = Call(events, now, now + seconds, long=seconds > FREEZE)
    try:
        if len(events) == 1:
            response = await stub.LogEvent(pb.LogEventRequest(event=events[0]), timeout=seconds)
            ledger.acknowledge(events[0], response.duplicate)
        else:
            batch = await stub.LogEvents(pb.LogEventsRequest(events=events), timeout=seconds)
            assert not batch.rejected, batch.rejected
            for event in events:
                ledger.acknowledge(event, duplicate=False)
        record.code = OK
    except grpc.aio.AioRpcError as error:
        record.code = error.code().name
    ledger.answered(record.code)
    return record


async def test_frozen_database_rolls_back_calls_past_their_deadline(
    start_app: StartApp, tracebacks: TracebackCatcher, postgres: OwnPostgres
) -> None:
    await postgres.configure(track_commit_timestamp="on")  # when each event committed, for the checks
    app = await start_app(postgres.url)
    rnd = random.Random(3)
    pool = (event for _ in itertools.count() for event in make_events(1_000, rnd, users=100))  # endless
    ledger = Ledger()
    calls: list[Call] = []
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(app.address, options=RAW_CHANNEL_OPTIONS) as channel:
        stub = InteractionServiceStub(channel)
        stop_at = loop.time() + 1.0 + FREEZE + 1.5

        async def short_loop(batch: int) -> None:
            while loop.time() < stop_at:
                calls.append(await call(stub, [next(pool) for _ in range(batch)], SHORT_DEADLINE, ledger))

        async def long_caller() -> None:
            await asyncio.sleep(0.5)  # after the freeze began
            calls.append(await call(stub, [next(pool)], LONG_DEADLINE, ledger))

        loops = [asyncio.create_task(short_loop(1 if i % 2 else 10)) for i in range(LOOPS)]
        await asyncio.sleep(1.0)
        frozen = await asyncio.to_thread(postgres.freeze)
        frozen_at = time.time()
        longs = [asyncio.create_task(long_caller()) for _ in range(LONG_CALLERS)]
        await asyncio.sleep(FREEZE)
        await asyncio.to_thread(postgres.thaw, frozen)
        thawed_at = time.time()
        await asyncio.gather(*loops, *longs)
        await asyncio.sleep(1.0)  # a late commit, if any, lands now

        gave_up = [c for c in calls if c.code == grpc.StatusCode.DEADLINE_EXCEEDED.name]
        committed = await commit_times(postgres.url, [e for c in gave_up for e in c.events])
        # A call that began once PostgreSQL was frozen had nothing processed
        # before its deadline: the server had every chance to roll it back.
        # One already in flight may have sent its COMMIT just before the
        # freeze, which then lands at the thaw: a genuine race, reported only.
        late, late_in_flight, raced = [], [], []
        for c in gave_up:
            for e in c.events:
                if key(e) not in committed:
                    continue
                if committed[key(e)] <= c.deadline + SLACK:
                    raced.append(e)
                    continue
                rpc = "LogEvent" if len(c.events) == 1 else "LogEvents"
                seconds_late = round(committed[key(e)] - c.deadline, 2)
                (late if c.started > frozen_at else late_in_flight).append((e.event_id, rpc, seconds_late))

        # Every caller that gave up resends: `duplicate` exactly where the commit went through.
        wrong_answers = []
        for c in gave_up:
            for event in c.events:
                before = ledger.duplicates
                await log_until_acknowledged(stub, event, ledger)
                ledger.resends += 1
                if (ledger.duplicates > before) != (key(event) in committed):
                    wrong_answers.append(event.event_id)
        # And so does every other caller whose call failed.
        for c in calls:
            if c.code not in (OK, grpc.StatusCode.DEADLINE_EXCEEDED.name):
                for event in c.events:
                    await log_until_acknowledged(stub, event, ledger)
                    ledger.resends += 1

    long_codes = [c.code for c in calls if c.long]
    report(
        "freeze",
        f"{FREEZE:.0f} s frozen; {len(calls)} calls, {len(gave_up)} DEADLINE_EXCEEDED "
        f"({sum(len(c.events) for c in gave_up)} events): {len(raced)} committed racing the deadline, "
        f"{len(late)} of calls begun during the freeze committed later than deadline + {SLACK} s "
        f"({sum(rpc == 'LogEvent' for _, rpc, _ in late)} of them LogEvent), {len(late_in_flight)} of calls in "
        f"flight at the freeze committed at the thaw, the rest rolled back; long-deadline calls: "
        f"{long_codes.count(OK)}/{len(long_codes)} OK; thawed at {thawed_at:.1f}; {ledger.figures()}",
    )
    assert gave_up, "the freeze must outlast some callers' deadlines"
    assert not late, (
        f"{len(late)} events were committed after their caller gave up (event_id, RPC, seconds late): {late[:5]}"
    )
    assert not wrong_answers, f"resends answered wrongly (duplicate must mean committed): {wrong_answers[:5]}"
    assert long_codes == [OK] * LONG_CALLERS, f"callers with a deadline longer than the freeze failed: {long_codes}"
    await check_log_and_state(postgres.url, ledger, all_acknowledged=True)
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"


async def commit_times(database_url: str, events: list[Event]) -> dict[tuple[str, str], float]:
    """When each of `events` that is in the log was committed (epoch seconds)."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT user_id, event_id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 AS at"
            " FROM events WHERE event_id = ANY($1::uuid[])",
            [e.event_id for e in events],
        )
    finally:
        await connection.close()
    return {(r["user_id"], r["event_id"]): r["at"] for r in rows}
