"""RecommendationService on the real server and PostgreSQL: every RPC against
the reference of tests/recs_reference.py, computed from the events the test
sent, with the maintainer running as it does in production (the tests wait
until it has applied what they sent: storage.wait_applied).

Covered: out-of-order arrival and duplicates, deletion, exclusions, ties,
the window and half-life edges, the together relation's edges (one hour
exactly, sessions, empty sessions) and its cap, bad input, unknown ids, and
a rebuild from the log giving the same aggregates as the maintenance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client import InteractionsClient, SyncInteractionsClient
from interactions_client.rules import STANDARD
from interactions_client.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    interaction_service_pb2,
    interaction_service_pb2_grpc,
    recommendation_service_pb2_grpc,
)
from interactions_client.v1 import recommendation_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_server import storage
from interactions_server.config import RetentionPolicy
from interactions_server.server import App
from interactions_server.storage import _recommendations as recs
from tests import recs_reference as ref
from tests.events import valid_event
from tests.support import StartServer, field_violations
from tests.test_cli import cli

HOUR = 3600.0
DAY = 86400.0
TOLERANCE = 1e-3  # relative: the decay estimated from a bucket's moments (docs/analytics.md)


def to_event(e: ref.Ev, event_id: str | None = None) -> Event:
    rule = STANDARD[e.type]
    event = valid_event(rule.event_type, user_id=e.user)
    if event_id is not None:
        event.event_id = event_id
    event.ClearField("product_id")
    if e.product:
        event.product_id = e.product
    event.ClearField("session_id")
    if e.session:
        event.session_id = e.session
    seconds = math.floor(e.at)
    event.occurred_at.CopyFrom(Timestamp(seconds=seconds, nanos=round((e.at - seconds) * 1e6) * 1000))
    return event


async def send(server: App, events: Sequence[Event]) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = interaction_service_pb2_grpc.InteractionServiceStub(channel)
        for first in range(0, len(events), 500):
            response = await stub.LogEvents(
                interaction_service_pb2.LogEventsRequest(events=events[first : first + 500])
            )
            assert not response.rejected, response.rejected[:3]


async def applied(server: App) -> None:
    await storage.wait_applied(server.pool, 30.0)


def stub(channel: grpc.aio.Channel) -> recommendation_service_pb2_grpc.RecommendationServiceStub:
    return recommendation_service_pb2_grpc.RecommendationServiceStub(channel)


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def same(got: Sequence[pb.ScoredProduct], want: Sequence[ref.Row], *, last: bool = True, rel: float = 1e-9) -> None:
    assert [p.product_id for p in got] == [r.product_id for r in want]
    for p, r in zip(got, want, strict=True):
        assert p.score == pytest.approx(r.score, rel=rel, abs=1e-12), p.product_id
        assert p.support == r.support, p.product_id
        if last and r.last is not None:
            assert seconds(p.last_occurred_at) == pytest.approx(r.last, abs=1e-6), p.product_id
        if r.last is None:
            assert not p.HasField("last_occurred_at")


def mix(rng: random.Random, now: float, *, users: int = 12, products: int = 15, count: int = 600) -> list[ref.Ev]:
    """A seeded mix over the last three days: every kind of type, sessions
    (some spanning hours), events without a session, a few without product."""
    kinds = ["view"] * 5 + ["click"] * 2 + ["product_view", "purchase", "purchase", "add_to_cart", "wishlist", "review"]
    kinds += ["search", "page_view", "login"]
    events = []
    for _ in range(count):
        kind = rng.choice(kinds)
        user = f"u{rng.randrange(users)}"
        at = now - rng.uniform(60, 3 * DAY)
        product: str | None = f"p{min(rng.randrange(products), rng.randrange(products))}"
        if kind in ("login",) or (kind in ("search", "page_view") and rng.random() < 0.5):
            product = None
        session = f"s-{user}-{int(at // (3 * HOUR))}" if rng.random() < 0.7 else ""
        if STANDARD[kind].session_required and not session:
            session = f"s-{user}-x"
        events.append(ref.Ev(user, product, kind, round(at, 6), session))
    return events


async def test_every_rpc_against_the_reference(server: App) -> None:
    rng = random.Random(20)
    now = time.time()
    events = mix(rng, now)
    protos = [to_event(e) for e in events]
    order = list(range(len(protos)))
    rng.shuffle(order)  # out of order
    await send(server, [protos[i] for i in order[: len(order) // 2]])
    await applied(server)
    await send(server, [protos[i] for i in order[len(order) // 3 :]])  # the overlap: duplicates
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        for user in sorted({e.user for e in events}):
            got = await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id=user, limit=100))
            same(got.products, ref.recently_viewed(events, user, 100))
            got = await rec.UserAffinities(pb.UserAffinitiesRequest(user_id=user, limit=100))
            same(got.products, ref.affinities(events, user, now, None, 100))
            before = time.time()
            got = await rec.UserAffinities(
                pb.UserAffinitiesRequest(user_id=user, limit=100, half_life=Duration(seconds=int(2 * DAY)))
            )
            want = ref.affinities(events, user, before, 2 * DAY, 100)
            assert {p.product_id for p in got.products} == {r.product_id for r in want}
            by_id = {r.product_id: r for r in want}
            for p in got.products:
                assert p.score == pytest.approx(by_id[p.product_id].score, rel=TOLERANCE), p.product_id
                assert p.support == by_id[p.product_id].support
        for product in sorted({e.product for e in events if e.product}):
            got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id=product, limit=100))
            same(got.products, ref.together(events, ref.PURCHASE_TYPES, product, 100))
            got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id=product, limit=100))
            same(got.products, ref.together(events, ref.VIEW_TYPES, product, 100))
        before = time.time()
        got = await rec.TrendingProducts(pb.TrendingProductsRequest(limit=100))
        want = ref.trending(events, before, limit=100)
        assert {p.product_id for p in got.products} == {r.product_id for r in want}
        for p, r in zip(got.products, sorted(want, key=lambda r: r.product_id), strict=False):
            del p, r
        by_id = {r.product_id: r for r in want}
        for p in got.products:
            assert p.score == pytest.approx(by_id[p.product_id].score, rel=TOLERANCE), p.product_id
            assert p.support == by_id[p.product_id].support
    # At a fixed now, against the bucket rule exactly and the definition within the tolerance.
    for window, half_life in ((7 * DAY, DAY), (DAY, 6 * HOUR), (3 * HOUR, HOUR), (30 * DAY, 30 * DAY)):
        rows = await storage.trending(server.pool, now, window, half_life, 100)
        want = ref.trending(events, now, window, half_life, 100)
        same_scored(rows, want)


def same_scored(rows: Sequence[storage.Scored], want: Sequence[ref.Row]) -> None:
    assert [r.product_id for r in rows] == [w.product_id for w in want]
    for r, w in zip(rows, want, strict=True):
        assert r.score == pytest.approx(w.score, rel=TOLERANCE), r.product_id
        assert r.support == w.support, r.product_id
        assert r.last_occurred_at is not None and w.last is not None
        assert r.last_occurred_at.timestamp() == pytest.approx(w.last, abs=1e-6)


async def test_affinities_of_a_heavy_person_take_rounds_and_stay_exact(server: App) -> None:
    """UserAffinities with a half-life reads the person's products by
    weight, the heaviest first, in rounds (storage's threshold algorithm):
    here the 60 heaviest products (30 old events and one recent) score below
    20 with three recent events, so the first round's 40 do not settle it and
    the answer comes from the second; it is the reference's."""
    now = time.time()
    events = [ref.Ev("heavy", f"mixed-{i:02d}", "view", now - 10 * DAY - j * 60) for i in range(60) for j in range(30)]
    events += [ref.Ev("heavy", f"mixed-{i:02d}", "view", now - HOUR - i) for i in range(60)]
    events += [
        ref.Ev("heavy", f"steady-{i:02d}", "view", now - (1 + 0.5 * i) * HOUR - j) for i in range(20) for j in range(3)
    ]
    await send(server, [to_event(e) for e in events])
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        for limit in (5, 20, 100):
            before = time.time()
            got = await rec.UserAffinities(
                pb.UserAffinitiesRequest(user_id="heavy", limit=limit, half_life=Duration(seconds=int(DAY)))
            )
            want = ref.affinities(events, "heavy", before, DAY, limit)
            assert [p.product_id for p in got.products] == [r.product_id for r in want]
            for p, r in zip(got.products, want, strict=True):
                assert p.score == pytest.approx(r.score, rel=TOLERANCE), p.product_id
                assert p.support == r.support
        assert [p.product_id for p in got.products][:20] == [f"steady-{i:02d}" for i in range(20)]


async def test_unknown_ids_answer_empty_lists(server: App) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        assert not (await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id="nobody"))).products
        assert not (await rec.UserAffinities(pb.UserAffinitiesRequest(user_id="nobody"))).products
        assert not (await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id="none"))).products
        assert not (await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="none"))).products
        assert not (await rec.TrendingProducts(pb.TrendingProductsRequest())).products


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("RecentlyViewed", pb.RecentlyViewedRequest(user_id="u", limit=-1), "limit"),
        ("RecentlyViewed", pb.RecentlyViewedRequest(user_id="u", limit=101), "limit"),
        ("RecentlyViewed", pb.RecentlyViewedRequest(user_id=""), "user_id"),
        ("RecentlyViewed", pb.RecentlyViewedRequest(user_id="u" * 129), "user_id"),
        (
            "RecentlyViewed",
            pb.RecentlyViewedRequest(user_id="u", exclude_product_ids=["p", "x" * 129]),
            "exclude_product_ids[1]",
        ),
        (
            "RecentlyViewed",
            pb.RecentlyViewedRequest(user_id="u", exclude_product_ids=["p"] * 1001),
            "exclude_product_ids",
        ),
        ("TrendingProducts", pb.TrendingProductsRequest(window=Duration(seconds=0)), "window"),
        ("TrendingProducts", pb.TrendingProductsRequest(window=Duration(seconds=-5)), "window"),
        ("TrendingProducts", pb.TrendingProductsRequest(half_life=Duration(seconds=1, nanos=-1)), "half_life"),
        ("TrendingProducts", pb.TrendingProductsRequest(half_life=Duration(nanos=1_000_000_000)), "half_life"),
        ("TrendingProducts", pb.TrendingProductsRequest(limit=-3), "limit"),
        ("FrequentlyBoughtTogether", pb.FrequentlyBoughtTogetherRequest(product_id="p" * 129), "product_id"),
        ("FrequentlyBoughtTogether", pb.FrequentlyBoughtTogetherRequest(product_id="p\x00"), "product_id"),
        ("AlsoViewed", pb.AlsoViewedRequest(product_id=" "), "product_id"),
        ("AlsoViewed", pb.AlsoViewedRequest(product_id="p", limit=1000), "limit"),
        ("UserAffinities", pb.UserAffinitiesRequest(user_id="u", half_life=Duration(seconds=0)), "half_life"),
        ("UserAffinities", pb.UserAffinitiesRequest(user_id="u", limit=-1), "limit"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    server: App, method: str, request_: object, field: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(stub(channel), method)(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)


async def test_exclusions_and_ties(server: App) -> None:
    now = time.time()
    at = now - 2 * HOUR
    events = [
        # u1 viewed p1..p4 at the same instant: a tie, broken by product_id.
        *(ref.Ev("u1", p, "view", at) for p in ("p3", "p1", "p4", "p2")),
        ref.Ev("u1", "p5", "view", at - 60),
        ref.Ev("u1", "p2", "purchase", at + 1),
        ref.Ev("u1", "p3", "add_to_cart", at + 2),
    ]
    await send(server, [to_event(e) for e in events])
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        got = await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id="u1"))
        assert [p.product_id for p in got.products] == ["p1", "p2", "p3", "p4", "p5"]
        got = await rec.RecentlyViewed(
            pb.RecentlyViewedRequest(
                user_id="u1", exclude_purchased=True, exclude_in_cart=True, exclude_product_ids=["p4"], limit=2
            )
        )
        same(got.products, ref.recently_viewed(events, "u1", 2, exclude=["p4"], exclude_purchased=True, cart=["p3"]))
        assert [p.product_id for p in got.products] == ["p1", "p5"]
        got = await rec.UserAffinities(pb.UserAffinitiesRequest(user_id="u1", exclude_in_cart=True))
        same(got.products, ref.affinities(events, "u1", now, cart=["p3"]))
        got = await rec.TrendingProducts(pb.TrendingProductsRequest(exclude_product_ids=["p2"], limit=3))
        assert [p.product_id for p in got.products] == [
            r.product_id for r in ref.trending(events, time.time(), exclude=["p2"], limit=3)
        ]


