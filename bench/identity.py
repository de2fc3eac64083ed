"""(m): LinkIdentity of a guest with 100 events (issue 18's target: p99 <= 20 ms).

Each of `link_guests` guests logs 100 events of the benchmark's mix (views,
clicks, searches, cart and wishlist events, purchases) and its user 20, all
through the bulk streamer before the clock starts; then the guests are
linked to their users one call at a time from this process, each call timed
from send to answer. A link moves the guest's 100 events, keys and purchases
under the user and folds its cart and wishlist events into the user's lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench import database
from bench.measures import Bench, percentile
from bench.proc_stats import CpuShares
from bench.workload import stream_events
from interactions_client import InteractionsClient
from interactions_client.v1.event_pb2 import Event

GUEST_EVENTS = 100
USER_EVENTS = 20
SEED_LINK = 10


@dataclass(slots=True)
class LinkLatency:
    guests: int
    events_per_guest: int
    p50: float  # seconds
    p99: float
    max: float
    moved: int  # events moved by all the links (guests * events_per_guest when all went well)
    problems: int  # links that moved another number of events, or failed
    cpu: CpuShares


def _events(bench: Bench, guests: int) -> Iterator[Event]:
    """Each guest's and user's events, ids rewritten to bench-guest-N / bench-user-N."""
    per_person = GUEST_EVENTS + USER_EVENTS
    source = stream_events(bench.seed(SEED_LINK), 0, 1, guests * per_person, time.time())
    for n, event in enumerate(source):
        person, k = divmod(n, per_person)
        event.user_id = f"bench-guest-{person}" if k < GUEST_EVENTS else f"bench-user-{person}"
        yield event


async def link_latency(bench: Bench) -> LinkLatency:
    guests = bench.config.link_guests
    await database.reset_log(bench.url)
    bench.progress(f"(m) {guests:,} guests with {GUEST_EVENTS} events each (and their users with {USER_EVENTS})")
    async with InteractionsClient(bench.server.target, deadline=30.0) as client:
        async with client.stream(validate=False) as stream:
            for event in _events(bench, guests):
                await stream.send(event)
        meter = bench.meter()
        cpu_before = time.process_time()
        latencies: list[float] = []
        moved = problems = 0
        meter.start()
        for n in range(guests):
            started = time.perf_counter()
            try:
                linked = await client.link_identity(f"bench-guest-{n}", f"bench-user-{n}")
            except Exception:  # counted: a failed link voids the figure
                problems += 1
                continue
            latencies.append(time.perf_counter() - started)
            moved += linked.events_moved
            problems += linked.events_moved != GUEST_EVENTS
        cpu = meter.stop(time.process_time() - cpu_before)
    latencies.sort()
    result = LinkLatency(
        guests,
        GUEST_EVENTS,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[-1] if latencies else float("nan"),
        moved,
        problems,
        cpu,
    )
    bench.progress(f"(m) LinkIdentity p50 {result.p50 * 1000:.1f} ms, p99 {result.p99 * 1000:.1f} ms")
    return result
