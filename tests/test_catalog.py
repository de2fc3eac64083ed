"""The rule catalog, read from the schema, matches the seed's summary table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from interactions_client.catalog import catalog_row
from interactions_client.rules import CUSTOM, RULES, STANDARD
from interactions_client.v1.event_pb2 import EventType

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "interaction-types.md"


def seed_summary_rows() -> list[tuple[str, ...]]:
    rows = []
    for line in SEED.read_text().splitlines():
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append(tuple(cells))
    return rows


@pytest.mark.skipif(not SEED.exists(), reason="the seed spec lives in ../shared beside the repository")
def test_catalog_matches_the_seed_summary_table_row_by_row() -> None:
    seed = seed_summary_rows()
    assert len(seed) == 18
    ours = [catalog_row(RULES[n]) for n in range(1, 19)]
    assert ours == seed


def test_enum_numbers_and_stored_names() -> None:
    assert EventType.EVENT_TYPE_UNSPECIFIED == 0
    assert [STANDARD[n].event_type for n in ("view", "click", "add_to_cart")] == [1, 2, 3]
    assert STANDARD["logout"].event_type == EventType.EVENT_TYPE_LOGOUT == 18
    assert len(STANDARD) == 18
    assert CUSTOM.ml_weight is None
    assert CUSTOM.name not in STANDARD


def test_catalog_command_prints_every_type() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "interactions_client.catalog"], capture_output=True, text=True, check=True
    ).stdout
    for name in STANDARD:
        assert f" {name} " in out
    assert "purchase_history" in out
