"""The SQL of the AnalyticsService (indexes in migrations/0002_analytics.sql).

Reads only. Per-user reads are ranges of events_user_time; window reads
prune partitions and BRIN ranges by occurred_at. Timestamps leave the
database as epoch microseconds (no datetime objects per row on the hot
paths) and weights, type names and type sets come in as arrays, so that the
schema stays their only source. Text ordering of exports and pages is by code
point (COLLATE "C"): independent of the database's locale, and the same
order as Python's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, NamedTuple

import asyncpg

from interactions_server.storage._citus import for_person, person_sql

_US = "(extract(epoch FROM {}) * 1000000)::int8"
_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"
LEADS_TO_US = 30 * 60 * 1_000_000  # a search leads to what its user does within 30 minutes


class Window(NamedTuple):
    """[start, end) on occurred_at in epoch microseconds; None is unbounded."""

    start_us: int | None
    end_us: int | None


class TypeFilter(NamedTuple):
    """Stored type names to keep; `custom` also keeps every custom type
    (a name not in `standard`). `names` empty and not `custom`: every type."""

    names: list[str]
    custom: bool
    standard: list[str]

    @property
    def everything(self) -> bool:
        return not self.names and not self.custom


class EventRow(NamedTuple):
    """One logged event, as stored."""

    user_id: str
    event_id: str
    event_type: str
    session_id: str | None
    product_id: str | None
    event_value: int
    occurred_us: int
    details: str | None  # JSON text: {"<details member>": {...}}
    attributes: str | None  # JSON text
    received_us: int


_EVENT_COLUMNS = (
    "user_id, event_id::text, event_type, session_id, product_id, event_value, "
    f"{_US.format('occurred_at')}, details::text, attributes::text, {_US.format('received_at')}"
)


def _bound(param: str, infinity: str) -> str:
    """A bigint parameter as a timestamptz, NULL as +-infinity: a plain range
    condition that prunes partitions and uses the BRIN index in generic plans
    too, where `$n IS NULL OR ...` would scan everything."""
    return f"coalesce({_TS.format(param)}, '{infinity}'::timestamptz)"


def _window_sql(first_param: int, column: str = "occurred_at") -> str:
    """Conditions for a Window passed as two bigint parameters (NULL: unbounded)."""
    start, end = f"${first_param}::int8", f"${first_param + 1}::int8"
    return f"{column} >= {_bound(start, '-infinity')} AND {column} < {_bound(end, 'infinity')}"


def _types_sql(first_param: int) -> str:
    """Conditions for a TypeFilter passed as (names text[], custom bool, standard text[])."""
    names, custom, standard = (f"${first_param + i}" for i in range(3))
    return (
        f"(cardinality({names}::text[]) = 0 AND NOT {custom}::bool "
        f"OR event_type = ANY({names}::text[]) OR ({custom}::bool AND event_type <> ALL({standard}::text[])))"
    )


# The analytics transactions' work_mem: window queries sort and hash a window's
# events; 64 MB (for each of at most analytics_pool_max_size transactions)
# keeps a 7-day window of a 1M-event log in memory instead of spilling to
# disk. Per transaction, not per session: pgbouncer refuses session settings.
WORK_MEM = "64MB"


async def use_work_mem(conn: asyncpg.Connection) -> None:
    """Sets the analytics work_mem for the rest of `conn`'s transaction."""
    await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")


@contextlib.asynccontextmanager
async def snapshot(pool: asyncpg.Pool, *, analytics: bool = False) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a READ ONLY REPEATABLE READ transaction: every query of
    an RPC sees one snapshot. `analytics`: with the analytics work_mem."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if analytics:
            await use_work_mem(conn)
        yield conn


# --- exports ---------------------------------------------------------------------


async def snapshot_of(conn: asyncpg.Connection) -> str:
    """The snapshot `conn`'s REPEATABLE READ transaction reads (pg_snapshot text)."""
    snapshot: str = await conn.fetchval("SELECT pg_current_snapshot()::text")
    return snapshot


