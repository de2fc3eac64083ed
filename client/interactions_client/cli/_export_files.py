"""Export files: the columns of each layout and streaming writers for .csv, .jsonl and .parquet.

Writers take one batch (a response's rows) at a time, so memory stays bounded
whatever the export's size; Parquet is written in row groups of at most
ROW_GROUP_ROWS rows through pyarrow, an optional extra
(`pip install 'interactions-client[parquet]'`). docs/analytics.md documents
the columns.

How values are written:
- timestamps: RFC 3339 in UTC (`2026-10-01T12:00:00.250000Z`) in CSV and JSONL,
  timestamp[us, UTC] in Parquet; TIMESTAMP of the personalize layout: epoch seconds;
- maps (`counts`, `attributes`) and `details`: a JSON object (as text in a CSV
  cell; an object in JSONL); in Parquet the maps are map<string, int64> /
  map<string, string> and `details` is JSON text;
- absent values: an empty CSV cell, JSON null, a Parquet null.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict

from interactions_client.analytics import to_datetime
from interactions_client.cli._errors import UsageError
from interactions_client.rules import stored_name
from interactions_client.v1.analytics_service_pb2 import ExportedEvent, TrainingRow

FORMATS = (".csv", ".jsonl", ".parquet")
ROW_GROUP_ROWS = 65_536
PARQUET_INSTALL = "pip install 'interactions-client[parquet]'"

Columns = dict[str, list[Any]]


# --- layouts: protobuf rows to columns ------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # string, int64, double, timestamp, epoch_seconds, counts, attributes, json


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    columns: tuple[Column, ...]
    to_columns: Callable[[Sequence[Any]], Columns]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _training_columns(rows: Sequence[TrainingRow]) -> Columns:
    return {
        "user_id": [r.user_id for r in rows],
        "product_id": [r.product_id for r in rows],
        "weight": [r.weight for r in rows],
        "event_count": [r.event_count for r in rows],
        "last_occurred_at": [to_datetime(r.last_occurred_at) for r in rows],
        "counts": [dict(r.counts) for r in rows],
    }


def _details(exported: ExportedEvent) -> dict[str, Any] | None:
    member = exported.event.WhichOneof("details")
    if member is None:
        return None
    payload = MessageToDict(getattr(exported.event, member), preserving_proto_field_name=True)
    return {member: payload}


def _events_columns(rows: Sequence[ExportedEvent]) -> Columns:
    events = [r.event for r in rows]
    return {
        "event_id": [e.event_id for e in events],
        "event_type": [stored_name(e) for e in events],
        "custom_type": [e.custom_type or None for e in events],
        "user_id": [e.user_id for e in events],
        "session_id": [e.session_id or None for e in events],
        "product_id": [e.product_id or None for e in events],
        "event_value": [e.event_value if e.HasField("event_value") else None for e in events],
        "occurred_at": [to_datetime(e.occurred_at) for e in events],
        "received_at": [to_datetime(r.received_at) for r in rows],
        "ml_weight": [r.ml_weight for r in rows],
        "details": [_details(r) for r in rows],
        "attributes": [dict(e.attributes) for e in events],
    }


def _personalize_columns(rows: Sequence[ExportedEvent]) -> Columns:
    # An interactions dataset needs an item: events without a product are left out.
    events = [r.event for r in rows if r.event.product_id]
    return {
        "USER_ID": [e.user_id for e in events],
        "ITEM_ID": [e.product_id for e in events],
        "TIMESTAMP": [e.occurred_at.seconds for e in events],
        "EVENT_TYPE": [stored_name(e) for e in events],
        "EVENT_VALUE": [e.event_value if e.HasField("event_value") else None for e in events],
    }


TRAINING = Layout(
    "training",
    (
        Column("user_id", "string"),
        Column("product_id", "string"),
        Column("weight", "double"),
        Column("event_count", "int64"),
        Column("last_occurred_at", "timestamp"),
        Column("counts", "counts"),
    ),
    _training_columns,
)

EVENTS = Layout(
    "default",
    (
        Column("event_id", "string"),
        Column("event_type", "string"),
        Column("custom_type", "string"),
        Column("user_id", "string"),
        Column("session_id", "string"),
        Column("product_id", "string"),
        Column("event_value", "int64"),
        Column("occurred_at", "timestamp"),
        Column("received_at", "timestamp"),
        Column("ml_weight", "double"),
        Column("details", "json"),
        Column("attributes", "attributes"),
    ),
    _events_columns,
)

PERSONALIZE = Layout(
    "personalize",
    (
        Column("USER_ID", "string"),
        Column("ITEM_ID", "string"),
        Column("TIMESTAMP", "epoch_seconds"),
        Column("EVENT_TYPE", "string"),
        Column("EVENT_VALUE", "int64"),
    ),
    _personalize_columns,
)

EVENT_LAYOUTS = {EVENTS.name: EVENTS, PERSONALIZE.name: PERSONALIZE}


# --- writers ---------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _text_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


class Writer(ABC):
    """Writes batches of columns to `path`; `close()` finishes the file."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path = path
        self.layout = layout
        self.rows = 0

    def write(self, columns: Columns) -> None:
        count = len(columns[self.layout.columns[0].name])
        if count:
            self._write(columns, count)
            self.rows += count

    @abstractmethod
    def _write(self, columns: Columns, count: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class CsvWriter(Writer):
    def __init__(self, path: Path, layout: Layout) -> None:
        super().__init__(path, layout)
        self._file: TextIO = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(layout.names)

    def _write(self, columns: Columns, count: int) -> None:
        values = [columns[name] for name in self.layout.names]
        self._csv.writerows([_text_cell(v) for v in row] for row in zip(*values, strict=True))

    def close(self) -> None:
        self._file.close()


class JsonlWriter(Writer):
    def __init__(self, path: Path, layout: Layout) -> None:
        super().__init__(path, layout)
        self._file: TextIO = path.open("w", encoding="utf-8")

    def _write(self, columns: Columns, count: int) -> None:
        names = self.layout.names
        values = [columns[name] for name in names]
        self._file.writelines(
            json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False, default=_json_default) + "\n"
            for row in zip(*values, strict=True)
        )

    def close(self) -> None:
        self._file.close()


