"""No raw id in the server's log (issue 17 item 9): the README's rule holds
without exception.

The real `interactions-server` command, at DEBUG, with tokens: every RPC is
called with distinctive user, product and session ids, search text and
attribute values (accepted, duplicate, conflicting, rejected, refused,
not found, deleted, replayed after the deletion), then the whole log is
scanned for each of them and for every event id. The deletion's audit trail
is the audit_log record, named in the log by its number.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from interactions_client import InteractionsClient, InteractionsError
from interactions_client.v1.event_pb2 import Event, EventType
from tests.events import valid_event
from tests.support import cli
from tests.test_auth import TOKENS, tokens_toml

T = EventType
USERS = [f"uid-LEAK{i}-7f3a" for i in range(3)]
PRODUCT = "sku-LEAK-5c1e"
SESSION = "sess-LEAK-90b2"
QUERY = "query text LEAK 11d4"
ATTRIBUTE = "attribute value LEAK 3e8f"
NOBODY = "uid-LEAK-never-logged-21aa"


def events_of(user: str) -> list[Event]:
    carted = valid_event(T.EVENT_TYPE_ADD_TO_CART, user_id=user, product_id=PRODUCT)
    carted.attributes["k"] = ATTRIBUTE
    events = [
        carted,
        valid_event(T.EVENT_TYPE_PURCHASE, user_id=user, product_id=PRODUCT, session_id=SESSION),
        valid_event(T.EVENT_TYPE_SEARCH, user_id=user, session_id=SESSION, search={"query": QUERY}),
        valid_event(T.EVENT_TYPE_WISHLIST, user_id=user, product_id=PRODUCT),
        valid_event(T.EVENT_TYPE_LOGIN, user_id=user, session_id=SESSION),
    ]
    for i, event in enumerate(events):  # an hour ago: a replay after the deletion is refused
        event.occurred_at.FromSeconds(int(time.time()) - 3600 + i)
    return events


async def expect_error(call: object) -> None:
    with pytest.raises(InteractionsError):
        await call  # type: ignore[misc]


async def exercise(address: str) -> list[str]:
    """Every RPC, with every kind of outcome; returns the event ids used."""
    ids: list[str] = []
    async with (
        InteractionsClient(address, token=TOKENS["operator"][0]) as client,
        InteractionsClient(address, token=TOKENS["reader"][0]) as reader,
    ):
        for user in USERS:
            events = events_of(user)
            ids += [e.event_id for e in events]
            await client.log_many(events)
            await client.log_many(events)  # duplicates
            conflicting = Event()
            conflicting.CopyFrom(events[0])
            conflicting.event_value = 9
            await expect_error(client.log(conflicting))  # ALREADY_EXISTS
        async with client.stream(validate=False) as stream:  # the server sees the invalid ones too
            for user in USERS:
                invalid = valid_event(T.EVENT_TYPE_ADD_TO_CART, user_id=user, product_id=PRODUCT, event_value=-1)
                for event in [*events_of(user), invalid]:
                    ids.append(event.event_id)
                    await stream.send(event)
        assert stream.totals.rejected == len(USERS)
        await expect_error(reader.log(events_of(USERS[0])[0]))  # PERMISSION_DENIED, logged with the token's name
        for user in [*USERS, NOBODY]:
            await client.get_cart(user)
            await client.get_wishlist(user)
            [p async for p in client.list_purchases(user, page_size=1)]
            [e async for e in client.list_user_events(user, page_size=1)]
            [s async for s in client.list_sessions(user)]
        await client.get_session(USERS[0], SESSION)
        await expect_error(client.get_session(NOBODY, SESSION))  # NOT_FOUND names them to the caller only
        await expect_error(client.get_user_activity(NOBODY))
        await client.get_user_activity(USERS[1])
        [e async for e in client.export_events()]
        [r async for r in client.export_training_data()]
        await client.top_search_queries()
        await client.count_active_users()
        for user in (USERS[0], NOBODY):
            await client.delete_user_data(user, dry_run=True)
            await client.delete_user_data(user)
        replay = events_of(USERS[0])  # new ids, times before the watermark: refused naming user_id
        ids += [e.event_id for e in replay]
        assert (await client.log_many(replay)).accepted == 0
    return ids


async def test_the_servers_log_carries_no_id_content_or_token(tmp_path: Path, database_url: str) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml(TOKENS))
    async with cli(
        "--listen", "127.0.0.1:0", "--database-url", database_url, "--log-level", "DEBUG",
        "--log-summary-interval", "0.2", "--auth-tokens", str(tokens),
    ) as server:  # fmt: skip
        address = (await server.wait_for_line(r"listening on (127\.0\.0\.1:\d+)"))[1]
        event_ids = await exercise(address)
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0
    log = "".join(server.log)
    # The scan saw what matters: the deletions, the refusals, the summaries.
    assert log.count("deleted the data of a user") == 2 and "audit_log record" in log
    assert "refused /interactions.v1.InteractionService/LogEvent to token reader" in log
    assert "events in the last" in log
    secrets = [*USERS, NOBODY, PRODUCT, SESSION, QUERY, ATTRIBUTE, *(s for s, _, _ in TOKENS.values())]
    for secret in [*secrets, *event_ids, *(str(uuid.UUID(e)).replace("-", "") for e in event_ids)]:
        assert secret not in log, f"{secret!r} is in the server's log"
    connection = await asyncpg.connect(database_url)
    try:
        audit = await connection.fetchval("SELECT string_agg(audit_log::text, ' ') FROM audit_log")
    finally:
        await connection.close()
    assert audit.count("delete_user_data") == 2 and not any(user in audit for user in [*USERS, NOBODY])
