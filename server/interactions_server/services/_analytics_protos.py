"""Stored rows back into the schema's messages, and the per-query and
per-session folds the AnalyticsService computes in Python."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.rules import STANDARD
from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.storage import EventRow, SearchOutcome, SessionEvent, TrainingRow

# From the schema: the ML weights by stored name.
ML_WEIGHTS: dict[str, float] = {rule.name: rule.ml_weight for rule in STANDARD.values() if rule.ml_weight is not None}

# What a search leads to (the definitions), by stored name.
CLICK_TYPES = ("click", "view", "product_view")
CART_TYPES = ("add_to_cart", "cart_add")
PURCHASE_TYPES = ("purchase",)
# Whose product a session counts as viewed.
VIEW_TYPES = frozenset({"view", "product_view", "click"})


def timestamp(micros: int) -> Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1_000)


# Stored type name -> (EventType number, ml_weight or None): one lookup per event.
_TYPES: dict[str, tuple[int, float | None]] = {
    rule.name: (rule.event_type, rule.ml_weight) for rule in STANDARD.values()
}


def fill_event(event: Event, row: EventRow) -> None:
    """Sets an (empty) Event to the event as logged, with the default
    event_value the log filled in. Fields are set in place: about four times
    faster than building the messages with keyword arguments."""
    user_id, event_id, event_type, session_id, product_id, event_value, occurred_us, details, attributes, _ = row
    _fill(event, user_id, event_id, event_type, session_id, product_id, event_value, occurred_us)
    if details is not None or attributes is not None:
        _fill_json(event, details, attributes)


def _fill(
    event: Event,
    user_id: str,
    event_id: str,
    event_type: str,
    session_id: str | None,
    product_id: str | None,
    event_value: int,
    occurred_us: int,
) -> float | None:
    """Sets an Event's columns; returns its type's ml_weight (None when it has none)."""
    event.event_id = event_id
    event.user_id = user_id
    known = _TYPES.get(event_type)
    weight = None
    if known is None:
        event.event_type = EventType.EVENT_TYPE_CUSTOM
        event.custom_type = event_type
    else:
        event.event_type, weight = known  # type: ignore[assignment]
    if session_id is not None:
        event.session_id = session_id
    if product_id is not None:
        event.product_id = product_id
    event.event_value = event_value
    occurred = event.occurred_at
    occurred.seconds, micros = divmod(occurred_us, 1_000_000)
    occurred.nanos = micros * 1_000
    return weight


def _fill_json(event: Event, details: str | None, attributes: str | None) -> None:
    """Sets an Event's details (JSON {"<details member>": {...}}) and attributes (JSON object)."""
    if details is not None:
        ((member, payload),) = json.loads(details).items()
        message = getattr(event, member)
        for name, value in payload.items():
            setattr(message, name, value)
    if attributes is not None:
        event.attributes.update(json.loads(attributes))


def add_events(events: Any, rows: Iterable[EventRow]) -> None:
    """Appends the rows to a repeated Event field."""
    add = events.add
    for row in rows:
        fill_event(add(), row)


def add_exported_events(exported: Any, rows: Sequence[Sequence[Any]], start: int, max_bytes: int) -> int:
    """Appends rows[start:] (each with EventRow's fields, in its order) to a
    repeated ExportedEvent field until about `max_bytes` are in it (at least
    one row); returns the index after the last row added. Exports run this
    for every event: the row is unpacked at once, not read field by field."""
    add = exported.add
    size = 0
    end = len(rows)
    for index in range(start, end):
        (
            user_id,
            event_id,
            event_type,
            session_id,
            product_id,
            event_value,
            occurred_us,
            details,
            attributes,
            received_us,
        ) = rows[index]
        item = add()
        event = item.event
        weight = _fill(event, user_id, event_id, event_type, session_id, product_id, event_value, occurred_us)
        if weight is not None:
            item.ml_weight = weight
        received = item.received_at
        received.seconds, micros = divmod(received_us, 1_000_000)
        received.nanos = micros * 1_000
        # Roughly the row's bytes: ids and times, plus its JSON payloads.
        size += 160
        if details is not None or attributes is not None:
            _fill_json(event, details, attributes)
            size += len(details or "") + len(attributes or "")
        if size >= max_bytes:
            return index + 1
    return end


def add_training_rows(rows: Any, chunk: Iterable[TrainingRow]) -> None:
    """Appends the pairs to a repeated TrainingRow field (set in place, like fill_event)."""
    for r in chunk:
        row = rows.add()
        row.user_id = r.user_id
        row.product_id = r.product_id
        row.weight = r.weight
        row.event_count = r.event_count
        seconds, micros = divmod(r.last_occurred_us, 1_000_000)
        row.last_occurred_at.seconds = seconds
        row.last_occurred_at.nanos = micros * 1_000
        row.counts.update(zip(r.types, r.type_counts, strict=True))


# --- search analytics ------------------------------------------------------------


def normalise_query(query: str) -> str:
    """Unicode NFKC, lower case, trimmed, inner whitespace collapsed.

    Done here rather than in SQL: PostgreSQL's lower() follows the database's
    locale (under "C" it lowers ASCII only) and its normalize() needs a UTF8
    database; Python's str methods are the same on every deployment."""
    return " ".join(unicodedata.normalize("NFKC", query).lower().split())


@dataclass(slots=True)
class _QueryTotals:
    searches: int = 0
    users: set[str] = field(default_factory=set)
    clicked: int = 0
    added_to_cart: int = 0
    purchased: int = 0
    reported_count: int = 0
    no_results: int = 0


def top_queries(outcomes: Iterable[SearchOutcome], limit: int) -> list[pb.SearchQueryStats]:
    """Merges the raw queries' outcomes by normalised query; the `limit` most
    searched first (ties by query)."""
    totals: dict[str, _QueryTotals] = {}
    for o in outcomes:
        key = normalise_query(o.query)
        t = totals.get(key)
        if t is None:
            t = totals[key] = _QueryTotals()
        t.searches += o.searches
        t.users.add(o.user_id)
        t.clicked += o.clicked
        t.added_to_cart += o.added_to_cart
        t.purchased += o.purchased
        t.reported_count += o.reported_count
        t.no_results += o.no_results
    ranked = sorted(totals.items(), key=lambda item: (-item[1].searches, item[0]))[:limit]
    stats = []
    for query, t in ranked:
        s = pb.SearchQueryStats(
            query=query,
            searches=t.searches,
            users=len(t.users),
            click_through_rate=t.clicked / t.searches,
            add_to_cart_rate=t.added_to_cart / t.searches,
            conversion_rate=t.purchased / t.searches,
        )
        if t.reported_count:
            s.no_result_rate = t.no_results / t.reported_count
        stats.append(s)
    return stats


# --- sessions ------------------------------------------------------------------------


def sessions(user_id: str, events: Sequence[SessionEvent]) -> dict[str, pb.Session]:
    """A summary per session (no timeline) of events in (session_id,
    occurred_at, event_id) order."""
    out: dict[str, pb.Session] = {}
    seen: set[str] = set()
    current: pb.Session | None = None
    last_us = 0
    for e in events:
        if current is None or e.session_id != current.session_id:
            if current is not None:
                current.ended_at.CopyFrom(timestamp(last_us))
            current = out[e.session_id] = pb.Session(
                session_id=e.session_id, user_id=user_id, started_at=timestamp(e.occurred_us)
            )
            seen = set()
        current.event_count += 1
        current.counts[e.event_type] += 1
        if e.event_type in VIEW_TYPES and e.product_id is not None and e.product_id not in seen:
            seen.add(e.product_id)
            current.products_viewed.append(e.product_id)
        if e.event_type == "search" and e.query is not None:
            current.search_queries.append(e.query)
        last_us = e.occurred_us
    if current is not None:
        current.ended_at.CopyFrom(timestamp(last_us))
    return out
