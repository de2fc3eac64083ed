"""The subscription from the shipped clients and tools, against the real
server: the async and sync clients resume by themselves after the server
went away and came back; `interactions tail` prints JSONL as events arrive
and its cursor on exit, and continues from it; examples/abandoned_cart.py
emails the idle carts once, across restarts from its state file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from interactions_client import InteractionsClient, SyncInteractionsClient
from interactions_client.events import new_event
from interactions_client.subscription import SubscriptionBatch
from interactions_server.server import App
from tests.support import StartServer, eventually
from tests.test_cli import Run, cli
from tests.test_event_stream import _true, events_of, stream_order

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "abandoned_cart.py"


async def test_the_async_client_resumes_with_its_cursor_when_the_server_comes_back(start_server: StartServer) -> None:
    server = await start_server(listen="127.0.0.1:0")
    address = server.address
    logged = [events_of([f"u{j}" for j in range(4)]) for _ in range(2)]
    async with InteractionsClient(address) as client:
        subscription = client.subscribe()
        batches = aiter(subscription)
        await anext(batches)
        assert (await client.log_many(logged[0])).accepted == 4
        received: list[str] = []
        async with asyncio.timeout(10):
            while len(received) < 4:
                received += [e.event.event_id for e in (await anext(batches)).events]
        await server.stop()
        # Another server on the same address, after a while: the subscription
        # retries (UNAVAILABLE) and goes on from its cursor.
        reading = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.5)
        again = await start_server(listen=address)
        async with InteractionsClient(address) as writer:
            assert (await writer.log_many(logged[1])).accepted == 4
        async with asyncio.timeout(20):
            received += [e.event.event_id for e in (await reading).events]
            while len(received) < 8:
                received += [e.event.event_id for e in (await anext(batches)).events]
        assert received == stream_order(logged)
        assert subscription.resumes >= 1
        subscription.close()
    await again.stop()


async def test_the_sync_client_subscribes_and_closes_from_another_thread(server: App) -> None:
    logged = events_of([f"s{j}" for j in range(6)])
    batches: list[SubscriptionBatch] = []
    with SyncInteractionsClient(server.address) as client:
        subscription = client.subscribe(start="earliest", event_types=["view"], partition=(0, 1))

        def consume() -> None:
            for batch in subscription:
                batches.append(batch)

        thread = threading.Thread(target=consume)
        thread.start()
        async with InteractionsClient(server.address) as writer:
            assert (await writer.log_many(logged)).accepted == 6
        await eventually(lambda: _true(sum(len(b.events) for b in batches) >= 6))
        subscription.close()
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
    assert [e.event.event_id for b in batches for e in b.events] == stream_order([logged])
    assert subscription.cursor == batches[-1].cursor


# --- interactions tail ------------------------------------------------------------------


async def tail(*args: str, until_lines: int, then: signal.Signals = signal.SIGINT) -> Run:
    """Runs `interactions tail ARGS` until it printed `until_lines` lines, then sends `then`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interactions_client.cli", "tail", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(20):
        while len(lines) < until_lines:
            line = (await process.stdout.readline()).decode()
            assert line, (await process.stderr.read()).decode()
            lines.append(line)
    process.send_signal(then)
    try:
        async with asyncio.timeout(20):  # a tail that does not end on the signal fails here, not hangs
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        raise
    assert process.returncode is not None
    return Run(process.returncode, "".join(lines) + stdout.decode(), stderr.decode())


