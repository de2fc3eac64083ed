"""The client's AnalyticsService methods against the real server: each typed
method's answer compared with a reference computed here from the events sent,
errors as the client's exceptions, the sync twin, and exports that resume by
themselves after a broken connection (a TCP proxy cutting the stream) with
exactly the rows of an uninterrupted export."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interactions_client import InteractionsClient, InvalidArgumentError, NotFoundError, SyncInteractionsClient
from interactions_client.analytics import AsyncExport, ResumePolicy, to_datetime
from interactions_client.errors import UnavailableError
from interactions_client.events import new_event
from interactions_client.rules import CUSTOM, RULES, stored_name
from interactions_client.v1.analytics_service_pb2 import TrainingRow
from interactions_client.v1.event_pb2 import Event
from interactions_server.server import App

# An hour boundary yesterday: inside the partitions the server keeps.
BASE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)


def at(minutes: float) -> datetime:
    return BASE + timedelta(minutes=minutes)


def shop_events() -> list[Event]:
    """A small, varied log: searches that lead (or not) to clicks, carts and
    purchases, sessions, logins, a custom type, events without product or session."""
    e = new_event
    return [
        e("login", "u1", occurred_at=at(-1)),
        e("search", "u1", session_id="s1", details={"query": "Red  Shoes ", "result_count": 12}, occurred_at=at(0)),
        e("click", "u1", product_id="p1", session_id="s1", occurred_at=at(1)),
        e("product_view", "u1", product_id="p1", session_id="s1", details={"product_name": "Red"}, occurred_at=at(2)),
        e("add_to_cart", "u1", product_id="p1", value=2, session_id="s1", occurred_at=at(3)),
        e("view", "u1", product_id="p2", session_id="s1", occurred_at=at(4)),
        e("purchase", "u1", product_id="p1", session_id="s1", occurred_at=at(10)),
        e("logout", "u1", occurred_at=at(11)),
        e("view", "u1", product_id="p2", session_id="s2", occurred_at=at(24 * 60 - 30)),  # the next day
        e("search", "u2", details={"query": "red shoes", "result_count": 0}, occurred_at=at(0)),
        e("view", "u2", product_id="p2", occurred_at=at(40)),  # more than 30 minutes after the search
        e("review", "u2", product_id="p1", value=4, occurred_at=at(50)),
        e("login", "u2", occurred_at=at(55)),
        e("gift_card_redeemed", "u3", product_id="p3", occurred_at=at(5)),
        e("wishlist", "u3", product_id="p2", value=1, occurred_at=at(6)),
        e("page_view", "u3", session_id="s3", details={"page_path": "/deals"}, occurred_at=at(7)),
        e(
            "search", "u3", product_id="p3", details={"query": "\uff22\uff2c\uff35\uff25 hat"}, occurred_at=at(8)
        ),  # NFKC: BLUE
    ]


@dataclass
class Pair:
    weight: float = 0.0
    event_count: int = 0
    last: datetime | None = None
    counts: Counter[str] = field(default_factory=Counter)


def reference_training(
    events: Iterable[Event], *, as_of: datetime | None = None, half_life: timedelta | None = None
) -> dict[tuple[str, str], Pair]:
    """The training matrix by its definition in the issue."""
    pairs: dict[tuple[str, str], Pair] = defaultdict(Pair)
    for event in events:
        weight = RULES[event.event_type].ml_weight
        if weight is None or not event.product_id or event.event_type == CUSTOM.event_type:
            continue
        occurred = event.occurred_at.ToDatetime(tzinfo=UTC)
        if half_life is not None:
            assert as_of is not None
            weight *= 0.5 ** ((as_of - occurred) / half_life)
        pair = pairs[event.user_id, event.product_id]
        pair.weight += weight
        pair.event_count += 1
        pair.last = max(pair.last or occurred, occurred)
        pair.counts[stored_name(event)] += 1
    return dict(pairs)


def as_pairs(rows: Iterable[TrainingRow]) -> dict[tuple[str, str], Pair]:
    return {
        (r.user_id, r.product_id): Pair(r.weight, r.event_count, to_datetime(r.last_occurred_at), Counter(r.counts))
        for r in rows
    }


def assert_same_training(got: dict[tuple[str, str], Pair], expected: dict[tuple[str, str], Pair]) -> None:
    assert got.keys() == expected.keys()
    for key, pair in expected.items():
        assert got[key].weight == pytest.approx(pair.weight, rel=1e-9), key
        assert (got[key].event_count, got[key].last, got[key].counts) == (pair.event_count, pair.last, pair.counts)


@pytest.fixture
async def real_client(server: App) -> AsyncIterator[InteractionsClient]:
    async with InteractionsClient(server.address) as client:
        yield client


@pytest.fixture
async def shop(real_client: InteractionsClient) -> list[Event]:
    events = shop_events()
    result = await real_client.log_many(events)
    assert result.accepted == len(events), result
    return events


async def test_export_training_data(real_client: InteractionsClient, shop: list[Event]) -> None:
    export = real_client.export_training_data()
    rows = [row async for row in export]
    assert [(r.user_id, r.product_id) for r in rows] == sorted((r.user_id, r.product_id) for r in rows)
    assert_same_training(as_pairs(rows), reference_training(shop))
    # Neither the custom type nor the product-less events, nor types without a weight, are in it.
    assert ("u3", "p3") in as_pairs(rows) and as_pairs(rows)["u3", "p3"].counts == {"search": 1}
    assert export.as_of is not None and export.resumes == 0

    end, half_life = at(60), timedelta(hours=1)
    window = [e for e in shop if at(0) <= e.occurred_at.ToDatetime(tzinfo=UTC) < end]
    decayed = [r async for r in real_client.export_training_data(start_time=at(0), end_time=end, half_life=half_life)]
    assert_same_training(as_pairs(decayed), reference_training(window, as_of=end, half_life=half_life))


async def test_export_events(real_client: InteractionsClient, shop: list[Event]) -> None:
    exported = [e async for e in real_client.export_events()]
    expected = sorted(shop, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id))
    assert [x.event.event_id for x in exported] == [e.event_id for e in expected]
    by_id = {x.event.event_id: x for x in exported}
    for event in shop:
        got = by_id[event.event_id]
        rule = RULES[event.event_type]
        assert got.ml_weight == (rule.ml_weight or 0.0)
        assert got.event.event_value == (event.event_value if event.HasField("event_value") else rule.default_value)
        assert (got.event.user_id, got.event.product_id, got.event.session_id) == (
            event.user_id,
            event.product_id,
            event.session_id,
        )
        assert got.received_at.seconds > 0
    chosen = [x.event.event_id async for x in real_client.export_events(event_types=["purchase", "custom"])]
    assert chosen == [e.event_id for e in expected if RULES[e.event_type].name in ("purchase", "custom")]
    windowed = [x.event.event_id async for x in real_client.export_events(start_time=at(0), end_time=at(8))]
    assert windowed == [e.event_id for e in expected if at(0) <= e.occurred_at.ToDatetime(tzinfo=UTC) < at(8)]


async def test_top_search_queries(real_client: InteractionsClient, shop: list[Event]) -> None:
    queries = await real_client.top_search_queries(start_time=at(-60), end_time=at(60))
    assert [(q.query, q.searches, q.users) for q in queries] == [("red shoes", 2, 2), ("blue hat", 1, 1)]
    red = queries[0]
    # u1's search led to a click, a cart and a purchase; u2's to nothing within 30 minutes.
    assert (red.click_through_rate, red.add_to_cart_rate, red.conversion_rate) == (0.5, 0.5, 0.5)
    assert red.no_result_rate == 0.5
    assert not queries[1].HasField("no_result_rate")
    assert len(await real_client.top_search_queries(limit=1)) == 1


async def test_sessions_and_activity(real_client: InteractionsClient, shop: list[Event]) -> None:
    session = await real_client.get_session("u1", "s1")
    in_s1 = [e for e in shop if e.user_id == "u1" and e.session_id == "s1"]
    assert (session.event_count, to_datetime(session.started_at), to_datetime(session.ended_at)) == (
        len(in_s1),
        at(0),
        at(10),
    )
    assert list(session.products_viewed) == ["p1", "p2"]
    assert list(session.search_queries) and [e.event_id for e in session.events] == [e.event_id for e in in_s1]
    assert dict(session.counts) == Counter(stored_name(e) for e in in_s1)
    assert not session.truncated

    sessions = [s async for s in real_client.list_sessions("u1", page_size=1)]  # one page each
    assert [s.session_id for s in sessions] == ["s2", "s1"] and not sessions[0].events
    page = await real_client.list_sessions_page("u1", page_size=1)
    assert [s.session_id for s in page.sessions] == ["s2"] and page.next_page_token

    activity = await real_client.get_user_activity("u1")
    assert (activity.login_count, activity.logout_count, activity.session_count) == (1, 1, 2)
    assert (to_datetime(activity.first_seen_at), to_datetime(activity.last_seen_at)) == (at(-1), at(24 * 60 - 30))
    assert (to_datetime(activity.last_login_at), to_datetime(activity.last_logout_at)) == (at(-1), at(11))
    assert dict(activity.event_counts) == Counter(stored_name(e) for e in shop if e.user_id == "u1")

    active = await real_client.count_active_users(
        start_time=BASE - timedelta(days=1), end_time=BASE + timedelta(days=2)
    )
    assert (active.active_users, active.logged_in_users) == (3, 2)
    days = {d.date: (d.active_users, d.logged_in_users) for d in active.daily}
    first_day = at(-1).date().isoformat()
    assert days[first_day][0] >= 1 and sum(a for a, _ in days.values()) >= 3

    newest_first = [e.event_id async for e in real_client.list_user_events("u1", page_size=2)]
    u1 = sorted((e for e in shop if e.user_id == "u1"), key=lambda e: e.occurred_at.ToNanoseconds(), reverse=True)
    assert newest_first == [e.event_id for e in u1]
    views = [e.event_id async for e in real_client.list_user_events("u1", event_types=["view"], start_time=at(0))]
    assert views == [e.event_id for e in u1 if stored_name(e) == "view"]
    first = await real_client.list_user_events_page("u1", page_size=3)
    assert len(first.events) == 3 and first.next_page_token


async def test_unknown_users_and_bad_input(real_client: InteractionsClient, shop: list[Event]) -> None:
    with pytest.raises(NotFoundError):
        await real_client.get_session("u1", "no-such-session")
    with pytest.raises(NotFoundError):
        await real_client.get_user_activity("nobody")
    assert [s async for s in real_client.list_sessions("nobody")] == []
    assert [e async for e in real_client.list_user_events("nobody")] == []

    async def violations(call: Any) -> set[str]:
        with pytest.raises(InvalidArgumentError) as caught:
            await call
        return {v.field for v in caught.value.violations}

    assert await violations(real_client.count_active_users(start_time=at(1), end_time=at(0))) == {"start_time"}
    assert await violations(real_client.list_sessions_page("u1", page_size=1001)) == {"page_size"}
    assert await violations(real_client.list_sessions_page("u1", page_token="not a token")) == {"page_token"}
    assert await violations(real_client.get_user_activity(" ")) == {"user_id"}
    with pytest.raises(InvalidArgumentError) as caught:
        [r async for r in real_client.export_training_data(half_life=timedelta(0))]
    assert [v.field for v in caught.value.violations] == ["half_life"]
    with pytest.raises(InvalidArgumentError) as caught:
        [r async for r in real_client.export_events(resume_token="garbage")]
    assert [v.field for v in caught.value.violations] == ["resume_token"]
    with pytest.raises(ValueError, match="timezone-aware"):
        real_client.export_events(start_time=datetime(2026, 1, 1))


async def test_sync_client(server: App, shop: list[Event]) -> None:
    def use() -> None:
        with SyncInteractionsClient(server.address) as client:
            assert_same_training(as_pairs(client.export_training_data()), reference_training(shop))
            assert len(list(client.export_events())) == len(shop)
            assert client.top_search_queries(start_time=at(-60))[0].query == "red shoes"
            assert client.get_session("u1", "s1").event_count == 6  # search, click, product_view, cart, view, purchase
            assert [s.session_id for s in client.list_sessions("u1", page_size=1)] == ["s2", "s1"]
            assert client.get_user_activity("u2").login_count == 1
            assert client.count_active_users().active_users == 3
            assert len(list(client.list_user_events("u2", page_size=1))) == sum(e.user_id == "u2" for e in shop)
            with pytest.raises(NotFoundError):
                client.get_user_activity("nobody")

    await asyncio.to_thread(use)  # the server runs on this test's event loop


# --- exports across broken connections --------------------------------------------


class CuttingProxy:
    """A TCP proxy to the server that cuts each of its first `cuts` connections
    once `after` bytes have come back from the server (mid-response), with a
    reset. `downstream` holds the bytes each connection brought back."""

    def __init__(self, port: int, *, after: int = 0, cuts: int = 0) -> None:
        self._port, self._after, self._cuts = port, after, cuts
        self.downstream: list[int] = []
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = len(self.downstream)
        self.downstream.append(0)
        limit = self._after if index < self._cuts else None
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if limit is not None and self.downstream[index] + len(data) >= limit:
                    client_writer.write(data[: limit - self.downstream[index]])
                    self.downstream[index] = limit
                    self.cut += 1
                    return
                client_writer.write(data)
                await client_writer.drain()
                self.downstream[index] += len(data)

        sending = asyncio.create_task(upstream())
        try:
            await downstream()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sending.cancel()
            for writer in (client_writer, server_writer):
                writer.transport.abort()  # a reset, as a dead peer or a crashed proxy gives
            self._tasks.discard(task)


@pytest.fixture
async def bulk(real_client: InteractionsClient) -> list[Event]:
    """5,000 events on 5,000 (user, product) pairs: several responses per export."""
    events = [
        new_event("view", f"user-{i % 50:02d}", product_id=f"p{i:05d}", occurred_at=at(i / 100)) for i in range(5000)
    ]
    result = await real_client.log_many(events)
    assert result.accepted == len(events)
    return events


FAST = ResumePolicy(attempts=6, initial_backoff=0.05, max_backoff=0.5)

Export = Callable[[InteractionsClient], AsyncExport[Any]]


async def rows_through(
    port: int, export: Export, *, after: int = 0, cuts: int = 0
) -> tuple[list[Any], CuttingProxy, int]:
    """The rows of `export` through a CuttingProxy, the proxy, and the export's resumes."""
    async with CuttingProxy(port, after=after, cuts=cuts) as proxy, InteractionsClient(proxy.address) as client:
        running = export(client)
        rows = [row async for row in running]
    return rows, proxy, running.resumes


