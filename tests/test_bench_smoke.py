"""The benchmark runs end to end at tiny sizes and prints every measure.

Slow (it starts PostgreSQL, the server, a no-op server and client processes):
run with `scripts/test -m slow`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The start of the table row of every measure, (a) to (n), (k2), (r) and (s).
MEASURE_ROWS = (
    "(a) DB ceiling",
    "(b) bulk StreamEvents",
    "(c) RPC ceiling",
    "(c) CPU per call",
    "(d) LogEvent, 64 callers",
    "(d) CPU per call",
    "(d) LogEvent p50",
    "(d) LogEvent p99",
    "(e) server RSS peak",
    "(e) server RSS at end",
    "(e) RSS last quarter",
    "(f) bulk with",
    "(g) fan-out 1 stream",
    "(g) fan-out 4 streams",
    "(g) fan-out 16 streams",
    "(h) COPY (export query) TO STDOUT",
    "(h) ExportEvents through the client",
    "(i) ExportTrainingData",
    "(i) server RSS during the export",
    "(j) TopSearchQueries",
    "(j) CountActiveUsers",
    "(k) LogEvent p50 at 200 calls/s during a bulk stream",
    "(k) LogEvent p99 at 200 calls/s during a bulk stream",
    "(k) LogEvent max at 200 calls/s during a bulk stream",
    "(k) the bulk stream meanwhile",
    "(l) late LogEvent p50",
    "(l) late LogEvent p99",
    "(l) late LogEvent max",
    "(l) CPU per late LogEvent",
    "(m) LinkIdentity, guest of 100 events, p50",
    "(m) LinkIdentity, guest of 100 events, p99",
    "(n) bulk beside a page_view retention",
    "(n) the retention meanwhile",
    "(k2) 1 worker, 1 conn.: LogEvent",
    "(k2) 1 worker, 1 conn.: the stream beside LogEvent",
    "(k2) 2 workers, 2 conn.: LogEvent",
    "(k2) 2 workers, 2 conn.: the stream beside LogEvent",
    "(r) maintainer catching up on",
    "(r) RecentlyViewed p99 at 50 calls/s",
    "(r) TrendingProducts p99 at 50 calls/s",
    "(r) FrequentlyBoughtTogether CPU per call",
    "(r) freshness alone",
    "(r) freshness beside a bulk stream",
    "(r) freshness beside a stream at half its full rate",
    "(r) the same paced at half that rate",
    "(s) (b) xid + BRIN (0009)",
    "(s) (b) no xid column",
    "(s) (b) xid + B-tree",
    "(s) (b) xid + BRIN + NOTIFY",
    "(s) (b) with 8 subscribers attached",
    "(s) commit -> delivery, 1 subscriber(s)",
    "(s) commit -> delivery, 8 subscriber(s)",
    "(s) server RSS, a consumer at",
)


@pytest.mark.slow
def test_quick_run_prints_every_measure(request: pytest.FixtureRequest) -> None:
    # Nothing deselects slow tests by default yet, so this one opts out itself.
    if "slow" not in str(request.config.getoption("markexpr", "")):
        pytest.skip("slow: run with -m slow")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for start in MEASURE_ROWS:
        row = next((line for line in lines if line.startswith(start)), None)
        assert row is not None, f"no {start!r} row in:\n{done.stdout}"
        assert "VOID" not in row, row  # every event and call of the run succeeded
    assert "CPU (cores busy" in done.stdout
