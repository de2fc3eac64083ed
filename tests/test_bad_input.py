"""Every class of bad input, through the real RPCs: the caller learns which
field is wrong (google.rpc.BadRequest), and nothing of a bad event is written."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from interactions_client import limits
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server.server import App
from tests.events import valid_event
from tests.support import field_violations

T = EventType


async def count_events(server: App) -> int:
    count: int = await server.pool.fetchval("SELECT count(*) FROM events")
    return count


def too_many_attributes() -> Event:
    event = valid_event(T.EVENT_TYPE_VIEW)
    event.attributes.update({f"k{i}": "v" for i in range(limits.MAX_ATTRIBUTES + 1)})
    return event


# (case, bad event, the field LogEvent's BadRequest must name)
BAD_EVENTS = [
    ("blank user_id", lambda: valid_event(T.EVENT_TYPE_VIEW, user_id="  "), "event.user_id"),
    ("no event_type", lambda: Event(event_id=str(uuid.uuid4()), user_id="u1", product_id="p1"), "event.event_type"),
    (
        "unknown event_type",
        lambda: Event(event_id=str(uuid.uuid4()), event_type=999, user_id="u1", product_id="p1"),
        "event.event_type",
    ),
    ("event_id not a UUID", lambda: valid_event(T.EVENT_TYPE_VIEW, event_id="order-17"), "event.event_id"),
    ("product_id missing", lambda: valid_event(T.EVENT_TYPE_ADD_TO_CART, product_id=""), "event.product_id"),
    ("product_id not allowed", lambda: valid_event(T.EVENT_TYPE_LOGIN, product_id="p1"), "event.product_id"),
    ("rating out of range", lambda: valid_event(T.EVENT_TYPE_REVIEW, event_value=6), "event.event_value"),
    ("price as purchase value", lambda: valid_event(T.EVENT_TYPE_PURCHASE, event_value=2499), "event.event_value"),
    ("wishlist value missing", lambda: valid_event(T.EVENT_TYPE_WISHLIST, event_value=None), "event.event_value"),
    ("search without query", lambda: valid_event(T.EVENT_TYPE_SEARCH, search=None), "event.search"),
    ("details of another type", lambda: valid_event(T.EVENT_TYPE_VIEW, search={"query": "x"}), "event.search"),
    ("session_id missing", lambda: valid_event(T.EVENT_TYPE_PAGE_VIEW, session_id=""), "event.session_id"),
    ("custom_type standard", lambda: valid_event(T.EVENT_TYPE_CUSTOM, custom_type="view"), "event.custom_type"),
    (
        "occurred_at in the future",
        lambda: valid_event(T.EVENT_TYPE_VIEW, occurred_at={"seconds": int(time.time()) + 3600}),
        "event.occurred_at",
    ),
    ("too many attributes", too_many_attributes, "event.attributes"),
]


async def test_log_event_without_event_names_the_event_field(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await interaction_stub.LogEvent(pb.LogEventRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(raised.value) == {"event": "is required"}


@pytest.mark.parametrize(("bad_event", "field"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS])
async def test_log_event_rejects_a_bad_event_naming_its_field(
    server: App, interaction_stub: InteractionServiceStub, bad_event: Callable[[], Event], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await interaction_stub.LogEvent(pb.LogEventRequest(event=bad_event()))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(raised.value)
    assert list(violations) == [field]
    assert violations[field]  # a description a person can act on
    assert await count_events(server) == 0


async def test_log_event_reports_every_violation_at_once(server: App, interaction_stub: InteractionServiceStub) -> None:
    event = valid_event(T.EVENT_TYPE_REVIEW, user_id="", product_id="", event_value=9)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await interaction_stub.LogEvent(pb.LogEventRequest(event=event))
    assert set(field_violations(raised.value)) == {"event.user_id", "event.product_id", "event.event_value"}
    assert raised.value.details().startswith("invalid event: ")


async def test_log_events_writes_the_valid_events_and_reports_the_rest(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    good = [
        valid_event(T.EVENT_TYPE_ADD_TO_CART, product_id="p1", event_value=2),
        valid_event(T.EVENT_TYPE_VIEW),
        valid_event(T.EVENT_TYPE_LOGIN),
    ]
    bad_user = valid_event(T.EVENT_TYPE_VIEW, user_id="")
    bad_quantity = valid_event(T.EVENT_TYPE_ADD_TO_CART, product_id="p2", event_value=0)
    events = [good[0], bad_user, good[1], bad_quantity, good[2]]

    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))

    assert (response.accepted_count, response.duplicate_count) == (3, 0)
    rejected = [(r.index, r.event_id, [v.field for v in r.violations]) for r in response.rejected]
    assert rejected == [(1, bad_user.event_id, ["user_id"]), (3, bad_quantity.event_id, ["event_value"])]
    logged = {str(r["event_id"]) for r in await server.pool.fetch("SELECT event_id FROM events")}
    assert logged == {e.event_id for e in good}
    cart = await server.pool.fetch("SELECT product_id, quantity FROM user_cart WHERE user_id = 'u1'")
    assert [tuple(r) for r in cart] == [("p1", 2)]  # the rejected add_to_cart changed nothing


async def test_log_events_of_only_bad_events_writes_nothing(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    events = [valid_event(T.EVENT_TYPE_VIEW, product_id=""), valid_event(T.EVENT_TYPE_CLICK, event_value=3)]
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))
    assert response.accepted_count == 0
    assert [r.index for r in response.rejected] == [0, 1]
    assert await count_events(server) == 0


async def test_log_events_takes_a_full_batch(server: App, interaction_stub: InteractionServiceStub) -> None:
    events = [valid_event(T.EVENT_TYPE_VIEW, product_id=f"p{i}") for i in range(limits.MAX_BATCH_EVENTS)]
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))
    assert response.accepted_count == limits.MAX_BATCH_EVENTS
    assert await count_events(server) == limits.MAX_BATCH_EVENTS


async def test_log_events_refuses_a_batch_over_the_limit(server: App, interaction_stub: InteractionServiceStub) -> None:
    events = [valid_event(T.EVENT_TYPE_VIEW, product_id=f"p{i}") for i in range(limits.MAX_BATCH_EVENTS + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await interaction_stub.LogEvents(pb.LogEventsRequest(events=events))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1001 events" in field_violations(raised.value)["events"]
    assert await count_events(server) == 0


async def test_stream_reports_bad_events_in_the_response(server: App, interaction_stub: InteractionServiceStub) -> None:
    good, bad = valid_event(T.EVENT_TYPE_VIEW), valid_event(T.EVENT_TYPE_VIEW, user_id="")
    call = interaction_stub.StreamEvents()
    await call.write(pb.StreamEventsRequest(sequence=7, events=[good, bad]))
    await call.done_writing()
    responses = [r async for r in call]
    assert [(r.sequence, r.accepted_count, [x.index for x in r.rejected]) for r in responses] == [(7, 1, [1])]
    assert await count_events(server) == 1


async def test_stream_refuses_a_batch_over_the_limit_after_acknowledging_earlier_ones(
    server: App, interaction_stub: InteractionServiceStub
) -> None:
    call = interaction_stub.StreamEvents()
    await call.write(pb.StreamEventsRequest(sequence=1, events=[valid_event(T.EVENT_TYPE_VIEW)]))
    first = await call.read()
    assert (first.sequence, first.accepted_count) == (1, 1)
    too_many = [valid_event(T.EVENT_TYPE_VIEW) for _ in range(limits.MAX_BATCH_EVENTS + 1)]
    await call.write(pb.StreamEventsRequest(sequence=2, events=too_many))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 2" in field_violations(raised.value)["events"]
    assert await count_events(server) == 1


READS = [
    ("GetCart", state_pb.GetCartRequest),
    ("GetWishlist", state_pb.GetWishlistRequest),
    ("ListPurchases", state_pb.ListPurchasesRequest),
]


@pytest.mark.parametrize(("method", "request_type"), READS, ids=[r[0] for r in READS])
@pytest.mark.parametrize("user_id", ["", "   ", "u" * (limits.MAX_ID_LENGTH + 1)], ids=["empty", "blank", "too-long"])
async def test_reads_require_a_user_id(
    server: App, user_state_stub: UserStateServiceStub, method: str, request_type: type, user_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(user_state_stub, method)(request_type(user_id=user_id))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(raised.value)) == ["user_id"]


# Right alphabet and length but a date no purchase has (past year 9999): "fw" + "A" * 30.
FAR_FUTURE_TOKEN = "fw" + "A" * 30


@pytest.mark.parametrize("token", ["not-a-token", "A" * 31, "A" * 33, "@" * 32, FAR_FUTURE_TOKEN])
async def test_list_purchases_rejects_a_bad_page_token(
    server: App, user_state_stub: UserStateServiceStub, token: str
) -> None:
    request = state_pb.ListPurchasesRequest(user_id="u1", page_token=token)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await user_state_stub.ListPurchases(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(raised.value)) == ["page_token"]


async def test_list_purchases_rejects_a_negative_page_size(server: App, user_state_stub: UserStateServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="u1", page_size=-1))
    assert list(field_violations(raised.value)) == ["page_size"]


def purchase(user_id: str, at: datetime, product_id: str) -> Event:
    event = valid_event(T.EVENT_TYPE_PURCHASE, user_id=user_id, product_id=product_id, session_id="s9")
    event.occurred_at.FromDatetime(at)
    return event


async def list_all(
    stub: UserStateServiceStub, user_id: str, page_size: int
) -> tuple[list[state_pb.Purchase], list[int]]:
    """Every purchase, page by page, and the size of each page."""
    purchases: list[state_pb.Purchase] = []
    sizes: list[int] = []
    token = ""
    while True:
        request = state_pb.ListPurchasesRequest(user_id=user_id, page_size=page_size, page_token=token)
        page = await stub.ListPurchases(request)
        purchases.extend(page.purchases)
        sizes.append(len(page.purchases))
        token = page.next_page_token
        if not token:
            return purchases, sizes


async def test_list_purchases_pages_newest_first_without_gaps_or_repeats(
    server: App, interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    base = datetime(2026, 3, 1, 12, tzinfo=UTC)
    offsets = [0, 0, 0, 5, 9, 9, 30]  # ties are ordered by event_id
    mine = [purchase("buyer", base + timedelta(seconds=s), f"p{i}") for i, s in enumerate(offsets)]
    someone_elses = purchase("other", base, "p0")
    await interaction_stub.LogEvents(pb.LogEventsRequest(events=[*mine, someone_elses]))

    purchases, sizes = await list_all(user_state_stub, "buyer", page_size=3)

    expected = sorted(mine, key=lambda e: (e.occurred_at.ToDatetime(), e.event_id), reverse=True)
    assert [p.event_id for p in purchases] == [e.event_id for e in expected]
    assert sizes == [3, 3, 1]
    first = purchases[0]
    assert (first.product_id, first.session_id) == (expected[0].product_id, "s9")
    assert first.purchased_at == expected[0].occurred_at


async def test_list_purchases_pages_stay_stable_when_a_purchase_arrives(
    server: App, interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    base = datetime(2026, 3, 1, 12, tzinfo=UTC)
    older = [purchase("buyer", base + timedelta(seconds=i), f"p{i}") for i in range(4)]
    await interaction_stub.LogEvents(pb.LogEventsRequest(events=older))
    first = await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="buyer", page_size=2))

    await interaction_stub.LogEvent(pb.LogEventRequest(event=purchase("buyer", base + timedelta(hours=1), "new")))
    rest = await user_state_stub.ListPurchases(
        state_pb.ListPurchasesRequest(user_id="buyer", page_size=2, page_token=first.next_page_token)
    )
    assert [p.product_id for p in [*first.purchases, *rest.purchases]] == ["p3", "p2", "p1", "p0"]
    assert rest.next_page_token == ""


async def test_list_purchases_page_size_defaults_to_100_and_caps_at_1000(
    server: App, interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub
) -> None:
    base = datetime(2026, 3, 1, tzinfo=UTC)
    events = [purchase("buyer", base + timedelta(seconds=i), f"p{i}") for i in range(limits.MAX_BATCH_EVENTS + 1)]
    for start in range(0, len(events), limits.MAX_BATCH_EVENTS):
        batch = events[start : start + limits.MAX_BATCH_EVENTS]
        await interaction_stub.LogEvents(pb.LogEventsRequest(events=batch))

    default = await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="buyer"))
    assert len(default.purchases) == 100
    assert default.next_page_token

    capped = await user_state_stub.ListPurchases(state_pb.ListPurchasesRequest(user_id="buyer", page_size=5000))
    assert len(capped.purchases) == 1000
    last = await user_state_stub.ListPurchases(
        state_pb.ListPurchasesRequest(user_id="buyer", page_size=5000, page_token=capped.next_page_token)
    )
    assert [p.product_id for p in last.purchases] == ["p0"]
    assert last.next_page_token == ""


# LogEventRequest{event: Event{user_id: b"\xff"}}: bytes no protobuf runtime
# can parse (a string field with bad UTF-8), as a buggy client might send.
_EVENT_WITH_BAD_UTF8 = bytes([0x22, 1, 0xFF])
MALFORMED_LOG_EVENT = bytes([0x0A, len(_EVENT_WITH_BAD_UTF8)]) + _EVENT_WITH_BAD_UTF8
MALFORMED_STREAM_REQUEST = bytes([0x12, len(_EVENT_WITH_BAD_UTF8)]) + _EVENT_WITH_BAD_UTF8


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("/interactions.v1.InteractionService/LogEvent", MALFORMED_LOG_EVENT),
        ("/interactions.v1.InteractionService/LogEvents", MALFORMED_LOG_EVENT),
        ("/interactions.v1.UserStateService/GetCart", bytes([0x0A, 1, 0xFF])),
    ],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_not_unknown(
    server: App, channel: grpc.aio.Channel, method: str, payload: bytes
) -> None:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(payload)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad UTF-8" in error.value.details()
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 0


async def test_a_stream_request_that_does_not_parse_ends_the_stream_with_invalid_argument(
    server: App, channel: grpc.aio.Channel
) -> None:
    good = pb.StreamEventsRequest(sequence=1, events=[valid_event(EventType.EVENT_TYPE_VIEW)]).SerializeToString()
    call = channel.stream_stream(
        "/interactions.v1.InteractionService/StreamEvents",
        request_serializer=lambda b: b,
        response_deserializer=pb.StreamEventsResponse.FromString,
    )
    responses = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for response in call(iter([good, MALFORMED_STREAM_REQUEST])):
            responses.append(response)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.sequence for r in responses] == [1]  # the good batch before it was committed and answered
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 1