async def test_together_edges_and_the_cap(server: App) -> None:
    base = math.floor(time.time() / HOUR) * HOUR - 10 * DAY + 0.5 * HOUR
    events = [
        # a: exactly one hour apart (together), b: one hour and a microsecond (not), across an hour boundary.
        ref.Ev("a", "x", "purchase", base),
        ref.Ev("a", "y", "purchase", base + HOUR),
        ref.Ev("b", "x", "purchase", base),
        ref.Ev("b", "z", "purchase", base + HOUR + 1e-6),
        # c: a day apart in one session (together); d: a day apart, no session (not).
        ref.Ev("c", "x", "purchase", base, "s1"),
        ref.Ev("c", "w", "purchase", base + DAY, "s1"),
        ref.Ev("d", "x", "purchase", base),
        ref.Ev("d", "v", "purchase", base + DAY),
        # e: x twice, with y once: one person, support 1.
        ref.Ev("e", "x", "purchase", base + 5),
        ref.Ev("e", "x", "purchase", base + 50),
        ref.Ev("e", "y", "purchase", base + 20),
    ]
    # h: a heavy viewer with 30 products in one hour: only the first 20 by
    # first occurrence take part (sent newest first: the arrival order does
    # not change which).
    heavy = [ref.Ev("h", f"q{i:02d}", "view", base + 10 * i) for i in range(30)]
    events += heavy
    rng = random.Random(7)
    protos = [to_event(e) for e in events]
    await send(server, list(reversed(protos[-30:])))
    await applied(server)
    rest = protos[:-30]
    rng.shuffle(rest)
    await send(server, rest)
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id="x", limit=100))
        same(got.products, ref.together(events, ref.PURCHASE_TYPES, "x", 100))
        assert {p.product_id: p.support for p in got.products} == {"y": 2, "w": 1}
        assert got.products[0].score == pytest.approx(2 / 5)
        got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="q00", limit=100))
        same(got.products, ref.together(events, ref.VIEW_TYPES, "q00", 100))
        assert [p.product_id for p in got.products] == [f"q{i:02d}" for i in range(1, 20)]
        assert not (await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="q25"))).products
    # An earlier event of a product past the cap displaces the 20th: q29 viewed first.
    late = ref.Ev("h", "q29", "view", base - 1)
    events.append(late)
    await send(server, [to_event(late)])
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        for product in ("q00", "q19", "q29"):
            got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id=product, limit=100))
            same(got.products, ref.together(events, ref.VIEW_TYPES, product, 100))
        assert not (await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="q19"))).products


