"""Sealed tokens (issue 17 item 8) and the audit log (item 9), against the
real server and database.

Every token the server hands out (export resume tokens, page tokens of
ListPurchases, ListSessions, ListUserEvents) is sealed by the deployment's
Keyring: no id in clear, any edit refused with INVALID_ARGUMENT naming the
field, the same keys on every server of one database (created once, race
free), other keys on another database. A deletion writes an audit record
naming the user by a keyed hash only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from interactions_client import InteractionsClient
from interactions_client.v1 import analytics_service_pb2 as apb
from interactions_client.v1 import user_state_service_pb2 as spb
from interactions_client.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.user_state_service_pb2_grpc import UserStateServiceStub
from interactions_server import storage
from interactions_server.keyring import AUDIT, CURSOR, INVALID_TOKEN, Keyring, new_secret
from interactions_server.server import App
from tests.events import valid_event
from tests.support import StartServer, field_violations
from tests.test_auth import TOKENS, tokens_toml

T = EventType
USER = "alice-LEAKCHECK-user"
PRODUCT = "sku-LEAKCHECK-product"
SESSION = "session-LEAKCHECK"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


async def log_history(address: str, user: str = USER) -> list[str]:
    """Enough events of `user` for every listing to have a second page; returns their ids."""
    events = [
        valid_event(T.EVENT_TYPE_PURCHASE, user_id=user, product_id=PRODUCT, session_id=f"{SESSION}-{i}")
        for i in range(4)
    ] + [valid_event(T.EVENT_TYPE_VIEW, user_id=user, product_id=f"{PRODUCT}-{i}") for i in range(4)]
    async with InteractionsClient(address) as client:
        assert (await client.log_many(events)).accepted == len(events)
    return [e.event_id for e in events]


# --- one token of every kind, and a call that uses it ---------------------------------


async def _drain(call: Any) -> list[Any]:
    return [r async for r in call]


Use = Callable[[str], Awaitable[Any]]


def token_users(channel: grpc.aio.Channel) -> dict[str, tuple[str, Use]]:
    """field name and a call that presents a token, by RPC."""
    analytics, state = AnalyticsServiceStub(channel), UserStateServiceStub(channel)
    return {
        "ExportTrainingData": (
            "resume_token",
            lambda t: _drain(analytics.ExportTrainingData(apb.ExportTrainingDataRequest(resume_token=t))),
        ),
        "ExportEvents": (
            "resume_token",
            lambda t: _drain(analytics.ExportEvents(apb.ExportEventsRequest(resume_token=t))),
        ),
        "ListSessions": (
            "page_token",
            lambda t: analytics.ListSessions(apb.ListSessionsRequest(user_id=USER, page_size=1, page_token=t)),
        ),
        "ListUserEvents": (
            "page_token",
            lambda t: analytics.ListUserEvents(apb.ListUserEventsRequest(user_id=USER, page_size=1, page_token=t)),
        ),
        "ListPurchases": (
            "page_token",
            lambda t: state.ListPurchases(spb.ListPurchasesRequest(user_id=USER, page_size=1, page_token=t)),
        ),
    }


async def issued_tokens(channel: grpc.aio.Channel) -> dict[str, str]:
    """A token the server handed out, by RPC (exports: the first response's, so that a resume has rows left)."""
    analytics, state = AnalyticsServiceStub(channel), UserStateServiceStub(channel)
    training = await _drain(analytics.ExportTrainingData(apb.ExportTrainingDataRequest()))
    events = await _drain(analytics.ExportEvents(apb.ExportEventsRequest()))
    sessions = await analytics.ListSessions(apb.ListSessionsRequest(user_id=USER, page_size=1))
    user_events = await analytics.ListUserEvents(apb.ListUserEventsRequest(user_id=USER, page_size=1))
    purchases = await state.ListPurchases(spb.ListPurchasesRequest(user_id=USER, page_size=1))
    tokens = {
        "ExportTrainingData": training[-1].resume_token,
        "ExportEvents": events[-1].resume_token,
        "ListSessions": sessions.next_page_token,
        "ListUserEvents": user_events.next_page_token,
        "ListPurchases": purchases.next_page_token,
    }
    assert all(tokens.values()), tokens
    return tokens


async def refused_field(use: Use, token: str) -> str | None:
    """The field an INVALID_ARGUMENT names, or None when the call succeeded."""
    try:
        await use(token)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        (field, description), *others = field_violations(error).items()
        assert not others and description == INVALID_TOKEN
        return field
    return None


def decoded(token: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return b""


@pytest.fixture
async def history(server: App) -> list[str]:
    return await log_history(server.address)


async def test_tokens_carry_no_id_in_clear(server: App, channel: grpc.aio.Channel, history: list[str]) -> None:
    tokens = await issued_tokens(channel)
    secrets = [USER, PRODUCT, SESSION]
    for rpc, token in tokens.items():
        raw = decoded(token)
        for secret in secrets:
            assert secret not in token and secret.encode() not in raw, (rpc, secret)
        for event_id in history:  # neither as text nor as the UUID's 16 bytes
            assert event_id.encode() not in raw and uuid.UUID(event_id).bytes not in raw, rpc


async def test_an_edited_token_is_refused_naming_its_field(
    server: App, channel: grpc.aio.Channel, history: list[str]
) -> None:
    tokens = await issued_tokens(channel)
    users = token_users(channel)
    for rpc, token in tokens.items():
        field, use = users[rpc]
        assert await refused_field(use, token) is None, rpc  # the genuine token is accepted
        edits = {token[:-1], token + "A", token[1:], ""}
        for i, char in enumerate(token):  # every position, to another character of the alphabet
            edits.add(token[:i] + ALPHABET[(ALPHABET.index(char) + 1) % 64] + token[i + 1 :])
        edits.discard("")
        for edited in edits:
            assert await refused_field(use, edited) == field, (rpc, edited)


async def test_a_token_of_one_rpc_is_refused_by_another(
    server: App, channel: grpc.aio.Channel, history: list[str]
) -> None:
    tokens = await issued_tokens(channel)
    users = token_users(channel)
    for rpc, token in tokens.items():
        for other, (field, use) in users.items():
            if other != rpc and not {rpc, other} <= {"ListUserEvents", "ExportEvents"}:
                assert await refused_field(use, token) == field, (rpc, other)
    # Same shape of position, other kind: still refused.
    assert await refused_field(users["ExportEvents"][1], tokens["ListUserEvents"]) == "resume_token"
    assert await refused_field(users["ListUserEvents"][1], tokens["ExportEvents"]) == "page_token"


async def test_tokens_open_on_every_server_of_a_database_and_nowhere_else(
    start_server: StartServer, empty_database_url: str
) -> None:
    first = await start_server()
    await log_history(first.address)
    second = await start_server()  # same database: reads the keys the first one made
    elsewhere = await start_server(database_url=empty_database_url)  # another deployment: its own keys
    await log_history(elsewhere.address)
    async with (
        grpc.aio.insecure_channel(first.address) as a,
        grpc.aio.insecure_channel(second.address) as b,
        grpc.aio.insecure_channel(elsewhere.address) as c,
    ):
        tokens = await issued_tokens(a)
        for rpc, token in tokens.items():
            field, use = token_users(b)[rpc]
            assert await refused_field(use, token) is None, rpc
            field, use = token_users(c)[rpc]
            assert await refused_field(use, token) == field, rpc


async def test_the_keys_are_created_once_by_servers_starting_together(database_url: str) -> None:
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=1) for _ in range(6)]
    try:
        keyrings = await asyncio.gather(*(storage.load_keyring(p) for p in pools))
        count = await pools[0].fetchval("SELECT count(*) FROM server_keys")
    finally:
        for pool in pools:
            await pool.close()
    assert count == 2  # one cursor key, one audit key
    token = keyrings[0].seal("kind", 1, "x")
    assert all(k.open(token, "kind", "f") == [1, "x"] for k in keyrings)
    assert len({k.subject_hash("u") for k in keyrings}) == 1


