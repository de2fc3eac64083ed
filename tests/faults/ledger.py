"""What a fault test sent and what the server answered, and the checks on the
database afterwards.

Every fault test ends with `check_log_and_state(url, ledger)`:

- every acknowledged event is in the log exactly once, with the content sent;
- no other event is there (the log holds only events the test sent);
- the state tables equal the fold of every accepted event (cart, wishlist,
  purchases): those of the log, and those the state holds that the log may
  have lost to retention (state_history, purchase_history); the state's
  history holds exactly the accepted cart and wishlist events, and its fold
  checkpoints agree with it (tests/fold_checks.py);
- zero INTERNAL and zero UNKNOWN answers (`ledger.codes`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio

from interactions_client.rules import RULES, STANDARD, stored_name
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.fold_checks import check_fold_invariants
from tests.test_order_independence import model_fold

Key = tuple[str, str]  # (user_id, event_id): the idempotency key
OK = "OK"
# What a caller resends on: the write did not happen, or its answer was lost.
RESEND_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
FORBIDDEN_CODES = ("INTERNAL", "UNKNOWN")
# grpc.aio's own status for a call whose send failed in the client (the server
# had already ended the call): it replaces the server's status with INTERNAL
# "Internal error from Core". Not the server's answer; tallied under its own
# name. An INTERNAL the server sends carries the server's message, and its
# traceback-free ERROR log line is caught by the log checks.
CLIENT_WRITE_FAILED = "Internal error from Core"
CLIENT_SIDE = "client-side: write after the server ended the call"

# Channel options for the test's callers: no client-side retries (every
# answer is seen and tallied), fast reconnects after a server restart.
RAW_CHANNEL_OPTIONS = (
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def key(event: Event) -> Key:
    return (event.user_id, event.event_id)


@dataclass
class Ledger:
    sent: dict[Key, Event] = field(default_factory=dict)
    acknowledged: set[Key] = field(default_factory=set)
    codes: Counter[str] = field(default_factory=Counter)  # status code name of every answer, OK included
    details: dict[str, str] = field(default_factory=dict)  # the first status message seen per code
    resends: int = 0  # events sent again after a failed call or a broken stream
    duplicates: int = 0  # events answered "duplicate"

    def sending(self, events: Sequence[Event]) -> None:
        for event in events:
            self.sent[key(event)] = event

    def answered(self, code: grpc.StatusCode | str, details: str | None = None) -> None:
        name = code if isinstance(code, str) else code.name
        if name == "INTERNAL" and details == CLIENT_WRITE_FAILED:
            name = CLIENT_SIDE
        self.codes[name] += 1
        if details is not None:
            self.details.setdefault(name, details)

    def acknowledge(self, event: Event, duplicate: bool) -> None:
        self.acknowledged.add(key(event))
        self.duplicates += duplicate

    def forbidden(self) -> dict[str, str]:
        """The INTERNAL / UNKNOWN answers: their count and first message."""
        return {code: f"{self.codes[code]}: {self.details.get(code)}" for code in FORBIDDEN_CODES if self.codes[code]}

    def figures(self) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in self.codes.most_common())
        return (
            f"events sent {len(self.sent)}, acknowledged {len(self.acknowledged)}, "
            f"duplicate answers {self.duplicates}, resends {self.resends}; answers: {codes}"
        )


FIGURES: list[str] = []
"""Every figure reported in this session; conftest prints them in pytest's summary."""


def report(name: str, text: str) -> None:
    """Records a figure for docs/reliability.md (printed at the end of the run, and now with `pytest -s`)."""
    FIGURES.append(f"[faults] {name}: {text}")
    print(f"\n{FIGURES[-1]}", flush=True)


# --- events -----------------------------------------------------------------

_TYPES = ["add_to_cart", "add_to_cart", "remove_from_cart", "update_cart_quantity", "wishlist", "purchase", "view"]


