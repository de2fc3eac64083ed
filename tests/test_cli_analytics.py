"""The analytics commands of `interactions` against the real server: exports to
.csv, .jsonl and .parquet read back with the documented columns and the values
the server computes, the personalize layout, and the read commands printing
what the server answers (tables and --json, exit statuses)."""

from __future__ import annotations

import asyncio
import csv
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from interactions_client import InteractionsClient
from interactions_client.cli._export_files import EVENTS, TRAINING
from interactions_client.events import new_event
from interactions_client.rules import stored_name
from interactions_client.v1.event_pb2 import Event
from interactions_server.server import App
from tests.test_analytics_client import (
    BASE,
    CuttingProxy,
    Pair,
    assert_same_training,
    at,
    reference_training,
    shop_events,
)
from tests.test_cli import cli

# Each command's user (and session) as the documented options, and as the
# positional arguments the reading commands took before.
USER_SPELLINGS = [
    (["cart", "u1"], ["cart", "--user", "u1"]),
    (["wishlist", "u1"], ["wishlist", "--user", "u1"]),
    (["purchases", "u1"], ["purchases", "--user", "u1"]),
    (["session", "u1", "s1"], ["session", "--user", "u1", "--session", "s1"]),
    (["sessions", "u1"], ["sessions", "--user", "u1"]),
    (["activity", "u1"], ["activity", "--user", "u1"]),
    (["events", "u2", "--limit", "2"], ["events", "--limit", "2", "--user", "u2"]),
    (["delete-user", "u1", "--dry-run"], ["delete-user", "--dry-run", "--user", "u1"]),
]


@pytest.fixture
async def shop(server: App) -> list[Event]:
    events = shop_events()
    async with InteractionsClient(server.address) as client:
        assert (await client.log_many(events)).accepted == len(events)
    return events


def read_back(path: Path) -> list[dict[str, Any]]:
    """The file's rows as dicts, maps and timestamps as JSONL has them."""
    if path.suffix == ".parquet":
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        for row in rows:
            row["counts"] = dict(row["counts"])
            row["last_occurred_at"] = row["last_occurred_at"].isoformat().replace("+00:00", "Z")
        return rows
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["counts"] = json.loads(row["counts"])
        row["weight"], row["event_count"] = float(row["weight"]), int(row["event_count"])
    return rows


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
async def test_export_training(server: App, shop: list[Event], tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"train{suffix}"
    since = BASE.date().isoformat()
    run = await cli("export", "training", "--out", str(out), "--since", since, "--half-life", "12h", "--json",
                    "--target", server.address)  # fmt: skip
    assert run.status == 0, run
    assert run.stderr == ""  # no progress when stderr is not a terminal
    totals = json.loads(run.stdout)
    assert not (tmp_path / f"train{suffix}.partial").exists()

    rows = read_back(out)
    assert [list(r) for r in rows] == [TRAINING.names] * len(rows)
    assert totals["rows"] == len(rows) and totals["resumes"] == 0
    as_of = datetime.fromisoformat(totals["as_of"])
    window = [e for e in shop if e.occurred_at.ToDatetime(tzinfo=UTC) >= BASE]
    expected = reference_training(window, as_of=as_of, half_life=timedelta(hours=12))
    got = {
        (r["user_id"], r["product_id"]): Pair(
            r["weight"],
            r["event_count"],
            datetime.fromisoformat(r["last_occurred_at"].replace("Z", "+00:00")),
            Counter(r["counts"]),
        )
        for r in rows
    }
    assert_same_training(got, expected)


async def test_export_events_layouts(server: App, shop: list[Event], tmp_path: Path) -> None:
    target = ("--target", server.address)
    ordered = sorted(shop, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id))

    run = await cli("export", "events", "--out", str(tmp_path / "all.csv"), *target)
    assert run.status == 0, run
    assert run.stdout.startswith(f"wrote {len(shop)} rows to ")
    with (tmp_path / "all.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == EVENTS.names
    assert [r["event_id"] for r in rows] == [e.event_id for e in ordered]
    assert [r["event_type"] for r in rows] == [stored_name(e) for e in ordered]

    out = tmp_path / "personalize.csv"
    run = await cli("export", "events", "--out", str(out), "--layout", "personalize", "--json", *target)
    assert run.status == 0, run
    with_product = [e for e in ordered if e.product_id]
    assert json.loads(run.stdout)["rows"] == len(with_product)
    lines = out.read_text().splitlines()
    assert lines[0] == "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE"
    first = with_product[0]
    value = first.event_value if first.HasField("event_value") else 1
    assert lines[1] == f"{first.user_id},{first.product_id},{first.occurred_at.seconds},{stored_name(first)},{value}"
    assert len(lines) == 1 + len(with_product)

    out = tmp_path / "chosen.jsonl"
    run = await cli("export", "events", "--out", str(out), "--type", "purchase", "--type", "review", *target)
    assert run.status == 0, run
    chosen = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["event_id"] for c in chosen] == [e.event_id for e in ordered if stored_name(e) in ("purchase", "review")]

    run = await cli("export", "events", "--out", str(out), "--type", "nonsense", *target)
    assert run.status == 2 and "unknown event type" in run.stderr

    # A refused export leaves no file behind, not even the partial one.
    failed = tmp_path / "failed.parquet"
    run = await cli(
        "export", "training", "--out", str(failed), "--since", "2026-10-02", "--until", "2026-10-01", *target
    )
    assert run.status == 1 and "start_time" in run.stderr, run
    assert not failed.exists() and not (tmp_path / "failed.parquet.partial").exists()