# The deletions committed that `$1` does not see: user_deletions.deleted_xid
# (migrations/0007) not visible in the snapshot. At or past the snapshot's
# xmin only (older ones finished before it was taken): a range of the index
# on deleted_xid, whatever the number of users ever deleted.
_DELETED_SINCE = """
SELECT user_id FROM user_deletions
WHERE deleted_xid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(deleted_xid, $1::text::pg_snapshot)
"""


async def users_deleted_since(pool: asyncpg.Pool, snapshot: str) -> frozenset[str]:
    """The users whose data a deletion removed after `snapshot` was taken
    (committed now, invisible to that snapshot), read on a connection of
    `pool`, outside the snapshot."""
    return frozenset(r[0] for r in await pool.fetch(_DELETED_SINCE, snapshot))


async def _prefetched(cursor: Any, chunk: int) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The cursor's rows, `chunk` at a time, with the next chunk fetched while
    the caller works on (and sends) this one: the database and the server's
    Python overlap instead of taking turns. At most two chunks in memory."""
    pending = asyncio.ensure_future(cursor.fetch(chunk))
    try:
        while records := await pending:
            pending = asyncio.ensure_future(cursor.fetch(chunk))
            yield records
    finally:
        if not pending.done():
            # The connection runs one statement at a time: let the fetch end
            # (at most `chunk` rows) before the transaction is rolled back.
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)


class TrainingRow(NamedTuple):
    user_id: str
    product_id: str
    weight: float
    event_count: int
    last_occurred_us: int
    types: list[str]  # with `type_counts`: the pair's counted events per type
    type_counts: list[int]


# The decay is 0.5 ** halvings; past about 1,074 halvings power() fails on
# underflow (and on overflow below -1,024), so an event more than
# _MAX_HALVINGS half-lives old weighs 0 and the (rare: after as_of) event more
# than that many half-lives ahead counts as exactly that many.
_HALVINGS = f"((extract(epoch FROM {_TS.format('$5::int8')} - e.occurred_at))::float8 / $6::float8)"
_MAX_HALVINGS = 1000

# Per (user, product, type) first, so that the per-type counts come out as
# two parallel arrays; the decay factor is 1 when no half-life is given. The
# keys are "C" from the start, so that one sort serves both the grouping and
# the order.
_TRAINING = f"""
SELECT user_id, product_id, sum(weight), sum(n)::int8, max(last_us), array_agg(event_type), array_agg(n)
FROM (
    SELECT e.user_id COLLATE "C" AS user_id, e.product_id COLLATE "C" AS product_id, e.event_type, count(*) AS n, {_US.format("max(e.occurred_at)")} AS last_us,
           sum(w.weight * CASE WHEN $6::float8 IS NULL THEN 1.0::float8
                               WHEN {_HALVINGS} > {_MAX_HALVINGS} THEN 0.0::float8
                               ELSE power(0.5::float8, greatest({_HALVINGS}, -{_MAX_HALVINGS})) END) AS weight
    FROM events AS e JOIN unnest($3::text[], $4::float8[]) AS w(event_type, weight) ON e.event_type = w.event_type
    WHERE e.product_id IS NOT NULL AND {_window_sql(1, "e.occurred_at")}
      AND ($7::text IS NULL OR (e.user_id COLLATE "C", e.product_id COLLATE "C") > ($7::text, $8::text))
    GROUP BY e.user_id, e.product_id, e.event_type
) AS per_type
GROUP BY user_id, product_id
ORDER BY user_id, product_id
"""


async def training_rows(
    conn: asyncpg.Connection,
    window: Window,
    weights: dict[str, float],
    as_of_us: int,
    half_life_seconds: float | None,
    after: tuple[str, str] | None,
    chunk: int,
) -> AsyncGenerator[list[TrainingRow], None]:
    """The training matrix in (user_id, product_id) order, `chunk` rows at a
    time, from a server-side cursor (`conn` must be in a transaction)."""
    names = sorted(weights)
    cursor = await conn.cursor(
        _TRAINING,
        window.start_us,
        window.end_us,
        names,
        [weights[n] for n in names],
        as_of_us,
        half_life_seconds,
        after[0] if after else None,
        after[1] if after else None,
    )
    async with contextlib.aclosing(_prefetched(cursor, chunk)) as chunks:
        async for records in chunks:
            yield [TrainingRow(*r) for r in records]


# The bench COPYs this same statement for the ceiling of (h).
EXPORT_EVENTS = f"""
SELECT {_EVENT_COLUMNS} FROM events
WHERE {_window_sql(1)} AND {_types_sql(3)}
  AND occurred_at >= {_bound("$6::int8", "-infinity")}  -- prunes partitions and BRIN ranges
  AND ($6::int8 IS NULL OR (occurred_at, event_id) > ({_TS.format("$6::int8")}, $7::uuid))
