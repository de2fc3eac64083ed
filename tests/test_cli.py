"""The `interactions` command against the real server: every command, tables
and --json, exit statuses, and a 100,000-line import with malformed and
invalid lines mixed in (exact totals, the rejected file, a re-run giving only
duplicates)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from interactions_client.cli import main
from interactions_client.cli._jsonl_import import IMPORT_NAMESPACE, rejected_path_for
from interactions_client.cli._progress import Progress
from interactions_client.rules import RULES
from interactions_server.server import App


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str


async def cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, cwd: Path | None = None
) -> Run:
    """Runs `interactions ARGS` as its own process (stderr is not a terminal)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "interactions_client.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    stdout, stderr = await process.communicate(stdin)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def test_types_prints_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["types"]) == 0
    table = capsys.readouterr().out
    assert all(rule.name in table for rule in RULES.values())
    assert table.splitlines()[0].split()[:3] == ["#", "Event", "Type"]

    assert main(["types", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in catalog] == [r.name for r in RULES.values()]
    review = next(t for t in catalog if t["name"] == "review")
    assert (review["event_value"], review["ml_weight"], review["sync"]) == ("1-5", 1.6, "No")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "--user", "u1"]) == 2  # --type is required
    assert capsys.readouterr().err.startswith("interactions log: error: missing --type\n")


async def test_log_and_read_back(server: App) -> None:
    target = ("--target", server.address)
    run = await cli("log", *target, "--type", "add_to_cart", "--user", "u1", "--product", "p1", "--value", "2")
    assert run.status == 0 and run.stdout.startswith("logged "), run
    run = await cli("log", *target, "--type", "wishlist", "--user", "u1", "--product", "p2", "--value", "1", "--json")
    assert run.status == 0 and json.loads(run.stdout)["duplicate"] is False
    event_id = str(uuid.uuid4())
    # A resend is the same event: same id, same time.
    search = ["log", *target, "--type", "search", "--user", "u1", "--query", "laptop", "--event-id", event_id]
    search += ["--occurred-at", "2026-03-01T10:00:00+01:00"]
    assert (await cli(*search, "--attr", "page=2", "--attr", "ab=x=y")).status == 0
    again = await cli(*search, "--attr", "page=2", "--attr", "ab=x=y")
    assert (again.status, again.stdout.strip()) == (0, f"duplicate {event_id}")
    # The same id with other content (here: without the attributes) is refused.
    assert (await cli(*search)).status != 0
    untimed = ["log", *target, "--type", "login", "--user", "u1", "--event-id", str(uuid.uuid4())]
    assert (await cli(*untimed)).stdout.startswith("logged")
    # Without --occurred-at the time is left to the server: absent both times, the same content.
    assert (await cli(*untimed)).stdout.startswith("duplicate")
    page = ("--type", "page_view", "--user", "u1", "--session", "s1", "--page-path", "/deals")
    assert (await cli("log", *target, *page)).status == 0
    assert (await cli("log", *target, "--type", "purchase", "--user", "u1", "--product", "p1")).status == 0
    custom = ("--type", "gift_card_redeemed", "--custom", "--user", "u1", "--value", "25")
    assert (await cli("log", *target, *custom)).status == 0

    row = await server.pool.fetchrow("SELECT details, attributes FROM events WHERE event_id = $1", uuid.UUID(event_id))
    assert json.loads(row["details"])["search"]["query"] == "laptop"
    assert json.loads(row["attributes"]) == {"page": "2", "ab": "x=y"}
    assert await server.pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'gift_card_redeemed'") == 1

    cart = await cli("cart", *target, "u1")
    assert cart.status == 0
    assert cart.stdout.splitlines()[0].split() == ["product_id", "quantity", "updated_at"]
    assert cart.stdout.splitlines()[2].split()[:2] == ["p1", "2"]
    assert [
        (i["product_id"], i["quantity"]) for i in json.loads((await cli("cart", *target, "u1", "--json")).stdout)
    ] == [("p1", 2)]
    wishlist = json.loads((await cli("wishlist", *target, "u1", "--json")).stdout)
    assert [i["product_id"] for i in wishlist] == ["p2"]
    purchases = json.loads((await cli("purchases", *target, "u1", "--json")).stdout)
    assert [p["product_id"] for p in purchases] == ["p1"]
    assert (await cli("purchases", *target, "nobody")).stdout == "(none)\n"