def make_events(
    count: int, rnd: random.Random, *, users: int = 300, products: int = 20, prefix: str = "f"
) -> list[Event]:
    """Valid events of the state-keeping types (and views), with increasing
    occurred_at (plus jitter, so some arrive out of order)."""
    base = datetime.now(UTC) - timedelta(minutes=30)
    events = []
    for i in range(count):
        name = rnd.choice(_TYPES)
        value = {
            "add_to_cart": rnd.randint(1, 3),
            "remove_from_cart": rnd.randint(0, 2),
            "update_cart_quantity": rnd.randint(0, 4),
            "wishlist": rnd.randint(0, 1),
        }.get(name, 1)
        event = Event(
            event_id=str(uuid.uuid4()),
            event_type=STANDARD[name].event_type,
            user_id=f"{prefix}-u{rnd.randrange(users)}",
            product_id=f"p{rnd.randrange(products)}",
            event_value=value,
        )
        event.occurred_at.FromDatetime(base + timedelta(milliseconds=i * 10 + rnd.randint(0, 50)))
        events.append(event)
    return events


# --- callers ----------------------------------------------------------------


async def log_until_acknowledged(
    stub: InteractionServiceStub,
    event: Event,
    ledger: Ledger,
    *,
    deadline: float = 10.0,
    give_up_after: float = 60.0,
) -> None:
    """LogEvent, resent on the retryable codes until answered; fails the test
    on any other code or after `give_up_after` seconds."""
    loop = asyncio.get_running_loop()
    stop = loop.time() + give_up_after
    ledger.sending([event])
    backoff = 0.05
    while True:
        try:
            response = await stub.LogEvent(pb.LogEventRequest(event=event), timeout=deadline)
        except grpc.aio.AioRpcError as error:
            ledger.answered(error.code(), error.details())
            if error.code() not in RESEND_CODES or loop.time() > stop:
                raise AssertionError(f"LogEvent {event.event_id}: {error.code().name} {error.details()}") from error
            ledger.resends += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 1.0)
            continue
        ledger.answered(OK)
        ledger.acknowledge(event, response.duplicate)
        return


async def unary_load(
    stub: InteractionServiceStub, events: Sequence[Event], ledger: Ledger, *, callers: int, progress: Callable[[], None]
) -> None:
    """`callers` concurrent callers logging `events` one LogEvent each."""
    queue = iter(events)

    async def caller() -> None:
        for event in queue:
            await log_until_acknowledged(stub, event, ledger)
            progress()

    await asyncio.gather(*(caller() for _ in range(callers)))


class RecordingCall:
    """A StreamEvents call whose end is tallied in the ledger (the shipped
    streamer retries even INTERNAL, so its totals would hide one)."""

    def __init__(self, call: Any, ledger: Ledger) -> None:
        self._call, self._ledger = call, ledger

    async def write(self, request: pb.StreamEventsRequest) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    async def read(self) -> Any:
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:  # CANCELLED: the streamer itself cancelled
                self._ledger.answered(error.code(), error.details())
            raise
        if response is grpc.aio.EOF:
            self._ledger.answered(OK)
        return response

    def cancel(self) -> bool:
        cancelled: bool = self._call.cancel()
        return cancelled


def recording_stream_opener(stub: InteractionServiceStub, ledger: Ledger) -> Callable[[], RecordingCall]:
    return lambda: RecordingCall(stub.StreamEvents(), ledger)


# --- the checks -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRow:
    user_id: str
    event_id: str
    event_type: str
    product_id: str | None
    event_value: int
    occurred_us: int


async def read_log(database_url: str) -> list[LogRow]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT user_id, event_id::text, event_type, product_id, event_value,"
            " (extract(epoch FROM occurred_at) * 1000000)::int8 AS occurred_us FROM events"
        )
    finally:
        await connection.close()
    return [LogRow(*r) for r in rows]


def _occurred_us(event: Event) -> int:
    return event.occurred_at.seconds * 1_000_000 + event.occurred_at.nanos // 1_000


def _value(event: Event) -> int:
    return event.event_value if event.HasField("event_value") else RULES[event.event_type].default_value


def duplicated_keys(rows: Sequence[LogRow]) -> dict[Key, int]:
    counts = Counter((r.user_id, r.event_id) for r in rows)
    return {k: n for k, n in counts.items() if n > 1}


