"""One person, one fold: after an anonymous id is linked to a user, the
user's cart and wishlist are the fold of both ids' events in (occurred_at,
event_id) order, whatever the arrival order: the guest's events before or
after the link, the link (by LinkIdentity, or by a login carrying the
anonymous id, shuffled in with the events) before or after any of them,
resends anywhere, chains (a link to a linked anonymous id), refused links.

The state machine of tests/test_order_independence.py, with two guests and a
user, and a rule that links: the model decides each link by the rules of the
README (permanent and single; a person cannot be linked; a target stands for
its person) in arrival order, and folds every event under its id's person.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from interactions_client.rules import STANDARD
from interactions_client.v1 import identity_service_pb2 as id_pb
from interactions_client.v1 import identity_service_pb2_grpc as id_grpc
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1 import interaction_service_pb2_grpc as pb_grpc
from interactions_client.v1.event_pb2 import Event
from interactions_server.ingest import _sync
from interactions_server.ingest._identity import LinkRequest, decide_links
from interactions_server.storage import IdentityFacts
from tests.fold_checks import check_fold_invariants
from tests.test_order_independence import (
    BASE,
    MACHINE_SETTINGS,
    RETENTION_CUTOFF,
    event_strategy,
    model_fold,
    read_state,
)

GUESTS, USER = (0, 1), 2  # indexes into the machine's ids


class LinkModel:
    """The link rules, as the server applies them in arrival order."""

    def __init__(self) -> None:
        self.person_of: dict[str, str] = {}
        self.persons: set[str] = set()

    def decide(self, anonymous_id: str, target: str) -> bool:
        """Applies one link (a login of `target` with `anonymous_id`); False when refused."""
        person = self.person_of.get(target, target)
        current = self.person_of.get(anonymous_id)
        if current is not None:
            ok = current == person
        elif anonymous_id in self.persons or anonymous_id == person:
            ok = False
        else:
            self.person_of[anonymous_id] = person
            ok = True
        if ok:
            self.persons.add(person)
        return ok

    def person(self, id_: str) -> str:
        return self.person_of.get(id_, id_)


class IdentityOrderMachine(RuleBasedStateMachine):
    def __init__(self, address: str, loop: asyncio.AbstractEventLoop, pool: Any) -> None:
        super().__init__()
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.InteractionServiceStub(self.channel)
        self.identity = id_grpc.IdentityServiceStub(self.channel)
        self.loop, self.pool = loop, pool
        self.sent: dict[str, Event] = {}  # every event accepted at least once, by event_id
        self.pending: list[Event] = []  # generated, not yet sent
        self.ids: list[str] = []
        self.model = LinkModel()

    @initialize()
    def make_ids(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ids = [f"guest-a-{tag}", f"guest-b-{tag}", f"user-{tag}"]

    @rule(specs=st.lists(event_strategy, min_size=1, max_size=10), who=st.integers(0, 2))
    def generate(self, specs: list[tuple[str, str, int, int]], who: int) -> None:
        for name, product, value, offset in specs:
            if name == "add_to_cart":
                value = max(value, 1)
            elif name == "wishlist":
                value = value % 2
            event = Event(
                event_id=str(uuid.uuid4()),
                event_type=STANDARD[name].event_type,
                user_id=self.ids[who],
                product_id=product,
                event_value=value,
            )
            event.occurred_at.FromDatetime(BASE + timedelta(seconds=offset, microseconds=offset * 7))
            self.pending.append(event)

    @rule(guest=st.sampled_from(GUESTS), to=st.integers(0, 2), by_login=st.booleans(), offset=st.integers(0, 30))
    def link(self, guest: int, to: int, by_login: bool, offset: int) -> None:
        anonymous_id, user_id = self.ids[guest], self.ids[to]
        if anonymous_id == user_id:
            return
        if by_login:  # shuffled in with the pending events: linked when its batch arrives
            login = Event(event_id=str(uuid.uuid4()), event_type=STANDARD["login"].event_type, user_id=user_id)
            login.login.anonymous_id = anonymous_id
            login.occurred_at.FromDatetime(BASE + timedelta(seconds=offset))
            self.pending.append(login)
            return
        request = id_pb.LinkIdentityRequest(anonymous_id=anonymous_id, user_id=user_id)
        expected = self.model.decide(anonymous_id, user_id)
        try:
            self.identity.LinkIdentity(request, timeout=30)
        except grpc.RpcError as error:
            assert not expected, error
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
        else:
            assert expected

    @rule(seed=st.integers(0, 2**32), batch_size=st.integers(1, 8), resend=st.integers(0, 5))
    def send_shuffled(self, seed: int, batch_size: int, resend: int) -> None:
        rnd = random.Random(seed)
        outgoing = self.pending + rnd.sample(list(self.sent.values()), min(resend, len(self.sent)))
        rnd.shuffle(outgoing)
        self.pending = []
        for start in range(0, len(outgoing), batch_size):
            batch = outgoing[start : start + batch_size]
            response = self.stub.LogEvents(pb.LogEventsRequest(events=batch), timeout=30)
            refused = {r.index for r in response.rejected}
            expected_refused = set()
            for i, event in enumerate(batch):
                if event.WhichOneof("details") == "login" and not self.model.decide(
                    event.login.anonymous_id, event.user_id
                ):
                    expected_refused.add(i)
                elif event.event_type == STANDARD["login"].event_type:
                    self.model.persons.add(self.model.person(event.user_id))
            assert refused == expected_refused, response.rejected
            assert response.accepted_count + response.duplicate_count == len(batch) - len(refused)
            for i, event in enumerate(batch):
                if i not in refused:
                    self.sent[event.event_id] = event

    @rule()
    def retention(self) -> None:
        """Drops every event the machine sent from the log and the dedup keys:
        a link after it folds the guest's state history, not the log."""
        asyncio.run_coroutine_threadsafe(
            self.pool.execute("SELECT drop_event_partitions_before($1)", RETENTION_CUTOFF), self.loop
        ).result(timeout=30)

    @invariant()
    def state_is_the_fold_of_each_person(self) -> None:
        if not self.ids:
            return
        as_person = []
        for event in self.sent.values():
            moved = Event()
            moved.CopyFrom(event)
            moved.user_id = self.model.person(event.user_id)
            as_person.append(moved)
        expected_cart, expected_wishlist = model_fold(as_person)
        cart, wishlist = asyncio.run_coroutine_threadsafe(self._read_state(), self.loop).result(timeout=30)
        assert cart == expected_cart
        assert wishlist == expected_wishlist
        asyncio.run_coroutine_threadsafe(check_fold_invariants(self.pool, self.ids), self.loop).result(timeout=30)

    async def _read_state(self) -> tuple[dict[Any, tuple[int, datetime]], dict[Any, datetime]]:
        return await read_state(self.pool, self.ids)

    def teardown(self) -> None:
        self.channel.close()


