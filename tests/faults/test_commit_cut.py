"""Fault 2: the connection between server and PostgreSQL cut right after a
COMMIT is forwarded (tests/faults/proxy.py), several times, under unary,
batch and stream load.

The transaction may well be committed while the server never hears so.
Promise: the call fails with a retryable code (UNAVAILABLE), never INTERNAL
or UNKNOWN; its resend is answered `duplicate` when the commit went through,
so every event is logged exactly once.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import grpc.aio

from interactions_client.streamer import EventStreamer
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.conftest import StartApp
from tests.faults.ledger import (
    OK,
    RAW_CHANNEL_OPTIONS,
    RESEND_CODES,
    Ledger,
    TracebackCatcher,
    check_log_and_state,
    chunks,
    make_events,
    recording_stream_opener,
    report,
    unary_load,
)
from tests.faults.postgres import OwnPostgres
from tests.faults.proxy import CommitCuttingProxy

CUTS = 8  # per phase


async def log_batches_until_acknowledged(stub: InteractionServiceStub, events: list[Event], ledger: Ledger) -> None:
    """LogEvents in batches of 50, each resent until answered."""
    ledger.sending(events)
    for batch in chunks(events, 50):
        for _ in range(100):
            try:
                response = await stub.LogEvents(pb.LogEventsRequest(events=batch), timeout=10)
            except grpc.aio.AioRpcError as error:
                ledger.answered(error.code(), error.details())
                assert error.code() in RESEND_CODES, f"LogEvents: {error.code().name} {error.details()}"
                ledger.resends += len(batch)
                await asyncio.sleep(0.05)
                continue
            ledger.answered(OK)
            assert not response.rejected, response.rejected
            assert response.accepted_count + response.duplicate_count == len(batch)
            for event in batch:
                ledger.acknowledge(event, duplicate=False)
            ledger.duplicates += response.duplicate_count
            break
        else:
            raise AssertionError("a batch was never acknowledged")


async def test_connections_cut_after_commit(
    postgres: OwnPostgres, proxy: CommitCuttingProxy, start_app: StartApp, tracebacks: TracebackCatcher
) -> None:
    app = await start_app(postgres.tcp_url("127.0.0.1", proxy.port))
    rnd = random.Random(2)
    ledger = Ledger()
    async with grpc.aio.insecure_channel(app.address, options=RAW_CHANNEL_OPTIONS) as channel:
        stub = InteractionServiceStub(channel)

        proxy.arm(CUTS, every=2)  # unary: 64 callers (group commit: batches of up to 64 events, each one COMMIT)
        await unary_load(stub, make_events(1_500, rnd, prefix="u"), ledger, callers=64, progress=lambda: None)
        assert proxy.cuts_done == CUTS, "the unary phase must have cut every time"

        proxy.arm(CUTS, every=2)  # batches of 50
        await log_batches_until_acknowledged(stub, make_events(3_000, rnd, prefix="b"), ledger)
        assert proxy.cuts_done == 2 * CUTS, "the batch phase must have cut every time"

        proxy.arm(CUTS, every=2)  # the shipped streamer
        events = make_events(10_000, rnd, prefix="s")
        ledger.sending(events)
        streamer = EventStreamer(recording_stream_opener(stub, ledger), batch_size=200, max_in_flight=4)
        async with streamer:
            for event in events:
                await streamer.send(event)
        totals = streamer.totals
        assert (totals.failed, totals.rejected, totals.accepted + totals.duplicate) == (0, 0, len(events)), totals
        for event in events:
            ledger.acknowledge(event, duplicate=False)
        ledger.resends += totals.resent
        ledger.duplicates += totals.duplicate

    report("commit cuts", f"{proxy.cuts_done} cuts, {proxy.connections} connections opened; {ledger.figures()}")
    assert proxy.cuts_done == 3 * CUTS, "the stream phase must have cut every time"
    assert ledger.duplicates > 0, "some commits went through before the cut: their resends must be duplicates"
    await check_log_and_state(postgres.url, ledger, all_acknowledged=True)
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"
