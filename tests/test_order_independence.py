"""State equals the fold of each user's events in (occurred_at, event_id)
order, whatever order the events arrive in, in whatever batches, however often
they are resent, and whatever retention removes from the log meanwhile.

A hypothesis state machine sends random cart and wishlist events, shuffled and
with repeats, in random batch sizes, through the real server, runs retention
over every event it sent (the log and its dedup keys forget them, so resends
are logged again), and compares the state tables with a model fold of every
distinct event sent, and the fold's checkpoints with its history
(tests/fold_checks.py). The second test makes the fold's segments 2 events
long, so that sealing, late events in sealed segments and splits happen all
the time. The machine makes blocking gRPC calls from a worker thread while the
event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from interactions_client.rules import STANDARD
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import interaction_service_pb2_grpc as pb_grpc
from interactions_client.v1.event_pb2 import Event
from interactions_server.ingest import _sync
from tests.fold_checks import check_fold_invariants

BASE = datetime(2026, 1, 1, tzinfo=UTC)
RETENTION_CUTOFF = (BASE + timedelta(days=40)).date()  # retention by whole months: every event of the machine
PRODUCTS = ["p1", "p2", "p3"]
CART_TYPES = ("add_to_cart", "remove_from_cart", "update_cart_quantity")


def model_fold(events: Iterable[Event]) -> tuple[dict[tuple[str, str], tuple[int, datetime]], dict[Any, datetime]]:
    """The expected cart ((user, product) -> (quantity, updated_at)) and wishlist ((user, product) -> added_at)."""
    ordered = sorted(events, key=lambda e: (e.occurred_at.ToDatetime(tzinfo=UTC), e.event_id))
    quantities: dict[tuple[str, str], tuple[int, datetime]] = {}
    wishlist: dict[tuple[str, str], datetime] = {}
    for e in ordered:
        key, at, name, v = (e.user_id, e.product_id), e.occurred_at.ToDatetime(tzinfo=UTC), _name(e), e.event_value
        q = quantities.get(key, (0, at))[0]
        if name == "add_to_cart":
            quantities[key] = (q + v, at)
        elif name == "remove_from_cart":
            quantities[key] = (0 if v == 0 else max(q - v, 0), at)
        elif name == "update_cart_quantity":
            quantities[key] = (v, at)
        elif name == "wishlist" and v == 1:
            wishlist.setdefault(key, at)
        elif name == "wishlist":
            wishlist.pop(key, None)
    return {k: qa for k, qa in quantities.items() if qa[0] > 0}, wishlist


def _name(event: Event) -> str:
    return next(n for n, r in STANDARD.items() if r.event_type == event.event_type)


event_strategy = st.tuples(
    st.sampled_from([*CART_TYPES, "wishlist"]),
    st.sampled_from(PRODUCTS),
    st.integers(0, 4),  # value (clamped per type below)
    st.integers(0, 30),  # occurred_at offset in seconds: ties are common, broken by event_id
)


async def read_state(pool: Any, users: list[str]) -> tuple[dict[Any, tuple[int, datetime]], dict[Any, datetime]]:
    """The live cart lines ((user, product) -> (quantity, updated_at)) and wishlist lines of `users`."""
    cart = await pool.fetch(
        "SELECT user_id, product_id, quantity, updated_at FROM user_cart WHERE user_id = ANY($1)", users
    )
    wishlist = await pool.fetch(
        "SELECT user_id, product_id, added_at FROM user_wishlist WHERE user_id = ANY($1)", users
    )
    return (
        {(r["user_id"], r["product_id"]): (r["quantity"], r["updated_at"]) for r in cart},
        {(r["user_id"], r["product_id"]): r["added_at"] for r in wishlist},
    )


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class OrderMachine(RuleBasedStateMachine):
    def __init__(self, address: str, loop: asyncio.AbstractEventLoop, pool: Any) -> None:
        super().__init__()
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.InteractionServiceStub(self.channel)
        self.loop, self.pool = loop, pool
        self.sent: dict[str, Event] = {}  # every event sent at least once, by event_id
        self.pending: list[Event] = []  # generated, not yet sent
        self.users: list[str] = []

    @initialize(users=st.integers(1, 2))
    def make_users(self, users: int) -> None:
        self.users = [f"order-{uuid.uuid4()}" for _ in range(users)]

    @rule(specs=st.lists(event_strategy, min_size=1, max_size=12), user=st.integers(0, 1))
    def generate(self, specs: list[tuple[str, str, int, int]], user: int) -> None:
        for name, product, value, offset in specs:
            if name == "add_to_cart":
                value = max(value, 1)
            elif name == "wishlist":
                value = value % 2
            event = Event(
                event_id=str(uuid.uuid4()),
                event_type=STANDARD[name].event_type,
                user_id=self.users[user % len(self.users)],
                product_id=product,
                event_value=value,
            )
            event.occurred_at.FromDatetime(BASE + timedelta(seconds=offset, microseconds=offset * 7))
            self.pending.append(event)

    @rule(seed=st.integers(0, 2**32), batch_size=st.integers(1, 8), resend=st.integers(0, 5))
    def send_shuffled(self, seed: int, batch_size: int, resend: int) -> None:
        rnd = random.Random(seed)
        outgoing = self.pending + rnd.sample(list(self.sent.values()), min(resend, len(self.sent)))
        rnd.shuffle(outgoing)
        self.pending = []
        for start in range(0, len(outgoing), batch_size):
            batch = outgoing[start : start + batch_size]
            response = self.stub.LogEvents(pb.LogEventsRequest(events=batch), timeout=30)
            assert not response.rejected, response.rejected
            assert response.accepted_count + response.duplicate_count == len(batch)
            for event in batch:
                self.sent[event.event_id] = event

    @rule()
    def retention(self) -> None:
        """Drops every event the machine sent from the log and from the dedup keys."""
        asyncio.run_coroutine_threadsafe(
            self.pool.execute("SELECT drop_event_partitions_before($1)", RETENTION_CUTOFF), self.loop
        ).result(timeout=30)

    @invariant()
    def state_equals_the_fold(self) -> None:
        if not self.users:
            return
        expected_cart, expected_wishlist = model_fold(self.sent.values())
        cart, wishlist = asyncio.run_coroutine_threadsafe(self._read_state(), self.loop).result(timeout=30)
        assert cart == expected_cart
        assert wishlist == expected_wishlist
        asyncio.run_coroutine_threadsafe(check_fold_invariants(self.pool, self.users), self.loop).result(timeout=30)

    async def _read_state(self) -> tuple[dict[Any, tuple[int, datetime]], dict[Any, datetime]]:
        return await read_state(self.pool, self.users)

    def teardown(self) -> None:
        self.channel.close()


async def test_state_is_the_fold_whatever_the_arrival_order(server: Any) -> None:
    await run_machine(server)


async def test_state_is_the_fold_with_segments_of_two_events(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sync, "SEGMENT_EVENTS", 2)
    await run_machine(server)


async def run_machine(server: Any) -> None:
    loop = asyncio.get_running_loop()

    def factory() -> OrderMachine:
        return OrderMachine(server.address, loop, server.pool)

    await asyncio.to_thread(run_state_machine_as_test, factory, settings=MACHINE_SETTINGS)  # type: ignore[arg-type]
