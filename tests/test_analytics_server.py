"""AnalyticsService on the real server and PostgreSQL: every RPC against a
reference computed here, in plain Python, from the events the test sent.

The log is a seeded mix of every type over three days: out of order, with
duplicates resent, custom types, events without a product or a session,
searches whose text differs only by case, width and spacing, and a user
whose events sit exactly on the windows' edges.
"""

from __future__ import annotations

import logging
import random
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.rules import RULES, STANDARD, stored_name
from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1 import analytics_service_pb2_grpc, interaction_service_pb2, interaction_service_pb2_grpc
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.services import analytics
from interactions_server.storage import _analytics as analytics_storage
from tests.events import valid_event

T = EventType
MINUTE = 60_000_000  # microseconds
HOUR = 60 * MINUTE
DAY = 24 * HOUR
LEADS_TO = 30 * MINUTE
WEIGHTS = {r.name: r.ml_weight for r in STANDARD.values() if r.ml_weight is not None}
QUERIES = [
    "Laptop",
    "  laptop ",
    "\uff2c\uff21\uff30\uff34\uff2f\uff30",
    "gaming  Mouse",
    "gaming mouse",
    "Ünïcode\u00a0case",
    "rare",
]
COUNTED = ("searches", "click", "cart", "buy", "reported", "zero")
CLICKS, CARTS, PURCHASES = {"click", "view", "product_view"}, {"add_to_cart", "cart_add"}, {"purchase"}


def micros(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1_000


def ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1_000)


