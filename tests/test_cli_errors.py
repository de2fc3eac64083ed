"""How the `interactions` command fails: usage errors in the CLI's words with
exit 2, JSON error objects with --json, health as a probe, `--type` outside
the catalog, `import -`, import totals that add up, and an import that
cannot reach the server (refused, or a peer that never answers)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from interactions_client.cli import main
from interactions_server.server import App
from tests.test_cli import cli
from tests.test_client_fakes import FakeServer

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused

# argparse's own phrases: none of them may reach the user.
PYTHON_WORDING = (
    "the following arguments",
    "invalid choice",
    "invalid int value",
    "invalid float value",
    "argument -",
    "COMMAND",
)

USAGE_ERRORS = [
    ([], "interactions: error: no command given (commands: import, log, cart"),
    (["frobnicate"], "interactions: error: unknown command 'frobnicate' (commands: import, log, cart"),
    (["log", "--user", "u1"], "interactions log: error: missing --type"),
    (["log"], "interactions log: error: missing --type and --user"),
    (["cart"], "interactions cart: error: missing USER"),
    (["cart", "u1", "--user", "u2"], "interactions cart: error: USER given twice (u1 and --user u2)"),
    (["session", "--user", "u1"], "interactions session: error: missing SESSION (--session SESSION)"),
    (["import"], "interactions import: error: missing FILE"),
    (["cart", "u1", "--bogus"], "interactions: error: unknown option --bogus"),
    (["cart", "u1", "u2"], "interactions: error: unexpected argument u2"),
    (["cart", "u1", "--target"], "interactions cart: error: --target needs a value"),
    (["cart", "u1", "--target", "localhost"], "error: --target: 'localhost' is not HOST:PORT (e.g. localhost:50051)"),
    (["cart", "u1", "--target", "h:99999"], "error: --target: 'h:99999' is not HOST:PORT: the port must be from 1"),
    (["cart", "u1", "--target", "::1:5"], "--target: '::1:5' is not HOST:PORT: write an IPv6 address in brackets"),
    (["cart", "u1", "--deadline", "soon"], "error: --deadline: 'soon' is not a number of seconds"),
    (["cart", "u1", "--deadline", "0"], "error: --deadline: '0' is not a number of seconds above 0"),
    (["log", "--type", "review", "--user", "u", "--value", "five"], "error: --value: 'five' is not a whole number"),
    (["log", "--type", "cart_add", "--user", "u", "--quantity", "1.5"], "--quantity: '1.5' is not a whole number"),
    (["import", "f.jsonl", "--batch-size", "0"], "--batch-size: 0 is out of range (give a number from 1 to 1000)"),
    (["import", "f.jsonl", "--retry-timeout", "x"], "--retry-timeout: 'x' is not a number of seconds"),
    (["log", "--type", "login", "--user", "u", "--occurred-at", "noon"], "--occurred-at: 'noon' is not an ISO 8601"),
    (["log", "--type", "login", "--user", "u", "--occurred-at", "2026-03-01T10:00"], "has no UTC offset"),
    (["log", "--type", "login", "--user", "u", "--attr", "ip"], "error: --attr 'ip': expected KEY=VALUE"),
    (["log", "--type", "view", "--user", "u", "--product", "p", "--query", "q"], "--query: not an option of view"),
    (
        ["log", "--type", "gift_card", "--user", "u"],
        "error: unknown event type 'gift_card' (see `interactions types`; add --custom to log it as a custom type)",
    ),
    (["log", "--type", "custom", "--user", "u"], "unknown event type 'custom' (name the custom type instead"),
    (["log", "--type", "view", "--custom", "--user", "u"], "error: 'view' is a type of the catalog; drop --custom"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_in_the_clis_words(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every check runs before a connection is made: nothing listens at the default target.
    assert main(argv) == 2
    out = capsys.readouterr()
    assert message in out.err and out.out == ""
    first, hint = out.err.splitlines()
    assert first.startswith("interactions") and ": error: " in first and hint.startswith("(see `interactions")
    assert not any(phrase in out.err for phrase in PYTHON_WORDING), out.err

    assert main([*argv, "--json"]) == 2
    out = capsys.readouterr()
    error = json.loads(out.out)["error"]
    assert error["code"] == "USAGE" and error["message"] in out.err


def test_a_bad_target_from_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INTERACTIONS_TARGET", "no port here")
    assert main(["cart", "u1"]) == 2
    assert "'no port here' is not HOST:PORT" in capsys.readouterr().err


def test_a_client_certificate_without_its_key_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not checked before the key is missing")
    assert main(["health", "--client-cert", str(cert), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["message"] == (
        "a client certificate needs its private key, and the other way round"
    )


def test_a_missing_file_is_a_file_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.jsonl"
    assert main(["import", str(missing), "--json", "--target", UNREACHABLE]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": {"code": "FILE_ERROR", "message": f"{missing}: No such file or directory"}}
    assert out.err == f"error: {missing}: No such file or directory\n"


# --json errors from the service and the channel.


async def test_a_refused_event_is_a_json_error_with_violations(server: App) -> None:
    review = ("log", "--target", server.address, "--type", "review", "--user", "u1", "--product", "p1")
    run = await cli(*review, "--value", "9", "--json")
    assert run.status == 1
    error = json.loads(run.stdout)["error"]
    assert (error["code"], error["message"]) == ("INVALID_ARGUMENT", "invalid event")
    assert [v["field"] for v in error["violations"]] == ["event_value"] and error["violations"][0]["description"]
    assert "event_value: " in run.stderr  # the same, for a person


async def test_an_unreachable_server_is_a_json_error(tmp_path: Path) -> None:
    run = await cli("cart", "u1", "--target", UNREACHABLE, "--json")
    assert run.status == 1
    error = json.loads(run.stdout)["error"]
    assert error["code"] == "UNAVAILABLE" and error["message"].startswith("UNAVAILABLE: ")
    assert run.stderr.startswith("error: UNAVAILABLE: ")


async def test_health_json_when_not_serving_or_unreachable(server: App, fake: FakeServer) -> None:
    run = await cli("health", "--target", server.address, "--json")
    assert (run.status, json.loads(run.stdout)) == (0, {"serving": True})

    unknown = await cli("health", "--target", server.address, "--service", "no.such.Service", "--json")
    assert unknown.status == 1
    answer = json.loads(unknown.stdout)
    assert answer["serving"] is False and answer["error"]["code"] == "NOT_FOUND"

    await fake.set_serving(False)
    run = await cli("health", "--target", fake.address, "--json")
    assert (run.status, json.loads(run.stdout)) == (1, {"serving": False})
    assert (await cli("health", "--target", fake.address)).stdout == "NOT SERVING\n"

    run = await cli("health", "--target", UNREACHABLE, "--json")
    assert run.status == 1
    answer = json.loads(run.stdout)
    assert answer["serving"] is False and answer["error"]["code"] == "UNAVAILABLE"


# --type and --custom.


async def test_custom_types_need_custom(server: App) -> None:
    base = ("log", "--target", server.address, "--user", "u1", "--json")
    refused = await cli(*base, "--type", "loyalty_points_earned", "--value", "40")
    assert refused.status == 2
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "USAGE" and "'loyalty_points_earned'" in error["message"]
    assert "`interactions types`" in error["message"]
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 0

    logged = await cli(*base, "--type", "loyalty_points_earned", "--value", "40", "--custom")
    assert logged.status == 0, logged.stderr
    row = await server.pool.fetchrow("SELECT event_type, event_value FROM events")
    assert (row["event_type"], row["event_value"]) == ("loyalty_points_earned", 40)

    # A custom name still obeys the custom type's rules (checked before sending).
    bad = await cli(*base, "--type", "Loyalty Points", "--custom")
    assert bad.status == 1
    assert [v["field"] for v in json.loads(bad.stdout)["error"]["violations"]] == ["custom_type"]


# The import: standard input, totals that add up, an unreachable server.

LOGIN = '{"eventType": "EVENT_TYPE_LOGIN", "userId": "u%d"}'
LINES = [LOGIN % 1, "", LOGIN % 2, "   ", "not json", '{"eventType": "EVENT_TYPE_REVIEW", "userId": "u3"}', LOGIN % 1]
# Two accepted, one duplicate (the same line again), one rejected, one malformed, two blank.
EXPECTED = {"lines": 7, "accepted": 2, "duplicate": 1, "rejected": 1, "malformed": 1, "blank": 2, "failed": 0}


def adds_up(totals: dict[str, Any]) -> bool:
    parts = ("accepted", "duplicate", "rejected", "malformed", "blank", "failed")
    return bool(totals["lines"] == sum(totals[k] for k in parts))


async def test_import_reads_standard_input(server: App, tmp_path: Path) -> None:
    data = "\n".join(LINES).encode() + b"\n"
    run = await cli("import", "-", "--target", server.address, "--json", stdin=data, cwd=tmp_path)
    assert run.status == 3, run.stderr  # finished, with a rejected and a malformed line
    totals = json.loads(run.stdout)
    assert {k: totals[k] for k in EXPECTED} == EXPECTED and adds_up(totals)
    assert totals["rejected_file"] == "stdin.rejected.jsonl"
    records = [json.loads(line) for line in (tmp_path / "stdin.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], "violations" in r) for r in records] == [(5, False), (6, True)]
    assert await server.pool.fetchval("SELECT count(*) FROM events") == 2

    elsewhere = tmp_path / "bad.jsonl"
    run = await cli("import", "-", "--target", server.address, "--rejected", str(elsewhere), stdin=data, cwd=tmp_path)
    assert run.status == 3 and elsewhere.exists()


async def test_the_import_table_adds_up(server: App, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    run = await cli("import", str(path), "--target", server.address)
    assert run.status == 3
    table = dict(line.split(None, 1) for line in run.stdout.splitlines()[2:9])
    assert {k: int(v.replace(",", "")) for k, v in table.items()} == EXPECTED


async def test_an_import_that_cannot_connect_says_so(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    run = await cli("import", str(path), "--target", UNREACHABLE)
    assert (run.status, run.stdout) == (1, "")
    assert run.stderr == f"error: cannot connect to {UNREACHABLE}\n"  # no progress line, no table
    run = await cli("import", str(path), "--target", UNREACHABLE, "--json")
    assert (run.status, json.loads(run.stdout)) == (
        1,
        {"error": {"code": "UNAVAILABLE", "message": f"cannot connect to {UNREACHABLE}"}},
    )
    assert not (tmp_path / "events.rejected.jsonl").exists()  # nothing was read


@pytest.fixture
async def silent_peer() -> AsyncIterator[str]:
    """A TCP port that accepts connections and never says a word (no HTTP/2 handshake)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_an_import_to_a_peer_that_never_answers_gives_up(silent_peer: str, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(LOGIN % 1 + "\n")
    started = time.monotonic()
    run = await cli("import", str(path), "--target", silent_peer, "--deadline", "5", "--json")
    assert run.status == 1
    error = json.loads(run.stdout)["error"]
    assert error["code"] == "UNAVAILABLE" and error["message"].startswith(f"cannot connect to {silent_peer}")
    assert time.monotonic() - started < 5 + 3  # within the deadline (the channel's handshake timeout is shorter)


async def test_an_import_whose_server_goes_away_reports_totals_and_the_error(server: App) -> None:
    """Connected, then the server stops: the lines read still add up, the unconfirmed
    ones count as failed, and --json carries the totals and the error together."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "interactions_client.cli", "import", "-", "--target", server.address),
        *("--retry-timeout", "1", "--json"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(b"".join(f"{LOGIN % n}\n".encode() for n in range(10)) + b"\n")
    await process.stdin.drain()
    for _ in range(100):  # until the first lines are stored
        if await server.pool.fetchval("SELECT count(*) FROM events") == 10:
            break
        await asyncio.sleep(0.1)
    await server.stop(0)
    process.stdin.write(b"".join(f"{LOGIN % n}\n".encode() for n in range(10, 15)))
    process.stdin.close()  # the end of the input (communicate() without input leaves it open)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1, stderr
    totals = json.loads(stdout)
    assert (totals["lines"], totals["accepted"], totals["blank"], totals["failed"]) == (16, 10, 1, 5)
    assert adds_up(totals)
    assert totals["error"]["code"] == "UNAVAILABLE"
    assert totals["error"]["message"].startswith("5 event(s) were not confirmed")
