"""The benchmark's events: a realistic mix over Zipf-distributed users and products.

Generation is deterministic for a (seed, stream) pair, so a child process can
make exactly the events the parent made for the database ceiling. Events of
several streams interleave in time: event j of stream s (of S) is the
(j*S + s)-th of one ordered sequence spread over the last hour, so each stream
sends roughly in time order, as real producers do.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event
from interactions_client.validation import validate

# The mix of issue 5 (percent of events).
MIX: dict[str, int] = {
    "view": 55,
    "click": 15,
    "page_view": 8,
    "search": 6,
    "add_to_cart": 6,
    "remove_from_cart": 3,
    "update_cart_quantity": 2,
    "purchase": 2,
    "wishlist": 2,
    "review": 1,
}
USERS = 100_000
USER_EXPONENT = 0.8  # Zipf-like: the hottest user sends about 2% of all events
PRODUCTS = 20_000
PRODUCT_EXPONENT = 1.0  # popularity is steeper: the top product gets about 9% of product events
WINDOW_SECONDS = 3_540.0  # occurred_at spread over [now - 1 h, now - 1 min]

_TYPES = list(MIX)
_TYPE_WEIGHTS = list(itertools.accumulate(MIX.values()))
_QUERIES = ("laptop", "running shoes", "coffee grinder", "usb-c cable", "desk lamp", "gift ideas", "4k monitor")
_DEVICES = ("web", "ios", "android")
_REFERRERS = ("https://www.example.com/", "https://search.example.org/?q=deals", "")


def _zipf_cumulative(n: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k**exponent) for k in range(1, n + 1)))


_USER_CUMULATIVE = _zipf_cumulative(USERS, USER_EXPONENT)
_PRODUCT_CUMULATIVE = _zipf_cumulative(PRODUCTS, PRODUCT_EXPONENT)


def stream_length(total: int, streams: int, stream: int) -> int:
    """How many of `total` events stream `stream` (of `streams`) sends."""
    return total // streams + (1 if stream < total % streams else 0)


def stream_events(seed: int, stream: int, streams: int, total: int, base_time: float) -> Iterator[Event]:
    """The events of one stream, lazily; `base_time` is "now" (epoch seconds)."""
    count = stream_length(total, streams, stream)
    rng = random.Random(f"{seed}/{stream}/{streams}")
    step = WINDOW_SECONDS / max(total, 1)
    start = base_time - WINDOW_SECONDS - 60.0
    chunk = 4_096  # draws in blocks: random.choices is much cheaper per item in bulk
    for first in range(0, count, chunk):
        size = min(chunk, count - first)
        types = rng.choices(_TYPES, cum_weights=_TYPE_WEIGHTS, k=size)
        users = rng.choices(range(USERS), cum_weights=_USER_CUMULATIVE, k=size)
        products = rng.choices(range(PRODUCTS), cum_weights=_PRODUCT_CUMULATIVE, k=size)
        for k in range(size):
            at = start + ((first + k) * streams + stream) * step
            yield _event(rng, types[k], users[k], products[k], at)


def _event(rng: random.Random, type_name: str, user: int, product: int, at: float) -> Event:
    seconds = int(at)
    event = Event(
        event_id=uuid7(int(at * 1000), rng.getrandbits(80)),
        event_type=STANDARD[type_name].event_type,  # type: ignore[arg-type]
        user_id=f"user-{user}",
        session_id=f"sess-{user}-{seconds // 1800}",
        occurred_at=Timestamp(seconds=seconds, nanos=int((at - seconds) * 1e9)),
    )
    product_id = f"sku-{product}"
    if type_name == "search":
        event.search.query = rng.choice(_QUERIES)
    elif type_name == "page_view":
        event.page_view.page_path = f"/products/{product_id}" if rng.random() < 0.5 else "/deals"
        event.page_view.referrer = rng.choice(_REFERRERS)
    else:
        event.product_id = product_id
    if type_name == "add_to_cart":
        event.event_value = rng.randint(1, 3)
    elif type_name == "update_cart_quantity":
        event.event_value = rng.randint(0, 4)
    elif type_name == "wishlist":
        event.event_value = 1 if rng.random() < 0.8 else 0
    elif type_name == "review":
        event.event_value = rng.randint(1, 5)
    if type_name == "purchase":
        event.attributes.update({"price": f"{rng.randint(100, 99_999) / 100:.2f}", "currency": "EUR"})
    elif rng.random() < 0.5:
        event.attributes["device"] = rng.choice(_DEVICES)
    return event


def uuid7(unix_ms: int, random_bits: int) -> str:
    """A UUIDv7 (RFC 9562) like the client's default event ids (new_event_id),
    from the event's time and the workload's random source (reproducible)."""
    value = (unix_ms & (1 << 48) - 1) << 80 | random_bits & (1 << 80) - 1
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def check_valid(events: Sequence[Event], sample: int = 2_000) -> None:
    """Raises when an event of an evenly spread sample breaks a rule of the schema."""
    step = max(1, len(events) // sample)
    for event in events[::step]:
        violations = validate(event)
        if violations:
            found = "; ".join(f"{v.field}: {v.description}" for v in violations)
            raise ValueError(f"the workload made an invalid event ({found}): {event}")


def log_row(event: Event) -> dict[str, Any]:
    """The event as a row of the log, by column, converted the way the server stores it."""
    rule = STANDARD_BY_NUMBER[event.event_type]
    member = event.WhichOneof("details")
    details = None
    if member is not None:
        payload = getattr(event, member)
        details = json.dumps({member: {f.name: getattr(payload, f.name) for f in payload.DESCRIPTOR.fields}})
    ts = event.occurred_at
    return {
        "user_id": event.user_id,
        "event_id": uuid.UUID(event.event_id),
        "event_type": rule.name,
        "session_id": event.session_id or None,
        "product_id": event.product_id or None,
        "event_value": event.event_value if event.HasField("event_value") else rule.default_value,
        "occurred_at": datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC),
        "details": details,
        "attributes": json.dumps(dict(event.attributes)) if event.attributes else None,
        "syncs_state": rule.syncs,
    }


STANDARD_BY_NUMBER = {rule.event_type: rule for rule in STANDARD.values()}
SYNCING_TYPES = tuple(rule.name for rule in STANDARD.values() if rule.syncs)