def test_a_newer_key_seals_and_the_older_still_opens() -> None:
    cursor_v1, audit_v1 = new_secret(CURSOR), new_secret(AUDIT)
    old = Keyring({CURSOR: {1: cursor_v1}, AUDIT: {1: audit_v1}})
    rotated = Keyring({CURSOR: {1: cursor_v1, 2: new_secret(CURSOR)}, AUDIT: {1: audit_v1}})
    issued = old.seal("events", 5, "e")
    assert rotated.open(issued, "events", "resume_token") == [5, "e"]
    fresh = rotated.seal("events", 6, "f")
    assert decoded(fresh)[0] == 2 and decoded(issued)[0] == 1
    with pytest.raises(Exception, match="resume token"):
        old.open(fresh, "events", "resume_token")  # a key it does not have


# --- the audit log -------------------------------------------------------------------------


async def test_a_deletion_writes_an_audit_record_naming_the_user_by_a_keyed_hash_only(
    server: App, history: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    keyring = await storage.load_keyring(server.pool)
    async with InteractionsClient(server.address) as client:
        await client.delete_user_data(USER, dry_run=True)
        assert await storage.audit_records(server.pool) == []  # a dry run deletes nothing, records nothing
        with caplog.at_level(logging.INFO):
            done = await client.delete_user_data(USER)
    (record,) = await storage.audit_records(server.pool)
    assert record.action == storage.DELETE_USER_DATA
    assert record.actor == "unauthenticated"  # this server has no tokens file (see test_auth for token:<name>)
    assert record.subject == keyring.subject_hash(USER) and record.subject != keyring.subject_hash(USER + "x")
    assert record.counts == {"events": 8, "cart_lines": 0, "wishlist_lines": 0, "purchases": 4}
    assert record.detail["deleted_through"] == done.deleted_through.ToDatetime().isoformat() + "+00:00"
    assert await storage.audit_records(server.pool, subject=keyring.subject_hash(USER)) == [record]
    row = await server.pool.fetchval("SELECT audit_log::text FROM audit_log")
    assert USER not in row and USER.encode().hex() not in row
    (line,) = [r for r in caplog.records if r.name == "interactions_server.admin"]
    assert USER not in line.getMessage() and f"audit_log record {record.id}" in line.getMessage()


async def test_the_actor_is_the_token_that_asked(start_server: StartServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml(TOKENS))
    secured = await start_server(auth_tokens=tokens)
    async with InteractionsClient(secured.address, token=TOKENS["operator"][0]) as operator:
        await operator.log_many([valid_event(T.EVENT_TYPE_VIEW, user_id=USER)])
        await operator.delete_user_data(USER)
    (record,) = await storage.audit_records(secured.pool)
    assert record.actor == "token:operator"


async def test_the_audit_api_records_other_actions_in_the_callers_transaction(server: App) -> None:
    """What the data lifecycle will call: a record written in a transaction
    that rolls back is gone with it."""
    pool = server.pool
    keyring = await storage.load_keyring(pool)
    record = storage.AuditRecord("retention_purge", "system:retention", None, {"events": 12}, {"before": "2026-01-01"})
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await storage.record_audit(conn, record)
                raise RuntimeError("rolled back")
        async with conn.transaction():
            record_id = await storage.record_audit(conn, record)
            await storage.record_audit(conn, record._replace(action="x", subject=keyring.subject_hash("u")))
    (purge,) = await storage.audit_records(pool, action="retention_purge")
    assert (purge.id, purge.subject, purge.counts, purge.detail) == (
        record_id,
        None,
        {"events": 12},
        {"before": "2026-01-01"},
    )
    assert len(await storage.audit_records(pool)) == 2