async def test_trending_window_and_half_life_edges(server: App) -> None:
    now = math.floor(time.time() / HOUR) * HOUR - 0.25 * HOUR  # a quarter hour before an hour's end
    window = 6 * HOUR
    edge = now - window  # 45 minutes into an hour: that hour's midpoint is before the edge
    events = [
        ref.Ev("t1", "in", "view", edge + HOUR),
        ref.Ev("t1", "in", "purchase", now - 1),
        ref.Ev("t2", "edge", "view", edge + 60),  # inside the window, in an hour that is not counted
        ref.Ev("t2", "out", "view", edge - HOUR),
        ref.Ev("t3", "half", "click", now - 2 * HOUR),
        ref.Ev("t3", "twice", "view", now - 4 * HOUR),
        ref.Ev("t3", "twice", "view", now - 4 * HOUR),
    ]
    await send(server, [to_event(e) for e in events])
    await applied(server)
    rows = await storage.trending(server.pool, now, window, 2 * HOUR, 10)
    same_scored(rows, ref.trending(events, now, window, 2 * HOUR, 10))
    scores = {r.product_id: r.score for r in rows}
    assert scores["half"] == pytest.approx(1.2 * 0.5, rel=TOLERANCE)  # one half-life old
    assert scores["twice"] == pytest.approx(2 * 0.25, rel=TOLERANCE)
    assert "out" not in scores and "edge" not in scores  # the documented rounding of the far edge
    assert ref.trending(events, now, window, 2 * HOUR, 10, rounded=False)[-1].product_id == "edge"
    # A window that starts at an hour's midpoint takes that hour.
    rows = await storage.trending(server.pool, now, window + 0.25 * HOUR, 2 * HOUR, 10)
    assert "edge" in {r.product_id for r in rows}


