"""`interactions`: log events, import files, read state and check health from a shell.

Exit status: 0 success; 1 failure (unreachable, refused, events not
confirmed, not serving); 2 usage error; 3 an import finished but some lines
were rejected or malformed (see FILE.rejected.jsonl). With --json a failure
is also an object on stdout: {"error": {"code", "message", "violations"}}
(_errors.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.catalog import HEADER, PRODUCT_LABELS, SYNC_LABELS, VALUE_LABELS, catalog_row, format_table
from interactions_client.channel import DEFAULT_DEADLINE, TlsConfig, default_target
from interactions_client.cli import _analytics as analytics_cli
from interactions_client.cli import _lifecycle as lifecycle_cli
from interactions_client.cli import _recommend as recommend_cli
from interactions_client.cli import _tail as tail_cli
from interactions_client.cli._errors import EXIT_FAILED, EXIT_OK, EXIT_REJECTED_LINES, EXIT_USAGE, UsageError, report
from interactions_client.cli._jsonl_import import RejectedLines, import_jsonl, rejected_path_for
from interactions_client.cli._progress import Progress
from interactions_client.cli.args import CliParser, add_ids, count, moment, resolve_ids, seconds, target, whole_number
from interactions_client.client import InteractionsClient
from interactions_client.errors import InteractionsError
from interactions_client.events import new_event
from interactions_client.limits import MAX_BATCH_EVENTS
from interactions_client.rules import CUSTOM, RULES, STANDARD
from interactions_client.v1.event_pb2 import Event

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_REJECTED_LINES", "EXIT_USAGE", "build_parser", "main"]

STDIN = Path("-")
STDIN_REJECTED = Path("stdin.rejected.jsonl")
"""Where `import -` writes rejected lines unless --rejected says otherwise."""

# CLI options that fill the fields of a type's details payload (rules decide which payload).
_DETAIL_OPTIONS = ("query", "page_path", "referrer", "product_name", "quantity", "action", "anonymous_id")


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command's name.
    After it they carry no defaults, so that they never reset a value given before it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    add = parser.add_argument
    add(
        "--target",
        type=target,
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
    add("--deadline", type=seconds, default=default(DEFAULT_DEADLINE), help="seconds per call (default: 10)")
    add("--json", action="store_true", default=default(False), help="print JSON for scripts instead of tables")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _add_common_options(
        CliParser(prog="interactions", description="Client of the Interactions service."), defaults=True
    )
    common = _add_common_options(CliParser(add_help=False), defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = commands.add_parser(
        "import", parents=[common], help="stream a JSONL file of events (protobuf JSON, one per line)"
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="a .jsonl file, or - for standard input")
    imp.add_argument(
        "--rejected", type=Path, help=f"where rejected lines go (default: FILE.rejected.jsonl, {STDIN_REJECTED} for -)"
    )
    imp.add_argument("--batch-size", type=count(1, MAX_BATCH_EVENTS), default=500)
    imp.add_argument(
        "--retry-timeout",
        type=seconds,
        default=60.0,
        help="seconds to keep reconnecting before giving up (default: 60)",
    )

    log = commands.add_parser("log", parents=[common], help="log one event")
    log.add_argument("--type", required=True, dest="event_type", help="a type of the catalog (see `types`)")
    log.add_argument("--custom", action="store_true", help="log --type as a custom type (outside the catalog)")
    log.add_argument("--user", required=True, metavar="USER", help="the user id")
    log.add_argument("--product")
    log.add_argument("--value", type=whole_number, help="event_value (default: the type's default)")
    log.add_argument("--session")
    log.add_argument("--query", help="search: the search term")
    log.add_argument("--page-path", help="page_view")
    log.add_argument("--referrer", help="page_view")
    log.add_argument("--product-name", help="product_view")
    log.add_argument("--quantity", type=whole_number, help="cart_add, cart_remove, cart_update")
    log.add_argument("--action", help="cart and wishlist session actions")
    log.add_argument("--anonymous-id", help="login: the id the user had as a guest, linked to --user")
    log.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE", help="an attribute (repeatable)")
    log.add_argument("--occurred-at", type=moment, help="ISO 8601 with offset (default: now)")
    log.add_argument("--event-id", help="a UUID (default: a new one)")

    for name, what in (("cart", "the user's cart"), ("wishlist", "the user's wishlist"), ("purchases", "purchases")):
        reader = commands.add_parser(name, parents=[common], help=f"print {what}")
        add_ids(reader, "user")

    link = commands.add_parser(
        "link",
        parents=[common],
        help="link ANON (a guest's id) to USER: its events, cart, wishlist and purchases become the user's "
        "(needs the identity:write scope)",
        usage="interactions link ANON USER [--occurred-at TIME] [options]",
    )
    add_ids(link, "anon", "user")
    link.add_argument("--occurred-at", type=moment, help="when the link happened, ISO 8601 with offset (default: now)")
    identity = commands.add_parser(
        "identity",
        parents=[common],
        help="print the user ID belongs to and the anonymous ids linked to that user",
        usage="interactions identity ID [options]",
    )
    add_ids(identity, "id")

    delete = commands.add_parser(
        "delete-user", parents=[common], help="delete everything stored about a user (needs the admin scope)"
    )
    add_ids(delete, "user")
    delete.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")

    commands.add_parser("types", parents=[common], help="print the event type catalog")
    health = commands.add_parser("health", parents=[common], help="exit 0 only when the service is SERVING")
    health.add_argument("--service", default="", help="a service name (default: the server as a whole)")
    analytics_cli.add_commands(commands, common)
    lifecycle_cli.add_commands(commands, common)
    recommend_cli.add_commands(commands, common)
    tail_cli.add_command(commands, common, analytics_cli.parse_event_type)
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
        if not sep or not key:
            raise UsageError(f"--attr '{pair}': expected KEY=VALUE", command="interactions log")
        attributes[key] = value
    return attributes


def _checked_type(args: argparse.Namespace) -> str:
    """--type, checked against the catalog: a name outside it needs --custom."""
    name: str = args.event_type
    if args.custom:
        if name in STANDARD or name == CUSTOM.name:
            raise UsageError(f"'{name}' is a type of the catalog; drop --custom", command="interactions log")
    elif name not in STANDARD:
        hint = (
            "name the custom type instead, e.g. --type gift_card_redeemed --custom"
            if name == CUSTOM.name
            else "see `interactions types`; add --custom to log it as a custom type"
        )
        raise UsageError(f"unknown event type '{name}' ({hint})", command="interactions log")
    return name


def _checked_details(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The detail options given, each checked to be a field of the type's details payload."""
    details = {option: getattr(args, option) for option in _DETAIL_OPTIONS if getattr(args, option) is not None}
    rule = STANDARD.get(name, CUSTOM)
    fields = getattr(Event(), rule.details).DESCRIPTOR.fields_by_name if rule.details else {}
    if unknown := [option for option in details if option not in fields]:
        options = " and ".join("--" + option.replace("_", "-") for option in unknown)
        raise UsageError(f"{options}: not an option of {name} events", command="interactions log")
    return details


