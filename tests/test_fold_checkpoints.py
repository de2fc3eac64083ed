"""The state's own history and the checkpoints of its fold (issue 17, items 2
and 3; migrations/0006_fold_checkpoints.sql, ingest/_fold.py, ingest/_sync.py):

- retention never changes the state: a late event after a retention folds
  onto everything ever accepted, and the resend of an event whose dedup key
  retention forgot is not folded twice;
- a key's history is sealed in segments of SEGMENT_EVENTS (made small here),
  and a late event reads only the rows of the segment it falls in (or of the
  open tail) and the key's segment functions; segments split past twice the
  size;
- the function algebra composes like the step-by-step fold;
- the migration seals existing lines, and gives a line that retention had
  already cut the origin that keeps its value;
- DeleteUserData deletes the history and segments.
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interactions_client.rules import RULES, STANDARD
from interactions_client.v1 import user_state_service_pb2 as state_pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server import storage
from interactions_server.ingest import SyncEvent, _fold, _sync, fold_events
from interactions_server.server import App
from interactions_server.storage import _migrate as migrate
from tests.fold_checks import check_fold_invariants
from tests.support import StartServer
from tests.test_order_independence import model_fold
from tests.test_write_path import cart, log

NOW = datetime.now(UTC).replace(microsecond=0)


def event(name: str, value: int, at: datetime, *, product: str = "p1", user: str = "u1") -> Event:
    e = Event(
        event_id=str(uuid.uuid4()),
        event_type=STANDARD[name].event_type,
        user_id=user,
        product_id=product,
        event_value=value,
    )
    e.occurred_at.FromDatetime(at)
    return e


async def wishlist(stub: UserStateServiceStub, user: str = "u1") -> dict[str, datetime]:
    response = await stub.GetWishlist(state_pb.GetWishlistRequest(user_id=user))
    return {item.product_id: item.added_at.ToDatetime(tzinfo=UTC) for item in response.items}


async def state(pool: asyncpg.Pool, users: Sequence[str]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The live cart and wishlist lines, shaped like model_fold's result."""
    lines = await pool.fetch("SELECT * FROM user_cart WHERE user_id = ANY($1)", list(users))
    wished = await pool.fetch("SELECT * FROM user_wishlist WHERE user_id = ANY($1)", list(users))
    return (
        {(r["user_id"], r["product_id"]): (r["quantity"], r["updated_at"]) for r in lines},
        {(r["user_id"], r["product_id"]): r["added_at"] for r in wished},
    )


# --- retention --------------------------------------------------------------------


