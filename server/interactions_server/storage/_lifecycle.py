"""The SQL of the data lifecycle: the retention policy's removals and purges
by filter (migrations/0010_lifecycle.sql).

Both only remove events from the log, with their dedup keys; the state
tables (carts, wishlists, purchases, and the fold's own history) are never
touched, so what is removed cannot change the state. Everything is bulk work
done in small transactions, paced so that ingest keeps its pace:

- whole months (retention only): the month's partition is detached from the
  log in a moment under lock_timeout (like partition creation; retried when a
  long read holds the log), renamed `<name>_retired`, then walked in batches
  along its (user_id, occurred_at, event_id) index, each batch deleting the
  dedup keys of its rows by primary key, then dropped. Late events of that
  month arriving meanwhile land in the default partition, where the row pass
  finds them;
- everything else (what a shorter per-type retention removes inside a month,
  every purge): one time slice of the log per batch, `DELETE ... RETURNING`
  and the keys of the deleted rows in the same statement; the slice's width
  adapts so that a batch deletes about `Pace.rows` rows in about
  `Pace.seconds`.

After each batch the job pauses in proportion to the batch's duration. Each
batch's transaction also adds what it removed to the run's audit_log record
(audit_add_removed), written by its first removal, so the record counts
exactly what was removed even when a run stops half-way.

For the subscription stream (issue 19, docs/subscribe.md): every removal
records the largest transaction id it removed, in its own transaction
(`note_events_removed`, migrations/0009), so that a subscription positioned
before a removed event is refused instead of skipping it: `_detach` locks the
month against late writes and reads its largest xid before detaching it, and
each row batch of `_remove_slices` records the largest xid it deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from interactions_client.rules import CUSTOM, STANDARD
from interactions_server.config import RetentionPolicy
from interactions_server.keyring import SubjectHash
from interactions_server.storage._analytics import TypeFilter, _types_sql
from interactions_server.storage._audit import AuditRecord, record_audit

_log = logging.getLogger("interactions_server.retention")

RETENTION = "retention"  # audit_log actions
PURGE_EVENTS = "purge_events"
RETIRED_SUFFIX = "_retired"
_STANDARD = sorted(STANDARD)


@dataclass(frozen=True, slots=True)
class Pace:
    """How bulk removal shares the database with ingest."""

    rows: int = 5_000  # rows a batch aims at
    seconds: float = 0.05  # the duration a batch aims at
    pause: float = 1.0  # after each batch, this many times its duration (at least min_pause)
    min_pause: float = 0.005
    lock_timeout: str = "1s"  # the longest a detach may hold up the inserts queued behind it
    lock_retries: int = 5  # tries of a detach whose lock is not free, before leaving it to the next run
    lock_retry_interval: float = 20.0  # seconds
    min_slice: timedelta = timedelta(seconds=1)
    max_slice: timedelta = timedelta(days=31)
    first_slice: timedelta = timedelta(hours=1)


DEFAULT_PACE = Pace()


@dataclass(slots=True)
class Removed:
    """What a run removed (or, on a dry run, would remove)."""

    by_type: dict[str, int] = field(default_factory=dict)  # catalog names and "custom"
    partitions: list[str] = field(default_factory=list)  # months dropped whole
    users: set[str] | None = None  # distinct users (purges only)
    audit_id: int | None = None  # the run's audit_log record (None: nothing removed, or a dry run)
    seconds: float = 0.0
    batches: int = 0
    deferred: list[str] = field(default_factory=list)  # months left for the next run (the log was locked)

    @property
    def events(self) -> int:
        return sum(self.by_type.values())

    def add(self, by_type: Mapping[str, int]) -> None:
        for name, n in by_type.items():
            self.by_type[name] = self.by_type.get(name, 0) + n


# --- where the log's rows are ---------------------------------------------------------

# The monthly partitions with their bounds as PostgreSQL stored them (the
# session's time zone at creation does not matter), and the default
# partition's range.
_PARTITIONS = """
SELECT c.relname, b[1]::timestamptz AS lower, b[2]::timestamptz AS upper
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid,
     regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS b
WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{4}_[0-9]{2}$'
ORDER BY lower
"""
_DEFAULT_RANGE = "SELECT min(occurred_at), max(occurred_at) FROM events_default"


class Partition(NamedTuple):
    name: str
    lower: datetime
    upper: datetime


async def partitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[Partition]:
    return [Partition(*r) for r in await conn.fetch(_PARTITIONS)]


async def _log_range(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[datetime, datetime] | None:
    """[oldest, newest) instants that may hold rows: the monthly partitions'
    bounds and the default partition's rows (historic imports: few)."""
    months = await partitions(conn)
    lowest, highest = await conn.fetchrow(_DEFAULT_RANGE)
    starts = [p.lower for p in months] + ([lowest] if lowest is not None else [])
    ends = [p.upper for p in months] + ([highest + timedelta(microseconds=1)] if highest is not None else [])
    return (min(starts), max(ends)) if starts else None


def _stored(name: str) -> str:
    """The name removals are counted under: a catalog name, or "custom" (never
    a custom type's own name, which is the caller's free text)."""
    return name if name in STANDARD else CUSTOM.name


# --- the retention policy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What a policy removes at `as_of`."""

    cutoffs: dict[str, datetime]  # per catalog name and "custom"; absent: kept for good
    months_before: datetime | None  # every type is removed before it: whole months go (None: some type is kept)

    @classmethod
    def of(cls, policy: RetentionPolicy, as_of: datetime) -> RetentionPlan:
        cutoffs = policy.cutoffs(as_of)
        every_type = len(cutoffs) == len(STANDARD) + 1
        return cls(cutoffs, min(cutoffs.values()) if every_type and cutoffs else None)

    def segments(self, start: datetime) -> list[tuple[datetime, datetime, TypeFilter]]:
        """[from, to) ranges from `start` to the latest cutoff, cut at every
        cutoff, each with the types removed throughout it: the log's old end
        is walked once, whatever the number of different cutoffs."""
        out: list[tuple[datetime, datetime, TypeFilter]] = []
        for cutoff in sorted(set(self.cutoffs.values())):
            if cutoff <= start:
                continue
            names = [n for n, c in self.cutoffs.items() if c >= cutoff]
            types = TypeFilter(sorted(n for n in names if n != CUSTOM.name), CUSTOM.name in names, _STANDARD)
            out.append((start, cutoff, types))
            start = cutoff
        return out

    def describe(self) -> dict[str, str]:
        return {name: cutoff.isoformat() for name, cutoff in sorted(self.cutoffs.items())}


# Every row older than its type's cutoff, counted per stored name: what a run
# at the same instant removes, months dropped whole included.
_COUNT_RETENTION = """
SELECT e.event_type, count(*)
FROM events AS e LEFT JOIN unnest($1::text[], $2::timestamptz[]) AS p(event_type, cutoff) ON p.event_type = e.event_type
WHERE e.occurred_at < $3::timestamptz
  AND e.occurred_at < coalesce(p.cutoff, CASE WHEN e.event_type = ANY($4::text[]) THEN NULL ELSE $5::timestamptz END)
GROUP BY e.event_type
"""


async def count_retention(conn: asyncpg.Connection | asyncpg.Pool, plan: RetentionPlan) -> Removed:
    """What applying `plan` would remove now (a dry run; reads only)."""
    removed = Removed()
    standard = {n: c for n, c in plan.cutoffs.items() if n != CUSTOM.name}
    if not plan.cutoffs:
        return removed
    rows = await conn.fetch(
        _COUNT_RETENTION,
        list(standard),
        list(standard.values()),
        max(plan.cutoffs.values()),
        _STANDARD,
        plan.cutoffs.get(CUSTOM.name),
    )
    for name, n in rows:
        removed.add({_stored(name): n})
    if plan.months_before is not None:
        removed.partitions = [p.name for p in await partitions(conn) if p.upper <= plan.months_before]
    return removed


