"""(n): bulk ingest while a per-type retention deletes a month of rows (issue 21).

`retention_events` page_view events dated 8 to 28 days ago (one month's
partition or two, other types' rows beside them untouched) are streamed in
first; then (b)'s stream runs again, and at the instant its clock starts
`interactions-server retention --retention-days-by-type page_view=7` starts
in its own process and deletes them: rows, not partitions (the months hold
other types' rows as far as the policy knows), by time slices of about 5,000
rows with a pause after each as long as the batch took. Reported: the
stream's rate beside (b)'s rate alone in the same run (target of the issue:
bounded cost, here >= 0.5 of alone), the retention's duration and rows
removed, and the overlap (a retention that ends long before the stream
measures little). The log is then checked: no page_view older than 7 days,
every event of the stream present.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import asyncpg

from bench import database
from bench.measures import SEED_BULK, Bench, Throughput, stream_run
from bench.services import server_command
from bench.workload import uuid7
from interactions_client import InteractionsClient
from interactions_client.rules import STANDARD
from interactions_client.v1.event_pb2 import Event

DAY = 86_400.0
OLDEST_DAYS, NEWEST_DAYS = 28.0, 8.0  # the old rows' age; the policy keeps 7 days of page_view
POLICY = "page_view=7"
SEED_RETENTION = 13


@dataclass(slots=True)
class RetentionBeside:
    old_rows: int  # page_view rows the retention had to delete
    removed: int  # rows it reported removed
    retention_seconds: float
    overlap_seconds: float  # of the stream's run, the part during which the retention ran
    run: Throughput  # the stream beside the retention
    errors: list[str] = field(default_factory=list)


def old_views(rnd: random.Random, count: int, now: float) -> list[Event]:
    span = (OLDEST_DAYS - NEWEST_DAYS) * DAY
    events = []
    for i in range(count):
        at = now - OLDEST_DAYS * DAY + span * i / max(count, 1)
        user = rnd.randrange(10_000)
        event = Event(
            event_id=uuid7(int(at * 1000), rnd.getrandbits(80)),
            event_type=STANDARD["page_view"].event_type,  # type: ignore[arg-type]
            user_id=f"old-user-{user}",
            session_id=f"old-sess-{user}-{int(at) // 1800}",
        )
        event.occurred_at.FromMicroseconds(int(at * 1_000_000))
        event.page_view.page_path = "/deals"
        events.append(event)
    return events


async def _removed(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Waits for `interactions-server retention`; the rows it says it removed, and its output."""
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    removed = 0
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        count = value.strip().replace(",", "")
        if name == "events" and count.isdigit():
            removed = int(count)
    return removed, text


async def run(bench: Bench) -> RetentionBeside:
    count = bench.config.retention_events
    now = time.time()
    old = old_views(random.Random(bench.seed(SEED_RETENTION)), count, now)
    errors: list[str] = []
    await database.reset_log(bench.url)
    bench.progress(f"(n) streaming {count:,} page_view events dated {NEWEST_DAYS:.0f}-{OLDEST_DAYS:.0f} days ago")
    async with (
        InteractionsClient(bench.server.target) as client,
        client.stream(validate=False, raise_on_failure=False) as streamer,
    ):
        for event in old:
            await streamer.send(event)
    if streamer.totals.accepted != count:
        errors.append(f"the old rows: {streamer.totals}")
    command = [*server_command(), "retention", "--database-url", bench.url, "--retention-days-by-type", POLICY]
    retention: dict[str, float | asyncio.subprocess.Process] = {}

    async def start_retention() -> None:
        retention["began"] = time.monotonic()
        retention["process"] = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )

    result, _ = await stream_run(
        bench,
        label="(n) bulk beside a page_view retention",
        seed=bench.seed(SEED_BULK),
        events=bench.config.events,
        reset=False,
        beside=start_retention,
    )
    stream_end = time.monotonic()
    process = retention["process"]
    assert isinstance(process, asyncio.subprocess.Process)
    removed, output = await _removed(process)
    ended = time.monotonic()
    retention_began = float(retention["began"])  # type: ignore[arg-type]
    if process.returncode != 0:
        errors.append(f"interactions-server retention exited {process.returncode}: {output[-500:]}")
    stream_began = stream_end - result.seconds
    overlap = max(0.0, min(stream_end, ended) - max(stream_began, retention_began))
    errors.extend(await _check(bench.url, now, bench.config.events))
    measured = RetentionBeside(count, removed, ended - retention_began, overlap, result, errors)
    bench.progress(
        f"(n) the stream {result.rate:,.0f} events/s beside a retention of {removed:,} rows "
        f"({measured.retention_seconds:.1f} s, {overlap:.1f} s of overlap)"
    )
    return measured


async def _check(url: str, now: float, stream_events: int) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            """SELECT count(*) FILTER (WHERE event_type = 'page_view' AND occurred_at < to_timestamp($1)) AS kept_old,
                      count(*) AS events
               FROM events""",
            now - 7 * DAY,
        )
    finally:
        await connection.close()
    errors = []
    if row["kept_old"]:
        errors.append(f"{row['kept_old']:,} page_view rows older than 7 days left")
    if row["events"] != stream_events:
        errors.append(f"the log holds {row['events']:,} events, the stream sent {stream_events:,}")
    return errors