async def assert_resumes_exactly(port: int, export: Export) -> list[Any]:
    """Cut the first two connections 40% into the full download: the export must
    resume from its token (not start again) and give exactly the uninterrupted rows."""
    expected, clean, _ = await rows_through(port, export)
    full = sum(clean.downstream)
    rows, proxy, resumes = await rows_through(port, export, after=full * 4 // 10, cuts=2)
    assert proxy.cut == 2 and resumes >= 2
    assert rows == expected
    # The last connection went on from a token: starting again would have downloaded everything.
    assert proxy.downstream[-1] < full * 0.9, (proxy.downstream, full)
    return rows


async def test_exports_resume_after_broken_connections(server: App, bulk: list[Event]) -> None:
    events = await assert_resumes_exactly(server.port, lambda client: client.export_events(policy=FAST))
    assert [e.event.event_id for e in events] == [
        e.event_id for e in sorted(bulk, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id))
    ]
    training = await assert_resumes_exactly(
        server.port, lambda client: client.export_training_data(end_time=at(100), policy=FAST)
    )
    assert len(training) == 5000


async def test_resumed_training_export_keeps_its_as_of(server: App, bulk: list[Event]) -> None:
    """Without end_time, as_of is the export's start: a resumed call must decay from the same instant."""
    half_life = timedelta(hours=6)
    async with CuttingProxy(server.port, after=60_000, cuts=1) as proxy, InteractionsClient(proxy.address) as client:
        export = client.export_training_data(half_life=half_life, policy=FAST)
        rows = [r async for r in export]
    assert export.resumes >= 1 and proxy.cut == 1 and export.as_of is not None
    assert_same_training(as_pairs(rows), reference_training(bulk, as_of=export.as_of, half_life=half_life))


