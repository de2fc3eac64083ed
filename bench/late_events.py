"""(l): late events on a long-lived key (issue 17, item 3).

One (user, product) cart line gets `late_key_events` events (200k by default)
in time order through the shipped streamer, spread over the last day; then
`late_calls` LogEvent calls, one at a time, each an add_to_cart dated at a
random instant of that day, so older than the line's last event: each one is
a late event for the fold. Its latency is timed from the call to its answer,
and the CPU of the server and of PostgreSQL over all the calls is divided
per call. Target: p99 <= 50 ms whatever the key's history (the fold reads
the rows of one sealed segment and the key's segment functions). The cart
is then checked against the fold of every event sent: a wrong state voids
the figure.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field

from bench import database
from bench.measures import Bench, Throughput, percentile
from interactions_client import InteractionsClient
from interactions_client.errors import InteractionsError
from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event

USER = "late-user"
PRODUCT = "late-sku"
SPAN_SECONDS = 86_400.0  # the key's history spreads over the last day
WARM_UP_CALLS = 5  # late calls before the measured ones (not counted)
SEED_LATE = 10


@dataclass(slots=True)
class LateEvents:
    key_events: int  # events on the key before the late calls
    calls: int  # measured late calls
    p50: float  # seconds
    p99: float
    max: float
    setup_seconds: float  # streaming the key's history
    run: Throughput  # the measured calls: CPU and WAL
    errors: list[str] = field(default_factory=list)

    @property
    def server_ms_per_call(self) -> float:
        return self.run.cpu.server * self.run.seconds / max(self.calls, 1) * 1000

    @property
    def postgres_ms_per_call(self) -> float:
        return self.run.cpu.postgres * self.run.seconds / max(self.calls, 1) * 1000


def _event(name: str, value: int, occurred: float) -> Event:
    event = Event(
        event_id=str(uuid.uuid4()),
        event_type=STANDARD[name].event_type,  # type: ignore[arg-type]
        user_id=USER,
        product_id=PRODUCT,
        event_value=value,
    )
    event.occurred_at.FromMicroseconds(int(occurred * 1_000_000))
    return event


def key_history(rnd: random.Random, count: int, start: float) -> list[Event]:
    """`count` cart events of the key, in time order over SPAN_SECONDS from `start`."""
    step = SPAN_SECONDS / max(count, 1)
    events = []
    for i in range(count):
        draw = rnd.random()
        if draw < 0.6:
            name, value = "add_to_cart", rnd.randint(1, 3)
        elif draw < 0.95:
            name, value = "remove_from_cart", rnd.randint(1, 2)
        else:
            name, value = "update_cart_quantity", rnd.randint(0, 5)
        events.append(_event(name, value, start + i * step))
    return events


def fold(events: list[Event]) -> int:
    """The quantity the cart must show: the events in (occurred_at, event_id) order."""
    quantity = 0
    for e in sorted(events, key=lambda e: (e.occurred_at.ToMicroseconds(), e.event_id)):
        if e.event_type == STANDARD["add_to_cart"].event_type:
            quantity += e.event_value
        elif e.event_type == STANDARD["remove_from_cart"].event_type:
            quantity = 0 if e.event_value == 0 else max(quantity - e.event_value, 0)
        else:
            quantity = e.event_value
    return quantity


async def run(bench: Bench) -> LateEvents:
    config = bench.config
    count, calls = config.late_key_events, config.late_calls
    rnd = random.Random(bench.seed(SEED_LATE))
    start = time.time() - SPAN_SECONDS - 60.0
    history = key_history(rnd, count, start)
    # Each late event at a random instant of the history: older than the line's last event.
    late = [_event("add_to_cart", 1, start + rnd.random() * SPAN_SECONDS) for _ in range(WARM_UP_CALLS + calls)]
    errors: list[str] = []
    await database.reset_log(bench.url)
    bench.progress(f"(l) streaming {count:,} events of one (user, product) in time order")
    async with InteractionsClient(bench.server.target) as client:
        began = time.monotonic()
        async with client.stream(validate=False, raise_on_failure=False) as streamer:
            for event in history:
                await streamer.send(event)
        setup = time.monotonic() - began
        if streamer.totals.accepted != count:
            errors.append(f"the key's history: {streamer.totals}")
        bench.progress(f"(l) {count:,} events in {setup:.1f} s; {calls} late LogEvent calls, one at a time")
        for event in late[:WARM_UP_CALLS]:
            await client.log(event, deadline=120.0)
        latencies: list[float] = []
        meter = bench.meter()
        wal = await database.wal_position(bench.url)
        meter.start()
        began = time.monotonic()
        for event in late[WARM_UP_CALLS:]:
            sent = time.perf_counter()
            try:
                await client.log(event, deadline=120.0)
            except InteractionsError as error:
                errors.append(f"late LogEvent: {error}")
                continue
            latencies.append(time.perf_counter() - sent)
        seconds = time.monotonic() - began
        cpu = meter.stop(0.0)
        written = await database.wal_position(bench.url) - wal
        cart = {item.product_id: item.quantity for item in await client.get_cart(USER)}
    expected = fold(history + late)
    if cart.get(PRODUCT, 0) != expected:
        errors.append(f"the cart holds {cart.get(PRODUCT, 0)}, the fold of the events {expected}")
    latencies.sort()
    result = Throughput(len(latencies), max(seconds, 1e-9), cpu, len(errors), errors[:3], wal_bytes=written)
    measured = LateEvents(
        count,
        len(latencies),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[-1] if latencies else float("nan"),
        setup,
        result,
        errors,
    )
    bench.progress(
        f"(l) p50 {measured.p50 * 1000:.1f} ms, p99 {measured.p99 * 1000:.1f} ms; "
        f"CPU per call: server {measured.server_ms_per_call:.1f} ms, PostgreSQL {measured.postgres_ms_per_call:.1f} ms"
    )
    return measured