async def test_retention_then_a_late_event_keeps_what_retention_removed(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    """Issue 17, item 2, as reported: the late add made the cart 3, not 6."""
    await log(interaction_stub, event("add_to_cart", 3, datetime(2015, 6, 15, tzinfo=UTC)))
    await log(interaction_stub, event("add_to_cart", 2, NOW - timedelta(minutes=10)))
    assert await cart(user_state_stub) == {"p1": 5}
    await server.pool.execute("SELECT drop_event_partitions_before('2016-01-01')")
    assert await cart(user_state_stub) == {"p1": 5}
    await log(interaction_stub, event("add_to_cart", 1, NOW - timedelta(hours=1)))
    assert await cart(user_state_stub) == {"p1": 6}


async def test_retention_then_a_late_event_keeps_the_first_added_at(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    first = datetime(2015, 6, 15, tzinfo=UTC)
    await log(interaction_stub, event("wishlist", 1, first), event("wishlist", 1, NOW - timedelta(minutes=10)))
    await server.pool.execute("SELECT drop_event_partitions_before('2016-01-01')")
    await log(interaction_stub, event("wishlist", 1, NOW - timedelta(hours=1)))
    assert await wishlist(user_state_stub) == {"p1": first}


async def test_the_resend_of_an_event_older_than_retention_is_not_folded_twice(
    interaction_stub: InteractionServiceStub, user_state_stub: UserStateServiceStub, server: App
) -> None:
    old = event("add_to_cart", 3, datetime(2015, 6, 15, tzinfo=UTC))
    await log(interaction_stub, old, event("remove_from_cart", 1, NOW - timedelta(minutes=10)))
    await server.pool.execute("SELECT drop_event_partitions_before('2016-01-01')")
    # Retention forgot its dedup key: the log takes it again, the state does not.
    assert (await log(interaction_stub, old)).accepted_count == 1
    await log(interaction_stub, event("add_to_cart", 1, NOW - timedelta(hours=1)))
    assert await cart(user_state_stub) == {"p1": 3}
    assert await server.pool.fetchval("SELECT count(*) FROM state_history") == 3
    await check_fold_invariants(server.pool)


# --- segments -------------------------------------------------------------------


@pytest.fixture
def segment_events(monkeypatch: pytest.MonkeyPatch) -> int:
    """Segments of 4 events in the server's fold, for this test."""
    monkeypatch.setattr(_sync, "SEGMENT_EVENTS", 4)
    return 4


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(history rows, segments) of every fetch_fold_rows the fold makes."""
    seen: list[tuple[int, int]] = []
    fetch = storage.fetch_fold_rows

    async def counting(*args: Any) -> storage.FoldRows:
        found = await fetch(*args)
        seen.append((sum(map(len, found.rows.values())), sum(map(len, found.segments.values()))))
        return found

    monkeypatch.setattr(storage, "fetch_fold_rows", counting)
    return seen


def cart_history(count: int, rnd: random.Random, start: datetime, *, product: str = "p1") -> list[Event]:
    """In time order, one event a second: mostly adds, some removes and sets."""
    names = ["add_to_cart"] * 6 + ["remove_from_cart"] * 2 + ["update_cart_quantity"]
    out = []
    for i in range(count):
        name = rnd.choice(names)
        value = {"add_to_cart": rnd.randint(1, 3), "remove_from_cart": rnd.randint(0, 2)}.get(name, rnd.randint(0, 5))
        out.append(event(name, value, start + timedelta(seconds=i), product=product))
    return out


def chunks(events: Sequence[Event], size: int) -> Iterator[Sequence[Event]]:
    for first in range(0, len(events), size):
        yield events[first : first + size]


async def test_in_order_events_seal_a_segment_every_n_events(
    interaction_stub: InteractionServiceStub, server: App, segment_events: int, reads: list[tuple[int, int]]
) -> None:
    events = cart_history(30, random.Random(1), NOW - timedelta(hours=2))
    for batch in chunks(events, 7):
        await log(interaction_stub, *batch)
    segments = await server.pool.fetch("SELECT events FROM state_segments ORDER BY until_at")
    assert [s["events"] for s in segments] == [4] * 7
    assert await server.pool.fetchval("SELECT tail_events FROM cart_lines") == 2
    assert reads == []  # in order: nothing read but the lines
    assert await check_fold_invariants(server.pool) == 1
    assert await state(server.pool, ["u1"]) == model_fold(events)[:2]


async def test_a_late_event_reads_its_segment_and_the_keys_segment_functions(
    interaction_stub: InteractionServiceStub, server: App, segment_events: int, reads: list[tuple[int, int]]
) -> None:
    n = segment_events
    start = NOW - timedelta(hours=2)
    events = cart_history(200, random.Random(2), start)
    for batch in chunks(events, 50):
        await log(interaction_stub, *batch)
    assert await server.pool.fetchval("SELECT count(*) FROM state_segments") == 50
    rnd = random.Random(3)

    # One late event in a sealed segment: that segment's rows and the 50 segment functions.
    late = event("add_to_cart", 2, start + timedelta(seconds=101, milliseconds=500))
    await log(interaction_stub, late)
    assert reads == [(n, 50)]
    events.append(late)

    # One in the open tail (empty after 200 = 50 * 4 events, so one in-order event first),
    # then one in the last segment.
    later = event("add_to_cart", 1, start + timedelta(seconds=300))
    in_tail = event("remove_from_cart", 1, start + timedelta(seconds=199, milliseconds=500))
    in_last_segment = event("update_cart_quantity", 4, start + timedelta(seconds=198, milliseconds=500))
    for e in (later, in_tail, in_last_segment):
        await log(interaction_stub, e)
    assert reads == [(n, 50), (1, 0), (n, 50)]
    events += [later, in_tail, in_last_segment]
    assert await state(server.pool, ["u1"]) == model_fold(events)[:2]

    # Many late events into one segment: it splits into runs of n once past 2n.
    reads.clear()
    crowd = [
        event(rnd.choice(["add_to_cart", "remove_from_cart"]), 1, start + timedelta(seconds=40, milliseconds=k))
        for k in range(1, 3 * n + 1)
    ]
    for e in crowd:
        await log(interaction_stub, e)
    events += crowd
    assert all(rows <= 2 * n for rows, _ in reads), reads
    assert max(count for _, count in reads) > 50  # it split
    assert await check_fold_invariants(server.pool) == 1
    expected = model_fold(events)[0]
    assert (await state(server.pool, ["u1"]))[0] == expected


async def test_late_events_over_a_long_key_equal_the_fold(
    interaction_stub: InteractionServiceStub, server: App, segment_events: int
) -> None:
    """Every arrival order over a key long enough for many segments, splits and
    seals in one batch: the state is the fold, the invariants hold."""
    rnd = random.Random(4)
    events = cart_history(120, rnd, NOW - timedelta(hours=2))
    events += [
        event("wishlist", rnd.randint(0, 1), NOW - timedelta(hours=2) + timedelta(seconds=i * 0.7)) for i in range(60)
    ]
    in_order, shuffled = events[:60], events[60:]
    rnd.shuffle(shuffled)
    for batch in chunks(in_order, 13):
        await log(interaction_stub, *batch)
    for batch in chunks(shuffled, rnd.randint(1, 9)):
        await log(interaction_stub, *batch)
    assert await check_fold_invariants(server.pool) == 2
    assert await state(server.pool, ["u1"]) == model_fold(events)[:2]


async def test_fold_events_folds_events_into_keys_out_of_the_write_path(
    interaction_stub: InteractionServiceStub, server: App, segment_events: int
) -> None:
    """What an identity link does: another user's events folded into u1's keys, late, twice."""
    rnd = random.Random(6)
    start = NOW - timedelta(hours=2)
    mine = cart_history(40, rnd, start)
    for batch in chunks(mine, 10):
        await log(interaction_stub, *batch)
    theirs = [e for e in cart_history(30, rnd, start + timedelta(milliseconds=500)) if e.product_id == "p1"]
    theirs.append(event("purchase", 1, start, product="p2"))
    moved = [
        SyncEvent(
            "u1", e.product_id, e.event_id, e.occurred_at.ToMicroseconds(), e.event_value, None, RULES[e.event_type]
        )
        for e in theirs
    ]
    for _ in range(2):
        async with server.pool.acquire() as connection, connection.transaction():
            await fold_events(connection, moved)
    assert await check_fold_invariants(server.pool) == 1
    assert await state(server.pool, ["u1"]) == model_fold([*mine, *theirs])[:2]
    assert await server.pool.fetchval("SELECT count(*) FROM purchase_history") == 1


# --- the algebra ------------------------------------------------------------------

cart_steps = st.lists(
    st.one_of(
        st.tuples(st.just(_fold.add_quantity), st.integers(1, 10_000)),
        st.tuples(st.just(_fold.remove_quantity), st.integers(0, 10_000)),
        st.tuples(st.just(_fold.set_quantity), st.integers(0, 10_000)),
    ),
    max_size=30,
)
wishlist_steps = st.lists(st.tuples(st.just(_fold.add_or_remove), st.integers(0, 1)), max_size=30)


def _stepwise(family: _fold.Family, state: int | None, fns: Sequence[_fold.Fn]) -> int | None:
    for f in fns:
        state = family.apply(f, state)
    return state


@given(steps=cart_steps, cut=st.integers(0, 30), start=st.integers(0, 10_000))
def test_cart_functions_compose_like_the_fold(steps: list[Any], cut: int, start: int) -> None:
    fns = [step(v, 0) for step, v in steps]
    family = _fold.CART
    assert family.apply(family.compose(fns), start) == _stepwise(family, start, fns)
    assert family.apply(family.compose(fns), None) == _stepwise(family, 0, fns)  # no line: 0
    # Associative: the composition of two runs is the composition of the whole.
    first, second = family.compose(fns[:cut]), family.compose(fns[cut:])
    assert family.then(first, second) == family.compose(fns)
    stepwise = family.identity
    for f in fns:
        stepwise = family.then(stepwise, f)
    assert stepwise == family.compose(fns)  # the inlined run is `then` step by step


@given(steps=wishlist_steps, cut=st.integers(0, 30), start=st.one_of(st.none(), st.integers(0, 10**15)))
def test_wishlist_functions_compose_like_the_fold(steps: list[Any], cut: int, start: int | None) -> None:
    fns = [step(v, 1_000 + i) for i, (step, v) in enumerate(steps)]
    family = _fold.WISHLIST
    assert family.apply(family.compose(fns), start) == _stepwise(family, start, fns)
    first, second = family.compose(fns[:cut]), family.compose(fns[cut:])
    assert family.then(first, second) == family.compose(fns)
    stepwise = family.identity
    for f in fns:
        stepwise = family.then(stepwise, f)
    assert stepwise == family.compose(fns)  # the inlined run is `then` step by step


# --- the migration ------------------------------------------------------------------


def reference_lines(events: Sequence[Event]) -> dict[tuple[str, str, str], tuple[int | None, Event]]:
    """(table, user, product) -> (value, last event): what 0001-0005's fold wrote, tombstones included."""
    lines: dict[tuple[str, str, str], tuple[int | None, Event]] = {}
    for e in sorted(events, key=lambda e: (e.occurred_at.ToMicroseconds(), e.event_id)):
        name = next(n for n, r in STANDARD.items() if r.event_type == e.event_type)
        table = "wishlist_lines" if name == "wishlist" else "cart_lines"
        key = (table, e.user_id, e.product_id)
        q = lines.get(key, (None, e))[0]
        v = e.event_value
        if name == "add_to_cart":
            q = (q or 0) + v
        elif name == "remove_from_cart":
            q = 0 if v == 0 else max((q or 0) - v, 0)
        elif name == "update_cart_quantity":
            q = v
        else:
            q = None if v == 0 else (q if q is not None else e.occurred_at.ToMicroseconds())
        lines[key] = (q, e)
    return lines


async def test_the_migration_seals_existing_lines_and_keeps_what_retention_had_removed(
    empty_database_url: str, start_server: StartServer, tmp_path: Path
) -> None:
    rnd = random.Random(5)
    start = NOW - timedelta(hours=3)
    long_cart = cart_history(2_500, rnd, start)  # 2 segments of 1024, a tail of 452
    long_wishlist = [
        event("wishlist", rnd.randint(0, 1), start + timedelta(seconds=i), product="p2") for i in range(1_100)
    ]
    # Keys whose first events retention removed before the upgrade:
    cut_cart = [event("add_to_cart", v, start + timedelta(seconds=i), product="p3") for i, v in enumerate([3, 2])]
    kept_cart = [
        event("add_to_cart", 1, start + timedelta(seconds=10), product="p3"),
        event("remove_from_cart", 2, start + timedelta(seconds=20), product="p3"),
    ]
    cut_wishlist = [event("wishlist", 1, start + timedelta(seconds=1), product="p4")]
    kept_wishlist = [event("wishlist", 1, start + timedelta(seconds=30), product="p4")]
    all_cut = [event("add_to_cart", 4, start + timedelta(seconds=2), product="p5")]
    cut = cut_cart + cut_wishlist + all_cut
    logged = long_cart + long_wishlist + kept_cart + kept_wishlist

    old = tmp_path / "migrations"
    old.mkdir()
    for path in migrate.load():
        if path.version <= 5:
            shutil.copy(path.path, old)
    connection = await asyncpg.connect(empty_database_url)
    try:
        await migrate.apply(connection, old)
        await connection.copy_records_to_table(
            "events",
            records=[
                (
                    e.user_id,
                    uuid.UUID(e.event_id),
                    name_of(e),
                    e.product_id,
                    e.event_value,
                    e.occurred_at.ToDatetime(UTC),
                    True,
                )
                for e in logged
            ],
            columns=["user_id", "event_id", "event_type", "product_id", "event_value", "occurred_at", "syncs_state"],
        )
        for (table, user, product), (value, last) in reference_lines(logged + cut).items():
            column = "quantity" if table == "cart_lines" else "added_at"
            stored: Any = (
                value
                if table == "cart_lines"
                else (None if value is None else datetime.fromtimestamp(value / 1e6, UTC))
            )
            await connection.execute(
                f"INSERT INTO {table} (user_id, product_id, {column}, updated_at, last_event_id) VALUES ($1, $2, $3, $4, $5)",
                user,
                product,
                stored,
                last.occurred_at.ToDatetime(UTC),
                uuid.UUID(last.event_id),
            )
        await migrate.apply(connection)
        assert await connection.fetchval("SELECT count(*) FROM state_history") == len(logged)
        assert await connection.fetchval("SELECT count(*) FROM state_segments WHERE state_table = 'cart_lines'") == 2
        assert (
            await connection.fetchval("SELECT count(*) FROM state_segments WHERE state_table = 'wishlist_lines'") == 1
        )
        assert await connection.fetchval("SELECT origin FROM cart_lines WHERE product_id = 'p3'") == 5
        assert await connection.fetchval("SELECT origin FROM cart_lines WHERE product_id = 'p5'") == 4
        assert await connection.fetchval("SELECT origin FROM cart_lines WHERE product_id = 'p1'") is None
        assert await check_fold_invariants(connection) == 5
    finally:
        await connection.close()

    app = await start_server(database_url=empty_database_url)
    late = [
        event("add_to_cart", 2, start + timedelta(seconds=700, milliseconds=1)),  # in the first segment
        event("remove_from_cart", 1, start + timedelta(seconds=2_400, milliseconds=1)),  # in the tail
        event("add_to_cart", 5, start + timedelta(seconds=15), product="p3"),
        event("wishlist", 0, start + timedelta(seconds=20), product="p4"),
        event("wishlist", 1, start + timedelta(seconds=500, milliseconds=1), product="p2"),
        event("add_to_cart", 1, start + timedelta(seconds=1), product="p5"),
    ]
    async with grpc.aio.insecure_channel(app.address) as channel:
        await log(InteractionServiceStub(channel), *late)
    assert await check_fold_invariants(app.pool) == 5
    assert await state(app.pool, ["u1"]) == model_fold(logged + cut + late)[:2]


def name_of(e: Event) -> str:
    return next(n for n, r in STANDARD.items() if r.event_type == e.event_type)