async def test_log_reports_violations_and_exits_1(server: App) -> None:
    run = await cli(
        "log", "--target", server.address, "--type", "review", "--user", "u1", "--product", "p1", "--value", "9"
    )
    assert run.status == 1
    assert "event_value: 9 is out of range" in run.stderr
    run = await cli("log", "--target", server.address, "--type", "view", "--user", "u1", "--query", "x")
    assert run.status == 2 and "--query: not an option of view events" in run.stderr


async def test_target_comes_from_the_environment(server: App) -> None:
    run = await cli("health", env={"INTERACTIONS_TARGET": server.address})
    assert (run.status, run.stdout) == (0, "SERVING\n")


async def test_health_is_a_probe(server: App) -> None:
    assert (await cli("health", "--target", server.address, "--json")).stdout == '{"serving": true}\n'
    await server.stop(0)
    run = await cli("health", "--target", server.address, "--deadline", "2")
    assert run.status == 1 and "UNAVAILABLE" in run.stderr


async def test_tls_options_are_used(server: App, tmp_path: Path) -> None:
    # A plaintext server does not speak TLS: the handshake fails, so the options reached the channel.
    run = await cli("health", "--target", server.address, "--tls", "--deadline", "2")
    assert run.status == 1
    missing = await cli("health", "--target", server.address, "--ca-cert", str(tmp_path / "none.pem"))
    assert missing.status == 1 and "none.pem" in missing.stderr


# The import.

IMPORT_LINES = 100_000


@dataclass
class ImportFile:
    path: Path
    valid_ids: set[tuple[str, str]]
    rejected: dict[int, str]  # line number -> the field reported
    malformed: set[int]
    blank: int


def write_import_file(path: Path, lines: int = IMPORT_LINES, seed: int = 3) -> ImportFile:
    """Valid events of several types (some without event_id), events that break
    a rule, malformed lines and blank lines, shuffled together."""
    rng = random.Random(seed)
    valid_ids: set[tuple[str, str]] = set()
    rejected: dict[int, str] = {}
    malformed: set[int] = set()
    blank = 0
    with path.open("w", encoding="utf-8") as out:
        for number in range(1, lines + 1):
            roll = rng.random()
            user = f"user{rng.randrange(500)}"
            at = f"2026-01-0{1 + number % 9}T{number % 24:02d}:{number % 60:02d}:00.{number:06d}Z"
            event: dict[str, object] = {"userId": user, "occurredAt": at}
            if roll < 0.03:
                out.write(rng.choice(['{"userId": "u1", "eventType": ', "not json", '{"bogus": 1}', "[]"]) + "\n")
                malformed.add(number)
                continue
            if roll < 0.035:
                out.write("\n" if roll < 0.0325 else "   \n")
                blank += 1
                continue
            if roll < 0.08:
                kind = rng.choice(["review", "no_product", "login_product"])
                if kind == "review":
                    event |= {"eventType": "EVENT_TYPE_REVIEW", "productId": "p1", "eventValue": "9"}
                    rejected[number] = "event_value"
                elif kind == "no_product":
                    event |= {"eventType": "EVENT_TYPE_ADD_TO_CART", "eventValue": "1"}
                    rejected[number] = "product_id"
                else:
                    event |= {"eventType": "EVENT_TYPE_LOGIN", "productId": "p1"}
                    rejected[number] = "product_id"
            else:
                kind = rng.choice(["view", "add", "search", "page", "login"])
                product = f"p{rng.randrange(50)}"
                if kind == "view":
                    event |= {"eventType": "EVENT_TYPE_VIEW", "productId": product}
                elif kind == "add":
                    event |= {"event_type": "EVENT_TYPE_ADD_TO_CART", "product_id": product, "event_value": 2}
                elif kind == "search":
                    event |= {"eventType": "EVENT_TYPE_SEARCH", "search": {"query": f"q{number}"}}
                elif kind == "page":
                    event |= {"eventType": 10, "sessionId": "s1", "pageView": {"pagePath": f"/p/{number}"}}
                else:
                    event |= {"eventType": "EVENT_TYPE_LOGIN", "attributes": {"ip": "10.0.0.1"}}
            line = json.dumps(event)
            if roll < 0.5:  # half carry an event_id; the others get one derived from the line
                event = {"eventId": str(uuid.UUID(int=rng.getrandbits(128), version=4)), **event}
                line = json.dumps(event)
                event_id = str(event["eventId"])
            else:
                event_id = str(uuid.uuid5(IMPORT_NAMESPACE, line))
            if number not in rejected:
                valid_ids.add((user, event_id))
            out.write(line + "\n")
    return ImportFile(path, valid_ids, rejected, malformed, blank)