class Job:
    """One run of bulk removal: its audit record, pacing and counts."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        record: AuditRecord,
        pace: Pace,
        *,
        removed: Removed | None = None,
        beat: Callable[[], Awaitable[None]] | None = None,
        turn: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.record = record
        self.pace = pace
        self.removed = Removed() if removed is None else removed  # with users: a set, to count them
        self.started = time.monotonic()
        self._beat = beat  # called between batches (the schedule's lease)
        self.turn = turn  # awaited before each row batch (interactive calls first)

    async def audit(self, conn: asyncpg.Connection, by_type: Mapping[str, int], partitions: int = 0) -> None:
        """In the transaction of a removal: creates the run's record at its
        first removal, then adds what this transaction removed to it."""
        if not by_type and not partitions:
            return
        if self.removed.audit_id is None:
            self.removed.audit_id = await record_audit(conn, self.record)
        await conn.execute(
            "SELECT audit_add_removed($1, $2, $3::jsonb, $4)",
            self.removed.audit_id,
            sum(by_type.values()),
            json.dumps(dict(by_type)),
            partitions,
        )

    async def paused(self, batch_seconds: float) -> None:
        """The pause after a batch, in proportion to its duration."""
        self.removed.batches += 1
        if self._beat is not None:
            await self._beat()
        await asyncio.sleep(max(self.pace.min_pause, batch_seconds * self.pace.pause))

    def finish(self) -> Removed:
        self.removed.seconds = time.monotonic() - self.started
        return self.removed


# --- whole months ---------------------------------------------------------------------------


async def _detach(job: Job, part: Partition) -> bool:
    """Takes one month's partition out of the log; False when the log's lock
    was not free within lock_timeout (nothing changed)."""
    retired = part.name + RETIRED_SUFFIX
    async with job.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{job.pace.lock_timeout}'")
        try:
            # No late event of the month may land between reading its largest
            # xid and the detach (SHARE: reads go on, writes to it wait).
            await conn.execute(f'LOCK TABLE "{part.name}" IN SHARE MODE')
            largest = await conn.fetchval(f'SELECT max(xid) FROM "{part.name}"')
            await conn.execute(f'ALTER TABLE events DETACH PARTITION "{part.name}"')
        except asyncpg.LockNotAvailableError:
            return False
        await conn.execute("SELECT note_events_removed($1)", largest)
        await conn.execute(f'ALTER TABLE "{part.name}" RENAME TO "{retired}"')
        if job.removed.audit_id is None:
            job.removed.audit_id = await record_audit(conn, job.record)
        await conn.execute(
            "INSERT INTO retention_detached (relname, audit_id) VALUES ($1, $2)", retired, job.removed.audit_id
        )
        await conn.execute("SELECT audit_add_removed($1, 0, '{}', 1)", job.removed.audit_id)
    job.removed.partitions.append(part.name)
    return True


# One page of a retired partition along its (user_id, occurred_at, event_id)
# index, the dedup keys of its rows deleted by primary key (a key that now
# points at another event, a resend logged since, is not its to delete).
_SWEEP = """
WITH page AS (
    SELECT user_id, occurred_at, event_id, event_type FROM {table}
    {after}
    ORDER BY user_id, occurred_at, event_id
    LIMIT $1
), keys AS (
    DELETE FROM event_keys AS k USING page AS p
    WHERE k.user_id = p.user_id AND k.event_id = p.event_id AND k.occurred_at = p.occurred_at
), last AS (
    SELECT user_id, occurred_at, event_id FROM page ORDER BY user_id DESC, occurred_at DESC, event_id DESC LIMIT 1
)
SELECT (SELECT coalesce(jsonb_object_agg(event_type, n), '{{}}')::text
        FROM (SELECT event_type, count(*) AS n FROM page GROUP BY event_type) AS c),
       (SELECT user_id FROM last), (SELECT occurred_at FROM last), (SELECT event_id FROM last)