async def check_log_and_state(database_url: str, ledger: Ledger, *, all_acknowledged: bool = False) -> list[LogRow]:
    """The invariants every fault test ends with (see the module docstring).
    `all_acknowledged`: the test resent until every event was acknowledged, so
    the log must hold exactly the events sent."""
    assert not ledger.forbidden(), f"INTERNAL/UNKNOWN answers: {ledger.forbidden()} ({ledger.figures()})"
    rows = await read_log(database_url)
    assert not duplicated_keys(rows), f"events logged more than once: {list(duplicated_keys(rows).items())[:5]}"
    logged = {(r.user_id, r.event_id): r for r in rows}
    accepted = logged.keys() | await state_keys(database_url)  # retention may have cut the log, not the state
    strangers = accepted - ledger.sent.keys()
    assert not strangers, f"{len(strangers)} logged events were never sent, e.g. {sorted(strangers)[:3]}"
    missing = ledger.acknowledged - logged.keys()
    assert not missing, f"{len(missing)} acknowledged events are not in the log, e.g. {sorted(missing)[:3]}"
    if all_acknowledged:
        assert ledger.acknowledged == ledger.sent.keys(), "some events were never acknowledged"
    for k, row in logged.items():
        event = ledger.sent[k]
        # occurred_at as sent; the server's receive time when the event had none.
        occurred_us = _occurred_us(event) if event.HasField("occurred_at") else row.occurred_us
        sent = (stored_name(event), event.product_id or None, _value(event), occurred_us)
        assert (row.event_type, row.product_id, row.event_value, row.occurred_us) == sent, f"{k}: {row} != {event}"
    await check_state_is_the_fold(database_url, [ledger.sent[k] for k in accepted], logged=len(logged))
    return rows


async def state_keys(database_url: str) -> set[Key]:
    """The (user_id, event_id) of the events the state holds (its history and the purchases)."""
    connection = await asyncpg.connect(database_url)
    try:
        records = await connection.fetch(
            "SELECT user_id, event_id::text FROM state_history"
            " UNION SELECT user_id, event_id::text FROM purchase_history"
        )
    finally:
        await connection.close()
    return {(r[0], r[1]) for r in records}


_FOLDED = frozenset(
    STANDARD[name].event_type for name in ("add_to_cart", "remove_from_cart", "update_cart_quantity", "wishlist")
)


async def check_state_is_the_fold(database_url: str, accepted: Sequence[Event], *, logged: int | None = None) -> None:
    """The state tables against the fold of the `accepted` events (every event
    ever accepted, retention or not); `logged`: how many of them the log still
    holds (all of them when None), which is what event_keys must hold."""
    connection = await asyncpg.connect(database_url)
    try:
        cart = await connection.fetch("SELECT user_id, product_id, quantity, updated_at FROM user_cart")
        wishlist = await connection.fetch("SELECT user_id, product_id, added_at FROM user_wishlist")
        purchases = await connection.fetch("SELECT user_id, event_id::text, product_id FROM purchase_history")
        history = await connection.fetch("SELECT user_id, event_id::text FROM state_history")
        keys = await connection.fetchval("SELECT count(*) FROM event_keys")
        await check_fold_invariants(connection)
    finally:
        await connection.close()
    expected_cart, expected_wishlist = model_fold(accepted)
    assert {(r[0], r[1]): (r[2], r[3]) for r in cart} == expected_cart, "user_cart is not the fold of the events"
    assert {(r[0], r[1]): r[2] for r in wishlist} == expected_wishlist, "user_wishlist is not the fold of the events"
    purchase = STANDARD["purchase"].event_type
    expected_purchases = {(e.user_id, e.event_id, e.product_id) for e in accepted if e.event_type == purchase}
    assert {tuple(r) for r in purchases} == expected_purchases, "purchase_history is not the purchases of the events"
    expected_history = {(e.user_id, e.event_id) for e in accepted if e.event_type in _FOLDED}
    assert len(history) == len(expected_history), "state_history holds an event twice"
    assert {tuple(r) for r in history} == expected_history, "state_history is not the cart and wishlist events"
    assert keys == (len(accepted) if logged is None else logged), "event_keys does not hold exactly the log's keys"


class TracebackCatcher(logging.Handler):
    """Collects log records that carry a traceback, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.stack_info or "Traceback (most recent call last)" in record.getMessage():
            self.records.append(record)
        if record.levelno >= logging.WARNING:
            self.warnings += 1

    def summary(self) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()[:200]}" for r in self.records[:5]]


def chunks(events: Sequence[Event], size: int) -> Iterator[Sequence[Event]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]
