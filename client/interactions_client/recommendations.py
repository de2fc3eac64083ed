"""The RecommendationService methods of the clients (docs/analytics.md,
"Recommendations"): each returns the list of ScoredProduct (product_id,
score, support, last_occurred_at), best first. `limit` 0 means the server's
default (10); at most 100. Durations are timedeltas."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.message import Message

from interactions_client.analytics import duration
from interactions_client.errors import from_rpc_error
from interactions_client.v1.recommendation_service_pb2 import (
    AlsoViewedRequest,
    FrequentlyBoughtTogetherRequest,
    RecentlyViewedRequest,
    ScoredProduct,
    TrendingProductsRequest,
    UserAffinitiesRequest,
)

__all__ = ["RecommendationMethods", "ScoredProduct", "SyncRecommendationMethods"]


def recently_viewed_request(
    user_id: str, limit: int, exclude: Iterable[str], exclude_purchased: bool, exclude_in_cart: bool
) -> RecentlyViewedRequest:
    return RecentlyViewedRequest(
        user_id=user_id,
        limit=limit,
        exclude_product_ids=list(exclude),
        exclude_purchased=exclude_purchased,
        exclude_in_cart=exclude_in_cart,
    )


def trending_request(
    window: timedelta | None, half_life: timedelta | None, limit: int, exclude: Iterable[str]
) -> TrendingProductsRequest:
    return TrendingProductsRequest(
        window=duration(window), half_life=duration(half_life), limit=limit, exclude_product_ids=list(exclude)
    )


def affinities_request(
    user_id: str, half_life: timedelta | None, limit: int, exclude: Iterable[str], exclude_in_cart: bool
) -> UserAffinitiesRequest:
    return UserAffinitiesRequest(
        user_id=user_id,
        half_life=duration(half_life),
        limit=limit,
        exclude_product_ids=list(exclude),
        exclude_in_cart=exclude_in_cart,
    )


class RecommendationMethods(ABC):
    """The RecommendationService methods of InteractionsClient."""

    _recommendations: Any  # the RecommendationServiceStub on the client's channel

    @abstractmethod
    def _deadline(self, deadline: float | None) -> float | None: ...

    async def _recommend(self, method: Any, request: Message, deadline: float | None) -> list[ScoredProduct]:
        try:
            response = await method(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.products)

    async def recently_viewed(
        self,
        user_id: str,
        *,
        limit: int = 0,
        exclude: Iterable[str] = (),
        exclude_purchased: bool = False,
        exclude_in_cart: bool = False,
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = recently_viewed_request(user_id, limit, exclude, exclude_purchased, exclude_in_cart)
        return await self._recommend(self._recommendations.RecentlyViewed, request, deadline)

    async def trending_products(
        self,
        *,
        window: timedelta | None = None,
        half_life: timedelta | None = None,
        limit: int = 0,
        exclude: Iterable[str] = (),
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = trending_request(window, half_life, limit, exclude)
        return await self._recommend(self._recommendations.TrendingProducts, request, deadline)

    async def frequently_bought_together(
        self, product_id: str, *, limit: int = 0, exclude: Iterable[str] = (), deadline: float | None = None
    ) -> list[ScoredProduct]:
        request = FrequentlyBoughtTogetherRequest(product_id=product_id, limit=limit, exclude_product_ids=list(exclude))
        return await self._recommend(self._recommendations.FrequentlyBoughtTogether, request, deadline)

    async def also_viewed(
        self, product_id: str, *, limit: int = 0, exclude: Iterable[str] = (), deadline: float | None = None
    ) -> list[ScoredProduct]:
        request = AlsoViewedRequest(product_id=product_id, limit=limit, exclude_product_ids=list(exclude))
        return await self._recommend(self._recommendations.AlsoViewed, request, deadline)

    async def user_affinities(
        self,
        user_id: str,
        *,
        half_life: timedelta | None = None,
        limit: int = 0,
        exclude: Iterable[str] = (),
        exclude_in_cart: bool = False,
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = affinities_request(user_id, half_life, limit, exclude, exclude_in_cart)
        return await self._recommend(self._recommendations.UserAffinities, request, deadline)


class SyncRecommendationMethods(ABC):
    """RecommendationMethods, blocking."""

    _recommendations: Any

    @abstractmethod
    def _deadline(self, deadline: float | None) -> float | None: ...

    def _recommend(self, method: Any, request: Message, deadline: float | None) -> list[ScoredProduct]:
        try:
            response = method(request, timeout=self._deadline(deadline))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return list(response.products)

    def recently_viewed(
        self,
        user_id: str,
        *,
        limit: int = 0,
        exclude: Iterable[str] = (),
        exclude_purchased: bool = False,
        exclude_in_cart: bool = False,
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = recently_viewed_request(user_id, limit, exclude, exclude_purchased, exclude_in_cart)
        return self._recommend(self._recommendations.RecentlyViewed, request, deadline)

    def trending_products(
        self,
        *,
        window: timedelta | None = None,
        half_life: timedelta | None = None,
        limit: int = 0,
        exclude: Iterable[str] = (),
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = trending_request(window, half_life, limit, exclude)
        return self._recommend(self._recommendations.TrendingProducts, request, deadline)

    def frequently_bought_together(
        self, product_id: str, *, limit: int = 0, exclude: Iterable[str] = (), deadline: float | None = None
    ) -> list[ScoredProduct]:
        request = FrequentlyBoughtTogetherRequest(product_id=product_id, limit=limit, exclude_product_ids=list(exclude))
        return self._recommend(self._recommendations.FrequentlyBoughtTogether, request, deadline)

    def also_viewed(
        self, product_id: str, *, limit: int = 0, exclude: Iterable[str] = (), deadline: float | None = None
    ) -> list[ScoredProduct]:
        request = AlsoViewedRequest(product_id=product_id, limit=limit, exclude_product_ids=list(exclude))
        return self._recommend(self._recommendations.AlsoViewed, request, deadline)

    def user_affinities(
        self,
        user_id: str,
        *,
        half_life: timedelta | None = None,
        limit: int = 0,
        exclude: Iterable[str] = (),
        exclude_in_cart: bool = False,
        deadline: float | None = None,
    ) -> list[ScoredProduct]:
        request = affinities_request(user_id, half_life, limit, exclude, exclude_in_cart)
        return self._recommend(self._recommendations.UserAffinities, request, deadline)
