"""Export files and CLI argument types, without a server: each layout written as
.csv, .jsonl and .parquet reads back with the documented columns and values;
durations and dates parse; a missing pyarrow is a usage error that says how to
install it. (The same against the real server: tests/test_cli_analytics.py.)"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from interactions_client.analytics import ResumePolicy, event_type_number
from interactions_client.cli import _analytics as analytics_cli
from interactions_client.cli import _export_files as export_files
from interactions_client.cli import main
from interactions_client.cli._analytics import parse_duration, parse_moment
from interactions_client.events import new_event, timestamp
from interactions_client.rules import RULES
from interactions_client.v1.analytics_service_pb2 import ExportedEvent, TrainingRow
from interactions_client.v1.event_pb2 import EventType

T0 = datetime(2026, 10, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def training_rows() -> list[TrainingRow]:
    return [
        TrainingRow(
            user_id="u1",
            product_id="p1",
            weight=3.5,
            event_count=2,
            last_occurred_at=timestamp(T0),
            counts={"purchase": 1, "add_to_cart": 1},
        ),
        TrainingRow(user_id="u2", product_id='p,"2', weight=1.0, event_count=1, last_occurred_at=timestamp(T0)),
    ]


def exported_events() -> list[ExportedEvent]:
    search = new_event("search", "u1", details={"query": "red shoes", "result_count": 0}, occurred_at=T0)
    review = new_event("review", "u2", product_id="p9", value=5, session_id="s1", attributes={"k": "v"}, occurred_at=T0)
    custom = new_event("gift_card_redeemed", "u3", product_id="p3", occurred_at=T0)
    return [
        ExportedEvent(event=search, ml_weight=1.0, received_at=timestamp(T0 + timedelta(seconds=1))),
        ExportedEvent(event=review, ml_weight=1.6, received_at=timestamp(T0)),
        ExportedEvent(event=custom, ml_weight=0.0, received_at=timestamp(T0)),
    ]


def write(path: Path, layout: export_files.Layout, rows: list[Any]) -> Path:
    writer = export_files.open_writer(path, layout)
    writer.write(layout.to_columns(rows[:1]))
    writer.write(layout.to_columns(rows[1:]))
    assert writer.path == export_files.partial_path(path) and not path.exists()
    export_files.finish(writer, path)
    assert not writer.path.exists()
    return path


def read(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="") as file:
            return list(csv.DictReader(file))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_training_file(tmp_path: Path, suffix: str) -> None:
    rows = read(write(tmp_path / f"t{suffix}", export_files.TRAINING, training_rows()))
    assert [list(r) for r in rows] == [
        ["user_id", "product_id", "weight", "event_count", "last_occurred_at", "counts"]
    ] * 2
    first, second = rows
    assert (first["user_id"], second["product_id"]) == ("u1", 'p,"2')
    if suffix == ".parquet":
        assert first["last_occurred_at"] == T0
        assert sorted(first["counts"]) == [("add_to_cart", 1), ("purchase", 1)]  # map<string, int64>
        assert (first["weight"], first["event_count"]) == (3.5, 2)
        assert pq.ParquetFile(tmp_path / "t.parquet").schema_arrow.field("counts").type.key_type == "string"
    else:
        assert first["last_occurred_at"] == "2026-10-01T12:00:00.250000Z"
        counts = first["counts"] if suffix == ".jsonl" else json.loads(first["counts"])
        assert counts == {"purchase": 1, "add_to_cart": 1}
        assert float(first["weight"]) == 3.5 and int(first["event_count"]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_events_file_has_every_field(tmp_path: Path, suffix: str) -> None:
    events = exported_events()
    rows = read(write(tmp_path / f"e{suffix}", export_files.EVENTS, events))
    assert list(rows[0]) == export_files.EVENTS.names
    search, review, custom = rows
    assert [r["event_id"] for r in rows] == [e.event.event_id for e in events]
    assert [r["event_type"] for r in rows] == ["search", "review", "gift_card_redeemed"]
    empty: object = "" if suffix == ".csv" else None
    assert (search["product_id"], search["session_id"], search["custom_type"]) == (empty, empty, empty)
    assert custom["custom_type"] == "gift_card_redeemed"
    details = search["details"] if suffix == ".jsonl" else json.loads(search["details"])
    assert details == {"search": {"query": "red shoes", "result_count": 0}}
    if suffix == ".csv":
        assert json.loads(review["attributes"]) == {"k": "v"} and review["event_value"] == "5"
        assert search["received_at"] == "2026-10-01T12:00:01.250000Z" and review["ml_weight"] == "1.6"
    elif suffix == ".jsonl":
        assert review["attributes"] == {"k": "v"} and review["event_value"] == 5
    else:
        assert review["attributes"] == [("k", "v")] and review["occurred_at"] == T0 and review["ml_weight"] == 1.6


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_personalize_layout(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"p{suffix}", export_files.PERSONALIZE, exported_events())
    if suffix == ".csv":
        assert path.read_text().splitlines()[0] == "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE"
    rows = read(path)
    # The search has no product: an interactions dataset cannot take it.
    epoch = int(T0.timestamp())
    expected = [["u2", "p9", epoch, "review", 5], ["u3", "p3", epoch, "gift_card_redeemed", None]]
    if suffix == ".csv":
        expected = [[str(v) if v is not None else "" for v in row] for row in expected]
    assert [list(r.values()) for r in rows] == expected


def test_parquet_row_groups_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_files, "ROW_GROUP_ROWS", 4)
    writer = export_files.open_writer(tmp_path / "t.parquet", export_files.TRAINING)
    for _ in range(5):
        writer.write(export_files.TRAINING.to_columns(training_rows() * 2))  # 4 rows a batch
    export_files.finish(writer, tmp_path / "t.parquet")
    parquet = pq.ParquetFile(tmp_path / "t.parquet")
    assert (parquet.metadata.num_rows, parquet.num_row_groups) == (20, 5)


def test_bad_extension_and_missing_pyarrow_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "events", "--out", str(tmp_path / "x.xlsx"), "--target", "127.0.0.1:1"]) == 2
    assert ".csv, .jsonl, .parquet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    assert main(["export", "training", "--out", str(tmp_path / "x.parquet"), "--target", "127.0.0.1:1"]) == 2
    assert "pip install 'interactions-client[parquet]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_argument_types() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("1.5s") == timedelta(seconds=1.5)
    for bad in ("", "30", "d", "3x", "30d ", "-1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    assert parse_moment("2026-10-01") == datetime(2026, 10, 1, tzinfo=UTC)
    assert parse_moment("2026-10-01T10:00:00+02:00") == datetime(2026, 10, 1, 8, tzinfo=UTC)
    assert parse_moment("2026-10-01T10:00:00") == datetime(2026, 10, 1, 10, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_moment("yesterday")
    assert event_type_number("add_to_cart") == EventType.EVENT_TYPE_ADD_TO_CART
    assert event_type_number("custom") == EventType.EVENT_TYPE_CUSTOM
    with pytest.raises(ValueError, match="unknown event type"):
        event_type_number("gift_card_redeemed")


def test_resume_backoff_grows_to_its_ceiling() -> None:
    policy = ResumePolicy(initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    delays = [policy.backoff(n) for n in range(1, 6)]
    assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4 and all(0.5 <= d <= 1.0 for d in delays[3:])


def test_docs_weights_table_is_the_schemas() -> None:
    """docs/analytics.md copies the ML weights; the schema owns them."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "analytics.md").read_text()
    table = docs.split("<!-- ml-weights")[1].split("<!-- /ml-weights -->")[0]
    documented = {
        cells[0]: float(cells[1])
        for line in table.splitlines()[3:]
        if (cells := [c.strip() for c in line.strip("|").split("|")]) and len(cells) == 2
    }
    schema = {r.name: r.ml_weight for r in RULES.values() if r.ml_weight is not None}
    assert documented == schema
    assert list(documented) == sorted(schema, key=lambda name: -schema[name])  # heaviest first, as the table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal() -> None:
    clock = iter([0.0, 1.0, 1.05, 2.0, 3.0])
    terminal = Terminal()
    progress = analytics_cli.ExportProgress(terminal, clock=lambda: next(clock))
    progress.update(1000)  # t=1.0: drawn
    progress.update(1500)  # t=1.05: too soon to redraw
    progress.update(4000)  # t=2.0
    assert progress.finish() == 3.0
    assert terminal.getvalue() == "\r1,000 rows  1,000 rows/s\x1b[K\r4,000 rows  2,000 rows/s\x1b[K\r\x1b[K"

    piped = io.StringIO()
    quiet = analytics_cli.ExportProgress(piped)
    quiet.update(1000)
    quiet.finish()
    assert piped.getvalue() == ""
