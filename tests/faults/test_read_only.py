"""Fault 7: the database turns read-only under load, then writable again, in
the two ways a failover to a standby looks from outside:

1. `ALTER DATABASE faults SET default_transaction_read_only = on` and every
   backend terminated (new sessions start read-only), then `RESET` without
   terminating anything (the sessions opened meanwhile stay read-only);
2. `ALTER SYSTEM SET default_transaction_read_only = on` and a reload
   (every session turns read-only at its next statement), then `RESET` and a
   reload.

Promise: while the database is read-only, LogEvent, LogEvents and
StreamEvents are answered UNAVAILABLE saying the database is read-only
(never INTERNAL, no traceback); health is NOT_SERVING for "" and the
services that write (InteractionService, AdminService) while the services
that only read (UserStateService, AnalyticsService) stay SERVING and
answer; once the database is writable again, writes commit within seconds
without anyone terminating sessions; every event acknowledged lands once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interactions_client.streamer import EventStreamer
from interactions_client.v1 import admin_service_pb2, analytics_service_pb2, user_state_service_pb2
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.admin_service_pb2_grpc import AdminServiceStub
from interactions_client.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.rpc._status import DATABASE_READ_ONLY_MESSAGE
from tests.faults.conftest import StartApp
from tests.faults.ledger import (
    OK,
    RAW_CHANNEL_OPTIONS,
    RESEND_CODES,
    Ledger,
    TracebackCatcher,
    check_log_and_state,
    log_until_acknowledged,
    make_events,
    recording_stream_opener,
    report,
)
from tests.faults.postgres import DATABASE, OwnPostgres

READ_ONLY_SECONDS = 3.0  # each phase keeps the database read-only this long
TEST_SECONDS = 120
UNARY_CALLERS = 12
BATCH_CALLERS = 3
BATCH = 20
WRITE_SERVICES = ("", "interactions.v1.InteractionService", "interactions.v1.AdminService")
READ_SERVICES = ("interactions.v1.UserStateService", "interactions.v1.AnalyticsService")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def admin(postgres: OwnPostgres, *statements: str) -> None:
    connection = await asyncpg.connect(postgres.admin_url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


class Load:
    """Unary callers, LogEvents callers and one bulk stream, writing until
    stopped; every caller resends until acknowledged (the ledger holds all)."""

    def __init__(self, channel: grpc.aio.Channel, ledger: Ledger) -> None:
        self.stub = InteractionServiceStub(channel)
        self.ledger = ledger
        self.stopped = asyncio.Event()
        self.rnd = random.Random(7)
        self.batches = 0

    def events(self, count: int, prefix: str) -> list[Event]:
        return make_events(count, self.rnd, users=200, prefix=prefix)

    async def unary(self, n: int) -> None:
        while not self.stopped.is_set():
            (event,) = self.events(1, f"u{n}")
            await log_until_acknowledged(self.stub, event, self.ledger)

    async def batches_of(self, n: int) -> None:
        while not self.stopped.is_set():
            events = self.events(BATCH, f"b{n}")
            self.ledger.sending(events)
            while True:
                try:
                    response = await self.stub.LogEvents(pb.LogEventsRequest(events=events), timeout=10)
                except grpc.aio.AioRpcError as error:
                    self.ledger.answered(error.code(), error.details())
                    assert error.code() in RESEND_CODES, f"LogEvents: {error.code().name} {error.details()}"
                    self.ledger.resends += len(events)
                    await asyncio.sleep(0.05)
                    continue
                self.ledger.answered(OK)
                assert not response.rejected, response.rejected
                for event in events:
                    self.ledger.acknowledge(event, duplicate=False)
                self.batches += 1
                break

    async def stream(self) -> None:
        streamer = EventStreamer(
            recording_stream_opener(self.stub, self.ledger), batch_size=100, max_in_flight=4, retry_timeout=60
        )
        sent = []
        async with streamer:
            while not self.stopped.is_set():
                for event in self.events(50, "s"):
                    self.ledger.sending([event])
                    sent.append(event)
                    await streamer.send(event)
                await asyncio.sleep(0.01)
        totals = streamer.totals
        assert (totals.failed, totals.rejected) == (0, 0), totals
        for event in sent:
            self.ledger.acknowledge(event, duplicate=False)
        self.ledger.resends += totals.resent
        self.ledger.duplicates += totals.duplicate
        report("read-only stream", f"{len(sent)} events, {totals.reconnects} reconnects, {totals.resent} resent")

    async def run(self) -> None:
        await asyncio.gather(
            *(self.unary(n) for n in range(UNARY_CALLERS)),
            *(self.batches_of(n) for n in range(BATCH_CALLERS)),
            self.stream(),
        )


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> float:
    """Polls `condition` every 20 ms; the seconds it took to hold."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110 - polls the server
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {
        s: (await stub.Check(health_pb2.HealthCheckRequest(service=s))).status for s in WRITE_SERVICES + READ_SERVICES
    }


