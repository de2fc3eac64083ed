"""A client that is not ours: stubs generated from protos/ alone (plain
protoc, none of interactions_client) can log every seed type, see state
change, get field details for bad events, probe health and list services by
reflection."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

from interactions_server.server import App
from tests.support import field_violations

PROTOS = Path(__file__).resolve().parents[1] / "protos"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    out = tmp_path_factory.mktemp("foreign")
    sources = [str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto")]
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *sources]
    assert protoc.main(args) == 0
    # Generated under the proto package path: `interactions.v1`, its own
    # descriptor pool entries are the same files, so load them in isolation.
    saved = dict(sys.modules)
    sys.path.insert(0, str(out))
    try:
        names = ["event_pb2", "interaction_service_pb2", "interaction_service_pb2_grpc", "user_state_service_pb2"]
        names += ["user_state_service_pb2_grpc"]
        yield {n: importlib.import_module(f"interactions.v1.{n}") for n in names}
    finally:
        sys.path.remove(str(out))
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]


def seed_events(m: dict[str, ModuleType]) -> list[object]:
    """One event of each seed type, written as JSON the way any client could."""
    e = m["event_pb2"]
    specs = [
        {"eventType": "EVENT_TYPE_VIEW", "productId": "p1"},
        {"eventType": "EVENT_TYPE_CLICK", "productId": "p1"},
        {"eventType": "EVENT_TYPE_ADD_TO_CART", "productId": "p1", "eventValue": "3"},
        {"eventType": "EVENT_TYPE_REMOVE_FROM_CART", "productId": "p1", "eventValue": "1"},
        {"eventType": "EVENT_TYPE_UPDATE_CART_QUANTITY", "productId": "p2", "eventValue": "4"},
        {"eventType": "EVENT_TYPE_PURCHASE", "productId": "p3"},
        {"eventType": "EVENT_TYPE_WISHLIST", "productId": "p4", "eventValue": "1"},
        {"eventType": "EVENT_TYPE_REVIEW", "productId": "p3", "eventValue": "5"},
        {"eventType": "EVENT_TYPE_SEARCH", "search": {"query": "laptop"}},
        {"eventType": "EVENT_TYPE_PAGE_VIEW", "sessionId": "s1", "pageView": {"pagePath": "/deals"}},
        {"eventType": "EVENT_TYPE_PRODUCT_VIEW", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_CART_ADD", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_CART_REMOVE", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_CART_UPDATE", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_WISHLIST_ADD", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_WISHLIST_REMOVE", "sessionId": "s1", "productId": "p1"},
        {"eventType": "EVENT_TYPE_LOGIN"},
        {"eventType": "EVENT_TYPE_LOGOUT"},
    ]
    return [json_format.ParseDict({"userId": "alice", **spec}, e.Event()) for spec in specs]


async def test_a_client_built_from_protos_alone(server: App, foreign: dict[str, ModuleType]) -> None:
    m = foreign
    svc, state = m["interaction_service_pb2"], m["user_state_service_pb2"]
    async with grpc.aio.insecure_channel(server.address) as channel:
        interactions = m["interaction_service_pb2_grpc"].InteractionServiceStub(channel)
        users = m["user_state_service_pb2_grpc"].UserStateServiceStub(channel)

        for event in seed_events(m):
            response = await interactions.LogEvent(svc.LogEventRequest(event=event))
            assert response.event_id and not response.duplicate

        cart = await users.GetCart(state.GetCartRequest(user_id="alice"))
        assert {i.product_id: i.quantity for i in cart.items} == {"p1": 2, "p2": 4}
        wishlist = await users.GetWishlist(state.GetWishlistRequest(user_id="alice"))
        assert [i.product_id for i in wishlist.items] == ["p4"]
        purchases = await users.ListPurchases(state.ListPurchasesRequest(user_id="alice"))
        assert [p.product_id for p in purchases.purchases] == ["p3"]

        bad = json_format.ParseDict(
            {"userId": "alice", "eventType": "EVENT_TYPE_PURCHASE", "productId": "p3", "eventValue": "1999"},
            m["event_pb2"].Event(),
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await interactions.LogEvent(svc.LogEventRequest(event=bad))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "price does not belong" in field_violations(error.value)["event.event_value"]

        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in reflection.ServerReflectionInfo(iter([request])):
            listed = {s.name for s in answer.list_services_response.service}
        assert {"interactions.v1.InteractionService", "interactions.v1.UserStateService"} <= listed
        assert "grpc.health.v1.Health" in listed