class ParquetWriter(Writer):
    """Buffers up to ROW_GROUP_ROWS rows, then writes them as one row group."""

    def __init__(self, path: Path, layout: Layout) -> None:
        super().__init__(path, layout)
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {
            "string": pa.string(),
            "int64": pa.int64(),
            "double": pa.float64(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "epoch_seconds": pa.int64(),
            "counts": pa.map_(pa.string(), pa.int64()),
            "attributes": pa.map_(pa.string(), pa.string()),
            "json": pa.string(),
        }
        self._pa = pa
        self._schema = pa.schema([pa.field(c.name, types[c.kind]) for c in layout.columns])
        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")
        self._buffer: Columns = {name: [] for name in layout.names}
        self._buffered = 0

    def _write(self, columns: Columns, count: int) -> None:
        for column in self.layout.columns:
            values = columns[column.name]
            if column.kind in ("counts", "attributes"):
                values = [list(v.items()) for v in values]
            elif column.kind == "json":
                values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
            self._buffer[column.name].extend(values)
        self._buffered += count
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffered:
            self._writer.write_table(self._pa.Table.from_pydict(self._buffer, schema=self._schema))
            self._buffer = {name: [] for name in self.layout.names}
            self._buffered = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def check_format(path: Path) -> str:
    """The format of `path` by its extension; UsageError when it cannot be written here."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out {path}: the extension must be one of {', '.join(FORMATS)}")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UsageError(f"writing .parquet needs pyarrow, which is not installed: {PARQUET_INSTALL}")
    return suffix


def partial_path(path: Path) -> Path:
    """Where an export is written until it is complete (then renamed to `path`)."""
    return path.with_name(path.name + ".partial")


def open_writer(path: Path, layout: Layout) -> Writer:
    """A writer for `path` by its extension, writing to partial_path(path) until `finish`."""
    writers: dict[str, type[Writer]] = {".csv": CsvWriter, ".jsonl": JsonlWriter, ".parquet": ParquetWriter}
    return writers[check_format(path)](partial_path(path), layout)


def finish(writer: Writer, path: Path) -> None:
    """Closes the writer and moves the complete file into place."""
    writer.close()
    os.replace(writer.path, path)