async def test_deletion_leaves_every_result(server: App) -> None:
    now = time.time()
    events = [
        ref.Ev("keep", "a", "purchase", now - HOUR, "s"),
        ref.Ev("keep", "b", "purchase", now - HOUR + 60, "s"),
        ref.Ev("gone", "a", "purchase", now - 2 * HOUR, "t"),
        ref.Ev("gone", "c", "purchase", now - 2 * HOUR + 60, "t"),
        ref.Ev("gone", "c", "view", now - 30),
        ref.Ev("gone", "a", "view", now - 20),
    ]
    # In one hour: the bucket's latest event is the deleted user's; its last_occurred_at goes back.
    hour = math.floor(now / HOUR) * HOUR - 2 * HOUR
    events += [ref.Ev("keep", "d", "view", hour + 100), ref.Ev("gone", "d", "view", hour + 200)]
    await send(server, [to_event(e) for e in events])
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.DeleteUserData(admin_service_pb2.DeleteUserDataRequest(user_id="gone"))
        await applied(server)
        left = [e for e in events if e.user != "gone"]
        rec = stub(channel)
        assert not (await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id="gone"))).products
        assert not (await rec.UserAffinities(pb.UserAffinitiesRequest(user_id="gone"))).products
        for product in ("a", "b", "c"):
            got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id=product))
            same(got.products, ref.together(left, ref.PURCHASE_TYPES, product))
        got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="a"))
        assert not got.products
    trending = await storage.trending(server.pool, now, 7 * DAY, DAY, 10)
    same_scored(trending, ref.trending(left, now))
    last = {r.product_id: r.last_occurred_at for r in trending}["d"]
    assert last is not None and last.timestamp() == pytest.approx(hour + 100, abs=1e-6)


