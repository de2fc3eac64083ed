"""An export already open when a user's data is deleted (issue 17 item 7).

An export reads one REPEATABLE READ snapshot, which still holds the rows a
later DeleteUserData removed. Before each response the server asks, outside
the snapshot, which users were deleted since, and leaves them out: a
response that starts after DeleteUserData returned carries none of the
user's rows. The responses gRPC already held for the slow reader (built
before, waiting for flow control: two at most, measured) may.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from interactions_client import InteractionsClient
from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server import storage
from interactions_server.server import App
from tests.events import valid_event

GONE = "gone-user"
OTHERS = [f"a-user-{i}" for i in range(9)]  # before GONE in the training export's (user, product) order
EVENTS = 6_000  # a tenth of them GONE's, every tenth in (occurred_at, event_id) order


def history() -> list[Event]:
    """One product per event, so that each is a row of the training export too."""
    start = int(time.time()) - 7200
    events = []
    for i in range(EVENTS):
        user = OTHERS[i % 10 - 1] if i % 10 else GONE
        event = valid_event(EventType.EVENT_TYPE_VIEW, user_id=user, product_id=f"p{i}")
        event.occurred_at.FromSeconds(start + i)
        events.append(event)
    return events


@pytest.fixture
async def logged(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        events = history()
        for start in range(0, len(events), 1000):
            assert (await client.log_many(events[start : start + 1000])).accepted == len(events[start : start + 1000])


class Checks:
    """When the server asked for the users deleted since an export's snapshot
    (once per response, again when a response had to be rebuilt), and what it learnt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[tuple[float, frozenset[str]]] = []
        real = storage.users_deleted_since

        async def recorded(*args: Any) -> frozenset[str]:
            started = time.monotonic()
            users = await real(*args)
            self.started.append((started, users))
            return users

        monkeypatch.setattr(storage, "users_deleted_since", recorded)


Users = Callable[[Any], list[str]]


async def read_deleting(server: App, call: Any, users_of: Users) -> tuple[list[list[str]], float]:
    """Reads the first response, deletes GONE (awaited), then reads the rest;
    the users of every response, and when the deletion returned."""
    responses = [users_of(await call.read())]
    async with InteractionsClient(server.address) as admin:
        assert (await admin.delete_user_data(GONE)).events_deleted == EVENTS // 10
    deleted_at = time.monotonic()
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(users_of(response))
    return responses, deleted_at


def event_users(response: pb.ExportEventsResponse) -> list[str]:
    return [e.event.user_id for e in response.events]


def training_users(response: pb.ExportTrainingDataResponse) -> list[str]:
    return [r.user_id for r in response.rows]


Export = Callable[[AnalyticsServiceStub], Any]
EXPORTS: dict[str, tuple[Export, Users]] = {
    "ExportEvents": (lambda stub: stub.ExportEvents(pb.ExportEventsRequest()), event_users),
    "ExportTrainingData": (lambda stub: stub.ExportTrainingData(pb.ExportTrainingDataRequest()), training_users),
}


# A slow reader: without BDP probing the client keeps HTTP/2's 64 KiB window,
# so the server cannot send the whole export into the client's buffers
# before the deletion (what was sent before it returned stays sent).
SLOW_READER = (("grpc.http2.bdp_probe", 0),)


@pytest.mark.parametrize("rpc", list(EXPORTS))
async def test_no_response_begun_after_a_deletion_carries_the_deleted_user(
    server: App, logged: None, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    checks = Checks(monkeypatch)
    export, users_of = EXPORTS[rpc]
    async with grpc.aio.insecure_channel(server.address, options=SLOW_READER) as channel:
        responses, deleted_at = await read_deleting(server, export(AnalyticsServiceStub(channel)), users_of)
    after = responses[1:]
    carrying = [i for i, users in enumerate(after) if GONE in users]
    # Every check that began after the deletion returned knew of it (and a
    # response is sent only once a check with no user of its rows in it answered).
    late = [users for started, users in checks.started if started > deleted_at]
    assert late and all(GONE in users for users in late), late
    # What a reader sees: at most the responses gRPC already held when the
    # deletion returned (one queued behind flow control, one waiting to be
    # queued); every later one is clean. Without the check, every response.
    assert carrying in ([], [0], [0, 1]), carrying
    assert len(after) >= 4
    # Nobody else's rows are lost.
    received = [u for users in responses for u in users if u != GONE]
    assert len(received) == EVENTS - EVENTS // 10


async def test_the_deleted_users_are_asked_for_once_per_response_not_per_row(
    server: App, logged: None, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = Checks(monkeypatch)
    responses = [r async for r in AnalyticsServiceStub(channel).ExportEvents(pb.ExportEventsRequest())]
    rows = sum(len(r.events) for r in responses)
    assert rows == EVENTS
    assert len(checks.started) == len(responses) <= rows // 500  # no deletion: one check per response


async def test_a_deletion_the_snapshot_already_saw_costs_no_filtering(
    server: App, logged: None, channel: grpc.aio.Channel
) -> None:
    async with InteractionsClient(server.address) as admin:
        await admin.delete_user_data(GONE)
    async with server.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await storage.snapshot_of(conn)
        assert await storage.users_deleted_since(server.pool, snapshot) == frozenset()
    async with server.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await storage.snapshot_of(conn)
        async with InteractionsClient(server.address) as admin:
            await admin.delete_user_data(OTHERS[0])  # again, after this snapshot
            await admin.delete_user_data(GONE)  # a second deletion of a user the snapshot saw deleted
        assert await storage.users_deleted_since(server.pool, snapshot) == {OTHERS[0], GONE}
