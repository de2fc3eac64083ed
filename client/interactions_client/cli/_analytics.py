"""The analytics commands of `interactions` (_main.py adds them): export, searches,
session, sessions, activity, active-users, events. docs/analytics.md shows them."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict

from interactions_client.analytics import AsyncExport, event_type_number, to_datetime
from interactions_client.catalog import format_table
from interactions_client.cli import _export_files as export_files
from interactions_client.cli._errors import EXIT_OK
from interactions_client.cli.args import add_ids
from interactions_client.client import InteractionsClient
from interactions_client.rules import stored_name
from interactions_client.v1.analytics_service_pb2 import SearchQueryStats, Session
from interactions_client.v1.event_pb2 import Event

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# --- argument types ------------------------------------------------------------


def parse_moment(text: str) -> datetime:
    """2026-10-01 (midnight UTC) or an ISO 8601 timestamp (UTC when it has no offset)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-10-01) or ISO timestamp") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_duration(text: str) -> timedelta:
    """30d, 12h, 90m, 45s, 2w, or several: 1h30m."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m or 1h30m")
    return sum((timedelta(**{_UNITS[unit]: float(number)}) for number, unit in parts), timedelta())


def parse_limit(text: str) -> int:
    """A count of rows: 0 (everything) or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def parse_event_type(text: str) -> str:
    try:
        event_type_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds the analytics commands to _main.py's subparsers."""

    def window(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", type=parse_moment, help="from this time on (2026-10-01 or ISO 8601, UTC)")
        parser.add_argument("--until", type=parse_moment, help="up to this time, excluded")

    def types(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--type", dest="event_types", type=parse_event_type, action="append", default=[],
            help="only this type (a seed name, or 'custom'); repeatable",
        )  # fmt: skip

    export = commands.add_parser("export", parents=[common], help="export training data or events to a file")
    kinds = export.add_subparsers(dest="what", required=True, metavar="WHAT")
    training = kinds.add_parser("training", parents=[common], help="the weighted (user, product) training matrix")
    events = kinds.add_parser("events", parents=[common], help="the raw event log")
    for parser in (training, events):
        parser.add_argument("--out", type=Path, required=True, help="the file: .csv, .jsonl or .parquet")
        window(parser)
    training.add_argument("--half-life", type=parse_duration, help="time decay, e.g. 30d (default: none)")
    types(events)
    events.add_argument(
        "--layout", choices=sorted(export_files.EVENT_LAYOUTS), default="default",
        help="default: every field; personalize: USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE",
    )  # fmt: skip

    searches = commands.add_parser("searches", parents=[common], help="the most searched queries and their rates")
    window(searches)
    searches.add_argument("--limit", type=int, default=20, help="at most this many queries (default 20)")

    session = commands.add_parser("session", parents=[common], help="one session of a user, with its timeline")
    add_ids(session, "user", "session")
    sessions = commands.add_parser("sessions", parents=[common], help="a user's sessions, newest first")
    add_ids(sessions, "user")
    sessions.add_argument("--limit", type=parse_limit, default=100, help="at most this many (default 100; 0: all)")
    activity = commands.add_parser("activity", parents=[common], help="a user's activity and event counts")
    add_ids(activity, "user")
    active = commands.add_parser("active-users", parents=[common], help="distinct active and logged-in users")
    window(active)
    user_events = commands.add_parser("events", parents=[common], help="a user's events, newest first")
    add_ids(user_events, "user")
    window(user_events)
    types(user_events)
    user_events.add_argument("--limit", type=parse_limit, default=100, help="at most this many (default 100; 0: all)")


def check_usage(args: argparse.Namespace) -> None:
    """Usage errors found before connecting (_errors.UsageError)."""
    if args.command == "export":
        export_files.check_format(args.out)


# --- output ---------------------------------------------------------------------


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return export_files.rfc3339(value)
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return export_files.rfc3339(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if rows:
        sys.stdout.write(format_table(columns, [[_cell(r[c]) for c in columns] for r in rows]) + "\n")
    else:
        sys.stdout.write("(none)\n")


def _print_fields(record: dict[str, Any], names: Sequence[str]) -> None:
    sys.stdout.write(format_table(("", "value"), [(n, _cell(record[n])) for n in names]) + "\n")


def event_dict(event: Event) -> dict[str, Any]:
    member = event.WhichOneof("details")
    return {
        "event_id": event.event_id,
        "event_type": stored_name(event),
        "user_id": event.user_id,
        "session_id": event.session_id or None,
        "product_id": event.product_id or None,
        "event_value": event.event_value if event.HasField("event_value") else None,
        "occurred_at": to_datetime(event.occurred_at),
        "details": None
        if member is None
        else {member: MessageToDict(getattr(event, member), preserving_proto_field_name=True)},
        "attributes": dict(event.attributes),
    }


def session_dict(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "user_id": session.user_id,
        "started_at": to_datetime(session.started_at),
        "ended_at": to_datetime(session.ended_at),
        "event_count": session.event_count,
        "counts": dict(session.counts),
        "products_viewed": list(session.products_viewed),
        "search_queries": list(session.search_queries),
    }


def _rate(stats: SearchQueryStats, name: str) -> float | None:
    return getattr(stats, name) if stats.HasField(name) else None  # type: ignore[arg-type]


_RATES = ("click_through_rate", "add_to_cart_rate", "conversion_rate", "no_result_rate")


# --- commands ---------------------------------------------------------------------


class ExportProgress:
    """Rows so far and rows/s, redrawn on stderr when it is a terminal; silent otherwise."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._tty = out.isatty()
        self._clock = clock
        self.started = clock()
        self._last = self.started

    def update(self, rows: int) -> None:
        now = self._clock()
        if self._tty and now - self._last >= 0.1:
            self._last = now
            self._out.write(f"\r{rows:,} rows  {rows / max(now - self.started, 1e-9):,.0f} rows/s\x1b[K")
            self._out.flush()

    def finish(self) -> float:
        if self._tty:
            self._out.write("\r\x1b[K")
            self._out.flush()
        return self._clock() - self.started


async def _export(client: InteractionsClient, args: argparse.Namespace) -> int:
    export: AsyncExport[Any]
    if args.what == "training":
        layout = export_files.TRAINING
        export = client.export_training_data(start_time=args.since, end_time=args.until, half_life=args.half_life)
    else:
        layout = export_files.EVENT_LAYOUTS[args.layout]
        export = client.export_events(start_time=args.since, end_time=args.until, event_types=args.event_types)
    progress = ExportProgress(sys.stderr)
    writer = export_files.open_writer(args.out, layout)
    try:
        async for batch in export.batches():
            writer.write(layout.to_columns(batch))
            progress.update(export.rows)
    except BaseException:
        writer.close()
        writer.path.unlink(missing_ok=True)
        raise
    export_files.finish(writer, args.out)
    seconds = progress.finish()
    totals = {
        "file": str(args.out),
        "rows": writer.rows,
        "received": export.rows,  # more than rows when the personalize layout left events without a product out
        "seconds": round(seconds, 3),
        "resumes": export.resumes,
        "as_of": export.as_of,
    }
    if args.json:
        _print_json(totals)
    else:
        rate = writer.rows / max(seconds, 1e-9)
        sys.stdout.write(f"wrote {writer.rows:,} rows to {args.out} in {seconds:.1f} s ({rate:,.0f} rows/s)\n")
        if export.rows != writer.rows:
            sys.stdout.write(f"left out {export.rows - writer.rows:,} events without a product_id\n")
        if export.resumes:
            sys.stdout.write(f"the stream broke and was resumed {export.resumes} time(s)\n")
        if export.as_of:
            sys.stdout.write(f"weights as of {export_files.rfc3339(export.as_of)}\n")
    return EXIT_OK


async def _searches(client: InteractionsClient, args: argparse.Namespace) -> int:
    queries = await client.top_search_queries(start_time=args.since, end_time=args.until, limit=args.limit)
    rows = [
        {"query": q.query, "searches": q.searches, "users": q.users, **{r: _rate(q, r) for r in _RATES}}
        for q in queries
    ]
    if args.json:
        _print_json(rows)
    else:
        _print_table(rows, ("query", "searches", "users", *_RATES))
    return EXIT_OK


async def _session(client: InteractionsClient, args: argparse.Namespace) -> int:
    session = await client.get_session(args.user, args.session)
    record = session_dict(session)
    events = [event_dict(e) for e in session.events]
    if args.json:
        _print_json({**record, "events": events, "truncated": session.truncated})
    else:
        _print_fields(record, list(record))
        _print_table(events, ("occurred_at", "event_type", "product_id", "event_value", "event_id"))
        if session.truncated:
            sys.stdout.write(f"(the first {len(events):,} of {session.event_count:,} events)\n")
    return EXIT_OK


async def _sessions(client: InteractionsClient, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    async for session in client.list_sessions(args.user, page_size=min(args.limit, 1000) if args.limit > 0 else 0):
        rows.append(session_dict(session))
        if len(rows) == args.limit:
            break
    if args.json:
        _print_json(rows)
    else:
        _print_table(rows, ("session_id", "started_at", "ended_at", "event_count", "products_viewed", "search_queries"))
    return EXIT_OK


async def _activity(client: InteractionsClient, args: argparse.Namespace) -> int:
    a = await client.get_user_activity(args.user)
    record = {
        "user_id": args.user,
        "first_seen_at": to_datetime(a.first_seen_at),
        "last_seen_at": to_datetime(a.last_seen_at),
        "last_login_at": to_datetime(a.last_login_at),
        "last_logout_at": to_datetime(a.last_logout_at),
        "login_count": a.login_count,
        "logout_count": a.logout_count,
        "session_count": a.session_count,
        "event_counts": dict(a.event_counts),
    }
    if args.json:
        _print_json(record)
    else:
        _print_fields(record, list(record))
    return EXIT_OK


async def _active_users(client: InteractionsClient, args: argparse.Namespace) -> int:
    counts = await client.count_active_users(start_time=args.since, end_time=args.until)
    daily = [
        {"date": d.date, "active_users": d.active_users, "logged_in_users": d.logged_in_users} for d in counts.daily
    ]
    if args.json:
        _print_json({"active_users": counts.active_users, "logged_in_users": counts.logged_in_users, "daily": daily})
    else:
        sys.stdout.write(f"active users: {counts.active_users:,}  logged in: {counts.logged_in_users:,}\n")
        _print_table(daily, ("date", "active_users", "logged_in_users"))
    return EXIT_OK


async def _events(client: InteractionsClient, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    page_size = min(args.limit, 1000) if args.limit > 0 else 0
    async for event in client.list_user_events(
        args.user, start_time=args.since, end_time=args.until, event_types=args.event_types, page_size=page_size
    ):
        rows.append(event_dict(event))
        if len(rows) == args.limit:
            break
    if args.json:
        _print_json(rows)
    else:
        _print_table(rows, ("occurred_at", "event_type", "product_id", "session_id", "event_value", "event_id"))
    return EXIT_OK


COMMANDS: dict[str, Callable[[InteractionsClient, argparse.Namespace], Awaitable[int]]] = {
    "export": _export,
    "searches": _searches,
    "session": _session,
    "sessions": _sessions,
    "activity": _activity,
    "active-users": _active_users,
    "events": _events,
}
