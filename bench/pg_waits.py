"""Where the database side of a measure waits: pg_stat_activity sampled
every few milliseconds (with --profile). Each sample counts, for every
backend of the server that is not idle, what it is doing: running (CPU),
waiting on a lock, on WAL flush, or on the server to send its next statement
("idle in transaction": the time is spent in the server process)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

import asyncpg

INTERVAL = 0.01

_SAMPLE = """
SELECT state, coalesce(wait_event_type || ':' || wait_event, 'running (CPU)'), left(query, 600)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = current_database()
  AND state <> 'idle' AND query NOT LIKE 'SELECT 1%'
"""


def statement_kind(query: str) -> str:
    """A short name for the statement a backend runs, e.g. "INSERT INTO events"."""
    text = " ".join(query.split())
    if text.startswith("WITH") and (targets := re.findall(r"INSERT INTO (\w+)", text)):
        return f"WITH ... INSERT INTO {' + '.join(dict.fromkeys(targets))}"
    match = re.match(r"(INSERT INTO \w+|SELECT pg_advisory_xact_lock|COPY \w+|SELECT .{0,40}?FROM \w+)", text)
    if match:
        return match.group(1)
    return text[:40] or "(none)"


@dataclass(frozen=True, slots=True)
class WaitSummary:
    samples: int
    busy_backends: float  # mean backends not idle per sample
    by_wait: list[tuple[str, int]]  # (state / wait event, backend samples)
    by_statement: list[tuple[str, int]]  # (statement while active, backend samples)

    def render(self, title: str) -> str:
        total = max(sum(n for _, n in self.by_wait), 1)
        lines = [
            f"{title}: {self.samples} samples of pg_stat_activity every {INTERVAL * 1000:.0f} ms; "
            f"{self.busy_backends:.2f} server backends busy on average",
            "",
            "busy backend time by what it waits for:",
        ]
        lines += [f"  {100.0 * n / total:5.1f}%  {name}" for name, n in self.by_wait]
        lines += ["", "busy backend time by statement (idle in transaction excluded):"]
        active = max(sum(n for _, n in self.by_statement), 1)
        lines += [f"  {100.0 * n / active:5.1f}%  {name}" for name, n in self.by_statement[:12]]
        return "\n".join(lines)


class PgWaitSampler:
    """`async with PgWaitSampler(url) as sampler:` samples until the block ends; then `summary()`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._samples = 0
        self._waits: Counter[str] = Counter()
        self._statements: Counter[str] = Counter()

    async def __aenter__(self) -> PgWaitSampler:
        self._connection = await asyncpg.connect(self.url)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._connection is not None:
            await self._connection.close()

    async def _run(self) -> None:
        assert self._connection is not None
        while True:  # cancelled by __aexit__
            for state, wait, query in await self._connection.fetch(_SAMPLE):
                if state == "active":
                    self._waits[wait] += 1
                    self._statements[statement_kind(query)] += 1
                else:
                    self._waits[f"{state} (waiting for the server process)"] += 1
            self._samples += 1
            await asyncio.sleep(INTERVAL)

    def summary(self) -> WaitSummary:
        busy = sum(self._waits.values())
        return WaitSummary(
            self._samples, busy / max(self._samples, 1), self._waits.most_common(), self._statements.most_common()
        )