"""
_AFTER = "WHERE (user_id, occurred_at, event_id) > ($2::text, $3::timestamptz, $4::uuid)"


async def _sweep(job: Job, relname: str, audit_id: int) -> None:
    """Deletes the dedup keys of a retired partition's rows, batch by batch
    (resuming where an earlier run stopped), then drops it."""
    table = f'"{relname}"'
    first, rest = _SWEEP.format(table=table, after=""), _SWEEP.format(table=table, after=_AFTER)
    record = job.removed.audit_id
    job.removed.audit_id = audit_id  # the counts go to the run that detached it
    try:
        position = await job.pool.fetchrow(
            "SELECT after_user, after_at, after_event FROM retention_detached WHERE relname = $1", relname
        )
        after = None if position is None or position[0] is None else tuple(position)
        while True:
            started = time.monotonic()
            async with job.pool.acquire() as conn, conn.transaction():
                if after is None:
                    counts_text, *last = await conn.fetchrow(first, job.pace.rows)
                else:
                    counts_text, *last = await conn.fetchrow(rest, job.pace.rows, *after)
                if last[0] is None:  # walked to the end
                    await conn.execute(f"DROP TABLE {table}")
                    await conn.execute("DELETE FROM retention_detached WHERE relname = $1", relname)
                    return
                by_type: dict[str, int] = {}
                for name, n in json.loads(counts_text).items():
                    by_type[_stored(name)] = by_type.get(_stored(name), 0) + n
                await conn.execute(
                    "UPDATE retention_detached SET after_user = $2, after_at = $3, after_event = $4 WHERE relname = $1",
                    relname,
                    *last,
                )
                await job.audit(conn, by_type)
            job.removed.add(by_type)
            after = tuple(last)
            await job.paused(time.monotonic() - started)
    finally:
        job.removed.audit_id = record


async def _detach_months(job: Job, months: Sequence[Partition]) -> None:
    """Detaches each month, retrying a busy lock a few times (a long export
    holds the log), then sweeps every retired partition."""
    pending = list(months)
    for attempt in range(job.pace.lock_retries):
        pending = [part for part in pending if not await _detach(job, part)]
        if not pending:
            break
        if attempt + 1 < job.pace.lock_retries:
            _log.warning(
                "retention: the event log is locked by a long transaction (an export?); "
                "detaching %d month(s) again in %.0f s",
                len(pending),
                job.pace.lock_retry_interval,
            )
            await asyncio.sleep(job.pace.lock_retry_interval)
    job.removed.deferred = [p.name for p in pending]
    for relname, audit_id in await job.pool.fetch("SELECT relname, audit_id FROM retention_detached ORDER BY relname"):
        await _sweep(job, relname, audit_id)


# --- row by row, one time slice per batch --------------------------------------------------

# The rows of one slice [$1, $2) that match the filter, with their keys, in
# one statement. $3-$5: the TypeFilter; $6: the users (the "users" variant
# only, where the per-user index finds them). Returns the rows removed per
# type and, when asked ($7), the distinct users.
_DELETE_SLICE = """
WITH gone AS (
    DELETE FROM events
    WHERE occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz AND {types} {users}
    RETURNING user_id, event_id, occurred_at, event_type, xid
), keys AS (
    DELETE FROM event_keys AS k USING gone AS g
    WHERE k.user_id = g.user_id AND k.event_id = g.event_id AND k.occurred_at = g.occurred_at
)
SELECT (SELECT coalesce(jsonb_object_agg(event_type, n), '{{}}')::text
        FROM (SELECT event_type, count(*) AS n FROM gone GROUP BY event_type) AS c),
       CASE WHEN $6::bool THEN (SELECT array_agg(DISTINCT user_id) FROM gone) END,
       (SELECT max(xid) FROM gone)
