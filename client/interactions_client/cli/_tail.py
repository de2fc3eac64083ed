"""`interactions tail`: the event stream as JSONL, as events arrive (docs/subscribe.md).

    interactions tail [--type T ...] [--from-start] [--cursor C] [--partition I/N]

Each event is one line on stdout, the same object as a line of
`interactions export events --out FILE.jsonl`; a deletion is a line
{"user_deleted": {"user_id": ..., "deleted_at": ...}}. Lines are flushed as
they come. On exit (Ctrl-C, SIGTERM, or a failure) the cursor after the last
line printed goes to stderr as `cursor C`: `--cursor C` continues there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from datetime import datetime
from typing import Any

from interactions_client.analytics import to_datetime
from interactions_client.cli import _export_files as export_files
from interactions_client.cli._errors import EXIT_OK
from interactions_client.client import InteractionsClient
from interactions_client.subscription import SubscriptionBatch


def parse_partition(text: str) -> tuple[int, int]:
    """I/N: partition I (from 0) of N."""
    index, slash, count = text.partition("/")
    if not slash or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"{text!r} is not a partition I/N with 0 <= I < N (e.g. 0/4)")
    return int(index), int(count)


def add_command(commands: Any, common: argparse.ArgumentParser, event_type: Any) -> None:
    tail = commands.add_parser(
        "tail", parents=[common], help="print events as JSONL as they are committed (and the cursor on exit)"
    )
    tail.add_argument(
        "--type", dest="event_types", type=event_type, action="append", default=[],
        help="only this type (a seed name, or 'custom'); repeatable",
    )  # fmt: skip
    tail.add_argument("--from-start", action="store_true", help="from the oldest event still in the log")
    tail.add_argument("--cursor", default="", help="continue after this cursor (printed by an earlier tail)")
    tail.add_argument("--partition", type=parse_partition, help="I/N: only partition I of N (by a hash of user_id)")


def _lines(batch: SubscriptionBatch) -> list[str]:
    rows = export_files.EVENTS.to_columns(batch.events)
    names = export_files.EVENTS.names
    lines = [
        json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False, default=_json_default) + "\n"
        for row in zip(*(rows[name] for name in names), strict=True)
    ]
    for deletion in batch.deletions:
        record = {"user_id": deletion.user_id, "deleted_at": to_datetime(deletion.deleted_at)}
        lines.append(json.dumps({"user_deleted": record}, ensure_ascii=False, default=_json_default) + "\n")
    return lines


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return export_files.rfc3339(value)
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


async def run(client: InteractionsClient, args: argparse.Namespace) -> int:
    subscription = client.subscribe(
        event_types=args.event_types,
        start="earliest" if args.from_start else "now",
        cursor=args.cursor,
        partition=args.partition,
    )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        # Closing ends the subscription's call whatever gRPC makes of a cancelled read (it can answer
        # one as a CANCELLED call); cancelling ends a wait between reconnections too.
        subscription.close()
        task.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C and SIGTERM alike
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
        for number in signals:
            loop.add_signal_handler(number, stop)
    try:
        async for batch in subscription:
            sys.stdout.writelines(_lines(batch))
            sys.stdout.flush()
    except asyncio.CancelledError:
        task.uncancel()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for number in signals:
                loop.remove_signal_handler(number)
        if subscription.cursor:
            sys.stderr.write(f"cursor {subscription.cursor}\n")
            sys.stderr.flush()
    return EXIT_OK