ORDER BY occurred_at, event_id
"""


async def export_events(
    conn: asyncpg.Connection, window: Window, types: TypeFilter, after: tuple[int, str] | None, chunk: int
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The log in (occurred_at, event_id) order, `chunk` rows at a time, from
    a server-side cursor (`conn` must be in a transaction). The records have
    EventRow's fields in its order but are not made EventRows (`EventRow(*r)`
    where needed): building one per exported event took a tenth of the
    server's time per event."""
    cursor = await conn.cursor(
        EXPORT_EVENTS,
        window.start_us,
        window.end_us,
        *types,
        after[0] if after else None,
        after[1] if after else None,
    )
    async with contextlib.aclosing(_prefetched(cursor, chunk)) as chunks:
        async for records in chunks:
            yield records


# --- window aggregates --------------------------------------------------------------


class SearchOutcome(NamedTuple):
    """The searches of one user with one raw query text in the window, and
    how many of them led to each kind of event."""

    query: str
    user_id: str
    searches: int
    clicked: int
    added_to_cart: int
    purchased: int
    reported_count: int  # searches that reported a result_count
    no_results: int  # of those, the ones where it was 0


# Every event of a relevant type in [start, end + LEADS_TO_US), per user in
# (occurred_at, searches first, event_id) order. A running count of searches numbers each
# search's group: the search and what follows it up to the user's next search.
# The running max of search times is the group's search time. Groups of
# searches outside [start, end) are dropped; searches after the window are
# read only to end the groups of the window's last searches.
_LEADS_TO = "($7::int8 * interval '1 microsecond')"  # LEADS_TO_US, a parameter
_SEARCH_OUTCOMES = f"""
WITH relevant AS (
    SELECT user_id, occurred_at, event_type, details,
           count(*) FILTER (WHERE event_type = 'search') OVER w AS search_no,
           max(occurred_at) FILTER (WHERE event_type = 'search') OVER w AS search_at
    FROM events
    WHERE event_type = ANY($3::text[])
      AND occurred_at >= {_bound("$1::int8", "-infinity")}
      AND occurred_at < {_bound("$2::int8", "infinity")} + {_LEADS_TO}
    -- "C": partitions need equality only, and byte order sorts fastest
    -- searches first at the same instant: an event logged with its search's time follows it
    WINDOW w AS (PARTITION BY user_id COLLATE "C" ORDER BY occurred_at, event_type <> 'search', event_id
                 ROWS UNBOUNDED PRECEDING)
), outcomes AS (
    SELECT user_id, search_at,
           max(details #>> '{{search,query}}') FILTER (WHERE event_type = 'search') AS query,
           max((details #>> '{{search,result_count}}')::int4) FILTER (WHERE event_type = 'search') AS result_count,
           bool_or(event_type = ANY($4::text[]) AND occurred_at <= search_at + {_LEADS_TO}) AS clicked,
           bool_or(event_type = ANY($5::text[]) AND occurred_at <= search_at + {_LEADS_TO}) AS carted,
           bool_or(event_type = ANY($6::text[]) AND occurred_at <= search_at + {_LEADS_TO}) AS bought
    FROM relevant
    WHERE search_no > 0 AND search_at < {_bound("$2::int8", "infinity")}
    GROUP BY user_id, search_no, search_at
)
SELECT query, user_id, count(*), count(*) FILTER (WHERE clicked), count(*) FILTER (WHERE carted),
       count(*) FILTER (WHERE bought), count(result_count), count(*) FILTER (WHERE result_count = 0)
FROM outcomes
GROUP BY query, user_id
"""


