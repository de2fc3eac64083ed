"""examples/train_recommender.py runs on an export made against the real server:
two groups of shoppers with their own products; a shopper of the first group is
recommended the first group's products they have not touched, by implicit's ALS
and by the numpy item-item similarity, from .parquet and .csv exports."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from interactions_client import InteractionsClient
from interactions_client.events import new_event
from interactions_client.v1.event_pb2 import Event
from interactions_server.server import App
from tests.test_analytics_client import at
from tests.test_cli import Run, cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_recommender.py"
TYPES = ("view", "click", "add_to_cart", "purchase")


def two_groups() -> list[Event]:
    """Shoppers a0-a7 touch products A1-A4 and b0-b7 products B1-B4 (each shopper
    three of the four, a different one left out); a0 has touched only A1 and A2."""
    events = []
    for group in ("a", "b"):
        for shopper in range(8):
            user = f"{group}{shopper}"
            products = [f"{group.upper()}{p}" for p in range(1, 5) if p != shopper % 4 + 1]
            if user == "a0":
                products = ["A1", "A2"]
            for n, product in enumerate(products):
                kind = TYPES[(shopper + n) % len(TYPES)]
                events.append(new_event(kind, user, product_id=product, occurred_at=at(shopper * 10 + n)))
    return events


async def run_example(*args: str | Path) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def recommended(run: Run) -> list[str]:
    assert run.status == 0, run
    lines = run.stdout.splitlines()
    assert lines[1] == "recommendations for a0:"
    return [line.split()[1] for line in lines[2:]]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
async def test_recommender_trains_on_the_export(server: App, tmp_path: Path, suffix: str) -> None:
    events = two_groups()
    async with InteractionsClient(server.address) as client:
        assert (await client.log_many(events)).accepted == len(events)
    out = tmp_path / f"train{suffix}"
    run = await cli("export", "training", "--out", str(out), "--half-life", "30d", "--target", server.address)
    assert run.status == 0, run

    for method in ("als", "item-item"):
        picks = recommended(await run_example(out, "--user", "a0", "--method", method, "--top", "4"))
        assert sorted(picks[:2]) == ["A3", "A4"], (method, picks)
        assert "A1" not in picks and "A2" not in picks  # already touched

    missing = await run_example(out, "--user", "nobody")
    assert missing.status == 1 and "nobody has no row" in missing.stderr
