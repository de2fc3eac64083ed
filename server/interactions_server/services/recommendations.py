"""interactions.v1.RecommendationService: what the storefront renders, read
from the aggregates the maintainer keeps (storage/_recommendations.py;
docs/analytics.md, "Recommendations").

Every read runs on the recommendations' own pool (ServerConfig.
recommendations_pool_max_size): never a connection ingest or the exports need.
Trending is one list for the whole shop per (window, half_life): computed
by one computation at a time per process and shared by every call (a stale
list is served while the next is computed, never one older than MAX_STALE
seconds), so that its cost does not grow with the call rate. A list stays
fresh for DUTY times as long as it took to compute (at least a second): its
recomputation takes at most about 1/DUTY of a connection and of a core of
PostgreSQL whatever the log's size (at 10M events, recomputed back to back,
it took a core of the database and delayed every read).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.v1 import recommendation_service_pb2 as pb
from interactions_client.v1 import recommendation_service_pb2_grpc
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import InvalidArgument
from interactions_server.services._ids import check_id

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RecommendationService"].full_name
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_EXCLUDED = 1_000  # exclude_product_ids
DEFAULT_WINDOW = 7 * 86_400.0
DEFAULT_HALF_LIFE = 86_400.0
MAX_DURATION_SECONDS = 315_576_000_000  # what google.protobuf.Duration allows (10,000 years)
# Trending's shared lists: how long one is fresh (DUTY times its computation,
# from TRENDING_TTL to MAX_TTL), the oldest one served while the next is
# computed, how many (window, half_life)s are kept.
TRENDING_TTL = 1.0
DUTY = 10.0
MAX_TTL = 15.0
MAX_STALE = 30.0
TRENDING_KEYS = 32
TRENDING_ROWS = MAX_LIMIT + MAX_EXCLUDED  # enough for any limit after any exclusions


class RecommendationService(recommendation_service_pb2_grpc.RecommendationServiceServicer):
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._clock = clock
        self._trending = _TrendingCache(pool, clock)

    async def RecentlyViewed(
        self, request: pb.RecentlyViewedRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecentlyViewedResponse:
        user_id = check_id(request.user_id, "user_id")
        limit = _limit(request.limit)
        exclude = _excluded(request.exclude_product_ids)
        rows = await storage.recently_viewed(
            self._pool,
            user_id,
            limit,
            exclude=exclude,
            exclude_purchased=request.exclude_purchased,
            exclude_in_cart=request.exclude_in_cart,
        )
        return pb.RecentlyViewedResponse(products=_products(rows))

    async def TrendingProducts(
        self, request: pb.TrendingProductsRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrendingProductsResponse:
        window = _duration(request.window, "window") if request.HasField("window") else DEFAULT_WINDOW
        half_life = _duration(request.half_life, "half_life") if request.HasField("half_life") else DEFAULT_HALF_LIFE
        limit = _limit(request.limit)
        excluded = set(_excluded(request.exclude_product_ids))
        rows = await self._trending.get(window, half_life)
        return pb.TrendingProductsResponse(
            products=_products([r for r in rows if r.product_id not in excluded][:limit])
        )

    async def FrequentlyBoughtTogether(
        self, request: pb.FrequentlyBoughtTogetherRequest, context: grpc.aio.ServicerContext
    ) -> pb.FrequentlyBoughtTogetherResponse:
        return pb.FrequentlyBoughtTogetherResponse(products=await self._together(storage.PURCHASES, request))

    async def AlsoViewed(
        self, request: pb.AlsoViewedRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlsoViewedResponse:
        return pb.AlsoViewedResponse(products=await self._together(storage.VIEWS, request))

    async def _together(
        self, kind: int, request: pb.FrequentlyBoughtTogetherRequest | pb.AlsoViewedRequest
    ) -> list[pb.ScoredProduct]:
        product_id = check_id(request.product_id, "product_id")
        limit = _limit(request.limit)
        exclude = _excluded(request.exclude_product_ids)
        return _products(await storage.together(self._pool, kind, product_id, limit, exclude=exclude))

    async def UserAffinities(
        self, request: pb.UserAffinitiesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UserAffinitiesResponse:
        user_id = check_id(request.user_id, "user_id")
        half_life = _duration(request.half_life, "half_life") if request.HasField("half_life") else None
        limit = _limit(request.limit)
        exclude = _excluded(request.exclude_product_ids)
        rows = await storage.affinities(
            self._pool,
            user_id,
            self._clock(),
            half_life,
            limit,
            exclude=exclude,
            exclude_in_cart=request.exclude_in_cart,
        )
        return pb.UserAffinitiesResponse(products=_products(rows))


@dataclass(slots=True)
class _Entry:
    rows: list[storage.Scored] = field(default_factory=list)
    computed_at: float = -math.inf  # time.monotonic() of the computation's start
    fresh_for: float = TRENDING_TTL  # seconds: DUTY times the computation's own
    computing: asyncio.Task[None] | None = None


class _TrendingCache:
    """One list per (window, half_life), shared by the calls of this process."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock
        self._entries: OrderedDict[tuple[float, float], _Entry] = OrderedDict()
        # One computation at a time: many (window, half_life)s never hold
        # more than one connection of the pool the per-user reads share.
        self._computing = asyncio.Semaphore(1)

    async def get(self, window: float, half_life: float) -> list[storage.Scored]:
        key = (window, half_life)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > TRENDING_KEYS:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        age = time.monotonic() - entry.computed_at
        if age >= entry.fresh_for and entry.computing is None:
            entry.computing = asyncio.create_task(self._compute(entry, window, half_life))
        if age >= MAX_STALE and entry.computing is not None:
            # Too old to serve: wait for the new list (shielded: one caller
            # giving up does not cancel it for the others).
            await asyncio.shield(entry.computing)
        return entry.rows

    async def _compute(self, entry: _Entry, window: float, half_life: float) -> None:
        try:
            async with self._computing:
                started = time.monotonic()
                entry.rows = await storage.trending(self._pool, self._clock(), window, half_life, TRENDING_ROWS)
                entry.computed_at = started
                entry.fresh_for = min(max(TRENDING_TTL, DUTY * (time.monotonic() - started)), MAX_TTL)
        finally:
            entry.computing = None


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field=field, description=description)])


