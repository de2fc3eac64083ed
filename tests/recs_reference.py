"""The RecommendationService's definitions (docs/analytics.md, "Recommendations")
computed in plain Python from a list of events: what the tests compare the
server with. Events are the ones the log holds after dedup, deletion and
linking (the tests work that out themselves)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from interactions_client.rules import STANDARD

WEIGHTS = {r.name: r.ml_weight for r in STANDARD.values() if r.ml_weight is not None}
VIEW_TYPES = frozenset({"view", "product_view", "click"})
PURCHASE_TYPES = frozenset({"purchase"})
CAP = 20
TOGETHER = 3_600.0


@dataclass(frozen=True, slots=True)
class Ev:
    user: str
    product: str | None
    type: str
    at: float  # epoch seconds
    session: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    product_id: str
    score: float
    support: int
    last: float | None


def _top(rows: Iterable[Row], limit: int, key: object = None) -> list[Row]:
    ordered = sorted(rows, key=lambda r: (-r.score, r.product_id))
    return ordered[:limit]


def recently_viewed(
    events: Sequence[Ev],
    user: str,
    limit: int = 10,
    *,
    exclude: Iterable[str] = (),
    exclude_purchased: bool = False,
    cart: Iterable[str] = (),
) -> list[Row]:
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, float] = {}
    bought = {e.product for e in events if e.user == user and e.type in PURCHASE_TYPES}
    for e in events:
        if e.user == user and e.product and e.type in VIEW_TYPES:
            counts[e.product] += 1
            last[e.product] = max(last.get(e.product, -math.inf), e.at)
    skip = set(exclude) | set(cart) | (bought if exclude_purchased else set())
    rows = [Row(p, float(n), n, last[p]) for p, n in counts.items() if p not in skip]
    return sorted(rows, key=lambda r: (-(r.last or 0), r.product_id))[:limit]


def in_trending_window(at: float, now: float, window: float, *, rounded: bool) -> bool:
    """Exactly [now - window, now), or the server's hour buckets: an event
    counts when its hour's midpoint is at or after now - window and the
    hour began at or before now."""
    if not rounded:
        return now - window <= at < now
    hour = math.floor(at / 3600)
    return hour * 3600 + 1800 >= now - window and hour * 3600 <= now


def trending(
    events: Sequence[Ev],
    now: float,
    window: float = 7 * 86400,
    half_life: float = 86400,
    limit: int = 10,
    *,
    exclude: Iterable[str] = (),
    rounded: bool = True,
) -> list[Row]:
    score: dict[str, float] = defaultdict(float)
    support: dict[str, int] = defaultdict(int)
    last: dict[str, float] = {}
    skip = set(exclude)
    for e in events:
        weight = WEIGHTS.get(e.type)
        if weight is None or not e.product or e.product in skip:
            continue
        if not in_trending_window(e.at, now, window, rounded=rounded):
            continue
        score[e.product] += weight * 0.5 ** ((now - e.at) / half_life)
        support[e.product] += 1
        last[e.product] = max(last.get(e.product, -math.inf), e.at)
    return _top((Row(p, s, support[p], last[p]) for p, s in score.items()), limit)


def _eligible(groups: dict[tuple[str, object], dict[str, float]]) -> dict[tuple[str, object], set[str]]:
    """The first CAP products of each group by first occurrence (ties by product)."""
    return {
        key: {p for p, _ in sorted(firsts.items(), key=lambda kv: (kv[1], kv[0]))[:CAP]}
        for key, firsts in groups.items()
    }


def person_pairs(events: Sequence[Ev], types: frozenset[str]) -> dict[str, set[tuple[str, str]]]:
    """Each person's together pairs (a < b), with the cap."""
    occurrences: dict[str, list[Ev]] = defaultdict(list)
    for e in events:
        if e.product and e.type in types:
            occurrences[e.user].append(e)
    pairs: dict[str, set[tuple[str, str]]] = {}
    for user, evs in occurrences.items():
        hour_first: dict[tuple[str, object], dict[str, float]] = defaultdict(dict)
        session_first: dict[tuple[str, object], dict[str, float]] = defaultdict(dict)
        for e in evs:
            assert e.product is not None
            h = hour_first[(user, math.floor(e.at / 3600))]
            h[e.product] = min(h.get(e.product, math.inf), e.at)
            if e.session:
                s = session_first[(user, e.session)]
                s[e.product] = min(s.get(e.product, math.inf), e.at)
        by_hour = _eligible(hour_first)
        by_session = _eligible(session_first)
        counted = [e for e in evs if e.product in by_hour[(user, math.floor(e.at / 3600))]]
        found: set[tuple[str, str]] = set()
        for i, x in enumerate(counted):
            for y in counted[i + 1 :]:
                if x.product != y.product and abs(x.at - y.at) <= TOGETHER:
                    found.add((min(x.product, y.product), max(x.product, y.product)))  # type: ignore[type-var]
        for members in by_session.values():
            ordered = sorted(members)
            found.update((a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :])
        pairs[user] = found
    return pairs


def together(
    events: Sequence[Ev], types: frozenset[str], product: str, limit: int = 10, *, exclude: Iterable[str] = ()
) -> list[Row]:
    people = {e.user for e in events if e.product == product and e.type in types}
    support: dict[str, int] = defaultdict(int)
    for found in person_pairs(events, types).values():
        for a, b in found:
            if a == product:
                support[b] += 1
            elif b == product:
                support[a] += 1
    skip = set(exclude)
    rows = [Row(q, n / max(len(people), 1), n, None) for q, n in support.items() if q not in skip]
    return sorted(rows, key=lambda r: (-r.support, r.product_id))[:limit]


def affinities(
    events: Sequence[Ev],
    user: str,
    now: float,
    half_life: float | None = None,
    limit: int = 10,
    *,
    exclude: Iterable[str] = (),
    cart: Iterable[str] = (),
) -> list[Row]:
    score: dict[str, float] = defaultdict(float)
    support: dict[str, int] = defaultdict(int)
    last: dict[str, float] = {}
    skip = set(exclude) | set(cart)
    for e in events:
        weight = WEIGHTS.get(e.type)
        if e.user != user or weight is None or not e.product or e.product in skip:
            continue
        score[e.product] += weight if half_life is None else weight * 0.5 ** ((now - e.at) / half_life)
        support[e.product] += 1
        last[e.product] = max(last.get(e.product, -math.inf), e.at)
    return _top((Row(p, s, support[p], last[p]) for p, s in score.items()), limit)
