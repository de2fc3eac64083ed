"""The recommendation commands of `interactions` (_main.py adds them):
recently-viewed, trending, bought-together, also-viewed, affinities. Users
and products are named like everywhere in the command (--user USER,
--product PRODUCT, or positionally: `recently-viewed U`, `bought-together P`)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from interactions_client.analytics import to_datetime
from interactions_client.cli import _analytics as analytics_cli
from interactions_client.cli._errors import EXIT_OK
from interactions_client.cli.args import add_ids
from interactions_client.client import InteractionsClient
from interactions_client.recommendations import ScoredProduct

COLUMNS = ("product_id", "score", "support", "last_occurred_at")


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds the recommendation commands to _main.py's subparsers."""

    def shared(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=int, default=0, help="at most this many (default 10, at most 100)")
        parser.add_argument(
            "--exclude", action="append", default=[], metavar="PRODUCT", help="leave this product out; repeatable"
        )

    viewed = commands.add_parser(
        "recently-viewed", parents=[common], help="a user's recently viewed products, newest first"
    )
    add_ids(viewed, "user")
    shared(viewed)
    viewed.add_argument("--exclude-purchased", action="store_true", help="leave out the products the user bought")
    viewed.add_argument("--exclude-in-cart", action="store_true", help="leave out the products in the user's cart")
    trending = commands.add_parser("trending", parents=[common], help="the trending products of the shop")
    trending.add_argument("--window", type=analytics_cli.parse_duration, help="e.g. 24h (default 7d)")
    trending.add_argument("--half-life", type=analytics_cli.parse_duration, help="e.g. 6h (default 1d)")
    shared(trending)
    bought = commands.add_parser(
        "bought-together", parents=[common], help="the products bought together with a product"
    )
    add_ids(bought, "product")
    shared(bought)
    also = commands.add_parser("also-viewed", parents=[common], help="the products viewed together with a product")
    add_ids(also, "product")
    shared(also)
    affinities = commands.add_parser(
        "affinities", parents=[common], help="a user's products by training weight, highest first"
    )
    add_ids(affinities, "user")
    shared(affinities)
    affinities.add_argument(
        "--half-life", type=analytics_cli.parse_duration, help="time decay, e.g. 30d (default none)"
    )
    affinities.add_argument("--exclude-in-cart", action="store_true", help="leave out the products in the user's cart")


def _print(products: list[ScoredProduct], args: argparse.Namespace) -> int:
    rows = [
        {
            "product_id": p.product_id,
            "score": p.score,
            "support": p.support,
            "last_occurred_at": to_datetime(p.last_occurred_at) if p.HasField("last_occurred_at") else None,
        }
        for p in products
    ]
    if args.json:
        analytics_cli._print_json(rows)
    else:
        analytics_cli._print_table(rows, COLUMNS)
    return EXIT_OK


async def _recently_viewed(client: InteractionsClient, args: argparse.Namespace) -> int:
    products = await client.recently_viewed(
        args.user,
        limit=args.limit,
        exclude=args.exclude,
        exclude_purchased=args.exclude_purchased,
        exclude_in_cart=args.exclude_in_cart,
    )
    return _print(products, args)


async def _trending(client: InteractionsClient, args: argparse.Namespace) -> int:
    products = await client.trending_products(
        window=args.window, half_life=args.half_life, limit=args.limit, exclude=args.exclude
    )
    return _print(products, args)


async def _bought_together(client: InteractionsClient, args: argparse.Namespace) -> int:
    return _print(await client.frequently_bought_together(args.product, limit=args.limit, exclude=args.exclude), args)


async def _also_viewed(client: InteractionsClient, args: argparse.Namespace) -> int:
    return _print(await client.also_viewed(args.product, limit=args.limit, exclude=args.exclude), args)


async def _affinities(client: InteractionsClient, args: argparse.Namespace) -> int:
    products = await client.user_affinities(
        args.user,
        half_life=args.half_life,
        limit=args.limit,
        exclude=args.exclude,
        exclude_in_cart=args.exclude_in_cart,
    )
    return _print(products, args)


COMMANDS: dict[str, Callable[[InteractionsClient, argparse.Namespace], Awaitable[int]]] = {
    "recently-viewed": _recently_viewed,
    "trending": _trending,
    "bought-together": _bought_together,
    "also-viewed": _also_viewed,
    "affinities": _affinities,
}