async def search_outcomes(
    conn: asyncpg.Connection,
    window: Window,
    click_types: Sequence[str],
    cart_types: Sequence[str],
    purchase_types: Sequence[str],
) -> list[SearchOutcome]:
    relevant = ["search", *click_types, *cart_types, *purchase_types]
    records = await conn.fetch(
        _SEARCH_OUTCOMES,
        window.start_us,
        window.end_us,
        relevant,
        list(click_types),
        list(cart_types),
        list(purchase_types),
        LEADS_TO_US,
    )
    return [SearchOutcome(*r) for r in records]


class ActiveUsers(NamedTuple):
    day: str | None  # YYYY-MM-DD (UTC); None for the whole window
    active_users: int
    logged_in_users: int


# Distinct (day, user) pairs first, by hashing: far fewer rows to count
# distinct over than the window's events, and no sort of the events. The
# days listed are the window's, from its start's day to the day of its last
# instant (end - 1 µs), zero-user days too; an absent bound is replaced by the
# day of the window's first (last) event.
_ACTIVE_USERS = f"""
WITH user_days AS (
    SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, user_id, bool_or(event_type = 'login') AS logged_in
    FROM events WHERE {_window_sql(1)}
    GROUP BY 1, 2
), per_day AS (
    SELECT day, count(*) AS active, count(*) FILTER (WHERE logged_in) AS logged_in FROM user_days GROUP BY day
), span AS (
    SELECT coalesce(({_TS.format("$1::int8")} AT TIME ZONE 'UTC')::date, (SELECT min(day) FROM per_day)) AS first,
           coalesce(({_TS.format("($2::int8 - 1)")} AT TIME ZONE 'UTC')::date, (SELECT max(day) FROM per_day)) AS last
), days AS (
    SELECT first + n AS day FROM span, generate_series(0, last - first) AS n
    WHERE NOT coalesce($1::int8 >= $2::int8, false)  -- an empty window has no day
)
SELECT NULL::text, count(DISTINCT user_id), count(DISTINCT user_id) FILTER (WHERE logged_in) FROM user_days
UNION ALL
SELECT to_char(day, 'YYYY-MM-DD'), coalesce(active, 0), coalesce(logged_in, 0) FROM days LEFT JOIN per_day USING (day)
ORDER BY 1 NULLS FIRST
"""


async def active_users(conn: asyncpg.Connection, window: Window) -> list[ActiveUsers]:
    """The whole window's counts first (day None), then each of its days."""
    return [ActiveUsers(*r) for r in await conn.fetch(_ACTIVE_USERS, window.start_us, window.end_us)]


# --- per user ----------------------------------------------------------------------
# A user id names its person (person_of, migrations/0008_identity.sql): an
# anonymous id linked to a user reads the user's events, which hold its own.


_USER_EVENTS = f"""
SELECT {_EVENT_COLUMNS} FROM events
WHERE user_id = person_of($1) AND {_window_sql(2)} AND {_types_sql(4)}
  AND occurred_at <= {_bound("$7::int8", "infinity")}  -- bounds the index range
  AND ($7::int8 IS NULL OR (occurred_at, event_id) < ({_TS.format("$7::int8")}, $8::uuid))
ORDER BY occurred_at DESC, event_id DESC
LIMIT $9
"""