"""
_ALL_USERS = _DELETE_SLICE.format(types=_types_sql(3), users="")
_SOME_USERS = _DELETE_SLICE.format(types=_types_sql(3), users="AND user_id = ANY($7::text[])")


class Slices:
    """Consecutive slices [start, end) of the log's time, each as wide as
    makes a batch of about Pace.rows rows in about Pace.seconds."""

    def __init__(self, start: datetime, end: datetime, pace: Pace) -> None:
        self.position = start
        self.end = end
        self.pace = pace
        self.width = pace.first_slice

    def next(self) -> tuple[datetime, datetime] | None:
        if self.position >= self.end:
            return None
        return self.position, min(self.end, self.position + self.width)

    def done(self, upper: datetime, rows: int, seconds: float) -> None:
        """The slice up to `upper` took `seconds` and removed `rows`."""
        self.position = upper
        pace = self.pace
        factor = min(pace.rows / max(rows, 1), pace.seconds / max(seconds, 1e-6), 4.0)
        self.width = max(pace.min_slice, min(pace.max_slice, self.width * max(factor, 0.25)))


async def _remove_slices(
    job: Job,
    start: datetime,
    end: datetime,
    types: TypeFilter,
    users: Sequence[str] | None,
    previous: Slices | None = None,
) -> Slices:
    """Deletes the matching rows of [start, end) slice by slice (starting
    from the width `previous` ended with); returns the slices walked."""
    statement = _ALL_USERS if users is None else _SOME_USERS
    extra = () if users is None else (list(users),)
    want_users = job.removed.users is not None
    slices = Slices(start, end, job.pace)
    if previous is not None:
        slices.width = previous.width
    while (window := slices.next()) is not None:
        if job.turn is not None:
            await job.turn()
        started = time.monotonic()
        try:
            async with job.pool.acquire() as conn, conn.transaction():
                counts_text, user_ids, largest = await conn.fetchrow(statement, *window, *types, want_users, *extra)
                if largest is not None:
                    # Its own statement: Citus cannot carry a void result
                    # through the recursive plan of the DELETE's CTE.
                    await conn.execute("SELECT note_events_removed($1)", largest)
                by_type: dict[str, int] = {}
                for name, n in json.loads(counts_text).items():
                    by_type[_stored(name)] = by_type.get(_stored(name), 0) + n
                await job.audit(conn, by_type)
        except asyncpg.DeadlockDetectedError:
            # A deletion of the same user's rows (DeleteUserData) went another way round: again.
            _log.info("a removal batch met a concurrent deletion; retrying it")
            continue
        seconds = time.monotonic() - started
        job.removed.add(by_type)
        if want_users and user_ids:
            assert job.removed.users is not None
            job.removed.users.update(user_ids)
        slices.done(window[1], sum(by_type.values()), seconds)
        await job.paused(seconds)
    return slices


async def apply_retention(
    pool: asyncpg.Pool,
    plan: RetentionPlan,
    *,
    actor: str,
    detail: Mapping[str, Any],
    pace: Pace = DEFAULT_PACE,
    beat: Callable[[], Awaitable[None]] | None = None,
) -> Removed:
    """Removes what `plan` says: whole months first, then the rest row by row.
    Resumes the key sweep of months an earlier run detached. A month whose
    detach had to wait for the next run is not deleted row by row meanwhile."""
    record = AuditRecord(RETENTION, actor, None, {}, {**detail, "cutoffs": plan.describe()})
    job = Job(pool, record, pace, beat=beat)
    months = []
    if plan.months_before is not None:
        months = [p for p in await partitions(pool) if p.upper <= plan.months_before]
    await _detach_months(job, months)
    deferred = [(p.lower, p.upper) for p in months if p.name in job.removed.deferred]
    if plan.cutoffs and (span := await _log_range(pool)) is not None:
        slices = None
        for start, end, types in plan.segments(span[0]):
            for lower, upper in _without(start, min(end, span[1]), deferred):
                slices = await _remove_slices(job, lower, upper, types, None, slices)
    return job.finish()


def _without(
    start: datetime, end: datetime, holes: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """[start, end) less the ranges `holes` (sorted, disjoint)."""
    out: list[tuple[datetime, datetime]] = []
    for lower, upper in holes:
        if lower > start and start < end:
            out.append((start, min(lower, end)))
        start = max(start, upper)
    if start < end:
        out.append((start, end))
    return out


# --- purges --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeFilter:
    """Events matching every field given (within a field: any value)."""

    types: TypeFilter  # `everything`: no type condition
    custom_types: tuple[str, ...]  # custom type names (stored names), part of the type condition
    start: datetime | None  # occurred_at >= start
    end: datetime | None  # occurred_at < end
    users: tuple[str, ...]  # each names its person (a linked anonymous id: the user it belongs to)

    @property
    def type_filter(self) -> TypeFilter:
        """The type condition, custom type names included."""
        return self.types._replace(names=sorted({*self.types.names, *self.custom_types}))

    def describe(self, subject_hash: Callable[[str], SubjectHash]) -> dict[str, Any]:
        """For the audit record: users by keyed hash only."""
        hashes = [subject_hash(u) for u in self.users]
        return {
            "event_types": self.types.names + ([CUSTOM.name] if self.types.custom else []),
            "custom_types": list(self.custom_types),
            "start_time": None if self.start is None else self.start.isoformat(),
            "end_time": None if self.end is None else self.end.isoformat(),
            "users": len(self.users),
            "user_hashes": [h.digest.hex() for h in hashes],
            "user_hash_key": hashes[0].version if hashes else None,
        }


_COUNT_PURGE = """
SELECT count(*), count(DISTINCT user_id) FROM events
WHERE occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz AND {types} {users}
"""
_COUNT_ALL_USERS = _COUNT_PURGE.format(types=_types_sql(3), users="")
_COUNT_SOME_USERS = _COUNT_PURGE.format(types=_types_sql(3), users="AND user_id = ANY($6::text[])")
_FAR_PAST = datetime(1, 1, 2, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 12, 30, tzinfo=UTC)


# A user id names its person (person_of, migrations/0008_identity.sql): the
# events of a linked anonymous id are stored under the person.
_PERSONS = "SELECT coalesce(array_agg(DISTINCT person_of(u) ORDER BY person_of(u)), '{}') FROM unnest($1::text[]) AS u"


async def _persons(conn: asyncpg.Connection | asyncpg.Pool, users: Sequence[str]) -> list[str]:
    persons: list[str] = await conn.fetchval(_PERSONS, list(users))
    return persons


async def count_purge(conn: asyncpg.Connection | asyncpg.Pool, purge: PurgeFilter) -> tuple[int, int]:
    """(events, users) a purge with `purge` would remove now (reads only)."""
    window = (purge.start or _FAR_PAST, purge.end or _FAR_FUTURE)
    if purge.users:
        persons = await _persons(conn, purge.users)
        row = await conn.fetchrow(_COUNT_SOME_USERS, *window, *purge.type_filter, persons)
    else:
        row = await conn.fetchrow(_COUNT_ALL_USERS, *window, *purge.type_filter)
    return row[0], row[1]


async def purge_events(
    pool: asyncpg.Pool,
    purge: PurgeFilter,
    *,
    actor: str,
    subject: SubjectHash | None,
    detail: Mapping[str, Any],
    pace: Pace = DEFAULT_PACE,
    removed: Removed | None = None,
    turn: Callable[[], Awaitable[None]] | None = None,
) -> Removed:
    """Removes the events matching `purge`, batch by batch; `subject`: the
    user's hash when the purge names one user. `removed` (given: filled as
    it goes, also when the call is cancelled half-way); `turn`: awaited
    before each batch."""
    record = AuditRecord(PURGE_EVENTS, actor, subject, {}, detail)
    job = Job(pool, record, pace, removed=removed or Removed(users=set()), turn=turn)
    span = await _log_range(pool)
    if span is not None:
        start = max(span[0], purge.start) if purge.start is not None else span[0]
        end = min(span[1], purge.end) if purge.end is not None else span[1]
        if start < end:
            persons = await _persons(pool, purge.users) if purge.users else None
            await _remove_slices(job, start, end, purge.type_filter, persons)
    done = job.finish()
    if done.audit_id is not None:
        await pool.execute(
            "UPDATE audit_log SET counts = counts || jsonb_build_object('users', $2::int8),"
            " detail = detail || '{\"finished\": true}' WHERE id = $1",
            done.audit_id,
            len(done.users or ()),
        )
    return done