@pytest.fixture(scope="module")
def import_file(tmp_path_factory: pytest.TempPathFactory) -> ImportFile:
    return write_import_file(tmp_path_factory.mktemp("import") / "events.jsonl")


async def test_import_of_100k_lines(server: App, import_file: ImportFile) -> None:
    f = import_file
    valid = len(f.valid_ids)
    assert valid + len(f.rejected) + len(f.malformed) + f.blank == IMPORT_LINES

    first = await cli("import", str(f.path), "--target", server.address, "--json")
    assert first.status == 3, first.stderr  # finished, with rejected lines
    totals = json.loads(first.stdout)
    expected = {"lines": IMPORT_LINES, "blank": f.blank, "rejected": len(f.rejected), "malformed": len(f.malformed)}
    assert {k: totals[k] for k in expected} == expected
    assert (totals["accepted"], totals["duplicate"], totals["failed"]) == (valid, 0, 0)
    assert "progress:" in first.stderr and "events/s" in first.stderr  # not a terminal: progress lines

    logged = await server.pool.fetch("SELECT user_id, event_id::text FROM events")
    assert {(r["user_id"], r["event_id"]) for r in logged} == f.valid_ids
    assert len(logged) == valid

    rejected_file = rejected_path_for(f.path)
    assert totals["rejected_file"] == str(rejected_file)
    records = [json.loads(line) for line in rejected_file.read_text(encoding="utf-8").splitlines()]
    by_line = {r["line"]: r for r in records}
    assert len(by_line) == len(records) == len(f.rejected) + len(f.malformed)
    source_lines = f.path.read_text(encoding="utf-8").splitlines()
    for number, field in f.rejected.items():
        record = by_line[number]
        assert record["text"] == source_lines[number - 1]
        assert [v["field"] for v in record["violations"]] == [field] and record["violations"][0]["description"]
    for number in f.malformed:
        assert by_line[number]["text"] == source_lines[number - 1] and by_line[number]["error"]

    second = await cli("import", str(f.path), "--target", server.address)
    assert second.status == 3
    table = dict(line.split(None, 1) for line in second.stdout.splitlines()[2:9])
    assert table == {
        "lines": f"{IMPORT_LINES:,}",
        "accepted": "0",
        "duplicate": f"{valid:,}",
        "rejected": f"{len(f.rejected):,}",
        "malformed": f"{len(f.malformed):,}",
        "blank": f"{f.blank:,}",
        "failed": "0",
    }
    assert await server.pool.fetchval("SELECT count(*) FROM events") == valid


async def test_import_of_a_clean_file_exits_0_and_leaves_no_rejected_file(server: App, tmp_path: Path) -> None:
    path = tmp_path / "clean.jsonl"
    path.write_text(
        '{"eventType": "EVENT_TYPE_LOGIN", "userId": "u1"}\n{"eventType": "EVENT_TYPE_LOGOUT", "userId": "u1"}\n'
    )
    rejected_path_for(path).write_text("stale\n")
    run = await cli("import", str(path), "--target", server.address, "--json")
    assert run.status == 0 and json.loads(run.stdout)["accepted"] == 2
    assert not rejected_path_for(path).exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal() -> None:
    out = FakeTerminal()
    progress = Progress(out, total_bytes=1_000)
    progress.finish(lines=10, bytes_read=500, events=10)
    text = out.getvalue()
    assert text.startswith("\r[" + "#" * 15 + "." * 15 + "]  50%") and "events/s" in text and text.endswith("\n")


def test_progress_lines_elsewhere() -> None:
    out = io.StringIO()
    progress = Progress(out, total_bytes=None, line_every=0)
    progress.update(lines=5, bytes_read=10, events=5)
    assert out.getvalue().startswith("progress: 5 lines")


def test_common_options_go_before_or_after_the_command() -> None:
    from interactions_client.cli import build_parser

    parser = build_parser()
    before = parser.parse_args(["--target", "h:1", "--json", "cart", "u1"])
    after = parser.parse_args(["cart", "u1", "--target", "h:1", "--json"])
    neither = parser.parse_args(["cart", "u1"])
    assert (before.target, before.json) == (after.target, after.json) == ("h:1", True)
    assert neither.target != "h:1" and neither.json is False