async def test_tail_prints_jsonl_as_events_arrive_and_the_cursor_on_exit(server: App) -> None:
    async with InteractionsClient(server.address) as client:
        first = [new_event("add_to_cart", "t1", product_id="p1"), new_event("view", "t2", product_id="p2")]
        assert (await client.log_many(first)).accepted == 2
        run = await tail("--target", server.address, "--from-start", until_lines=2)
        assert run.status == 0, run
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        assert {(r["user_id"], r["event_type"], r["product_id"]) for r in lines} == {
            ("t1", "add_to_cart", "p1"),
            ("t2", "view", "p2"),
        }
        assert lines[0]["occurred_at"].endswith("Z") and "received_at" in lines[0]
        cursor = run.stderr.strip().splitlines()[-1].removeprefix("cursor ")

        # From the cursor, only the new ones; --type and --partition filter; SIGTERM ends it too.
        later = [new_event("add_to_cart", f"t{i}", product_id="p3") for i in range(3, 9)]
        later.append(new_event("view", "t3", product_id="p9"))
        assert (await client.log_many(later)).accepted == 7
        assert (await client.delete_user_data("t4")).events_deleted == 1
        run = await tail(
            "--target", server.address, "--cursor", cursor, "--type", "add_to_cart", "--partition", "0/1",
            until_lines=6, then=signal.SIGTERM,
        )  # fmt: skip
        assert run.status == 0, run
        rows = [json.loads(line) for line in run.stdout.splitlines()]
        assert [r["user_id"] for r in rows if "user_id" in r] == ["t3", "t5", "t6", "t7", "t8"]
        assert [r["user_deleted"]["user_id"] for r in rows if "user_deleted" in r] == ["t4"]
        assert run.stderr.strip().splitlines()[-1].startswith("cursor ")

    bad = await cli("tail", "--partition", "3/2")
    assert bad.status == 2 and "partition" in bad.stderr


# --- examples/abandoned_cart.py -------------------------------------------------------------


async def run_example(*args: str | Path) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def test_the_abandoned_cart_example_emails_idle_carts_once_across_restarts(server: App, tmp_path: Path) -> None:
    state = tmp_path / "carts.json"

    def minutes_ago(minutes: float) -> datetime:
        return datetime.fromtimestamp(time.time() - minutes * 60, UTC)

    common = ("--target", server.address, "--state", str(state), "--check-every", "0.2", "--idle-minutes", "5")
    async with InteractionsClient(server.address) as client:
        events = [
            new_event("add_to_cart", "idle", product_id="p1", occurred_at=minutes_ago(20)),
            new_event("add_to_cart", "bought", product_id="p1", occurred_at=minutes_ago(20)),
            new_event("purchase", "bought", product_id="p1", occurred_at=minutes_ago(19)),
            new_event("add_to_cart", "busy", product_id="p2", occurred_at=minutes_ago(1)),
            new_event("add_to_cart", "emptied", product_id="p3", occurred_at=minutes_ago(30)),
            new_event("remove_from_cart", "emptied", product_id="p3", occurred_at=minutes_ago(29)),
            new_event("view", "viewer", product_id="p4", occurred_at=minutes_ago(30)),
        ]
        assert (await client.log_many(events)).accepted == len(events)
        run = await run_example(*common, "--from-start", "--exit-after", "2")
        assert run.status == 0, run
        assert run.stdout.splitlines() == ["email idle: you left 1 x p1 in your cart"]
        assert json.loads(state.read_text())["cursor"]

        # Restarted from its state: not the same email again; a new idle cart, and one more later.
        more = [
            new_event("add_to_cart", "late", product_id="p5", occurred_at=minutes_ago(10)),
            new_event("update_cart_quantity", "idle", product_id="p1", value=2, occurred_at=minutes_ago(3)),
        ]
        assert (await client.log_many(more)).accepted == 2
        run = await run_example(*common, "--exit-after", "2")
        assert run.status == 0, run
        assert run.stdout.splitlines() == ["email late: you left 1 x p5 in your cart"]
        run = await run_example(*common[:-1], "1", "--exit-after", "2")  # idle for a minute now
        assert run.status == 0, run
        assert sorted(run.stdout.splitlines()) == [
            "email busy: you left 1 x p2 in your cart",
            "email idle: you left 2 x p1 in your cart",
        ]


@pytest.fixture(autouse=True)
def _no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERACTIONS_TOKEN", raising=False)