def normalised(query: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", query).lower().split())


def event_at(
    event_type: int,
    *,
    when: int,
    product_id: str | None = "p1",
    attributes: dict[str, str] | None = None,
    **fields: Any,
) -> Event:
    """A valid event of the type that occurred at `when` (epoch microseconds),
    about `product_id` where the type allows one (None: about no product)."""
    event = valid_event(event_type, **fields)
    event.ClearField("product_id")
    if product_id is not None and RULES[event_type].product_allowed:
        event.product_id = product_id
    event.occurred_at.CopyFrom(ts(when))
    event.attributes.update(attributes or {})
    return event


def key(e: Event) -> tuple[int, str]:
    return micros(e.occurred_at), e.event_id


def as_logged(e: Event) -> Event:
    logged = Event()
    logged.CopyFrom(e)
    if not logged.HasField("event_value"):
        logged.event_value = RULES[e.event_type].default_value or 0
    return logged


@dataclass
class Log:
    events: list[Event]  # each accepted event once
    start_us: int  # the span the events cover
    end_us: int

    def in_window(self, start: int | None, end: int | None) -> list[Event]:
        return [
            e
            for e in self.events
            if (start is None or micros(e.occurred_at) >= start) and (end is None or micros(e.occurred_at) < end)
        ]


def make_events(rng: random.Random, now_us: int) -> list[Event]:
    base = now_us - 3 * DAY
    users = ["alice", "Bob", "carol", "dave-ü", "Zed", "eve"]
    out: list[Event] = []

    def add(event_type: int, user: str, at: int, **fields: Any) -> Event:
        event = event_at(event_type, when=at, user_id=user, **fields)
        out.append(event)
        return event

    for user in users:
        at = base + rng.randrange(HOUR)
        for n in range(rng.randrange(4, 7)):
            session = f"s{n}-{user}" if rng.random() < 0.8 else None
            add(T.EVENT_TYPE_LOGIN, user, at, session_id=session or None)
            for _ in range(rng.randrange(3, 12)):
                at += rng.randrange(10_000_000, 12 * MINUTE)
                product = f"p{rng.randrange(6)}"
                kind = rng.choice(
                    [
                        "view",
                        "click",
                        "cart",
                        "buy",
                        "wish",
                        "review",
                        "search",
                        "pview",
                        "cartadd",
                        "page",
                        "custom",
                        "remove",
                    ]
                )
                s = session if session else None
                if kind == "search":
                    details: dict[str, Any] = {"query": rng.choice(QUERIES)}
                    if rng.random() < 0.6:
                        details["result_count"] = rng.choice([0, 0, 3, 12])
                    add(T.EVENT_TYPE_SEARCH, user, at, session_id=s, product_id=None, search=details)
                elif kind in ("pview", "cartadd", "page") and session is None:
                    add(T.EVENT_TYPE_VIEW, user, at, product_id=product)
                elif kind == "pview":
                    add(T.EVENT_TYPE_PRODUCT_VIEW, user, at, session_id=session, product_id=product)
                elif kind == "cartadd":
                    add(T.EVENT_TYPE_CART_ADD, user, at, session_id=session, product_id=product)
                elif kind == "page":
                    add(T.EVENT_TYPE_PAGE_VIEW, user, at, session_id=session, product_id=None)
                elif kind == "custom":
                    add(
                        T.EVENT_TYPE_CUSTOM,
                        user,
                        at,
                        session_id=s,
                        product_id=product if rng.random() < 0.5 else None,
                        custom_type=rng.choice(["gift_card_redeemed", "coupon_used"]),
                        attributes={"k": "v"},
                    )
                else:
                    event_type, value = {
                        "view": (T.EVENT_TYPE_VIEW, None),
                        "click": (T.EVENT_TYPE_CLICK, None),
                        "cart": (T.EVENT_TYPE_ADD_TO_CART, rng.randrange(1, 4)),
                        "buy": (T.EVENT_TYPE_PURCHASE, None),
                        "wish": (T.EVENT_TYPE_WISHLIST, rng.randrange(2)),
                        "review": (T.EVENT_TYPE_REVIEW, rng.randrange(1, 6)),
                        "remove": (T.EVENT_TYPE_REMOVE_FROM_CART, None),
                    }[kind]
                    event = add(event_type, user, at, session_id=s, product_id=product)
                    if value is not None:
                        event.event_value = value
            at += rng.randrange(MINUTE, 10 * HOUR)
            add(T.EVENT_TYPE_LOGOUT, user, at, session_id=session or None)
    # Same instant, different ids: the (occurred_at, event_id) order decides.
    twin_at = base + DAY
    for _ in range(3):
        add(T.EVENT_TYPE_VIEW, "twins", twin_at, product_id="p1", session_id="tw")
    add(T.EVENT_TYPE_SEARCH, "twins", twin_at, search={"query": "Twin"}, session_id="tw")
    # A click in the same instant as its search: led to by it, whatever the ids.
    for n in range(20):
        add(T.EVENT_TYPE_SEARCH, f"quick-{n}", twin_at + n, search={"query": "Same instant"})
        add(T.EVENT_TYPE_CLICK, f"quick-{n}", twin_at + n, product_id="p2")
    return out


async def send(channel: grpc.aio.Channel, events: Sequence[Event], rng: random.Random) -> None:
    """In a shuffled order, in several batches, then a fifth of them again."""
    stub = interaction_service_pb2_grpc.InteractionServiceStub(channel)
    shuffled = list(events)
    rng.shuffle(shuffled)
    resent = rng.sample(shuffled, len(shuffled) // 5)
    accepted = duplicates = 0
    for batch in (shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :], resent):
        response = await stub.LogEvents(interaction_service_pb2.LogEventsRequest(events=batch))
        assert not response.rejected, response.rejected[:1]
        accepted += response.accepted_count
        duplicates += response.duplicate_count
    assert (accepted, duplicates) == (len(events), len(resent))


@pytest.fixture
async def log(channel: grpc.aio.Channel) -> Log:
    rng = random.Random(8)
    now_us = int(time.time()) * 1_000_000
    events = make_events(rng, now_us)
    await send(channel, events, rng)
    times = [micros(e.occurred_at) for e in events]
    return Log(events, min(times), max(times) + 1)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> analytics_service_pb2_grpc.AnalyticsServiceStub:
    return analytics_service_pb2_grpc.AnalyticsServiceStub(channel)


def windows(log: Log) -> list[tuple[int | None, int | None]]:
    """Unbounded, half-bounded, empty, and bounds exactly on events' times."""
    times = sorted({micros(e.occurred_at) for e in log.events})
    a, b = times[len(times) // 4], times[3 * len(times) // 4]
    return [(None, None), (a, None), (None, b), (a, b), (a, a), (log.start_us, log.end_us)]


def window_request(cls: Any, start: int | None, end: int | None, **fields: Any) -> Any:
    request = cls(**fields)
    if start is not None:
        request.start_time.CopyFrom(ts(start))
    if end is not None:
        request.end_time.CopyFrom(ts(end))
    return request


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [response async for response in stream]


# --- ExportTrainingData ---------------------------------------------------------------


def reference_training(events: Iterable[Event], as_of: int, half_life: float | None) -> list[tuple[Any, ...]]:
    pairs: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for e in events:
        if stored_name(e) in WEIGHTS and e.product_id:
            pairs[(e.user_id, e.product_id)].append(e)
    rows = []
    for (user, product), evs in sorted(pairs.items()):
        weight = 0.0
        for e in evs:
            decay = 1.0 if half_life is None else 0.5 ** ((as_of - micros(e.occurred_at)) / 1e6 / half_life)
            weight += WEIGHTS[stored_name(e)] * decay
        counts = dict(Counter(stored_name(e) for e in evs))
        rows.append((user, product, weight, len(evs), max(micros(e.occurred_at) for e in evs), counts))
    return rows


def training_tuples(responses: Sequence[pb.ExportTrainingDataResponse]) -> list[tuple[Any, ...]]:
    return [
        (r.user_id, r.product_id, r.weight, r.event_count, micros(r.last_occurred_at), dict(r.counts))
        for response in responses
        for r in response.rows
    ]


def assert_same_training(actual: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    assert [(a[0], a[1]) for a in actual] == [(e[0], e[1]) for e in expected]
    for a, e in zip(actual, expected, strict=True):
        assert a[2] == pytest.approx(e[2], rel=1e-9), a
        assert a[3:] == e[3:]


@pytest.mark.parametrize("half_life", [None, 3600.0, 86400.5])
async def test_training_matches_reference(stub: Any, log: Log, half_life: float | None) -> None:
    for start, end in windows(log):
        request = window_request(pb.ExportTrainingDataRequest, start, end)
        if half_life is not None:
            request.half_life.CopyFrom(Duration(seconds=int(half_life), nanos=int(half_life % 1 * 1e9)))
        before = int(time.time() * 1e6)
        responses = await collect(stub.ExportTrainingData(request))
        assert responses[0].HasField("as_of") and all(not r.HasField("as_of") for r in responses[1:])
        as_of = micros(responses[0].as_of)
        if end is not None:
            assert as_of == end
        else:
            assert before <= as_of <= int(time.time() * 1e6)
        expected = reference_training(log.in_window(start, end), as_of, half_life)
        assert_same_training(training_tuples(responses), expected)
        if start is not None and start == end:
            assert expected == [] and len(responses) == 1


async def test_training_resumed_in_the_middle_gives_the_same_rows(
    stub: Any, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(analytics, "ROWS_PER_RESPONSE", 5)
    # With end_time, both calls have the same as_of.
    request = pb.ExportTrainingDataRequest(half_life=Duration(seconds=7200), end_time=ts(log.end_us))
    whole = await collect(stub.ExportTrainingData(request))
    assert len(whole) > 4
    # Interrupted after the third response: cancel the call, resume from its token.
    call = stub.ExportTrainingData(request)
    received = [await call.read() for _ in range(3)]
    call.cancel()
    resumed = await collect(
        stub.ExportTrainingData(
            pb.ExportTrainingDataRequest(
                half_life=request.half_life, end_time=request.end_time, resume_token=received[-1].resume_token
            )
        )
    )
    assert resumed[0].as_of == received[0].as_of  # the same as_of, from the token
    assert_same_training(training_tuples(received + resumed), training_tuples(whole))


async def test_training_weights_decay_to_zero_without_errors(stub: Any, channel: grpc.aio.Channel) -> None:
    """Thousands of half-lives (a 1 s half-life over hours-old events, or an
    as_of in year 9999) underflow 0.5 ** n: the weight is 0, not an error."""
    now = int(time.time()) * 1_000_000
    events = [
        event_at(T.EVENT_TYPE_PURCHASE, user_id="old", product_id="p", when=now - 2 * HOUR),
        event_at(T.EVENT_TYPE_VIEW, user_id="old", product_id="p", when=now - HOUR),
    ]
    await send(channel, events, random.Random(1))
    second = Duration(seconds=1)
    for request in (
        pb.ExportTrainingDataRequest(half_life=second),
        pb.ExportTrainingDataRequest(half_life=second, end_time=ts(now + HOUR)),
        pb.ExportTrainingDataRequest(half_life=Duration(seconds=3600), end_time=Timestamp(seconds=253_402_300_799)),
    ):
        ((user, product, weight, count, last, counts),) = training_tuples(
            await collect(stub.ExportTrainingData(request))
        )
        assert (user, product, weight, count, last) == ("old", "p", 0.0, 2, now - HOUR)
        assert counts == {"purchase": 1, "view": 1}


async def test_without_end_time_as_of_ends_the_window(
    stub: Any, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event after as_of (future-dated, or logged before a resumed call)
    is in neither the first call nor the resumed one."""
    monkeypatch.setattr(analytics, "ROWS_PER_RESPONSE", 1)
    now = int(time.time()) * 1_000_000
    await send(
        channel,
        [
            event_at(T.EVENT_TYPE_VIEW, user_id="a", product_id="p", when=now - HOUR),
            event_at(T.EVENT_TYPE_VIEW, user_id="b", product_id="p", when=now - HOUR),
            event_at(T.EVENT_TYPE_VIEW, user_id="b", product_id="p", when=now + 4 * MINUTE),  # future-dated
        ],
        random.Random(1),
    )
    request = pb.ExportTrainingDataRequest(half_life=Duration(seconds=3600))
    call = stub.ExportTrainingData(request)
    first = await call.read()
    call.cancel()
    as_of = micros(first.as_of)
    assert as_of < now + 4 * MINUTE
    # Logged after the first call, dated just after its as_of: not in the resumed call.
    await send(
        channel,
        [
            event_at(T.EVENT_TYPE_VIEW, user_id="c", product_id="p", when=as_of + 1),
            event_at(T.EVENT_TYPE_VIEW, user_id="b", product_id="q", when=as_of + 2),
        ],
        random.Random(1),
    )
    request.resume_token = first.resume_token
    rows = training_tuples([first, *await collect(stub.ExportTrainingData(request))])
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("a", "p", 1, now - HOUR), ("b", "p", 1, now - HOUR)]
    for r in rows:
        assert r[2] == pytest.approx(WEIGHTS["view"] * 0.5 ** ((as_of - (now - HOUR)) / 1e6 / 3600), rel=1e-9)


# --- ExportEvents -------------------------------------------------------------------


def exported(responses: Sequence[pb.ExportEventsResponse]) -> list[pb.ExportedEvent]:
    return [e for response in responses for e in response.events]


@pytest.mark.parametrize(
    "types",
    [
        [],
        [T.EVENT_TYPE_SEARCH, T.EVENT_TYPE_PURCHASE],
        [T.EVENT_TYPE_CUSTOM],
        [T.EVENT_TYPE_LOGIN, T.EVENT_TYPE_CUSTOM],
    ],
)
async def test_export_events_matches_reference(stub: Any, log: Log, types: list[int]) -> None:
    started = int(time.time() * 1e6)
    for start, end in windows(log):
        responses = await collect(
            stub.ExportEvents(window_request(pb.ExportEventsRequest, start, end, event_types=types))
        )
        actual = exported(responses)
        expected = sorted((e for e in log.in_window(start, end) if not types or e.event_type in types), key=key)
        assert [a.event for a in actual] == [as_logged(e) for e in expected]
        assert [a.ml_weight for a in actual] == [WEIGHTS.get(stored_name(e), 0.0) for e in expected]
        assert all(micros(a.received_at) <= started for a in actual)


async def test_export_events_resumed_in_the_middle_gives_the_same_rows(
    stub: Any, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(analytics, "ROWS_PER_RESPONSE", 16)
    whole = exported(await collect(stub.ExportEvents(pb.ExportEventsRequest())))
    assert len(whole) == len(log.events)
    call = stub.ExportEvents(pb.ExportEventsRequest())
    received = [await call.read() for _ in range(4)]
    call.cancel()
    resumed = await collect(stub.ExportEvents(pb.ExportEventsRequest(resume_token=received[-1].resume_token)))
    assert exported(received) + exported(resumed) == whole


# --- TopSearchQueries ------------------------------------------------------------------


def reference_searches(log: Log, start: int | None, end: int | None, limit: int) -> list[tuple[Any, ...]]:
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in log.events:
        by_user[e.user_id].append(e)
    stats: dict[str, dict[str, Any]] = {}
    for evs in by_user.values():
        evs.sort(key=lambda e: (micros(e.occurred_at), e.event_type != T.EVENT_TYPE_SEARCH, e.event_id))
        for i, s in enumerate(evs):
            at = micros(s.occurred_at)
            if (
                s.event_type != T.EVENT_TYPE_SEARCH
                or (start is not None and at < start)
                or (end is not None and at >= end)
            ):
                continue
            led: set[str] = set()
            for later in evs[i + 1 :]:
                if later.event_type == T.EVENT_TYPE_SEARCH or micros(later.occurred_at) > at + LEADS_TO:
                    break
                led.add(stored_name(later))
            q = stats.setdefault(normalised(s.search.query), {"users": set(), **dict.fromkeys(COUNTED, 0)})
            q["searches"] += 1
            q["users"].add(s.user_id)
            q["click"] += bool(led & CLICKS)
            q["cart"] += bool(led & CARTS)
            q["buy"] += bool(led & PURCHASES)
            if s.search.HasField("result_count"):
                q["reported"] += 1
                q["zero"] += s.search.result_count == 0
    ranked = sorted(stats.items(), key=lambda kv: (-kv[1]["searches"], kv[0]))[:limit]
    return [
        (
            query,
            q["searches"],
            len(q["users"]),
            q["click"] / q["searches"],
            q["cart"] / q["searches"],
            q["buy"] / q["searches"],
            q["zero"] / q["reported"] if q["reported"] else None,
        )
        for query, q in ranked
    ]


def search_tuples(response: pb.TopSearchQueriesResponse) -> list[tuple[Any, ...]]:
    return [
        (
            q.query,
            q.searches,
            q.users,
            q.click_through_rate,
            q.add_to_cart_rate,
            q.conversion_rate,
            q.no_result_rate if q.HasField("no_result_rate") else None,
        )
        for q in response.queries
    ]


async def test_top_search_queries_matches_reference(stub: Any, log: Log) -> None:
    for start, end in windows(log):
        for limit in (0, 2):
            response = await stub.TopSearchQueries(window_request(pb.TopSearchQueriesRequest, start, end, limit=limit))
            assert search_tuples(response) == reference_searches(log, start, end, limit or 20)
    everything = search_tuples(await stub.TopSearchQueries(pb.TopSearchQueriesRequest()))
    assert {q[0] for q in everything} >= {"laptop", "gaming mouse", "twin"}  # the variants merged
    assert [q[1:4] for q in everything if q[0] == "same instant"] == [(20, 20, 1.0)]


async def test_what_a_search_leads_to(stub: Any, channel: grpc.aio.Channel) -> None:
    """The definition on a hand-made history, independent of the reference."""
    t0 = (int(time.time()) - 3 * 3600) * 1_000_000
    u = "searcher"
    events = [
        event_at(T.EVENT_TYPE_SEARCH, user_id=u, when=(t0), search={"query": "Shoes", "result_count": 0}),
        event_at(T.EVENT_TYPE_CLICK, user_id=u, when=(t0 + 10 * MINUTE)),  # led to by search 1
        event_at(T.EVENT_TYPE_SEARCH, user_id=u, when=(t0 + 20 * MINUTE), search={"query": " SHOES"}),
        event_at(T.EVENT_TYPE_ADD_TO_CART, user_id=u, when=(t0 + 50 * MINUTE)),  # exactly 30 min: led
        event_at(T.EVENT_TYPE_PURCHASE, user_id=u, when=(t0 + 50 * MINUTE + 1)),  # 1 µs too late
        event_at(T.EVENT_TYPE_PURCHASE, user_id="someone else", when=(t0 + 21 * MINUTE)),
        event_at(T.EVENT_TYPE_SEARCH, user_id=u, when=(t0 + 2 * HOUR), search={"query": "shoes", "result_count": 4}),
    ]
    await send(channel, events, random.Random(1))
    (shoes,) = (await stub.TopSearchQueries(pb.TopSearchQueriesRequest())).queries
    assert (shoes.query, shoes.searches, shoes.users) == ("shoes", 3, 1)
    assert (shoes.click_through_rate, shoes.add_to_cart_rate, shoes.conversion_rate) == (1 / 3, 1 / 3, 0.0)
    assert shoes.no_result_rate == 0.5
    # Only the first search in the window: its outcome is unchanged by the cut.
    window = window_request(pb.TopSearchQueriesRequest, t0, t0 + 1)
    (first,) = (await stub.TopSearchQueries(window)).queries
    assert (first.searches, first.click_through_rate, first.no_result_rate) == (1, 1.0, 1.0)


async def test_the_lead_time_is_analytics_storage_constant(
    stub: Any, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQL takes LEADS_TO_US as a parameter: one source for the 30 minutes."""
    assert analytics_storage.LEADS_TO_US == LEADS_TO
    monkeypatch.setattr(analytics_storage, "LEADS_TO_US", 5 * MINUTE)
    t0 = (int(time.time()) - 3 * 3600) * 1_000_000
    events = [
        event_at(T.EVENT_TYPE_SEARCH, user_id="u", when=t0, search={"query": "lamp"}),
        event_at(T.EVENT_TYPE_CLICK, user_id="u", when=t0 + 10 * MINUTE),  # within 30 min, not within 5
    ]
    await send(channel, events, random.Random(1))
    (lamp,) = (await stub.TopSearchQueries(pb.TopSearchQueriesRequest())).queries
    assert (lamp.searches, lamp.click_through_rate) == (1, 0.0)


# --- sessions, activity, active users, user events -------------------------------------


def reference_sessions(log: Log, user: str) -> list[dict[str, Any]]:
    by_session: dict[str, list[Event]] = defaultdict(list)
    for e in sorted(log.events, key=key):
        if e.user_id == user and e.session_id:
            by_session[e.session_id].append(e)
    sessions = []
    for sid, evs in by_session.items():
        viewed: list[str] = []
        for e in evs:
            if stored_name(e) in CLICKS and e.product_id not in viewed:
                viewed.append(e.product_id)
        sessions.append(
            {
                "session_id": sid,
                "started": micros(evs[0].occurred_at),
                "ended": micros(evs[-1].occurred_at),
                "count": len(evs),
                "counts": dict(Counter(stored_name(e) for e in evs)),
                "viewed": viewed,
                "queries": [e.search.query for e in evs if e.event_type == T.EVENT_TYPE_SEARCH],
                "events": [as_logged(e) for e in evs],
            }
        )
    return sorted(sessions, key=lambda s: (s["started"], s["session_id"]), reverse=True)


def session_dict(s: pb.Session) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "started": micros(s.started_at),
        "ended": micros(s.ended_at),
        "count": s.event_count,
        "counts": dict(s.counts),
        "viewed": list(s.products_viewed),
        "queries": list(s.search_queries),
        "events": list(s.events),
    }


def users(log: Log) -> list[str]:
    return sorted({e.user_id for e in log.events})


async def test_sessions_match_reference(stub: Any, log: Log) -> None:
    for user in users(log):
        expected = reference_sessions(log, user)
        listed: list[pb.Session] = []
        token = ""
        while True:
            page = await stub.ListSessions(pb.ListSessionsRequest(user_id=user, page_size=2, page_token=token))
            listed.extend(page.sessions)
            assert len(page.sessions) <= 2
            token = page.next_page_token
            if not token:
                break
        assert [session_dict(s) for s in listed] == [{**s, "events": []} for s in expected]
        for s in expected:
            got = (await stub.GetSession(pb.GetSessionRequest(user_id=user, session_id=s["session_id"]))).session
            assert session_dict(got) == s and got.user_id == user and not got.truncated
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSession(pb.GetSessionRequest(user_id="alice", session_id="s0-Bob"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.ListSessions(pb.ListSessionsRequest(user_id="nobody"))).sessions == []


async def test_long_session_is_truncated(stub: Any, channel: grpc.aio.Channel) -> None:
    t0 = (int(time.time()) - 3600) * 1_000_000
    events = [
        event_at(T.EVENT_TYPE_PAGE_VIEW, user_id="busy", session_id="long", when=(t0 + i * 1000))
        for i in range(analytics.MAX_SESSION_EVENTS + 5)
    ]
    await send(channel, events, random.Random(2))
    session = (await stub.GetSession(pb.GetSessionRequest(user_id="busy", session_id="long"))).session
    assert session.event_count == len(events) and session.truncated
    assert list(session.events) == [as_logged(e) for e in sorted(events, key=key)][: analytics.MAX_SESSION_EVENTS]


async def test_user_activity_matches_reference(stub: Any, log: Log) -> None:
    for user in users(log):
        evs = [e for e in log.events if e.user_id == user]
        logins = [micros(e.occurred_at) for e in evs if e.event_type == T.EVENT_TYPE_LOGIN]
        logouts = [micros(e.occurred_at) for e in evs if e.event_type == T.EVENT_TYPE_LOGOUT]
        got = await stub.GetUserActivity(pb.GetUserActivityRequest(user_id=user))
        assert micros(got.first_seen_at) == min(micros(e.occurred_at) for e in evs)
        assert micros(got.last_seen_at) == max(micros(e.occurred_at) for e in evs)
        assert (got.login_count, got.logout_count) == (len(logins), len(logouts))
        assert got.HasField("last_login_at") == bool(logins) and got.HasField("last_logout_at") == bool(logouts)
        if logins:
            assert micros(got.last_login_at) == max(logins)
        if logouts:
            assert micros(got.last_logout_at) == max(logouts)
        assert got.session_count == len({e.session_id for e in evs if e.session_id})
        assert dict(got.event_counts) == dict(Counter(stored_name(e) for e in evs))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUserActivity(pb.GetUserActivityRequest(user_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def day(e: Event) -> str:
    return datetime.fromtimestamp(micros(e.occurred_at) / 1e6, UTC).strftime("%Y-%m-%d")


def window_days(evs: list[Event], start: int | None, end: int | None) -> list[str]:
    """Every UTC day of [start, end); an absent bound: the first (last) event's day."""
    if start is not None and start == end:
        return []
    times = sorted(micros(e.occurred_at) for e in evs)
    first = start if start is not None else times[0] if times else None
    last = end - 1 if end is not None else times[-1] if times else None
    if first is None or last is None:
        return []
    first_day, last_day = first // DAY, last // DAY
    return [datetime.fromtimestamp(d * DAY / 1e6, UTC).strftime("%Y-%m-%d") for d in range(first_day, last_day + 1)]


async def test_active_users_match_reference(stub: Any, log: Log) -> None:
    # Also: days without events before, between and after the log's.
    for start, end in [*windows(log), (log.start_us - 3 * DAY, log.end_us + 2 * DAY)]:
        evs = log.in_window(start, end)
        days = window_days(evs, start, end)
        assert set(days) >= {day(e) for e in evs}
        got = await stub.CountActiveUsers(window_request(pb.CountActiveUsersRequest, start, end))
        assert got.active_users == len({e.user_id for e in evs})
        assert got.logged_in_users == len({e.user_id for e in evs if e.event_type == T.EVENT_TYPE_LOGIN})
        assert [(d.date, d.active_users, d.logged_in_users) for d in got.daily] == [
            (
                d,
                len({e.user_id for e in evs if day(e) == d}),
                len({e.user_id for e in evs if day(e) == d and e.event_type == T.EVENT_TYPE_LOGIN}),
            )
            for d in days
        ]


@pytest.mark.parametrize("types", [[], [T.EVENT_TYPE_SEARCH, T.EVENT_TYPE_CUSTOM], [T.EVENT_TYPE_VIEW]])
async def test_user_events_match_reference(stub: Any, log: Log, types: list[int]) -> None:
    for user in users(log):
        for start, end in windows(log):
            expected = sorted(
                (e for e in log.in_window(start, end) if e.user_id == user and (not types or e.event_type in types)),
                key=key,
                reverse=True,
            )
            got: list[Event] = []
            token = ""
            while True:
                request = window_request(
                    pb.ListUserEventsRequest, start, end, user_id=user, event_types=types, page_size=7, page_token=token
                )
                page = await stub.ListUserEvents(request)
                got.extend(page.events)
                token = page.next_page_token
                if not token:
                    break
            assert got == [as_logged(e) for e in expected]
    default = await stub.ListUserEvents(pb.ListUserEventsRequest(user_id="alice"))
    assert len(default.events) == min(100, sum(e.user_id == "alice" for e in log.events))
    assert (await stub.ListUserEvents(pb.ListUserEventsRequest(user_id="nobody"))).events == []


async def test_cancelled_exports_release_their_connections_cleanly(
    stub: Any, log: Log, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More cancelled exports than the analytics pool has connections: each
    ends its cursor and transaction, nothing is logged as an error, and a
    whole export still runs afterwards."""
    monkeypatch.setattr(analytics, "ROWS_PER_RESPONSE", 3)
    for _ in range(8):
        for call in (
            stub.ExportEvents(pb.ExportEventsRequest()),
            stub.ExportTrainingData(pb.ExportTrainingDataRequest()),
        ):
            await call.read()
            call.cancel()
    whole = exported(await collect(stub.ExportEvents(pb.ExportEventsRequest())))
    assert len(whole) == len(log.events)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_large_events_are_split_into_responses_of_about_a_mebibyte(stub: Any, channel: grpc.aio.Channel) -> None:
    t0 = (int(time.time()) - 3600) * 1_000_000
    attributes = {f"k{i:02}": "v" * 1_024 for i in range(50)}  # the limits: about 53 KB per event
    events = [event_at(T.EVENT_TYPE_VIEW, when=t0 + i, user_id="big", attributes=attributes) for i in range(60)]
    await send(channel, events, random.Random(3))
    responses = await collect(stub.ExportEvents(pb.ExportEventsRequest()))
    assert [e.event for e in exported(responses)] == [as_logged(e) for e in sorted(events, key=key)]
    assert len(responses) >= 3
    assert all(r.ByteSize() <= analytics.BYTES_PER_RESPONSE + 60_000 for r in responses)
