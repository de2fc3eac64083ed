"""`interactions`: log events, import files, read state and check health from a shell.

Exit status: 0 success; 1 failure (unreachable, refused, events not
confirmed, not serving); 2 usage error; 3 an import finished but some lines
were rejected or malformed (see FILE.rejected.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client import analytics_cli
from interactions_client.catalog import HEADER, PRODUCT_LABELS, SYNC_LABELS, VALUE_LABELS, catalog_row, format_table
from interactions_client.channel import DEFAULT_DEADLINE, TlsConfig, default_target
from interactions_client.client import InteractionsClient
from interactions_client.errors import InteractionsError, InvalidArgumentError
from interactions_client.events import new_event
from interactions_client.export_files import UsageError
from interactions_client.jsonl_import import RejectedLines, import_jsonl, rejected_path_for
from interactions_client.progress import Progress
from interactions_client.rules import RULES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED_LINES = 3

# CLI options that fill the fields of a type's details payload (rules decide which payload).
_DETAIL_OPTIONS = ("query", "page_path", "referrer", "product_name", "quantity", "action")


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command's name.
    After it they carry no defaults, so that they never reset a value given before it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    add = parser.add_argument
    add(
        "--target",
        default=default(default_target()),
        help="host:port (default: $INTERACTIONS_TARGET or localhost:50051)",
    )
    add("--tls", action="store_true", default=default(False), help="use TLS (implied by the certificate options)")
    add("--ca-cert", type=Path, default=default(None), help="PEM root certificates to trust (default: the system's)")
    add("--client-cert", type=Path, default=default(None), help="PEM client certificate chain, for mutual TLS")
    add("--client-key", type=Path, default=default(None), help="PEM private key of --client-cert")
    add(
        "--token",
        default=default(os.environ.get("INTERACTIONS_TOKEN") or None),
        help="bearer token for a server with --auth-tokens (default: $INTERACTIONS_TOKEN)",
    )
    add("--deadline", type=float, default=default(DEFAULT_DEADLINE), help="seconds per call (default: 10)")
    add("--json", action="store_true", default=default(False), help="print JSON for scripts instead of tables")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _add_common_options(
        argparse.ArgumentParser(prog="interactions", description="Client of the Interactions service."), defaults=True
    )
    common = _add_common_options(argparse.ArgumentParser(add_help=False), defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = commands.add_parser(
        "import", parents=[common], help="stream a JSONL file of events (protobuf JSON, one per line)"
    )
    imp.add_argument("file", type=Path)
    imp.add_argument("--rejected", type=Path, help="where rejected lines go (default: FILE.rejected.jsonl)")
    imp.add_argument("--batch-size", type=int, default=500)
    imp.add_argument(
        "--retry-timeout", type=float, default=60.0, help="seconds to keep reconnecting before giving up (default: 60)"
    )

    log = commands.add_parser("log", parents=[common], help="log one event")
    log.add_argument("--type", required=True, dest="event_type", help="a seed type (see `types`) or a custom name")
    log.add_argument("--user", required=True)
    log.add_argument("--product")
    log.add_argument("--value", type=int, help="event_value (default: the type's default)")
    log.add_argument("--session")
    log.add_argument("--query", help="search: the search term")
    log.add_argument("--page-path", help="page_view")
    log.add_argument("--referrer", help="page_view")
    log.add_argument("--product-name", help="product_view")
    log.add_argument("--quantity", type=int, help="cart_add, cart_remove, cart_update")
    log.add_argument("--action", help="cart and wishlist session actions")
    log.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE", help="an attribute (repeatable)")
    log.add_argument("--occurred-at", type=datetime.fromisoformat, help="ISO 8601 with offset (default: now)")
    log.add_argument("--event-id", help="a UUID (default: a new one)")

    for name, what in (("cart", "the user's cart"), ("wishlist", "the user's wishlist"), ("purchases", "purchases")):
        reader = commands.add_parser(name, parents=[common], help=f"print {what}")
        reader.add_argument("user")

    delete = commands.add_parser(
        "delete-user", parents=[common], help="delete everything stored about a user (needs the admin scope)"
    )
    delete.add_argument("user")
    delete.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")

    commands.add_parser("types", parents=[common], help="print the event type catalog")
    health = commands.add_parser("health", parents=[common], help="exit 0 only when the service is SERVING")
    health.add_argument("--service", default="", help="a service name (default: the server as a whole)")
    analytics_cli.add_commands(commands, common)
    return parser


def _tls(args: argparse.Namespace) -> TlsConfig | bool:
    if args.ca_cert or args.client_cert or args.client_key:
        return TlsConfig.from_files(args.ca_cert, args.client_cert, args.client_key)
    return bool(args.tls)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=None, ensure_ascii=False) + "\n")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    sys.stdout.write(format_table(header, rows) + "\n")


def _time(ts: Timestamp) -> str:
    return ts.ToJsonString() if ts.seconds or ts.nanos else ""


def _attributes(pairs: list[str]) -> dict[str, str]:
    attributes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--attr {pair!r}: expected KEY=VALUE")
        attributes[key] = value
    return attributes


async def _log(client: InteractionsClient, args: argparse.Namespace) -> int:
    details = {name: getattr(args, name) for name in _DETAIL_OPTIONS if getattr(args, name) is not None}
    event = new_event(
        args.event_type,
        args.user,
        product_id=args.product,
        value=args.value,
        details=details or None,
        session_id=args.session,
        attributes=_attributes(args.attr),
        occurred_at=args.occurred_at,
        event_id=args.event_id,
    )
    if args.occurred_at is None:
        # The server's receive time instead of ours: re-running the same command
        # with --event-id is then recognised as a resend, not a second event.
        event.ClearField("occurred_at")
    result = await client.log(event)
    if args.json:
        _print_json({"event_id": result.event_id, "duplicate": result.duplicate})
    else:
        sys.stdout.write(f"{'duplicate' if result.duplicate else 'logged'} {result.event_id}\n")
    return EXIT_OK


async def _cart(client: InteractionsClient, args: argparse.Namespace) -> int:
    items = await client.get_cart(args.user)
    rows = [{"product_id": i.product_id, "quantity": i.quantity, "updated_at": _time(i.updated_at)} for i in items]
    _print_rows(args, rows, ("product_id", "quantity", "updated_at"))
    return EXIT_OK


async def _wishlist(client: InteractionsClient, args: argparse.Namespace) -> int:
    items = await client.get_wishlist(args.user)
    rows = [{"product_id": i.product_id, "added_at": _time(i.added_at)} for i in items]
    _print_rows(args, rows, ("product_id", "added_at"))
    return EXIT_OK


async def _purchases(client: InteractionsClient, args: argparse.Namespace) -> int:
    rows = [
        {
            "event_id": p.event_id,
            "product_id": p.product_id,
            "purchased_at": _time(p.purchased_at),
            "session_id": p.session_id,
        }
        async for p in client.list_purchases(args.user)
    ]
    _print_rows(args, rows, ("event_id", "product_id", "purchased_at", "session_id"))
    return EXIT_OK


def _print_rows(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if args.json:
        _print_json(rows)
    elif rows:
        _print_table(columns, [[str(row[c]) for c in columns] for row in rows])
    else:
        sys.stdout.write("(none)\n")


async def _health(client: InteractionsClient, args: argparse.Namespace) -> int:
    serving = await client.health(args.service)
    if args.json:
        _print_json({"serving": serving})
    else:
        sys.stdout.write("SERVING\n" if serving else "NOT SERVING\n")
    return EXIT_OK if serving else EXIT_FAILED


async def _delete_user(client: InteractionsClient, args: argparse.Namespace) -> int:
    response = await client.delete_user_data(args.user, dry_run=args.dry_run)
    counts = {
        "events": response.events_deleted,
        "cart_lines": response.cart_lines_deleted,
        "wishlist_lines": response.wishlist_lines_deleted,
        "purchases": response.purchases_deleted,
    }
    if args.json:
        _print_json({**counts, "deleted_through": _time(response.deleted_through), "dry_run": args.dry_run})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        _print_table((verb, "count"), [(name, f"{count:,}") for name, count in counts.items()])
        if not args.dry_run:
            sys.stdout.write(f"events of {args.user} up to {_time(response.deleted_through)} are refused from now on\n")
    return EXIT_OK


async def _import(client: InteractionsClient, args: argparse.Namespace) -> int:
    source: BinaryIO = args.source  # opened by main(), outside the event loop
    rejected = RejectedLines(args.rejected or rejected_path_for(args.file))
    progress = Progress(sys.stderr, os.fstat(source.fileno()).st_size)
    totals = await import_jsonl(
        client,
        source,
        rejected=rejected,
        progress=progress,
        batch_size=args.batch_size,
        retry_timeout=args.retry_timeout,
    )
    if args.json:
        _print_json(totals.as_dict())
    else:
        rate = (totals.accepted + totals.duplicate + totals.rejected) / max(totals.seconds, 1e-9)
        rows = [
            (name, f"{getattr(totals, name):,}")
            for name in ("lines", "accepted", "duplicate", "rejected", "malformed", "failed")
        ]
        rows.append(("seconds", f"{totals.seconds:.1f} ({rate:,.0f} events/s)"))
        _print_table(("", "count"), rows)
        if totals.rejected_file:
            sys.stdout.write(f"rejected and malformed lines, with reasons: {totals.rejected_file}\n")
        if totals.failed:
            sys.stdout.write("some events were not confirmed; run the same import again (duplicates are skipped)\n")
    if totals.failed:
        return EXIT_FAILED
    return EXIT_REJECTED_LINES if totals.rejected or totals.malformed else EXIT_OK


def _types(args: argparse.Namespace) -> int:
    rules = list(RULES.values())
    if args.json:
        _print_json(
            [
                {
                    "event_type": r.event_type,
                    "name": r.name,
                    "description": r.description,
                    "event_value": VALUE_LABELS[r.value],
                    "default_value": r.default_value,
                    "product_id": PRODUCT_LABELS[r.product_id],
                    "details": r.details,
                    "session_required": r.session_required,
                    "sync": SYNC_LABELS[r.sync],
                    "ml_weight": r.ml_weight,
                }
                for r in rules
            ]
        )
    else:
        _print_table(HEADER, [catalog_row(r) for r in rules])
    return EXIT_OK


_CLIENT_COMMANDS = {
    "import": _import,
    "log": _log,
    "cart": _cart,
    "wishlist": _wishlist,
    "purchases": _purchases,
    "health": _health,
    **analytics_cli.COMMANDS,
    "delete-user": _delete_user,
}


async def _run(args: argparse.Namespace) -> int:
    async with InteractionsClient(args.target, tls=_tls(args), deadline=args.deadline, token=args.token) as client:
        return await _CLIENT_COMMANDS[args.command](client, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "types":  # the catalog compiled into this client; no server needed
            return _types(args)
        analytics_cli.check_usage(args)
        with contextlib.ExitStack() as files:
            if args.command == "import":
                args.source = files.enter_context(args.file.open("rb"))
            return asyncio.run(_run(args))
    except UsageError as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_USAGE
    except InvalidArgumentError as error:
        sys.stderr.write(f"error: {error.reason}\n")
        for violation in error.violations:
            sys.stderr.write(f"  {violation.field}: {violation.description}\n")
        return EXIT_FAILED
    except (InteractionsError, OSError, ValueError) as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