def _limit(value: int) -> int:
    if not 0 <= value <= MAX_LIMIT:
        raise _invalid("limit", f"must be from 0 (the default, {DEFAULT_LIMIT}) to {MAX_LIMIT}")
    return value or DEFAULT_LIMIT


def _excluded(values: Sequence[str]) -> list[str]:
    if len(values) > MAX_EXCLUDED:
        raise _invalid("exclude_product_ids", f"has {len(values):,} entries; the limit is {MAX_EXCLUDED:,}")
    return [check_id(value, f"exclude_product_ids[{i}]") for i, value in enumerate(values)]


def _duration(value: Duration, field: str) -> float:
    """A positive Duration in seconds; INVALID_ARGUMENT naming `field` otherwise."""
    seconds, nanos = value.seconds, value.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise _invalid(field, "is not a valid duration")
    if seconds > MAX_DURATION_SECONDS:
        raise _invalid(field, "is not a valid duration")
    if seconds < 0 or nanos < 0 or (seconds == 0 and nanos == 0):
        raise _invalid(field, "must be positive")
    return seconds + nanos / 1e9


def _products(rows: Sequence[storage.Scored]) -> list[pb.ScoredProduct]:
    products = []
    for row in rows:
        product = pb.ScoredProduct(product_id=row.product_id, score=row.score, support=row.support)
        if row.last_occurred_at is not None:
            product.last_occurred_at.CopyFrom(_timestamp(row.last_occurred_at))
        products.append(product)
    return products


def _timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp
