"""Logs of the real command: JSON lines that parse, the periodic summary,
the worker field, and no user id or event content at INFO."""

from __future__ import annotations

import json
import logging
import re
import signal
from datetime import datetime
from typing import Any

import grpc
import pytest

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server import logs, metrics
from tests.events import valid_event
from tests.support import cli

SECRET_USER = "user-7f3a-do-not-log"
SECRET_CONTENT = "gift-card-code-9c1e"


def parse_lines(log: list[str]) -> list[dict[str, Any]]:
    entries = []
    for line in log:
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), line
        datetime.fromisoformat(entry["time"])
        entries.append(entry)
    return entries


async def test_json_lines_summary_and_no_user_data(database_url: str) -> None:
    args = ("--listen", "127.0.0.1:0", "--database-url", database_url)
    async with cli(*args, "--log-format", "json", "--log-summary-interval", "0.5") as server:
        address = (await server.wait_for_line(r"listening on (127\.0\.0\.1:\d+)"))[1]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = InteractionServiceStub(channel)
            event = valid_event(EventType.EVENT_TYPE_CUSTOM, user_id=SECRET_USER)
            event.attributes["code"] = SECRET_CONTENT
            await stub.LogEvent(pb.LogEventRequest(event=event))
            await stub.LogEvent(pb.LogEventRequest(event=event))  # duplicate
            batch = [
                valid_event(EventType.EVENT_TYPE_VIEW, user_id=SECRET_USER),
                valid_event(EventType.EVENT_TYPE_SEARCH, user_id=SECRET_USER, search={"query": SECRET_CONTENT}),
                valid_event(EventType.EVENT_TYPE_PURCHASE, user_id=SECRET_USER, product_id=""),  # rejected
            ]
            await stub.LogEvents(pb.LogEventsRequest(events=batch))
        await server.wait_for_line(r'"events": \{"accepted": 3, "duplicate": 1, "rejected": 1\}', seconds=10)
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)

    entries = parse_lines(server.log)
    summary = next(e for e in entries if e["logger"] == "interactions_server.summary" and e["events"]["accepted"])
    assert summary["level"] == "INFO"
    assert summary["by_rpc"] == {
        "LogEvent": {"accepted": 1, "duplicate": 1, "rejected": 0},
        "LogEvents": {"accepted": 2, "duplicate": 0, "rejected": 1},
    }
    assert "3 accepted, 1 duplicate, 1 rejected" in summary["message"]
    assert any(e["message"].startswith("listening on") for e in entries)
    assert entries[-1]["message"] == "stopped"
    assert "worker" not in entries[0]  # one process: no worker field
    text = "".join(server.log)
    assert SECRET_USER not in text and SECRET_CONTENT not in text


async def test_workers_log_their_number(database_url: str) -> None:
    args = ("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url)
    async with cli(*args, "--log-format", "json") as server:
        await server.wait_for_line(r"listening on 127\.0\.0\.1:\d+ with 2 workers")
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)
    entries = parse_lines(server.log)
    serving = {e["worker"] for e in entries if re.match(r"worker \d \(pid \d+\) serving on", e["message"])}
    assert serving == {1, 2}
    # The supervisor's lines about a worker carry its number too.
    started = {e["worker"] for e in entries if re.match(r"worker (\d) started", e["message"])}
    assert started == {1, 2}
    assert all(e["logger"] == "interactions_server.supervisor" for e in entries if "started (pid" in e["message"])


# --- the formatters -----------------------------------------------------------


def record(message: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    entry = logging.LogRecord("interactions_server.test", logging.WARNING, __file__, 1, message, args, exc_info)
    entry.__dict__.update(extra)
    return entry


def test_json_formatter_carries_extra_fields_and_tracebacks() -> None:
    try:
        raise ValueError("bad")
    except ValueError as exc:
        error = exc
    line = logs.JsonFormatter().format(record("%d events", 3, exc=error, worker=2, counts={"accepted": 3}))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "3 events" and entry["level"] == "WARNING"
    assert entry["worker"] == 2 and entry["counts"] == {"accepted": 3}
    assert "ValueError: bad" in entry["exception"]


def test_text_formatter_appends_fields() -> None:
    line = logs.TextFormatter().format(record("summary", worker=1, events={"accepted": 2}))
    assert line.endswith('WARNING interactions_server.test: summary worker=1 events={"accepted":2}')


def test_the_client_name_is_a_field(caplog: pytest.LogCaptureFixture) -> None:
    token = metrics.current_client.set("checkout-service")
    try:
        filtered = record("hello")
        assert logs._ContextFilter(worker=None).filter(filtered)
    finally:
        metrics.current_client.reset(token)
    assert json.loads(logs.JsonFormatter().format(filtered))["client"] == "checkout-service"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        logs.configure("xml", "INFO")