async def aggregates(pool: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    tables = {}
    for table in recs.TABLES:
        rows = await pool.fetch(f"SELECT * FROM {table}")
        tables[table] = sorted(
            tuple(round(v, 6) if isinstance(v, float) else v for k, v in r.items() if k != "touched") for r in rows
        )
    return tables


async def test_a_rebuild_gives_what_the_maintenance_gave(server: App) -> None:
    rng = random.Random(3)
    now = time.time()
    events = mix(rng, now, count=400)
    protos = [to_event(e) for e in events]
    rng.shuffle(protos)
    for first in range(0, len(protos), 50):  # many small steps
        await send(server, protos[first : first + 50])
    await applied(server)
    maintained = await aggregates(server.pool)
    result = await recs.rebuild_now(server.database_url or "")
    assert result.rebuilt and result.applied == sum(1 for e in events if e.product)
    assert await aggregates(server.pool) == maintained


async def test_after_a_crash_empties_them_the_maintainer_rebuilds(server: App) -> None:
    """The recommendations' tables are UNLOGGED (migrations/0013: no WAL for
    what the log can rebuild), so crash recovery resets every one of them to
    empty, recs_state included: the maintainer's next step rebuilds from the
    log, and the reads answer as before the crash."""
    persistence = await server.pool.fetch(
        "SELECT relname, relpersistence::text FROM pg_class WHERE relname = ANY($1::text[]) AND relkind = 'r'",
        [*recs.TABLES, "recs_state", "recs_removed"],
    )
    assert len(persistence) == len(recs.TABLES) + 2
    assert {r["relname"]: r["relpersistence"] for r in persistence} == {r["relname"]: "u" for r in persistence}
    rng = random.Random(5)
    events = mix(rng, time.time(), count=200)
    await send(server, [to_event(e) for e in events])
    await applied(server)
    maintained = await aggregates(server.pool)
    assert maintained["recs_user_products"]
    # What crash recovery does to unlogged tables (recs_state first: the lock a step takes first).
    await server.pool.execute(f"TRUNCATE recs_state, recs_removed, {', '.join(recs.TABLES)}")
    await applied(server)
    assert await aggregates(server.pool) == maintained
    built = await server.pool.fetchval("SELECT built_at FROM recs_state")
    assert built is not None


async def test_the_clients_and_the_commands(server: App) -> None:
    now = time.time()
    events = [
        ref.Ev("c1", "a", "view", now - 300, "s"),
        ref.Ev("c1", "b", "view", now - 200, "s"),
        ref.Ev("c1", "a", "purchase", now - 100, "s"),
        ref.Ev("c1", "b", "purchase", now - 90, "s"),
    ]
    await send(server, [to_event(e) for e in events])
    await applied(server)
    async with InteractionsClient(server.address) as client:
        assert [p.product_id for p in await client.recently_viewed("c1")] == ["b", "a"]
        assert [p.product_id for p in await client.recently_viewed("c1", exclude=["b"])] == ["a"]
        assert [p.product_id for p in await client.frequently_bought_together("a")] == ["b"]
        assert [p.product_id for p in await client.also_viewed("b")] == ["a"]
        # b's events are the more recent: decayed, b comes first; undecayed, a tie broken by product_id.
        assert [p.product_id for p in await client.user_affinities("c1", half_life=timedelta(days=1))] == ["b", "a"]
        assert [p.product_id for p in await client.user_affinities("c1")] == ["a", "b"]
        trending = await client.trending_products(window=timedelta(hours=1), half_life=timedelta(hours=6), limit=1)
        assert [p.product_id for p in trending] == ["b"]

    def use_sync() -> None:
        with SyncInteractionsClient(server.address) as sync:
            assert [p.product_id for p in sync.recently_viewed("c1", exclude_purchased=True)] == []
            assert sync.frequently_bought_together("b")[0].score == pytest.approx(1.0)
            assert [p.product_id for p in sync.user_affinities("c1", limit=1)] == ["a"]

    await asyncio.to_thread(use_sync)  # the server runs on this test's event loop
    for args, want in (
        (("recently-viewed", "c1"), ["b", "a"]),
        (("recently-viewed", "--user", "c1", "--exclude", "b"), ["a"]),
        (("trending", "--window", "1h", "--half-life", "6h", "--limit", "1"), ["b"]),
        (("bought-together", "a"), ["b"]),
        (("also-viewed", "--product", "b"), ["a"]),
        (("affinities", "c1", "--half-life", "1d"), ["b", "a"]),
        (("affinities", "c1"), ["a", "b"]),
    ):
        run = await cli(*args, "--json", "--target", server.address)
        assert run.status == 0, run
        rows = json.loads(run.stdout)
        assert [r["product_id"] for r in rows] == want, args
        assert set(rows[0]) == {"product_id", "score", "support", "last_occurred_at"}
    run = await cli("recently-viewed", "c1", "--target", server.address)
    assert run.status == 0 and "product_id" in run.stdout and "b" in run.stdout
    run = await cli("recently-viewed", "c1", "--limit", "-1", "--target", server.address)
    assert run.status != 0 and "limit" in run.stderr


async def test_rebuild_recommendations_command(server: App) -> None:
    now = time.time()
    await send(server, [to_event(ref.Ev("r1", "a", "view", now - 10)), to_event(ref.Ev("r1", "b", "click", now - 5))])
    await applied(server)
    before = await aggregates(server.pool)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interactions_server.cli", "rebuild-recommendations",
        "--database-url", server.database_url or "", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "recommendations rebuilt from 2 events" in stdout.decode()
    assert await aggregates(server.pool) == before


async def test_reads_never_wait_for_the_pool_ingest_uses(server: App) -> None:
    """Every connection of the serving pool held (ingest's): the reads answer
    from the recommendations' own pool."""
    now = time.time()
    await send(server, [to_event(ref.Ev("o1", "a", "view", now - 60)), to_event(ref.Ev("o1", "b", "view", now - 30))])
    await applied(server)
    pool = server.pool
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            rec = stub(channel)
            got = await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id="o1"), timeout=10)
            assert [p.product_id for p in got.products] == ["b", "a"]
            await rec.UserAffinities(pb.UserAffinitiesRequest(user_id="o1"), timeout=10)
            await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="a"), timeout=10)
            await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id="a"), timeout=10)
            got = await rec.TrendingProducts(pb.TrendingProductsRequest(), timeout=10)
            assert {p.product_id for p in got.products} == {"a", "b"}
    finally:
        for conn in held:
            await pool.release(conn)


