"""AdminService.ExportUserData (the right of access) against the real server
and database: the export equals what the reads return (ListUserEvents,
GetCart, GetWishlist, ListPurchases), the deletion record, responses of at
most 1,000 rows, a bad id named, and `interactions export-user`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from interactions_client import InteractionsClient
from interactions_client.rules import stored_name
from interactions_client.v1 import admin_service_pb2 as apb
from interactions_client.v1.admin_service_pb2_grpc import AdminServiceStub
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server.server import App
from tests.support import field_violations
from tests.test_cli import cli as client_cli
from tests.test_retention import ev, log

T = EventType
NOW = datetime.now(UTC).replace(microsecond=0)


def person(user: str = "alice") -> list[Event]:
    """A history with every part: cart lines (one emptied), a wishlist, purchases, details and attributes."""
    at = NOW - timedelta(days=2)
    viewed = ev(T.EVENT_TYPE_PAGE_VIEW, at + timedelta(seconds=7), user=user)
    viewed.attributes["device"] = "ios"
    events = [
        ev(T.EVENT_TYPE_ADD_TO_CART, at, user=user, product_id="p1", event_value=2),
        ev(T.EVENT_TYPE_ADD_TO_CART, at + timedelta(seconds=1), user=user, product_id="p2"),
        ev(T.EVENT_TYPE_REMOVE_FROM_CART, at + timedelta(seconds=2), user=user, product_id="p2"),
        ev(T.EVENT_TYPE_WISHLIST, at + timedelta(seconds=3), user=user, product_id="p3", event_value=1),
        ev(T.EVENT_TYPE_PURCHASE, at + timedelta(seconds=4), user=user, product_id="p1", session_id="s1"),
        ev(T.EVENT_TYPE_PURCHASE, at + timedelta(seconds=5), user=user, product_id="p4"),
        ev(T.EVENT_TYPE_SEARCH, at + timedelta(seconds=6), user=user),
        viewed,
        ev(T.EVENT_TYPE_CUSTOM, at + timedelta(seconds=8), user=user, custom_type="gift_card_redeemed"),
    ]
    return events


async def exported(client: InteractionsClient, user: str) -> list[apb.ExportUserDataResponse]:
    return [r async for r in client.export_user_data(user)]


def parts(responses: list[apb.ExportUserDataResponse]) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {"cart": [], "wishlist": [], "purchases": [], "events": []}
    for r in responses[1:]:
        part = r.WhichOneof("part")
        assert part in out
        holder = getattr(r, part)
        out[part] += list(holder.items if part in ("cart", "wishlist") else getattr(holder, part))
    return out


async def reads(client: InteractionsClient, user: str) -> dict[str, list[object]]:
    return {
        "cart": list(await client.get_cart(user)),
        "wishlist": list(await client.get_wishlist(user)),
        "purchases": [p async for p in client.list_purchases(user, page_size=2)],
        "events": [e async for e in client.list_user_events(user, page_size=3)],
    }


async def test_the_export_equals_what_the_reads_return(server: App) -> None:
    await log(server, [*person("alice"), *person("bob")])
    async with InteractionsClient(server.address) as client:
        responses = await exported(client, "alice")
        expected = await reads(client, "alice")
    header = responses[0].header
    assert responses[0].WhichOneof("part") == "header"
    assert (header.user_id, list(header.anonymous_ids), header.HasField("deletion")) == ("alice", [], False)
    assert abs(header.exported_at.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    got = parts(responses)
    assert [r.WhichOneof("part") for r in responses[1:]] == ["cart", "wishlist", "purchases", "events"]
    assert got["cart"] == expected["cart"] and [i.product_id for i in got["cart"]] == ["p1"]  # type: ignore[attr-defined]
    assert got["wishlist"] == expected["wishlist"] and got["purchases"] == expected["purchases"]
    stored = got["events"]
    assert [s.event for s in stored] == expected["events"][::-1]  # type: ignore[attr-defined]  # oldest first
    assert len(stored) == 9 and all(s.received_at.seconds > 0 for s in stored)  # type: ignore[attr-defined]


async def test_a_person_with_linked_ids_exports_what_the_reads_return_by_any_of_their_ids(server: App) -> None:
    """The guest's history (cookie ids) and the user's, one person after the links."""
    guest = person("cookie-1")[:5]  # a cart, a wishlist, a purchase as a guest
    other_guest = [ev(T.EVENT_TYPE_ADD_TO_CART, NOW - timedelta(hours=3), user="cookie-2", product_id="p9")]
    await log(server, [*guest, *other_guest, *person("erin")[5:]])
    async with InteractionsClient(server.address) as client:
        await client.link_identity("cookie-1", "erin")
        await client.link_identity("cookie-2", "erin")
        await log(server, [ev(T.EVENT_TYPE_VIEW, NOW - timedelta(hours=1), user="cookie-1")])  # after the link
        identity = await client.get_identity("cookie-2")
        expected = await reads(client, "erin")
        for asked in ("erin", "cookie-1", "cookie-2"):
            responses = await exported(client, asked)
            header = responses[0].header
            assert (header.user_id, list(header.anonymous_ids)) == (identity.user_id, identity.anonymous_ids)
            assert (header.user_id, list(header.anonymous_ids)) == ("erin", ["cookie-1", "cookie-2"])
            got = parts(responses)
            assert {k: got[k] for k in ("cart", "wishlist", "purchases")} == {
                k: expected[k] for k in ("cart", "wishlist", "purchases")
            }
            assert [s.event for s in got["events"]] == expected["events"][::-1]  # type: ignore[attr-defined]
    assert len(expected["events"]) == 5 + 1 + 4 + 1 and [i.product_id for i in expected["cart"]] == ["p1", "p9"]  # type: ignore[attr-defined]


async def test_a_deleted_user_exports_the_deletion_record_and_what_came_since(server: App) -> None:
    await log(server, person("carol"))
    async with InteractionsClient(server.address) as client:
        done = await client.delete_user_data("carol")
        await log(server, [ev(T.EVENT_TYPE_VIEW, datetime.now(UTC), user="carol")])
        responses = await exported(client, "carol")
    deletion = responses[0].header.deletion
    assert deletion.deleted_through == done.deleted_through and deletion.deleted_at.seconds > 0
    got = parts(responses)
    assert (len(got["cart"]), len(got["purchases"]), len(got["events"])) == (0, 0, 1)


async def test_an_unknown_user_exports_a_header_only(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        responses = await exported(client, "nobody")
    assert [r.WhichOneof("part") for r in responses] == ["header"]


async def test_many_events_come_in_responses_of_at_most_1000(server: App) -> None:
    events = [ev(T.EVENT_TYPE_VIEW, NOW - timedelta(seconds=i), user="busy") for i in range(2_500)]
    await log(server, events)
    async with InteractionsClient(server.address) as client:
        responses = await exported(client, "busy")
    sizes = [len(r.events.events) for r in responses if r.WhichOneof("part") == "events"]
    assert sizes == [1_000, 1_000, 500]
    assert [s.event.event_id for r in responses[1:] for s in r.events.events] == [e.event_id for e in events[::-1]]


async def test_a_bad_user_id_is_named(server: App, channel: grpc.aio.Channel) -> None:
    for bad, text in (("", "is required"), ("x" * 129, "129 characters long")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in AdminServiceStub(channel).ExportUserData(apb.ExportUserDataRequest(user_id=bad)):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in field_violations(refused.value)["user_id"]


async def test_the_export_user_command_writes_one_readable_document(server: App, tmp_path: Path) -> None:
    await log(server, person("dave"))
    out = tmp_path / "dave.json"
    run = await client_cli("--target", server.address, "export-user", "dave", "--out", str(out))
    assert run.status == 0, run.stderr
    assert run.stdout.strip() == f"wrote {out}: 1 cart lines, 1 wishlist items, 2 purchases, 9 events"
    document = json.loads(out.read_text())
    assert list(document) == ["user_id", "anonymous_ids", "exported_at", "deletion", "cart", "wishlist", "purchases", "events"]  # fmt: skip
    assert (document["user_id"], document["anonymous_ids"], document["deletion"]) == ("dave", [], None)
    async with InteractionsClient(server.address) as client:
        expected = await reads(client, "dave")
    as_dicts = {k: [MessageToDict(m, preserving_proto_field_name=True) for m in v] for k, v in expected.items()}  # type: ignore[arg-type]
    assert document["cart"] == as_dicts["cart"] and document["wishlist"] == as_dicts["wishlist"]
    assert document["purchases"] == as_dicts["purchases"]
    events = document["events"]
    assert [e["event_id"] for e in events] == [e.event_id for e in expected["events"][::-1]]  # type: ignore[attr-defined]
    names = [stored_name(e) for e in expected["events"][::-1]]  # type: ignore[arg-type]
    assert [e["event_type"] for e in events] == names and "gift_card_redeemed" in names  # by name, readable
    assert all("received_at" in e for e in events)
    assert not [p for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir())) if p.suffix == ".partial"]
    # --user spelling, and standard output.
    run = await client_cli("--target", server.address, "export-user", "--user", "dave", "--out", "-")
    assert run.status == 0, run.stderr
    assert json.loads(run.stdout) == {**document, "exported_at": json.loads(run.stdout)["exported_at"]}


async def test_export_user_of_an_empty_person_is_a_valid_document(server: App) -> None:
    run = await client_cli("--target", server.address, "export-user", "--user", "nobody", "--out", "-")
    assert run.status == 0, run.stderr
    document = json.loads(run.stdout)
    assert [document[k] for k in ("cart", "wishlist", "purchases", "events")] == [[], [], [], []]