async def write_once(stub: InteractionServiceStub, rnd: random.Random, ledger: Ledger) -> grpc.aio.AioRpcError | None:
    """One LogEvent of a new event; its error, or None once committed (tallied either way)."""
    (event,) = make_events(1, rnd, prefix="probe")
    ledger.sending([event])
    try:
        response = await stub.LogEvent(pb.LogEventRequest(event=event), timeout=5)
    except grpc.aio.AioRpcError as error:
        ledger.answered(error.code(), error.details())
        if error.details() == DATABASE_READ_ONLY_MESSAGE:
            del ledger.sent[(event.user_id, event.event_id)]  # so a commit would show as a stranger in the log
        else:  # whatever else happened to it, it must land once in the end
            await log_until_acknowledged(stub, event, ledger)
        return error
    ledger.answered(OK)
    ledger.acknowledge(event, response.duplicate)
    return None


async def read_only_phase(
    name: str,
    channel: grpc.aio.Channel,
    ledger: Ledger,
    turn_read_only: Callable[[], Awaitable[None]],
    turn_writable: Callable[[], Awaitable[None]],
) -> None:
    stub = InteractionServiceStub(channel)
    rnd = random.Random(name)
    await turn_read_only()
    not_serving = await until(lambda: _overall(channel, NOT_SERVING))
    states = await statuses(channel)
    assert all(states[s] == NOT_SERVING for s in WRITE_SERVICES), states
    assert all(states[s] == SERVING for s in READ_SERVICES), states

    refused = await write_once(stub, rnd, ledger)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
    assert refused.details() == DATABASE_READ_ONLY_MESSAGE
    with_admin = AdminServiceStub(channel)
    try:
        await with_admin.DeleteUserData(admin_service_pb2.DeleteUserDataRequest(user_id="probe-u0"))
        raise AssertionError("a deletion committed on a read-only database")
    except grpc.aio.AioRpcError as error:
        ledger.answered(error.code(), error.details())
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, DATABASE_READ_ONLY_MESSAGE)
    # The reads go on.
    await UserStateServiceStub(channel).GetCart(user_state_service_pb2.GetCartRequest(user_id="u0-u1"))
    exported = [
        r async for r in AnalyticsServiceStub(channel).ExportEvents(analytics_service_pb2.ExportEventsRequest())
    ]
    user = next(iter(ledger.acknowledged))[0]
    dry = await with_admin.DeleteUserData(admin_service_pb2.DeleteUserDataRequest(user_id=user, dry_run=True))

    await asyncio.sleep(READ_ONLY_SECONDS)
    await turn_writable()
    started = time.monotonic()
    await until(lambda: _committed(stub, rnd, ledger))
    writes_back = time.monotonic() - started
    serving = await until(lambda: _overall(channel, SERVING))
    report(
        f"read-only {name}",
        f"health NOT_SERVING {not_serving:.2f} s after the switch (reads SERVING: {len(exported)} export responses, "
        f"a dry run counted {dry.events_deleted}); writes committing {writes_back:.2f} s after it was writable again, "
        f"health SERVING {serving:.2f} s after that",
    )


async def _overall(channel: grpc.aio.Channel, status: int) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    return bool((await stub.Check(health_pb2.HealthCheckRequest(service=""))).status == status)


async def _committed(stub: InteractionServiceStub, rnd: random.Random, ledger: Ledger) -> bool:
    error = await write_once(stub, rnd, ledger)
    assert error is None or error.code() in RESEND_CODES, error
    return error is None


async def test_a_read_only_database_is_unavailable_for_writes_and_served_for_reads(
    postgres: OwnPostgres, start_app: StartApp, tracebacks: TracebackCatcher
) -> None:
    app = await start_app(postgres.url)
    ledger = Ledger()
    async with (
        asyncio.timeout(TEST_SECONDS),
        grpc.aio.insecure_channel(app.address, options=RAW_CHANNEL_OPTIONS) as channel,
    ):
        load = Load(channel, ledger)
        running = asyncio.create_task(load.run())
        try:
            await phases(postgres, channel, ledger)
        except BaseException:
            running.cancel()  # a phase failed: stop the callers now, so the server can stop
            with contextlib.suppress(BaseException):
                await running
            raise
        load.stopped.set()
        await running

    report("read-only database", ledger.figures())
    assert ledger.codes["UNAVAILABLE"] > 0
    assert load.batches > 0
    await check_log_and_state(postgres.url, ledger, all_acknowledged=True)
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"


async def phases(postgres: OwnPostgres, channel: grpc.aio.Channel, ledger: Ledger) -> None:
    await asyncio.sleep(1.0)  # under load before the switch
    await read_only_phase(
        "by ALTER DATABASE and terminated backends, back by RESET alone",
        channel,
        ledger,
        lambda: _database_read_only(postgres),
        lambda: admin(postgres, f"ALTER DATABASE {DATABASE} RESET default_transaction_read_only"),
    )
    await asyncio.sleep(1.0)
    await read_only_phase(
        "by ALTER SYSTEM and a reload",
        channel,
        ledger,
        lambda: admin(postgres, "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()"),
        lambda: admin(postgres, "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()"),
    )
    await asyncio.sleep(1.0)  # writing again under load


async def _database_read_only(postgres: OwnPostgres) -> None:
    await admin(postgres, f"ALTER DATABASE {DATABASE} SET default_transaction_read_only = on")
    await postgres.terminate_backends()
