"""The retention policy against the real server and database: what it
removes across month boundaries and per type (whole months detached and
dropped, the rest row by row), the dry run's counts equal to the run's,
dedup keys going with their events, the state untouched, the audit record,
the daily run of a server (once per day, logged with counts and no ids),
`interactions-server retention`, a log locked by a long read, and a run
resumed after it stopped half-way."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from interactions_client import InteractionsClient
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_server import storage
from interactions_server.config import RetentionPolicy
from interactions_server.server import App
from interactions_server.storage import _lifecycle
from tests.conftest import with_database
from tests.events import valid_event
from tests.support import StartServer, cli, eventually

T = EventType
POLICY = RetentionPolicy.of(30, {"page_view": 7})  # the example
FAST = replace(storage.Pace(), rows=3, pause=0.0, min_pause=0.0, lock_retries=2, lock_retry_interval=0.05)
OLD_MONTHS = ("2024-10-01", "2025-04-01")  # partitions the tests create (before their data)


def at(event: Event, moment: datetime) -> Event:
    event.occurred_at.FromDatetime(moment)
    return event


def ev(kind: int, moment: datetime, user: str = "u1", **fields: object) -> Event:
    return at(valid_event(kind, user_id=user, **fields), moment)


async def log(server: App, events: list[Event]) -> None:
    async with InteractionsClient(server.address) as client:
        result = await client.log_many(events)
    assert result.accepted == len(events), result.rejected


async def with_old_months(pool: asyncpg.Pool) -> None:
    await pool.execute("SELECT ensure_event_partitions($1::date, $2::date)", *map(datetime.fromisoformat, OLD_MONTHS))


async def logged(pool: asyncpg.Pool) -> set[str]:
    return {str(r[0]) for r in await pool.fetch("SELECT event_id FROM events")}


async def keys(pool: asyncpg.Pool) -> set[str]:
    return {str(r[0]) for r in await pool.fetch("SELECT event_id FROM event_keys")}


async def state(pool: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: [tuple(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3")]
        for table in ("cart_lines", "wishlist_lines", "purchase_history", "state_history", "state_segments")
    }


def d(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# As of 2025-03-10 12:00 UTC the policy removes page_view before
# 2025-03-03 and every other type before 2025-02-08: months up to January
# whole, February's first week row by row.
AS_OF = d("2025-03-10T12:00:00")


def history() -> tuple[list[Event], set[str]]:
    """Events around every cutoff and month boundary, and the ids the policy keeps."""
    kept: list[Event] = [
        ev(T.EVENT_TYPE_VIEW, d("2025-02-08T00:00:00")),  # at the global cutoff: kept
        ev(T.EVENT_TYPE_ADD_TO_CART, d("2025-02-20T10:00:00"), product_id="p1"),
        ev(T.EVENT_TYPE_PAGE_VIEW, d("2025-03-03T00:00:00")),  # at page_view's cutoff
        ev(T.EVENT_TYPE_PAGE_VIEW, d("2025-03-09T00:00:00")),
        ev(T.EVENT_TYPE_CUSTOM, d("2025-02-09T00:00:00")),
        ev(T.EVENT_TYPE_PURCHASE, d("2025-03-01T00:00:00"), product_id="p1"),
        ev(T.EVENT_TYPE_VIEW, d("2025-03-01T00:00:00"), user="u2"),  # a month boundary, kept
    ]
    removed: list[Event] = [
        ev(T.EVENT_TYPE_VIEW, d("2024-12-31T23:59:59.999999")),  # December: a whole month
        ev(T.EVENT_TYPE_ADD_TO_CART, d("2024-12-15T00:00:00"), product_id="p1"),
        ev(T.EVENT_TYPE_WISHLIST, d("2025-01-01T00:00:00"), product_id="p2"),  # January: a whole month
        ev(T.EVENT_TYPE_PURCHASE, d("2025-01-31T12:00:00"), product_id="p3"),
        ev(T.EVENT_TYPE_VIEW, d("2025-02-01T00:00:00")),  # February, before the cutoff: rows
        ev(T.EVENT_TYPE_VIEW, d("2025-02-07T23:59:59"), user="u2"),
        ev(T.EVENT_TYPE_CUSTOM, d("2025-02-07T00:00:00")),
        ev(T.EVENT_TYPE_PAGE_VIEW, d("2025-02-20T00:00:00")),  # page_view: 7 days, inside February
        ev(T.EVENT_TYPE_PAGE_VIEW, d("2025-03-02T23:59:59")),  # and inside March
        ev(T.EVENT_TYPE_VIEW, d("2015-06-01T00:00:00")),  # the default partition (a historic import)
        ev(T.EVENT_TYPE_PAGE_VIEW, d("2015-06-01T00:00:00")),
    ]
    return [*kept, *removed], {e.event_id for e in kept}


EXPECTED = {"view": 4, "add_to_cart": 1, "wishlist": 1, "purchase": 1, "custom": 1, "page_view": 3}


async def test_the_policy_across_month_boundaries_and_per_type(server: App) -> None:
    await with_old_months(server.pool)
    events, kept = history()
    await log(server, events)
    plan = storage.RetentionPlan.of(POLICY, AS_OF)
    assert plan.months_before == d("2025-02-08T00:00:00")
    assert plan.cutoffs["page_view"] == d("2025-03-03T00:00:00") and plan.cutoffs["custom"] == plan.months_before

    dry = await storage.run_retention(server.pool, POLICY, dry_run=True, as_of=AS_OF)
    assert await logged(server.pool) == {e.event_id for e in events}  # a dry run removes nothing
    removed = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)

    assert removed.by_type == dry.by_type == EXPECTED
    assert (
        removed.partitions == dry.partitions == ["events_2024_10", "events_2024_11", "events_2024_12", "events_2025_01"]
    )
    assert await logged(server.pool) == kept
    assert await keys(server.pool) == kept  # the dedup keys went with their events
    names = {p.name for p in await _lifecycle.partitions(server.pool)}
    assert "events_2025_01" not in names and "events_2025_02" in names
    assert not await server.pool.fetch("SELECT relname FROM pg_class WHERE relname LIKE '%\\_retired'")
    assert await server.pool.fetchval("SELECT count(*) FROM retention_detached") == 0
    assert removed.batches > 4  # small batches (FAST: 3 rows)

    # Idempotent: a second run finds nothing.
    again = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    assert (again.events, again.partitions, again.audit_id) == (0, [], None)


async def test_a_cutoff_on_the_first_of_a_month_removes_whole_months_only(server: App) -> None:
    await with_old_months(server.pool)
    march = [ev(T.EVENT_TYPE_VIEW, d("2025-03-01T00:00:00")), ev(T.EVENT_TYPE_VIEW, d("2025-03-15T00:00:00"))]
    february = [ev(T.EVENT_TYPE_VIEW, d("2025-02-01T00:00:00")), ev(T.EVENT_TYPE_VIEW, d("2025-02-28T23:59:59"))]
    await log(server, march + february)
    removed = await storage.run_retention(
        server.pool, RetentionPolicy.of(30), as_of=d("2025-03-31T08:00:00"), pace=FAST
    )
    assert "events_2025_02" in removed.partitions and removed.by_type == {"view": 2}
    assert await logged(server.pool) == {e.event_id for e in march}


async def test_a_type_kept_for_good_keeps_every_month(server: App) -> None:
    """Without a global retention only the types given are removed, row by row."""
    await with_old_months(server.pool)
    events = [ev(T.EVENT_TYPE_PAGE_VIEW, d("2024-11-01T00:00:00")), ev(T.EVENT_TYPE_VIEW, d("2024-11-01T00:00:00"))]
    await log(server, events)
    policy = RetentionPolicy.of(None, {"page_view": 7})
    dry = await storage.run_retention(server.pool, policy, dry_run=True, as_of=AS_OF)
    removed = await storage.run_retention(server.pool, policy, as_of=AS_OF, pace=FAST)
    assert removed.by_type == dry.by_type == {"page_view": 1}
    assert removed.partitions == dry.partitions == []
    assert await logged(server.pool) == {events[1].event_id}


async def test_state_is_unchanged_and_a_resend_of_a_removed_event_is_logged_again(server: App) -> None:
    await with_old_months(server.pool)
    events, kept = history()
    await log(server, events)
    before = await state(server.pool)
    await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    assert await state(server.pool) == before

    old = [
        e for e in events if e.event_id not in kept and e.event_type in (T.EVENT_TYPE_VIEW, T.EVENT_TYPE_ADD_TO_CART)
    ]
    async with InteractionsClient(server.address) as client:
        assert (await client.log_many(old)).accepted == len(old)  # their dedup keys went with them
    assert {e.event_id for e in old} <= await logged(server.pool)
    assert await state(server.pool) == before  # logged again, not folded twice


async def test_a_deleted_users_watermark_still_refuses_replays(server: App) -> None:
    await with_old_months(server.pool)
    old = ev(T.EVENT_TYPE_VIEW, d("2024-12-01T00:00:00"), user="gone")
    await log(server, [old])
    async with InteractionsClient(server.address) as client:
        await client.delete_user_data("gone")
        await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
        result = await client.log_many([old])
    assert result.accepted == 0 and [r.violations[0].field for r in result.rejected] == ["user_id"]


async def test_every_removal_is_audited_with_counts_and_no_ids(server: App) -> None:
    await with_old_months(server.pool)
    events, _ = history()
    await log(server, events)
    removed = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    (record,) = await storage.audit_records(server.pool, action=storage.RETENTION)
    assert record.id == removed.audit_id
    assert (record.actor, record.subject) == ("system:retention", None)
    assert record.counts == {"events": sum(EXPECTED.values()), "partitions": 4}
    assert record.detail["removed_by_type"] == EXPECTED
    assert record.detail["policy"] == {"days": 30, "by_type": {"page_view": 7}}
    assert record.detail["cutoffs"]["page_view"] == "2025-03-03T00:00:00+00:00"
    assert "u1" not in str(record) and "u2" not in str(record)


async def test_a_locked_log_defers_the_months_and_the_next_run_takes_them(server: App, database_url: str) -> None:
    await with_old_months(server.pool)
    events, kept = history()
    await log(server, events)
    reader = await asyncpg.connect(database_url)  # a long export: holds the log for reading
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM events")
            pace = replace(FAST, lock_timeout="50ms")
            first = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=pace)
    finally:
        await reader.close()
    assert first.partitions == [] and len(first.deferred) == 4
    assert first.by_type == {"view": 3, "custom": 1, "page_view": 3}  # the rows of the months kept
    second = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    assert len(second.partitions) == 4
    assert {n: first.by_type.get(n, 0) + second.by_type.get(n, 0) for n in EXPECTED} == EXPECTED
    assert await logged(server.pool) == kept and await keys(server.pool) == kept


async def test_a_run_stopped_half_way_is_resumed_and_counts_each_row_once(server: App) -> None:
    await with_old_months(server.pool)
    events = [ev(T.EVENT_TYPE_VIEW, d("2024-12-01T00:00:00") + timedelta(hours=i), user=f"u{i}") for i in range(10)]
    await log(server, events)
    policy = RetentionPolicy.of(30)
    plan = storage.RetentionPlan.of(policy, AS_OF)
    slow = replace(FAST, min_pause=0.2)  # for the test to stop it half-way
    job = _lifecycle.Job(server.pool, storage.AuditRecord(storage.RETENTION, "test", None, {}), slow)
    (december,) = [p for p in await _lifecycle.partitions(server.pool) if p.name == "events_2024_12"]
    assert await _lifecycle._detach(job, december)
    sweeping = asyncio.create_task(_lifecycle._sweep(job, "events_2024_12_retired", job.removed.audit_id or 0))
    await eventually(lambda: _position_saved(server.pool))
    sweeping.cancel()  # the server stopped half-way
    with pytest.raises(asyncio.CancelledError):
        await sweeping
    assert 0 < job.removed.events < 10

    resumed = await _lifecycle.apply_retention(server.pool, plan, actor="test", detail={}, pace=FAST)
    assert job.removed.events + resumed.by_type.get("view", 0) == 10
    assert await keys(server.pool) == set() and await logged(server.pool) == set()
    (record,) = [r for r in await storage.audit_records(server.pool) if r.id == job.removed.audit_id]
    assert record.counts == {"events": 10, "partitions": 1}


async def _position_saved(pool: asyncpg.Pool) -> bool:
    return await pool.fetchval("SELECT after_user IS NOT NULL FROM retention_detached") is True


async def test_late_events_of_a_removed_month_go_to_the_default_partition_and_the_next_run(server: App) -> None:
    await with_old_months(server.pool)
    await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    late = ev(T.EVENT_TYPE_VIEW, d("2024-12-10T00:00:00"))
    await log(server, [late])
    assert await server.pool.fetchval("SELECT count(*) FROM events_default") == 1
    # Creating December again fails for that row: skipped, the other months made (January).
    assert await server.pool.fetchval("SELECT ensure_event_partitions('2024-12-01', '2025-04-01')") == 1
    assert "events_2024_12" not in {p.name for p in await _lifecycle.partitions(server.pool)}
    removed = await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    assert removed.by_type == {"view": 1} and await keys(server.pool) == set()


def test_policy_values_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown event type 'pageview'"):
        RetentionPolicy.of(None, {"pageview": 7})
    with pytest.raises(ValueError, match="from 1 to"):
        RetentionPolicy.of(0)
    policy = RetentionPolicy.of(30, {"custom": 90, "page_view": 7})
    assert (policy.days_of("view"), policy.days_of("page_view"), policy.days_of("gift_card_redeemed")) == (30, 7, 90)
    assert RetentionPolicy().keeps_everything
    nothing = storage.RetentionPlan.of(RetentionPolicy(), AS_OF)
    assert (nothing.cutoffs, nothing.months_before) == ({}, None)


# --- the server's daily run and the command -----------------------------------------------------


async def test_the_server_applies_the_policy_once_a_day_and_logs_counts_without_ids(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    writer = await start_server()
    old = [ev(T.EVENT_TYPE_VIEW, datetime.now(UTC) - timedelta(days=40), user="LEAKCHECK-user") for _ in range(3)]
    recent = ev(T.EVENT_TYPE_VIEW, datetime.now(UTC) - timedelta(days=1), user="LEAKCHECK-user")
    await log(writer, [*old, recent])
    with caplog.at_level(logging.INFO, logger="interactions_server.retention"):
        server = await start_server(retention=RetentionPolicy.of(30), retention_check_interval=0.1)
        keeper = server.database.retention
        assert keeper is not None
        await eventually(lambda: _true(keeper.runs == 1))
        await asyncio.sleep(0.5)  # several checks later: not again the same day
    assert keeper.runs == 1
    assert await logged(server.pool) == {recent.event_id}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retention removed")]
    assert re.fullmatch(
        r"retention removed 3 events \(view 3\)(, \d+ month\(s\) whole \([a-z0-9_, ]+\))? in [0-9.]+ s; "
        r"audit_log record \d+",
        line,
    )
    assert not [r for r in caplog.records if "LEAKCHECK" in r.getMessage()]
    # Another server of the deployment does not run it again either.
    other = await start_server(retention=RetentionPolicy.of(30), retention_check_interval=0.1)
    await asyncio.sleep(0.5)
    assert other.database.retention is not None and other.database.retention.runs == 0


async def _true(value: bool) -> bool:
    return value


async def test_the_retention_command_counts_then_removes(server: App, database_url: str) -> None:
    await with_old_months(server.pool)
    old = [ev(T.EVENT_TYPE_PAGE_VIEW, datetime.now(UTC) - timedelta(days=9)) for _ in range(2)]
    await log(server, [*old, ev(T.EVENT_TYPE_VIEW, datetime.now(UTC) - timedelta(days=9))])
    common = ("retention", "--database-url", database_url, "--retention-days-by-type", "page_view=7")
    async with cli(*common, "--dry-run") as process:
        assert await process.finish() == 0, "".join(process.log)
    assert len(await logged(server.pool)) == 3
    async with cli(*common) as process:
        assert await process.finish() == 0, "".join(process.log)
    assert len(await logged(server.pool)) == 1
    assert any("retention removed 2 events (page_view 2)" in line for line in process.log)


async def test_the_retention_command_needs_a_policy(database_url: str) -> None:
    async with cli("retention", "--database-url", database_url) as process:
        assert await process.finish() == 2
    assert "no retention policy" in "".join(process.log) and "Traceback" not in "".join(process.log)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--retention-days", "0", "from 1 to 36,600 days"),
        ("--retention-days", "thirty", "expected a number of days"),
        ("--retention-days-by-type", "pageview=7", "unknown event type 'pageview'"),
        ("--retention-days-by-type", "page_view", "is not TYPE=DAYS"),
    ],
)
async def test_a_bad_policy_is_a_usage_error(flag: str, value: str, message: str) -> None:
    async with cli("retention", flag, value) as process:
        assert await process.finish() == 2
    assert message in "".join(process.log) and "Traceback" not in "".join(process.log)


async def test_an_unknown_database_fails_in_one_line(postgres_url: str) -> None:
    url = with_database(postgres_url, f"missing_{uuid.uuid4().hex[:6]}")
    async with cli("retention", "--database-url", url, "--retention-days", "30") as process:
        assert await process.finish() == 2
    assert "does not exist" in "".join(process.log) and "Traceback" not in "".join(process.log)


async def test_a_late_event_after_retention_folds_as_if_nothing_had_been_removed(server: App) -> None:
    """The fold keeps its own history (migrations/0006): what retention removes
    from the log cannot change the state, now or when a late event comes."""
    await with_old_months(server.pool)
    cart = [
        ev(T.EVENT_TYPE_ADD_TO_CART, d("2024-12-01T00:00:00"), product_id="p1", event_value=5),  # removed
        ev(T.EVENT_TYPE_WISHLIST, d("2024-12-01T00:00:00"), product_id="p2", event_value=1),  # removed
        ev(T.EVENT_TYPE_ADD_TO_CART, d("2025-03-09T00:00:00"), product_id="p1", event_value=1),
        ev(T.EVENT_TYPE_WISHLIST, d("2025-03-09T00:00:00"), product_id="p2", event_value=1),
    ]
    await log(server, cart)
    await storage.run_retention(server.pool, POLICY, as_of=AS_OF, pace=FAST)
    late = [
        ev(T.EVENT_TYPE_ADD_TO_CART, d("2025-03-01T00:00:00"), product_id="p1", event_value=2),
        ev(T.EVENT_TYPE_WISHLIST, d("2025-03-01T00:00:00"), product_id="p2", event_value=1),
    ]
    await log(server, late)
    async with InteractionsClient(server.address) as client:
        assert [(i.product_id, i.quantity) for i in await client.get_cart("u1")] == [("p1", 8)]
        (item,) = await client.get_wishlist("u1")
    assert item.added_at.ToDatetime(UTC) == d("2024-12-01T00:00:00")  # the first add, removed from the log


async def test_with_workers_the_supervisor_applies_the_policy_once_for_the_host(server: App, database_url: str) -> None:
    await log(server, [ev(T.EVENT_TYPE_VIEW, datetime.now(UTC) - timedelta(days=40))])
    args = ("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url, "--retention-days", "30")
    async with cli(*args) as supervisor:
        for line in (r"listening on 127\.0\.0\.1:\d+ with 2 workers", r"retention removed 1 events \(view 1\)"):
            if not any(re.search(line, seen) for seen in supervisor.log):  # the two come in either order
                await supervisor.wait_for_line(line)
        supervisor.process.send_signal(signal.SIGTERM)
        assert await supervisor.finish() == 0, "".join(supervisor.log)
    lines = [line for line in supervisor.log if "interactions_server.retention" in line]
    assert len([line for line in lines if "retention removed" in line]) == 1
    assert not [line for line in lines if "worker=" in line]  # the supervisor's, no worker's
