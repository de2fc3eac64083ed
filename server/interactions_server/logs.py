"""Logging set-up: text for people, JSON lines for log collectors; a periodic summary.

`configure(fmt, level, worker)` is called once in every process. "text" is
the classic one-line format; "json" writes one JSON object per line:

    {"time": "2026-11-24T03:00:00.123Z", "level": "INFO", "logger": "interactions_server.server",
     "message": "listening on 127.0.0.1:50051", "worker": 1}

with, when they apply, `worker` (the worker number, absent in a single
process), `client` (the authenticated client's name, see
metrics.current_client), `exception` (a traceback), and any fields a call
passes with `extra=` (counts, ...). In text, those fields follow the message
as key=value. The default (None or "auto") is text when stderr is a terminal,
JSON otherwise.

What is logged at INFO and above never carries a user id, a token or event
content: counts, names of RPCs and types, addresses, durations.

`SummaryTask(interval)` logs, every `interval` seconds, the events this
process accepted, found duplicate and rejected, in total and by RPC. Each
worker logs its own summary (with its `worker` field); a log collector sums
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from interactions_server import metrics

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_SUMMARY_INTERVAL = 60.0

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_CONTEXT_FIELDS = ("worker", "client")


def default_format() -> str:
    return "text" if sys.stderr.isatty() else "json"


class _ContextFilter(logging.Filter):
    """Puts the process's worker number and the call's client on every record."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if self._worker is not None and not hasattr(record, "worker"):
            record.worker = self._worker
        if not hasattr(record, "client") and (client := metrics.current_client.get()):
            record.client = client
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context and `extra=` fields, context first."""
    extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}
    ordered = {k: extra.pop(k) for k in _CONTEXT_FIELDS if k in extra}
    ordered.update(extra)
    return ordered


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return text


def _text_value(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), default=str) if isinstance(value, dict | list) else str(value)


def configure(fmt: str | None, level: str, worker: int | None = None) -> None:
    """Sends this process's logs to stderr in `fmt` ("text", "json"; None or
    "auto": text on a terminal, JSON otherwise) at `level` and above,
    replacing any handlers configured before."""
    if fmt is None or fmt == "auto":
        fmt = default_format()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter(worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class SummaryTask:
    """Logs the events of this process every `interval` seconds (and once more
    at stop, for the remainder). start() and stop() run on the event loop."""

    def __init__(self, interval: float = DEFAULT_SUMMARY_INTERVAL) -> None:
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._since = time.monotonic()
        self._log = logging.getLogger("interactions_server.summary")

    def start(self) -> None:
        metrics.take_event_tally()  # start counting from now
        self._since = time.monotonic()
        if self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="log-summary")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.log_summary()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.log_summary()

    def log_summary(self) -> None:
        tally = metrics.take_event_tally()
        now = time.monotonic()
        seconds, self._since = now - self._since, now
        totals = {outcome: 0 for outcome in metrics.OUTCOMES}
        by_rpc: dict[str, dict[str, int]] = {}
        for (rpc, outcome), n in sorted(tally.items()):
            totals[outcome] += n
            by_rpc.setdefault(rpc, {o: 0 for o in metrics.OUTCOMES})[outcome] = n
        rpcs = "; ".join(
            f"{rpc} {c[metrics.ACCEPTED]}/{c[metrics.DUPLICATE]}/{c[metrics.REJECTED]}" for rpc, c in by_rpc.items()
        )
        self._log.info(
            "events in the last %.1f s: %d accepted, %d duplicate, %d rejected%s",
            seconds,
            totals[metrics.ACCEPTED],
            totals[metrics.DUPLICATE],
            totals[metrics.REJECTED],
            f" (accepted/duplicate/rejected by RPC: {rpcs})" if rpcs else "",
            extra={"events": totals, "by_rpc": by_rpc, "seconds": round(seconds, 3)},
        )