async def test_one_person_one_fold_whatever_the_arrival_order(server: Any) -> None:
    await run_machine(server)


async def test_one_person_one_fold_with_segments_of_two_events(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sync, "SEGMENT_EVENTS", 2)  # links fold into (and split) sealed segments
    await run_machine(server)


async def run_machine(server: Any) -> None:
    loop = asyncio.get_running_loop()

    def factory() -> IdentityOrderMachine:
        return IdentityOrderMachine(server.address, loop, server.pool)

    machine_settings = settings(MACHINE_SETTINGS, stateful_step_count=14)
    await asyncio.to_thread(run_state_machine_as_test, factory, settings=machine_settings)  # type: ignore[arg-type]


def test_the_model_decides_like_the_readme() -> None:
    model = LinkModel()
    assert model.decide("a", "u")
    assert model.decide("a", "u")  # already linked
    assert not model.decide("a", "v")  # linked elsewhere
    assert not model.decide("u", "v")  # u is a person
    assert model.decide("b", "a")  # a stands for u
    assert model.person("b") == "u"
    # The server's own decisions agree (ingest._identity.decide_links).
    facts = {i: IdentityFacts(None, False, ()) for i in ("a", "u", "v", "b")}
    requests = [
        LinkRequest(n, anonymous_id, target, 0)
        for n, (anonymous_id, target) in enumerate([("a", "u"), ("a", "u"), ("a", "v"), ("u", "v"), ("b", "a")])
    ]
    decisions = decide_links(requests, facts)
    assert [(d.link, d.refusal is None, d.person) for d in decisions] == [
        (True, True, "u"),
        (False, True, "u"),
        (False, False, "u"),
        (False, False, "v"),
        (True, True, "u"),
    ]