async def test_sync_export_resumes(server: App, bulk: list[Event]) -> None:
    async with CuttingProxy(server.port, after=150_000, cuts=2) as proxy:

        def export() -> tuple[list[str], int]:
            with SyncInteractionsClient(proxy.address) as client:
                events = client.export_events(policy=FAST)
                return [e.event.event_id for e in events], events.resumes

        ids, resumes = await asyncio.to_thread(export)
    assert resumes >= 2 and proxy.cut == 2
    assert ids == [e.event_id for e in sorted(bulk, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id))]


async def test_a_stopped_export_continues_from_its_token(real_client: InteractionsClient, bulk: list[Event]) -> None:
    everything = [e.event.event_id async for e in real_client.export_events()]
    first = real_client.export_events()
    seen: list[str] = []
    async for batch in first.batches():
        seen.extend(e.event.event_id for e in batch)
        if len(seen) >= 1500:
            break  # a consumer that checkpoints and quits
    token = first.resume_token
    assert token and 1500 <= len(seen) < 5000
    rest = [e.event.event_id async for e in real_client.export_events(resume_token=token)]
    assert seen + rest == everything


async def test_an_export_gives_up_after_its_attempts(server: App, bulk: list[Event]) -> None:
    async with CuttingProxy(server.port, after=200, cuts=100) as proxy, InteractionsClient(proxy.address) as client:
        export = client.export_events(policy=ResumePolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02))
        with pytest.raises(UnavailableError):
            async for _ in export:
                pass
    assert export.resumes == 2 and export.rows == 0


async def test_abandoned_exports_free_their_server_connections(
    real_client: InteractionsClient, bulk: list[Event]
) -> None:
    """A consumer that stops early cancels the call, so the server's cursor (and
    its connection of the small analytics pool) is released."""
    for _ in range(6):  # twice the analytics pool's connections
        async for _ in real_client.export_events():
            break
        async for _ in real_client.export_training_data().batches():
            break
    async with asyncio.timeout(15):
        assert len([e async for e in real_client.export_events()]) == len(bulk)