async def test_read_commands(server: App, shop: list[Event]) -> None:
    target = ("--target", server.address)
    since = ("--since", (BASE - timedelta(hours=1)).isoformat())

    run = await cli("searches", *since, "--json", *target)
    assert run.status == 0, run
    red, blue = json.loads(run.stdout)
    assert (red["query"], red["searches"], red["users"], red["click_through_rate"]) == ("red shoes", 2, 2, 0.5)
    assert blue["query"] == "blue hat" and blue["no_result_rate"] is None
    run = await cli("searches", *since, "--limit", "1", *target)
    assert run.status == 0 and "red shoes" in run.stdout and "blue hat" not in run.stdout

    run = await cli("session", "u1", "s1", "--json", *target)
    assert run.status == 0, run
    session = json.loads(run.stdout)
    assert (session["event_count"], session["products_viewed"], session["truncated"]) == (6, ["p1", "p2"], False)
    assert [e["event_type"] for e in session["events"]][:3] == ["search", "click", "product_view"]
    run = await cli("session", "u1", "s1", *target)
    assert run.status == 0 and "product_view" in run.stdout and "p1, p2" in run.stdout
    run = await cli("session", "u1", "nope", *target)
    assert run.status == 1 and "NOT_FOUND" in run.stderr

    run = await cli("sessions", "u1", "--json", *target)
    assert [s["session_id"] for s in json.loads(run.stdout)] == ["s2", "s1"]
    run = await cli("sessions", "nobody", *target)
    assert run.status == 0 and run.stdout == "(none)\n"

    run = await cli("activity", "u1", "--json", *target)
    activity = json.loads(run.stdout)
    assert (activity["login_count"], activity["session_count"]) == (1, 2)
    assert activity["last_logout_at"] == at(11).isoformat().replace("+00:00", "Z")
    assert activity["event_counts"] == dict(Counter(stored_name(e) for e in shop if e.user_id == "u1"))

    run = await cli("active-users", *since, "--json", *target)
    counts = json.loads(run.stdout)
    assert (counts["active_users"], counts["logged_in_users"]) == (3, 2)
    assert counts["daily"][0]["date"] == at(-1).date().isoformat()
    run = await cli("active-users", *since, *target)
    assert run.stdout.startswith("active users: 3  logged in: 2\n")

    run = await cli("events", "u2", "--json", *target)
    u2 = sorted((e for e in shop if e.user_id == "u2"), key=lambda e: e.occurred_at.ToNanoseconds(), reverse=True)
    assert [e["event_id"] for e in json.loads(run.stdout)] == [e.event_id for e in u2]
    run = await cli("events", "u2", "--limit", "1", "--type", "review", *target)
    assert run.status == 0 and "review" in run.stdout and "search" not in run.stdout

    run = await cli("searches", "--since", "last tuesday", *target)
    assert run.status == 2 and "not a date" in run.stderr


async def test_export_resumes_across_a_broken_connection(server: App, tmp_path: Path) -> None:
    events = [
        new_event("view", f"user-{i % 50:02d}", product_id=f"p{i:05d}", occurred_at=at(i / 100)) for i in range(5000)
    ]
    async with InteractionsClient(server.address) as client:
        assert (await client.log_many(events)).accepted == len(events)
    out = tmp_path / "events.jsonl"
    async with CuttingProxy(server.port, after=150_000, cuts=1) as proxy:
        run = await cli("export", "events", "--out", str(out), "--json", "--target", proxy.address)
    assert run.status == 0, run
    assert proxy.cut == 1 and json.loads(run.stdout)["resumes"] >= 1
    ordered = sorted(events, key=lambda e: (e.occurred_at.ToNanoseconds(), e.event_id))
    assert [json.loads(line)["event_id"] for line in out.read_text().splitlines()] == [e.event_id for e in ordered]


async def test_every_command_takes_the_user_as_log_does_and_as_before(server: App, shop: list[Event]) -> None:
    target = ("--target", server.address)
    runs = await asyncio.gather(*(cli(*argv, "--json", *target) for pair in USER_SPELLINGS for argv in pair))
    for (before, documented), old, new in zip(USER_SPELLINGS, runs[::2], runs[1::2], strict=True):
        assert old.status == new.status == 0, (before, old, new)
        answers = [json.loads(run.stdout) for run in (old, new)]
        for answer in answers:
            if isinstance(answer, dict):
                answer.pop("deleted_through", None)  # a dry run's watermark is "now"
        assert answers[0] == answers[1], (before, documented)
