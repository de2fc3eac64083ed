"""Both clients against a real gRPC server with in-memory servicers
(test_client_fakes.py): results, error translation with BadRequest details,
pre-validation, channel retries, deadlines, paging, health and TLS."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.channel import TlsConfig
from interactions_client.client import InteractionsClient
from interactions_client.errors import (
    DeadlineExceededError,
    InteractionsError,
    InvalidArgumentError,
    InvalidEventError,
    UnavailableError,
    from_rpc_error,
)
from interactions_client.sync_client import SyncInteractionsClient
from interactions_client.v1 import user_state_service_pb2 as state
from interactions_client.v1.event_pb2 import Event, EventType
from tests.test_client_fakes import FakeServer, start_fake_server

VIEW = EventType.EVENT_TYPE_VIEW


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_log_returns_the_event_id_and_resends_are_duplicates(
    client: InteractionsClient, fake: FakeServer
) -> None:
    event = Event(event_id="7f0c8c4e-2a51-4c8b-9f5e-1d7a4c2b9e01", event_type=VIEW, user_id="u1", product_id="p1")
    first = await client.log(event)
    again = await client.log(event)
    assert (first.event_id, first.duplicate) == (event.event_id, False)
    assert again.duplicate
    assert list(fake.interactions.stored) == [("u1", event.event_id)]


async def test_typed_method_reaches_the_server(client: InteractionsClient, fake: FakeServer) -> None:
    result = await client.search("u1", "laptop")
    stored = fake.interactions.stored[("u1", result.event_id)]
    assert stored.search.query == "laptop" and stored.HasField("occurred_at")


async def test_prevalidation_fails_without_a_round_trip(client: InteractionsClient, fake: FakeServer) -> None:
    with pytest.raises(InvalidEventError) as caught:
        await client.review("u1", "p1", 9)
    assert caught.value.local
    assert [v.field for v in caught.value.violations] == ["event_value"]
    assert fake.interactions.unary_calls == 0


async def test_server_bad_request_details_become_violations(fake: FakeServer) -> None:
    async with InteractionsClient(fake.address, validate=False) as client:
        with pytest.raises(InvalidEventError) as caught:
            await client.log(Event(event_type=EventType.EVENT_TYPE_REVIEW, user_id="", product_id="p1", event_value=9))
    error = caught.value
    assert not error.local and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in error.violations} == {"user_id", "event_value"}
    assert all(isinstance(field, str) and description for field, description in error.violations)
    assert "user_id is required" in str(error)


async def test_unavailable_is_retried_by_the_channel(client: InteractionsClient, fake: FakeServer) -> None:
    fake.faults.unavailable_unary = 2
    result = await client.view("u1", "p1")
    assert not result.duplicate
    assert fake.interactions.unary_calls == 3


async def test_unreachable_server_raises_unavailable() -> None:
    async with InteractionsClient(f"127.0.0.1:{free_port()}", deadline=5) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.view("u1", "p1")
    assert caught.value.retryable and isinstance(caught.value, InteractionsError)


async def test_default_deadline_applies_and_can_be_overridden(fake: FakeServer) -> None:
    fake.faults.unary_delay = 0.5
    async with InteractionsClient(fake.address, deadline=0.1) as client:
        with pytest.raises(DeadlineExceededError):
            await client.view("u1", "p1")
        result = await client.log(Event(event_type=VIEW, user_id="u1", product_id="p1"), deadline=5)
        assert not result.duplicate


async def test_log_many_chunks_and_reports_rejections_by_position(client: InteractionsClient, fake: FakeServer) -> None:
    events = [Event(event_type=VIEW, user_id=f"u{i % 7}", product_id=f"p{i}") for i in range(2_500)]
    for bad in (5, 1_500, 2_499):
        events[bad].product_id = ""
    result = await client.log_many(events)
    assert (result.accepted, result.duplicate) == (2_497, 0)
    assert [(r.index, r.local, r.violations[0].field) for r in result.rejected] == [
        (5, True, "product_id"),
        (1_500, True, "product_id"),
        (2_499, True, "product_id"),
    ]
    assert fake.interactions.unary_calls == 3  # 1,000 + 1,000 + 497
    assert all(e.event_id == "" for e in events)  # the caller's events are not changed


async def test_log_many_server_rejections_map_back_to_positions(fake: FakeServer) -> None:
    events = [
        Event(event_id=f"00000000-0000-4000-8000-{i:012d}", event_type=VIEW, user_id="u1", product_id="p")
        for i in range(1_200)
    ]
    events[1_100].product_id = ""
    async with InteractionsClient(fake.address, validate=False) as client:
        first = await client.log_many(events)
        second = await client.log_many(events)
    assert (first.accepted, first.duplicate, [(r.index, r.local) for r in first.rejected]) == (
        1_199,
        0,
        [(1_100, False)],
    )
    assert first.rejected[0].event.event_id == events[1_100].event_id
    assert (second.accepted, second.duplicate, len(second.rejected)) == (0, 1_199, 1)


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


async def test_reads(client: InteractionsClient, fake: FakeServer) -> None:
    fake.state.carts["u1"] = [state.CartItem(product_id="p1", quantity=2, updated_at=_ts(100))]
    fake.state.wishlists["u1"] = [state.WishlistItem(product_id="p2", added_at=_ts(50))]
    fake.state.purchases["u1"] = [state.Purchase(event_id=f"e{i}", product_id="p") for i in range(250)]
    cart = await client.get_cart("u1")
    assert [(i.product_id, i.quantity) for i in cart] == [("p1", 2)]
    assert [i.product_id for i in await client.get_wishlist("u1")] == ["p2"]
    assert await client.get_cart("nobody") == []
    purchases = [p.event_id async for p in client.list_purchases("u1", page_size=100)]
    assert purchases == [f"e{i}" for i in range(250)]


async def test_invalid_argument_outside_event_writes_is_not_an_event_error(client: InteractionsClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client._state.ListPurchases(state.ListPurchasesRequest(user_id="u1", page_token="x"))
    error = from_rpc_error(caught.value)
    assert type(error) is InvalidArgumentError and error.violations == []
    assert type(from_rpc_error(caught.value, about_event=True)) is InvalidEventError


async def test_health(client: InteractionsClient, fake: FakeServer) -> None:
    assert await client.health() is True
    await fake.set_serving(False)
    assert await client.health() is False


async def test_health_of_an_unreachable_server_raises() -> None:
    async with InteractionsClient(f"127.0.0.1:{free_port()}", deadline=2) as client:
        with pytest.raises(UnavailableError):
            await client.health()


# The synchronous twin: same results and errors, blocking. Its calls run while
# the fake server is served by this test's event loop, so they go to a thread.


async def test_sync_client(fake: FakeServer) -> None:
    fake.state.purchases["u1"] = [state.Purchase(event_id=f"e{i}") for i in range(150)]
    fake.state.carts["u1"] = [state.CartItem(product_id="p1", quantity=3)]

    def use_sync_client() -> None:
        with SyncInteractionsClient(fake.address) as client:
            logged = client.add_to_cart("u1", "p1", 3)
            assert not logged.duplicate and ("u1", logged.event_id) in fake.interactions.stored
            with pytest.raises(InvalidEventError) as caught:
                client.review("u1", "p1", 0)
            assert caught.value.local
            result = client.log_many([Event(event_type=VIEW, user_id="u2", product_id="p")] * 3)
            assert (result.accepted, result.duplicate) == (3, 0)  # each copy got its own event_id
            assert [i.quantity for i in client.get_cart("u1")] == [3]
            assert client.get_wishlist("u1") == []
            assert len(list(client.list_purchases("u1", page_size=40))) == 150
            assert client.health()

    await asyncio.to_thread(use_sync_client)


async def test_sync_client_errors() -> None:
    def call() -> None:
        with SyncInteractionsClient(f"127.0.0.1:{free_port()}", deadline=2) as client, pytest.raises(UnavailableError):
            client.login("u1")

    await asyncio.to_thread(call)


async def test_sync_client_server_validation(fake: FakeServer) -> None:
    def call() -> InvalidEventError:
        with SyncInteractionsClient(fake.address, validate=False) as client, pytest.raises(InvalidEventError) as caught:
            client.log(Event(event_type=VIEW, user_id="u1"))
        return caught.value

    error = await asyncio.to_thread(call)
    assert not error.local and [v.field for v in error.violations] == ["product_id"]


# TLS, with certificates made by openssl for this test.


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        )
    return d


async def test_tls_and_mutual_tls(certificates: Path) -> None:
    d = certificates
    credentials = grpc.ssl_server_credentials(
        [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
        root_certificates=(d / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    fake = await start_fake_server(credentials=credentials)
    target = fake.address.replace("127.0.0.1", "localhost")
    try:
        mutual = TlsConfig.from_files(d / "ca.pem", d / "client.pem", d / "client.key")
        async with InteractionsClient(target, tls=mutual) as client:
            assert await client.health()
            assert not (await client.login("u1")).duplicate
        async with InteractionsClient(target, tls=TlsConfig.from_files(d / "ca.pem"), deadline=2) as client:
            with pytest.raises(UnavailableError):  # no client certificate: the handshake fails
                await client.health()
        async with InteractionsClient(target, deadline=2) as client:
            with pytest.raises(UnavailableError):  # plaintext to a TLS port
                await client.health()
    finally:
        await fake.stop()
