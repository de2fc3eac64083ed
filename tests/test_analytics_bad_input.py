"""AnalyticsService: every bad input is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1 import analytics_service_pb2_grpc
from interactions_server import storage
from interactions_server.server import App
from interactions_server.services import _analytics_tokens as tokens
from tests.support import field_violations

Stub = analytics_service_pb2_grpc.AnalyticsServiceStub
LATE, EARLY = Timestamp(seconds=1_800_000_000), Timestamp(seconds=1_700_000_000)
BAD_TOKENS = [
    "not a token",
    "bm90IGpzb24",  # base64 of "not json"
    "WyJldmVudHMiLDUsIjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCJd",  # an unsealed token of the old format
    "x" * 5_000,
]
# Sealed by the server's own keys, but not what any RPC issues: (kind, parts).
BAD_SEALED: list[tuple[str, tuple[Any, ...]]] = [
    ("someone else's", (1, "x")),
    (tokens.EVENTS, (-5, "00000000-0000-0000-0000-000000000000")),
    (tokens.EVENTS, (5, "not-a-uuid")),
    (tokens.TRAINING, (True, "u", "p")),
]
BAD_IDS = ["", "   ", "u" * 129, "a\x00b"]
WINDOWED: list[tuple[str, type]] = [
    ("ExportTrainingData", pb.ExportTrainingDataRequest),
    ("ExportEvents", pb.ExportEventsRequest),
    ("TopSearchQueries", pb.TopSearchQueriesRequest),
    ("CountActiveUsers", pb.CountActiveUsersRequest),
    ("ListUserEvents", pb.ListUserEventsRequest),
]


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


async def rejected(stub: Stub, method: str, request: Any) -> dict[str, str]:
    """The field violations of a call that must fail with INVALID_ARGUMENT."""
    call = getattr(stub, method)(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method.startswith("Export"):
            async for _ in call:
                pass
        else:
            await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    return field_violations(caught.value)


def with_user(cls: type, **fields: Any) -> Any:
    return cls(user_id="alice", **fields) if "user_id" in cls.DESCRIPTOR.fields_by_name else cls(**fields)


@pytest.mark.parametrize(("method", "cls"), WINDOWED)
async def test_bad_windows(stub: Stub, method: str, cls: type) -> None:
    assert "start_time" in await rejected(stub, method, with_user(cls, start_time=LATE, end_time=EARLY))
    assert "start_time" in await rejected(stub, method, with_user(cls, start_time=Timestamp(nanos=-1)))
    assert "end_time" in await rejected(stub, method, with_user(cls, end_time=Timestamp(seconds=10**12)))


async def sealed(server: App, kind: str, *parts: Any) -> str:
    return (await storage.load_keyring(server.pool)).seal(kind, *parts)


@pytest.mark.parametrize("token", BAD_TOKENS)
async def test_bad_tokens(stub: Stub, token: str) -> None:
    await check_bad_token(stub, token)


@pytest.mark.parametrize(("kind", "parts"), BAD_SEALED)
async def test_bad_sealed_tokens(server: App, stub: Stub, kind: str, parts: tuple[Any, ...]) -> None:
    await check_bad_token(stub, await sealed(server, kind, *parts))


async def check_bad_token(stub: Stub, token: str) -> None:
    assert "resume_token" in await rejected(
        stub, "ExportTrainingData", pb.ExportTrainingDataRequest(resume_token=token)
    )
    assert "resume_token" in await rejected(stub, "ExportEvents", pb.ExportEventsRequest(resume_token=token))
    assert "page_token" in await rejected(stub, "ListSessions", pb.ListSessionsRequest(user_id="a", page_token=token))
    assert "page_token" in await rejected(
        stub, "ListUserEvents", pb.ListUserEventsRequest(user_id="a", page_token=token)
    )


async def test_a_token_of_another_rpc_is_refused(server: App, stub: Stub) -> None:
    user_events_token = await sealed(server, tokens.USER_EVENTS, 5, "00000000-0000-0000-0000-000000000000")
    assert "resume_token" in await rejected(
        stub, "ExportEvents", pb.ExportEventsRequest(resume_token=user_events_token)
    )


@pytest.mark.parametrize("size", [-1, 1_001])
async def test_page_sizes_out_of_range(stub: Stub, size: int) -> None:
    assert "page_size" in await rejected(stub, "ListSessions", pb.ListSessionsRequest(user_id="a", page_size=size))
    assert "page_size" in await rejected(stub, "ListUserEvents", pb.ListUserEventsRequest(user_id="a", page_size=size))
    assert "limit" in await rejected(stub, "TopSearchQueries", pb.TopSearchQueriesRequest(limit=size))


@pytest.mark.parametrize("half_life", [Duration(), Duration(seconds=-1), Duration(nanos=-5)])
async def test_half_life_must_be_positive(stub: Stub, half_life: Duration) -> None:
    assert "half_life" in await rejected(stub, "ExportTrainingData", pb.ExportTrainingDataRequest(half_life=half_life))


USER_RPCS: list[tuple[str, Callable[[str], Any]]] = [
    ("GetSession", lambda u: pb.GetSessionRequest(user_id=u, session_id="s1")),
    ("ListSessions", lambda u: pb.ListSessionsRequest(user_id=u)),
    ("GetUserActivity", lambda u: pb.GetUserActivityRequest(user_id=u)),
    ("ListUserEvents", lambda u: pb.ListUserEventsRequest(user_id=u)),
]


@pytest.mark.parametrize("user_id", BAD_IDS)
@pytest.mark.parametrize(("method", "make"), USER_RPCS)
async def test_bad_user_ids(stub: Stub, method: str, make: Callable[[str], Any], user_id: str) -> None:
    assert "user_id" in await rejected(stub, method, make(user_id))


@pytest.mark.parametrize("session_id", BAD_IDS)
async def test_bad_session_ids(stub: Stub, session_id: str) -> None:
    assert "session_id" in await rejected(stub, "GetSession", pb.GetSessionRequest(user_id="a", session_id=session_id))


@pytest.mark.parametrize("event_type", [0, 999])
async def test_bad_event_types(stub: Stub, event_type: int) -> None:
    assert "event_types" in await rejected(stub, "ExportEvents", pb.ExportEventsRequest(event_types=[event_type]))
    assert "event_types" in await rejected(
        stub, "ListUserEvents", pb.ListUserEventsRequest(user_id="a", event_types=[1, event_type])
    )


async def test_valid_edges_are_accepted(stub: Stub) -> None:
    """The largest page, an empty window and an unknown user are not errors."""
    assert (await stub.ListUserEvents(pb.ListUserEventsRequest(user_id="nobody", page_size=1_000))).events == []
    assert (
        await stub.TopSearchQueries(pb.TopSearchQueriesRequest(limit=1_000, start_time=LATE, end_time=LATE))
    ).queries == []
    counts = await stub.CountActiveUsers(pb.CountActiveUsersRequest(start_time=EARLY, end_time=EARLY))
    assert (counts.active_users, list(counts.daily)) == (0, [])
    responses = [r async for r in stub.ExportEvents(pb.ExportEventsRequest(start_time=LATE, end_time=LATE))]
    assert responses == []


async def test_count_active_users_lists_at_most_a_century_of_days(stub: Stub) -> None:
    """Each day of a bounded window is listed (zero-user days too), so its length is bounded."""
    century = pb.CountActiveUsersRequest(start_time=Timestamp(seconds=0), end_time=Timestamp(seconds=36_600 * 86_400))
    assert len((await stub.CountActiveUsers(century)).daily) == 36_600
    too_long = pb.CountActiveUsersRequest(start_time=Timestamp(seconds=0), end_time=Timestamp(seconds=36_601 * 86_400))
    assert "end_time" in await rejected(stub, "CountActiveUsers", too_long)