async def user_events(
    conn: asyncpg.Connection,
    user_id: str,
    window: Window,
    types: TypeFilter,
    before: tuple[int, str] | None,
    limit: int,
) -> list[EventRow]:
    """A user's events newest first, after the page that ended at `before`."""
    sql, person = await for_person(conn, _USER_EVENTS, user_id)
    records = await conn.fetch(
        sql,
        person,
        window.start_us,
        window.end_us,
        *types,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )
    return [EventRow(*r) for r in records]


class TypeActivity(NamedTuple):
    event_type: str
    events: int
    first_us: int
    last_us: int


_ACTIVITY = f"""
SELECT event_type, count(*), {_US.format("min(occurred_at)")}, {_US.format("max(occurred_at)")}
FROM events WHERE user_id = person_of($1) GROUP BY event_type
"""
_SESSION_COUNT = "SELECT count(DISTINCT session_id) FROM events WHERE user_id = person_of($1)"


async def user_activity(conn: asyncpg.Connection, user_id: str) -> tuple[list[TypeActivity], int]:
    """A user's events per type (count, first and last occurred_at) and how
    many distinct sessions they carry (`conn` in a REPEATABLE READ transaction,
    so that both statements see one snapshot)."""
    sql, person = await for_person(conn, _ACTIVITY, user_id)
    records = await conn.fetch(sql, person)
    sessions: int = await conn.fetchval(person_sql(conn, _SESSION_COUNT), person)
    return [TypeActivity(*r) for r in records], sessions


class SessionEvent(NamedTuple):
    """What a session summary needs of each of its events."""

    session_id: str
    event_type: str
    product_id: str | None
    query: str | None  # a search's query
    occurred_us: int


_SESSION_EVENTS = f"""
SELECT session_id, event_type, product_id, details #>> '{{search,query}}', {_US.format("occurred_at")}
FROM events WHERE user_id = person_of($1) AND session_id = ANY($2::text[])
ORDER BY session_id, occurred_at, event_id
"""


async def session_events(conn: asyncpg.Connection, user_id: str, session_ids: Sequence[str]) -> list[SessionEvent]:
    """The events of some sessions of a user, per session in (occurred_at, event_id) order."""
    sql, person = await for_person(conn, _SESSION_EVENTS, user_id)
    return [SessionEvent(*r) for r in await conn.fetch(sql, person, list(session_ids))]


_SESSION_TIMELINE = f"""
SELECT {_EVENT_COLUMNS} FROM events
WHERE user_id = person_of($1) AND session_id = $2
ORDER BY occurred_at, event_id
LIMIT $3
"""


async def session_timeline(conn: asyncpg.Connection, user_id: str, session_id: str, limit: int) -> list[EventRow]:
    sql, person = await for_person(conn, _SESSION_TIMELINE, user_id)
    return [EventRow(*r) for r in await conn.fetch(sql, person, session_id, limit)]


class SessionStart(NamedTuple):
    session_id: str
    started_us: int


_SESSIONS_PAGE = f"""
SELECT session_id, {_US.format("min(occurred_at)")} AS started_us
FROM events WHERE user_id = person_of($1) AND session_id IS NOT NULL
GROUP BY session_id
HAVING $2::int8 IS NULL
    OR (min(occurred_at), session_id COLLATE "C") < ({_TS.format("$2::int8")}, $3::text)
ORDER BY min(occurred_at) DESC, session_id COLLATE "C" DESC
LIMIT $4
"""


async def sessions_page(
    conn: asyncpg.Connection, user_id: str, before: tuple[int, str] | None, limit: int
) -> list[SessionStart]:
    """A user's sessions, newest start first, after the page that ended at `before`."""
    sql, person = await for_person(conn, _SESSIONS_PAGE, user_id)
    records = await conn.fetch(sql, person, before[0] if before else None, before[1] if before else None, limit)
    return [SessionStart(*r) for r in records]