async def _log(client: InteractionsClient, args: argparse.Namespace) -> int:
    event_type = _checked_type(args)
    details = _checked_details(event_type, args)
    event = new_event(
        event_type,
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
    try:
        serving = await client.health(args.service)
    except InteractionsError as error:  # a probe's answer all the same: not serving
        return report(error, as_json=args.json, fields={"serving": False})
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


async def _link(client: InteractionsClient, args: argparse.Namespace) -> int:
    result = await client.link_identity(args.anon, args.user, occurred_at=args.occurred_at)
    if args.json:
        _print_json(
            {
                "anonymous_id": args.anon,
                "user_id": args.user,
                "already_linked": result.already_linked,
                "events_moved": result.events_moved,
            }
        )
    elif result.already_linked:
        sys.stdout.write(f"{args.anon} was already linked to {args.user}; nothing changed\n")
    else:
        sys.stdout.write(f"linked {args.anon} to {args.user}: {result.events_moved:,} events moved\n")
    return EXIT_OK


async def _identity(client: InteractionsClient, args: argparse.Namespace) -> int:
    identity = await client.get_identity(args.id)
    if args.json:
        _print_json({"user_id": identity.user_id, "anonymous_ids": identity.anonymous_ids})
    else:
        _print_table(("user_id", "anonymous_ids"), [(identity.user_id, ", ".join(identity.anonymous_ids) or "(none)")])
    return EXIT_OK


async def _import(client: InteractionsClient, args: argparse.Namespace) -> int:
    source: BinaryIO = args.source  # opened by main(), outside the event loop
    await client.connect()  # before any progress: an unreachable server is one clear line
    default_rejected = STDIN_REJECTED if args.file == STDIN else rejected_path_for(args.file)
    rejected = RejectedLines(args.rejected or default_rejected)
    progress = Progress(sys.stderr, os.fstat(source.fileno()).st_size)
    totals = await import_jsonl(
        client,
        source,
        rejected=rejected,
        progress=progress,
        batch_size=args.batch_size,
        retry_timeout=args.retry_timeout,
    )
    if totals.failure is not None:
        # The totals still count every line read; the error says why events were not confirmed.
        report(totals.failure, as_json=args.json, fields=totals.as_dict())
    elif args.json:
        _print_json(totals.as_dict())
    if not args.json:
        rate = (totals.accepted + totals.duplicate + totals.rejected) / max(totals.seconds, 1e-9)
        rows = [
            (name, f"{getattr(totals, name):,}")
            for name in ("lines", "accepted", "duplicate", "rejected", "malformed", "blank", "failed")
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
    "link": _link,
    "identity": _identity,
    **recommend_cli.COMMANDS,
    "delete-user": _delete_user,
    **lifecycle_cli.COMMANDS,
    "tail": tail_cli.run,
}


async def _run(args: argparse.Namespace) -> int:
    async with InteractionsClient(args.target, tls=_tls(args), deadline=args.deadline, token=args.token) as client:
        return await _CLIENT_COMMANDS[args.command](client, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv  # known even when parsing fails
    try:
        args = build_parser().parse_args(argv)
        if args.command == "types":  # the catalog compiled into this client; no server needed
            return _types(args)
        resolve_ids(args, f"interactions {args.command}")
        analytics_cli.check_usage(args)
        lifecycle_cli.check_usage(args, argv)
        with contextlib.ExitStack() as files:
            if args.command == "import":
                args.source = sys.stdin.buffer if args.file == STDIN else files.enter_context(args.file.open("rb"))
            return asyncio.run(_run(args))
    except (UsageError, InteractionsError, OSError) as error:
        return report(error, as_json=as_json)
    except ValueError as error:  # an option value the client refused (e.g. a certificate without its key)
        return report(UsageError(str(error)), as_json=as_json)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
