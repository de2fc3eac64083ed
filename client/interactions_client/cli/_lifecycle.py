"""The data lifecycle commands of `interactions` (_main.py adds them):

    interactions purge --type page_view --before 2026-01-01 [--user U ...] [--force]
    interactions export-user U --out u.json      # also: --user U

Both need the admin scope. A purge without --force only counts; a forced one
runs without a deadline unless --deadline is given (it removes in small
batches and may take a while; what it removed before an interruption stays
removed, and the same command again removes the rest). export-user writes one
JSON document a person can read, in bounded memory: the parts as the server
streams them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from interactions_client.cli._analytics import parse_event_type, parse_moment
from interactions_client.cli._errors import EXIT_OK, UsageError
from interactions_client.cli.args import add_ids
from interactions_client.client import InteractionsClient
from interactions_client.rules import stored_name
from interactions_client.v1.admin_service_pb2 import ExportUserDataResponse

STDOUT = Path("-")
_FILTERS = ("--type", "--custom-type", "--since", "--before", "--user")
_PARTS = ("cart", "wishlist", "purchases", "events")  # in the stream's order
_ITEMS = {"cart": "items", "wishlist": "items", "purchases": "purchases", "events": "events"}


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    purge = commands.add_parser(
        "purge", parents=[common], help="remove the events matching a filter from the log (needs the admin scope)"
    )
    purge.add_argument(
        "--type", dest="event_types", type=parse_event_type, action="append", default=[],
        help="events of this type (a seed name, or 'custom' for every custom type); repeatable",
    )  # fmt: skip
    purge.add_argument(
        "--custom-type", dest="custom_types", action="append", default=[], metavar="NAME",
        help="events of this custom type; repeatable",
    )  # fmt: skip
    purge.add_argument("--since", type=parse_moment, help="events from this time on (2026-10-01 or ISO 8601, UTC)")
    purge.add_argument(
        "--before", "--until", dest="before", type=parse_moment, help="events before this time (excluded)"
    )
    purge.add_argument(
        "--user", dest="users", action="append", default=[], metavar="USER", help="events of this user; repeatable"
    )
    purge.add_argument("--force", action="store_true", help="remove them (without it: only count them)")

    export = commands.add_parser(
        "export-user", parents=[common], help="everything stored about a person, as one JSON document (admin scope)"
    )
    add_ids(export, "user")
    export.add_argument("--out", type=Path, required=True, help="the JSON file to write, or - for standard output")


def check_usage(args: argparse.Namespace, argv: list[str]) -> None:
    """Usage errors found before connecting; no --deadline: a forced purge and an export take their time."""
    filtered = args.command != "purge" or any(
        (args.event_types, args.custom_types, args.since, args.before, args.users)
    )
    if not filtered:
        raise UsageError(
            f"give at least one filter ({', '.join(_FILTERS)}): a purge without one would remove every event",
            command="interactions purge",
        )
    if args.command in COMMANDS and not any(a == "--deadline" or a.startswith("--deadline=") for a in argv):
        args.deadline = None


async def _purge(client: InteractionsClient, args: argparse.Namespace) -> int:
    response = await client.purge_events(
        event_types=args.event_types,
        custom_types=args.custom_types,
        start_time=args.since,
        end_time=args.before,
        user_ids=args.users,
        force=args.force,
        deadline=args.deadline,
    )
    if args.json:
        _print_json({"events": response.events, "users": response.users, "removed": args.force})
    elif args.force:
        sys.stdout.write(f"removed {response.events:,} events of {response.users:,} users\n")
    else:
        sys.stdout.write(
            f"would remove {response.events:,} events of {response.users:,} users "
            "(nothing removed: add --force to remove them)\n"
        )
    return EXIT_OK


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")


# --- export-user -----------------------------------------------------------------------------------


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _readable_event(stored: Any) -> dict[str, Any]:
    """An event as a person reads it: its type by name, when it was received."""
    event = _dict(stored.event)
    event["event_type"] = stored_name(stored.event)
    event.pop("custom_type", None)
    event["received_at"] = stored.received_at.ToJsonString()
    return event


def _items(part: str, response: ExportUserDataResponse) -> Iterator[dict[str, Any]]:
    holder = getattr(response, part)
    for item in getattr(holder, _ITEMS[part]):
        yield _readable_event(item) if part == "events" else _dict(item)


class _Document:
    """Writes the JSON document as the parts arrive: the header's fields, then
    one list per part (an empty one for a part that never came)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.counts = dict.fromkeys(_PARTS, 0)
        self._next = 0  # index in _PARTS of the next list to open
        self._open: str | None = None

    def header(self, response: ExportUserDataResponse) -> None:
        header = _dict(response.header)
        fields = {
            "user_id": header.get("user_id", ""),
            "anonymous_ids": header.get("anonymous_ids", []),
            "exported_at": header.get("exported_at"),
            "deletion": header.get("deletion"),
        }
        self.out.write("{\n")
        for name, value in fields.items():
            self.out.write(f"  {json.dumps(name)}: {json.dumps(value, ensure_ascii=False)},\n")

    def part(self, part: str, items: Iterator[dict[str, Any]]) -> None:
        while self._open != part:
            self._close()
            self._open = _PARTS[self._next]
            self._next += 1
            self.out.write(f"  {json.dumps(self._open)}: [")
        for item in items:
            self.out.write(("\n" if not self.counts[part] else ",\n") + "    " + json.dumps(item, ensure_ascii=False))
            self.counts[part] += 1

    def _close(self) -> None:
        if self._open is not None:
            self.out.write(
                ("\n  " if self.counts[self._open] else "") + "]" + ("," if self._next < len(_PARTS) else "") + "\n"
            )

    def finish(self) -> None:
        while self._next < len(_PARTS):
            self.part(_PARTS[self._next], iter(()))
        self._close()
        self.out.write("}\n")


async def _export_user(client: InteractionsClient, args: argparse.Namespace) -> int:
    out: Path = args.out
    with contextlib.ExitStack() as stack:
        if out == STDOUT:
            stream: TextIO = sys.stdout
        else:
            # Written beside the file and renamed at the end: no half document under its name.
            partial = out.with_name(out.name + ".partial")
            stream = stack.enter_context(partial.open("w", encoding="utf-8"))
            stack.callback(lambda: partial.unlink(missing_ok=True))
        document = _Document(stream)
        async for response in client.export_user_data(args.user):
            part = response.WhichOneof("part")
            if part == "header":
                document.header(response)
            elif part is not None:
                document.part(part, _items(part, response))
        document.finish()
        if out != STDOUT:
            stream.flush()
            os.replace(partial, out)
    if out != STDOUT:
        counts = document.counts
        summary = (
            f"{counts['cart']:,} cart lines, {counts['wishlist']:,} wishlist items, "
            f"{counts['purchases']:,} purchases, {counts['events']:,} events"
        )
        if args.json:
            _print_json({"out": str(out), **counts})
        else:
            sys.stdout.write(f"wrote {out}: {summary}\n")
    return EXIT_OK


COMMANDS: dict[str, Callable[[InteractionsClient, argparse.Namespace], Awaitable[int]]] = {
    "purge": _purge,
    "export-user": _export_user,
}