async def test_linked_identities_count_as_one_person(server: App) -> None:
    """A guest's events join its person's at the link (moved in the log, so
    the maintainer sees a removal and new events), later events of the guest
    id are the person's, and reads by the guest id answer for the person."""
    now = time.time()
    t = now - 3 * HOUR
    before = [
        ref.Ev("g", "a", "view", t),
        ref.Ev("g", "b", "click", t + 60),
        ref.Ev("g", "x", "purchase", t + 120),
        ref.Ev("m", "y", "purchase", t + 600),  # within an hour of g's x: together once linked
        ref.Ev("m", "x", "purchase", t - 2 * DAY),
        ref.Ev("m", "a", "view", t - DAY),
        ref.Ev("o", "x", "purchase", t),
    ]
    await send(server, [to_event(e) for e in before])
    await applied(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        rec = stub(channel)
        got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id="x"))
        same(got.products, ref.together(before, ref.PURCHASE_TYPES, "x"))
        assert not got.products  # three persons, none with two purchases within an hour
        await identity_service_pb2_grpc.IdentityServiceStub(channel).LinkIdentity(
            identity_service_pb2.LinkIdentityRequest(anonymous_id="g", user_id="m")
        )
        after = [ref.Ev("g", "c", "view", now - 60)]  # stored under m
        await send(server, [to_event(e) for e in after])
        await applied(server)
        merged = [ref.Ev("m" if e.user == "g" else e.user, e.product, e.type, e.at, e.session) for e in before + after]
        for user in ("g", "m"):
            got = await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id=user, exclude_purchased=True))
            same(got.products, ref.recently_viewed(merged, "m", exclude_purchased=True))
            assert [p.product_id for p in got.products] == ["c", "b", "a"]
            got = await rec.UserAffinities(pb.UserAffinitiesRequest(user_id=user, limit=100))
            same(got.products, ref.affinities(merged, "m", now, None, 100))
        got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id="x"))
        same(got.products, ref.together(merged, ref.PURCHASE_TYPES, "x"))
        assert [(p.product_id, p.support, p.score) for p in got.products] == [("y", 1, 0.5)]  # m and o bought x
        got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id="a"))
        same(got.products, ref.together(merged, ref.VIEW_TYPES, "a"))
        assert [p.product_id for p in got.products] == ["b"]
    same_scored(await storage.trending(server.pool, now, 7 * DAY, DAY, 10), ref.trending(merged, now))


async def test_retention_removes_what_it_removes(server: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row deletes (a type's retention) go through the journal, two persons a
    step here; a dropped month makes the maintainer rebuild. Every RPC then
    answers from the events the log still holds."""
    monkeypatch.setattr(recs, "JOURNAL_PERSONS", 2)
    await server.pool.execute("SELECT ensure_event_partitions('2025-01-01'::date, '2025-05-01'::date)")
    as_of = datetime(2025, 3, 31, 8, tzinfo=UTC)
    rng = random.Random(21)
    start = datetime(2025, 2, 1, tzinfo=UTC).timestamp()
    events = mix(rng, as_of.timestamp(), users=6, products=8, count=300)
    events = [ref.Ev(e.user, e.product, e.type, start + (e.at - events[0].at) % (as_of.timestamp() - start), e.session)
              for e in events]  # fmt: skip
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in events]
    await send(server, [to_event(e, i) for e, i in zip(events, ids, strict=True)])
    await applied(server)
    by_id = dict(zip(ids, events, strict=True))

    async def compare() -> None:
        left = [by_id[str(r[0])] for r in await server.pool.fetch("SELECT event_id FROM events")]
        assert len(left) < len(events)
        async with grpc.aio.insecure_channel(server.address) as channel:
            rec = stub(channel)
            for user in sorted({e.user for e in events}):
                got = await rec.RecentlyViewed(pb.RecentlyViewedRequest(user_id=user, limit=100))
                same(got.products, ref.recently_viewed(left, user, 100))
                got = await rec.UserAffinities(pb.UserAffinitiesRequest(user_id=user, limit=100))
                same(got.products, ref.affinities(left, user, 0, None, 100))
            for product in sorted({e.product for e in events if e.product}):
                got = await rec.FrequentlyBoughtTogether(pb.FrequentlyBoughtTogetherRequest(product_id=product))
                same(got.products, ref.together(left, ref.PURCHASE_TYPES, product))
                got = await rec.AlsoViewed(pb.AlsoViewedRequest(product_id=product))
                same(got.products, ref.together(left, ref.VIEW_TYPES, product))
        rows = await storage.trending(server.pool, as_of.timestamp(), 90 * DAY, 10 * DAY, 100)
        same_scored(rows, ref.trending(left, as_of.timestamp(), 90 * DAY, 10 * DAY, 100))

    fast = dataclasses.replace(storage.Pace(), rows=50, pause=0.0, min_pause=0.0)
    removed = await storage.run_retention(server.pool, RetentionPolicy.of(None, {"view": 7}), as_of=as_of, pace=fast)
    assert removed.by_type.get("view", 0) > 0 and not removed.partitions
    await applied(server)
    await compare()
    removed = await storage.run_retention(server.pool, RetentionPolicy.of(30), as_of=as_of, pace=fast)
    assert "events_2025_02" in removed.partitions
    await applied(server)
    await compare()


async def test_trending_is_one_shared_list_kept_fresh_for_its_cost(
    server: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls share one list per (window, half_life): fresh for DUTY
    times its computation (so that its recomputation takes a bounded share
    of the database whatever the log's size), served stale while the next is
    computed, and never older than MAX_STALE."""
    from interactions_server.services import recommendations as service

    computations: list[float] = []
    real = storage.trending

    async def slow(*args: object) -> list[storage.Scored]:
        await asyncio.sleep(0.2)  # a computation that costs 0.2 s, as a large log's does
        computations.append(time.monotonic())
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "trending", slow)
    now = time.time()
    await send(server, [to_event(ref.Ev("c1", "a", "view", now - 60))])
    await applied(server)
    cache = service._TrendingCache(server.pool, time.time)
    first = await cache.get(7 * DAY, DAY)  # no list yet: the call waits for the first
    assert [r.product_id for r in first] == ["a"]
    entry = cache._entries[(7 * DAY, DAY)]
    assert service.DUTY * 0.2 <= entry.fresh_for <= service.DUTY * 0.2 + 1.0
    await send(server, [to_event(ref.Ev("c1", "b", "purchase", now - 30))])
    await applied(server)
    assert await cache.get(7 * DAY, DAY) is first  # still fresh: no computation
    assert entry.computing is None and len(computations) == 1
    entry.computed_at -= entry.fresh_for  # stale: served while the next is computed
    assert await cache.get(7 * DAY, DAY) is first
    assert entry.computing is not None
    await entry.computing
    assert [r.product_id for r in await cache.get(7 * DAY, DAY)] == ["b", "a"]
    entry.computed_at -= service.MAX_STALE  # too old to serve: the call waits for the next
    await send(server, [to_event(ref.Ev("c1", "c", "purchase", now - 20))])
    await applied(server)
    assert {r.product_id for r in await cache.get(7 * DAY, DAY)} == {"a", "b", "c"}
    assert len(computations) == 3


async def test_the_maintainer_waits_while_the_host_is_saturated(start_server: StartServer) -> None:
    """Ingest first: while others keep the host at least BUSY_SHARE busy,
    the maintainer waits instead of stepping, for at most its budget in a
    row; then it steps until caught up, however busy the host stays. With
    the host idle, it steps as before."""
    server = await start_server(recommendations_interval=0.0)  # no maintainer of its own
    shares: list[int | None] = []
    load = 0.9

    def busy(backend: int | None) -> float:
        shares.append(backend)
        return load

    maintainer = recs.RecommendationsMaintainer(
        server.config.database_url or "", interval=0.05, busy=busy, yield_seconds=3.0
    )
    maintainer.start()
    try:
        now = time.time()
        await send(server, [to_event(ref.Ev("y1", "a", "view", now - 60))])
        with pytest.raises(TimeoutError):
            await storage.wait_applied(server.pool, 1.5)  # saturated: it waits (within its 3 s)
        assert maintainer.yields > 0 and maintainer.steps <= 1  # its first step may have come before the event
        assert shares and all(isinstance(pid, int) for pid in shares)  # its own backend's CPU is left out
        await storage.wait_applied(server.pool, 15.0)  # the budget spent, it steps however busy the host
        assert [
            p.product_id
            for p in await storage.recently_viewed(
                server.pool, "y1", 10, exclude=[], exclude_purchased=False, exclude_in_cart=False
            )
        ] == ["a"]
        load = 0.1
        await send(server, [to_event(ref.Ev("y1", "b", "view", now - 30))])
        waited = await storage.wait_applied(server.pool, 15.0)
        assert waited < 1.5  # idle: no waiting
    finally:
        await maintainer.stop()


def test_host_cpu_leaves_out_the_process_it_is_given() -> None:
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc (not Linux)")
    with_it, without_it = recs.HostCpu(), recs.HostCpu()
    assert with_it.busy_share(None) is None and without_it.busy_share(os.getpid()) is None  # no interval yet
    spin_until = time.process_time() + 0.5
    while time.process_time() < spin_until:  # this process busy for 0.5 s of CPU
        pass
    everyone, others = with_it.busy_share(None), without_it.busy_share(os.getpid())
    assert everyone is not None and others is not None
    assert 0.0 <= others < everyone <= 1.0
