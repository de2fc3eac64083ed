"""The SQL of the recommendations (RecommendationService; migrations/0011,
docs/analytics.md "Recommendations"): the maintained aggregates, their
maintenance from the committed events, their rebuild from the log, and the
reads.

The maintainer applies the log in windows of transaction ids (the stream's
`xid`, migrations/0009): a step, in one REPEATABLE READ transaction, locks
recs_state, takes the boundary of its own snapshot (every transaction below
it has finished: the stream's proof, docs/subscribe.md), applies every event
with an xid in [applied_through, end) for an end at most that boundary, and
moves applied_through to end. Each event is applied once: the window and the
position move together, under the row lock.

Removals (a deletion, an identity link's move, retention's and purges' row
deletes) leave a row in recs_removed by trigger; the step recomputes what
they touched from what the log still holds below applied_through: every
person-level row of the persons concerned, and the trending buckets of the
(hour, product)s concerned. Reading the log in the step's own snapshot is
what keeps removals race-free: a row deleted before the step is not there to
apply, one deleted after has its journal row seen by a later step. A
partition that vanished (retention dropped or detached a month) triggers a
rebuild.

Everything is set-based SQL; nothing here reads events into Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from interactions_client.limits import MAX_FUTURE_SECONDS
from interactions_client.rules import STANDARD
from interactions_server.errors import is_database_unavailable

_log = logging.getLogger("interactions_server.recommendations")

VIEW_TYPES = ("view", "product_view", "click")  # RecentlyViewed and AlsoViewed
PURCHASE_TYPES = ("purchase",)  # FrequentlyBoughtTogether
VIEWS, PURCHASES = 1, 2  # the kinds of together (recs_*_members.kind)
CAP = 20  # products of a (kind, person, hour) or (kind, person, session) that take part in pairs
TOGETHER_SECONDS = 3_600  # two occurrences within this of each other are together
ML_WEIGHTS: dict[str, float] = {r.name: r.ml_weight for r in STANDARD.values() if r.ml_weight is not None}
_WEIGHT_TYPES = list(ML_WEIGHTS)
_WEIGHT_VALUES = [ML_WEIGHTS[name] for name in _WEIGHT_TYPES]
HOUR_BUCKET_HOURS = 1.0  # recs_product_hours
DAY_BUCKET_HOURS = 24.0  # recs_user_days
# The moments m_k = sum of w * x^k (x: hours from the bucket's midpoint)
# kept per bucket: the decayed sum is their Taylor series, whose truncation
# error is below (a * width / 2)^MOMENTS / MOMENTS! relative (a: the decay
# rate per hour; docs/analytics.md).
MOMENTS = 8
_M = range(MOMENTS)
_M_COLUMNS = ", ".join(f"m{k}" for k in _M)


def _moment_sums(x: str) -> str:
    """SQL: sum(weight * x^k) AS m_k for every k, x an expression in hours."""
    return ", ".join(("sum(weight)" if k == 0 else f"sum(weight * ({x}) ^ {k})") + f" AS m{k}" for k in _M)


def _moment_adds() -> str:
    return ", ".join(f"m{k} = t.m{k} + excluded.m{k}" for k in _M)


_VIEW_LIST = ", ".join(f"'{t}'" for t in VIEW_TYPES)
_BUY_LIST = ", ".join(f"'{t}'" for t in PURCHASE_TYPES)
_KIND = f"(CASE WHEN e.event_type IN ({_VIEW_LIST}) THEN 1 WHEN e.event_type IN ({_BUY_LIST}) THEN 2 END)"

# Which events a statement reads: $1, $2 and the source's clause. A window
# is [$1, $2) of transaction ids (the whole log below $2 when $1 is -1); a
# person recompute is the events of the users $1 below transaction $2.
_WINDOW = "e.xid >= $1::int8 AND e.xid < $2::int8"
_USERS = "e.user_id = ANY($1::text[]) AND e.xid < $2::int8"


def _aggregate_sql(where: str, *, hours: bool) -> str:
    """The additive part of a step (or of a rebuild): a person's products,
    the denominators, the decay moments by day, the members of together, and
    (hours) the trending buckets. $3, $4: the ml_weights; $5: the step."""
    hours_cte = (
        f""",
hours AS (
    INSERT INTO recs_product_hours AS t (hour, product_id, n, {_M_COLUMNS}, last_at)
    SELECT h, product_id, count(*), {_moment_sums("x")}, max(occurred_at)
    FROM (SELECT product_id, weight, occurred_at, floor(epoch / 3600)::int4 AS h,
                 (epoch - floor(epoch / 3600) * 3600 - 1800) / 3600 AS x
          FROM src WHERE weight IS NOT NULL) AS s
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (hour, product_id) DO UPDATE
    SET n = t.n + excluded.n, {_moment_adds()}, last_at = greatest(t.last_at, excluded.last_at)
)"""
        if hours
        else ""
    )
    return f"""
WITH w AS (SELECT * FROM unnest($3::text[], $4::float8[]) AS w(event_type, weight)),
src AS MATERIALIZED (
    SELECT e.user_id, e.product_id, e.event_type, e.session_id, e.occurred_at, w.weight, {_KIND} AS kind,
           date_part('epoch', e.occurred_at) AS epoch
    FROM events AS e LEFT JOIN w ON w.event_type = e.event_type
    WHERE {where} AND e.product_id IS NOT NULL
),
agg AS (
    SELECT user_id, product_id,
           count(*) FILTER (WHERE kind = 1) AS view_n, max(occurred_at) FILTER (WHERE kind = 1) AS view_last,
           count(*) FILTER (WHERE kind = 2) AS buy_n,
           count(weight) AS train_n, coalesce(sum(weight), 0) AS train_w,
           max(occurred_at) FILTER (WHERE weight IS NOT NULL) AS train_last
    FROM src GROUP BY 1, 2
    HAVING count(*) FILTER (WHERE kind IS NOT NULL) > 0 OR count(weight) > 0
),
old AS MATERIALIZED (  -- before this statement's upserts: whether the person had the product yet
    SELECT a.user_id, a.product_id, a.view_n, a.buy_n, coalesce(o.view_n, 0) AS old_view_n,
           coalesce(o.buy_n, 0) AS old_buy_n
    FROM agg AS a LEFT JOIN recs_user_products AS o ON o.user_id = a.user_id AND o.product_id = a.product_id
),
products AS (
    INSERT INTO recs_user_products AS t
        (user_id, product_id, view_n, view_last, buy_n, train_n, train_w, train_last)
    SELECT user_id, product_id, view_n, view_last, buy_n, train_n, train_w, train_last
    FROM agg ORDER BY user_id, product_id
    ON CONFLICT (user_id, product_id) DO UPDATE
    SET view_n = t.view_n + excluded.view_n, view_last = greatest(t.view_last, excluded.view_last),
        buy_n = t.buy_n + excluded.buy_n, train_n = t.train_n + excluded.train_n,
        train_w = t.train_w + excluded.train_w, train_last = greatest(t.train_last, excluded.train_last)
),
people AS (
    INSERT INTO recs_product_people AS t (kind, product_id, people)
    SELECT k.kind, o.product_id, count(*)
    FROM old AS o
    CROSS JOIN LATERAL (VALUES (1::int2, o.view_n > 0 AND o.old_view_n = 0),
                               (2::int2, o.buy_n > 0 AND o.old_buy_n = 0)) AS k(kind, became)
    WHERE k.became
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (kind, product_id) DO UPDATE SET people = t.people + excluded.people
),
days AS (
    INSERT INTO recs_user_days AS t (user_id, day, product_id, n, {_M_COLUMNS})
    SELECT user_id, d, product_id, count(*), {_moment_sums("x")}
    FROM (SELECT user_id, product_id, weight, floor(epoch / 86400)::int4 AS d,
                 (epoch - floor(epoch / 86400) * 86400 - 43200) / 3600 AS x
          FROM src WHERE weight IS NOT NULL) AS s
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, day, product_id) DO UPDATE
    SET n = t.n + excluded.n, {_moment_adds()}
),
hour_members AS (  -- new members enter eligible: the ranking after corrects the few beyond the cap
    INSERT INTO recs_hour_members AS t (kind, user_id, hour, product_id, first_at, last_at, eligible, touched)
    SELECT kind, user_id, floor(epoch / 3600)::int4, product_id, min(occurred_at), max(occurred_at), true, $5::int8
    FROM src WHERE kind IS NOT NULL
    GROUP BY kind, user_id, 3, product_id ORDER BY kind, user_id, 3, product_id
    ON CONFLICT (kind, user_id, hour, product_id) DO UPDATE
    SET first_at = least(t.first_at, excluded.first_at), last_at = greatest(t.last_at, excluded.last_at),
        touched = excluded.touched
    WHERE excluded.first_at < t.first_at OR excluded.last_at > t.last_at
    RETURNING kind, user_id, product_id, xmax::text <> '0' AS widened  -- xmax is 0 on a row the upsert inserted
),
session_members AS (
    INSERT INTO recs_session_members AS t (kind, user_id, session_id, product_id, first_at, eligible, touched)
    SELECT kind, user_id, session_id, product_id, min(occurred_at), true, $5::int8
    FROM src WHERE kind IS NOT NULL AND session_id IS NOT NULL AND session_id <> ''
    GROUP BY kind, user_id, session_id, product_id ORDER BY kind, user_id, session_id, product_id
    ON CONFLICT (kind, user_id, session_id, product_id) DO UPDATE
    SET first_at = excluded.first_at, touched = excluded.touched
    WHERE excluded.first_at < t.first_at
    RETURNING kind, user_id, product_id, xmax::text <> '0' AS widened
),
widened AS (
    SELECT kind, user_id, product_id FROM hour_members WHERE widened
    UNION SELECT kind, user_id, product_id FROM session_members WHERE widened
){hours_cte}
SELECT (SELECT count(*) FROM src) AS applied, w.*
FROM (SELECT coalesce(array_agg(kind), '{{}}') AS widened_kinds, coalesce(array_agg(user_id), '{{}}') AS widened_users,
             coalesce(array_agg(product_id), '{{}}') AS widened_products FROM widened) AS w
"""


# The groups whose members a statement ranks: those with a member the step
# ($3) inserted or widened (the only changes that move a rank: a new member,
# an earlier first occurrence), by the members' `touched` index; or every
# group of some users (a recompute), or every group (a rebuild).
_WINDOW_HOUR_GROUPS = "SELECT DISTINCT kind, user_id, hour AS grp FROM recs_hour_members WHERE touched = $3::int8"
_WINDOW_SESSION_GROUPS = (
    "SELECT DISTINCT kind, user_id, session_id AS grp FROM recs_session_members WHERE touched = $3::int8"
)


def _eligibility_sql(table: str, column: str, groups: str | None) -> str:
    """Ranks the members of the groups (all groups when None) and stores who
    is among the first CAP by first occurrence (ties by product_id);
    returns the rows whose eligibility changed. A row that becomes eligible
    is touched by step $3, so that its pairs are looked for."""
    scope = (
        f"JOIN ({groups}) AS g ON g.kind = m.kind AND g.user_id = m.user_id AND g.grp = m.{column}"
        if groups is not None
        else ""
    )
    return f"""
WITH ranked AS (
    SELECT m.kind, m.user_id, m.{column}, m.product_id,
           row_number() OVER (PARTITION BY m.kind, m.user_id, m.{column}
                              ORDER BY m.first_at, m.product_id COLLATE "C") <= {CAP} AS eligible
    FROM {table} AS m {scope}
)
UPDATE {table} AS t SET eligible = r.eligible, touched = CASE WHEN r.eligible THEN $3::int8 ELSE t.touched END
FROM ranked AS r
WHERE t.kind = r.kind AND t.user_id = r.user_id AND t.{column} = r.{column} AND t.product_id = r.product_id
  AND t.eligible <> r.eligible
RETURNING t.kind, t.user_id, t.product_id, t.eligible, t.touched = $3::int8 AS this_step
"""


_ELIGIBLE_WINDOW_HOURS = _eligibility_sql("recs_hour_members", "hour", _WINDOW_HOUR_GROUPS).replace("$3", "$1")
_ELIGIBLE_WINDOW_SESSIONS = _eligibility_sql("recs_session_members", "session_id", _WINDOW_SESSION_GROUPS).replace(
    "$3", "$1"
)
_USER_HOUR_GROUPS = "SELECT kind, user_id, hour AS grp FROM recs_hour_members WHERE user_id = ANY($1::text[])"
_USER_SESSION_GROUPS = (
    "SELECT kind, user_id, session_id AS grp FROM recs_session_members WHERE user_id = ANY($1::text[])"
)
# $2 is unused by these: the same parameters as the window's, for one call shape.
_ELIGIBLE_USER_HOURS = _eligibility_sql(
    "recs_hour_members", "hour", f"SELECT DISTINCT * FROM ({_USER_HOUR_GROUPS}) AS u WHERE $2::int8 IS NOT NULL"
)
_ELIGIBLE_USER_SESSIONS = _eligibility_sql(
    "recs_session_members",
    "session_id",
    f"SELECT DISTINCT * FROM ({_USER_SESSION_GROUPS}) AS u WHERE $2::int8 IS NOT NULL",
)
_ELIGIBLE_ALL_HOURS = _eligibility_sql("recs_hour_members", "hour", None).replace("$3", "$1")
_ELIGIBLE_ALL_SESSIONS = _eligibility_sql("recs_session_members", "session_id", None).replace("$3", "$1")

_C = 'COLLATE "C"'


def _pairs_sql(hour_rows: str, session_rows: str) -> str:
    """Inserts the person pairs the given member rows (eligible ones) are in,
    with any eligible member of the same person in reach (same or adjacent
    hour within TOGETHER_SECONDS, or same session), and adds the new ones to
    the supports."""
    return f"""
WITH d AS ({hour_rows}),
ds AS ({session_rows}),
cand AS (
    SELECT d.kind, d.user_id, least(d.product_id {_C}, o.product_id {_C}) AS a,
           greatest(d.product_id {_C}, o.product_id {_C}) AS b
    FROM d JOIN recs_hour_members AS o
      ON o.kind = d.kind AND o.user_id = d.user_id AND o.hour BETWEEN d.hour - 1 AND d.hour + 1
     AND o.eligible AND o.product_id <> d.product_id
     AND (o.hour = d.hour
          OR (o.hour = d.hour + 1 AND o.first_at - d.last_at <= interval '{TOGETHER_SECONDS} seconds')
          OR (o.hour = d.hour - 1 AND d.first_at - o.last_at <= interval '{TOGETHER_SECONDS} seconds'))
    UNION
    SELECT ds.kind, ds.user_id, least(ds.product_id {_C}, o.product_id {_C}),
           greatest(ds.product_id {_C}, o.product_id {_C})
    FROM ds JOIN recs_session_members AS o
      ON o.kind = ds.kind AND o.user_id = ds.user_id AND o.session_id = ds.session_id
     AND o.eligible AND o.product_id <> ds.product_id
),
new AS (
    INSERT INTO recs_person_pairs (kind, user_id, a, b)
    SELECT kind, user_id, a, b FROM cand ORDER BY kind, user_id, a, b
    ON CONFLICT DO NOTHING
    RETURNING kind, a, b
)
INSERT INTO recs_pairs AS t (kind, product_id, other_id, support)
SELECT kind, p, q, count(*)
FROM (SELECT kind, a AS p, b AS q FROM new UNION ALL SELECT kind, b, a FROM new) AS x
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
ON CONFLICT (kind, product_id, other_id) DO UPDATE SET support = t.support + excluded.support
"""


# A window: the rows the step ($3) inserted, widened or made eligible (the
# only ones that can be in a new pair), by the `touched` index.
_PAIRS_WINDOW = _pairs_sql(
    "SELECT * FROM recs_hour_members WHERE touched = $1::int8 AND eligible",
    "SELECT * FROM recs_session_members WHERE touched = $1::int8 AND eligible",
)
# Every eligible member of the users $1 (their pairs are built from scratch).
_PAIRS_USERS = _pairs_sql(
    "SELECT * FROM recs_hour_members WHERE user_id = ANY($1::text[]) AND eligible",
    "SELECT * FROM recs_session_members WHERE user_id = ANY($1::text[]) AND eligible",
)
# The pairs of some (kind, person, product)s: $1, $2, $3 (kind, user_id, product_id).
_DISPLACED = "unnest($1::int2[], $2::text[], $3::text[]) AS k(kind, user_id, product_id)"
# Every pair of those from their eligible members.
_PAIRS_PRODUCTS = _pairs_sql(
    f"""SELECT m.* FROM recs_hour_members AS m JOIN {_DISPLACED}
        ON m.kind = k.kind AND m.user_id = k.user_id AND m.product_id = k.product_id WHERE m.eligible""",
    f"""SELECT m.* FROM recs_session_members AS m JOIN {_DISPLACED}
        ON m.kind = k.kind AND m.user_id = k.user_id AND m.product_id = k.product_id WHERE m.eligible""",
)
_PAIRS_ALL = _pairs_sql(
    "SELECT * FROM recs_hour_members WHERE eligible", "SELECT * FROM recs_session_members WHERE eligible"
)


# Forgetting persons: their pairs leave the supports, their products the
# denominators, then every person-level row of theirs goes.
def _forget_pairs_sql(gone: str) -> str:
    """Person pairs deleted by `gone` (a DELETE ... RETURNING kind, a, b)
    leave the supports; returns the supports changed."""
    return f"""
WITH gone AS ({gone}),
dec AS (
    SELECT kind, p, q, count(*) AS n
    FROM (SELECT kind, a AS p, b AS q FROM gone UNION ALL SELECT kind, b, a FROM gone) AS x
    GROUP BY 1, 2, 3
)
UPDATE recs_pairs AS t SET support = t.support - dec.n
FROM dec WHERE t.kind = dec.kind AND t.product_id = dec.p AND t.other_id = dec.q
RETURNING t.kind, t.product_id, t.other_id, t.support
"""


_FORGET_PAIRS = _forget_pairs_sql(
    "DELETE FROM recs_person_pairs WHERE kind IN (1, 2) AND user_id = ANY($1::text[]) RETURNING kind, a, b"
)
# By each side's index (an OR of the two would read every pair of the person).
_FORGET_PRODUCT_PAIRS = _forget_pairs_sql(
    f"""DELETE FROM recs_person_pairs WHERE ctid = ANY(ARRAY(
        SELECT pp.ctid FROM {_DISPLACED} JOIN recs_person_pairs AS pp
          ON pp.kind = k.kind AND pp.user_id = k.user_id AND pp.a = k.product_id
        UNION
        SELECT pp.ctid FROM {_DISPLACED} JOIN recs_person_pairs AS pp
          ON pp.kind = k.kind AND pp.user_id = k.user_id AND pp.b = k.product_id))
    RETURNING kind, a, b"""
)
_DROP_PAIRS = """
DELETE FROM recs_pairs AS t USING unnest($1::int2[], $2::text[], $3::text[]) AS k(kind, p, q)
WHERE t.kind = k.kind AND t.product_id = k.p AND t.other_id = k.q AND t.support <= 0
"""
_FORGET_PRODUCTS = """
WITH gone AS (DELETE FROM recs_user_products WHERE user_id = ANY($1::text[]) RETURNING product_id, view_n, buy_n),
dec AS (
    SELECT k.kind, g.product_id, count(*) AS n
    FROM gone AS g CROSS JOIN LATERAL (VALUES (1::int2, g.view_n > 0), (2::int2, g.buy_n > 0)) AS k(kind, had)
    WHERE k.had GROUP BY 1, 2
),
days AS (DELETE FROM recs_user_days WHERE user_id = ANY($1::text[])),
hours AS (DELETE FROM recs_hour_members WHERE kind IN (1, 2) AND user_id = ANY($1::text[])),
sessions AS (DELETE FROM recs_session_members WHERE kind IN (1, 2) AND user_id = ANY($1::text[]))
UPDATE recs_product_people AS t SET people = t.people - dec.n
FROM dec WHERE t.kind = dec.kind AND t.product_id = dec.product_id
RETURNING t.kind, t.product_id, t.people
"""
_DROP_PEOPLE = """
DELETE FROM recs_product_people AS t USING unnest($1::int2[], $2::text[]) AS k(kind, p)
WHERE t.kind = k.kind AND t.product_id = k.p AND t.people <= 0
"""

# The journal of removals, for at most $1 persons a step (every row of
# theirs): the persons (recomputed from the log), and the removed events that
# had been applied (xid below $2, the step's start) subtracted from the
# trending buckets, by the same moments they were added with. Returns the
# persons, and the buckets that are now empty or whose latest event was
# among the removed (their last_at is read again).
_JOURNAL = f"""
WITH gone AS (
    DELETE FROM recs_removed
    WHERE user_id IN (SELECT DISTINCT user_id FROM recs_removed LIMIT $1)
    RETURNING user_id, product_id, event_type, occurred_at, xid
),
w AS (SELECT * FROM unnest($3::text[], $4::float8[]) AS w(event_type, weight)),
sub AS (
    SELECT h, product_id, count(*) AS n, {_moment_sums("x")}, max(occurred_at) AS latest
    FROM (SELECT g.product_id, w.weight, g.occurred_at, floor(date_part('epoch', g.occurred_at) / 3600)::int4 AS h,
                 (date_part('epoch', g.occurred_at) - floor(date_part('epoch', g.occurred_at) / 3600) * 3600 - 1800)
                 / 3600 AS x
          FROM gone AS g JOIN w ON w.event_type = g.event_type WHERE g.xid < $2::int8) AS s
    GROUP BY 1, 2
),
upd AS (
    UPDATE recs_product_hours AS t
    SET n = t.n - sub.n, {", ".join(f"m{k} = t.m{k} - sub.m{k}" for k in _M)}
    FROM sub WHERE t.hour = sub.h AND t.product_id = sub.product_id
    RETURNING t.hour, t.product_id, t.n, t.last_at <= sub.latest AS stale
)
SELECT (SELECT coalesce(array_agg(DISTINCT user_id), '{{}}') FROM gone) AS users,
       (SELECT count(*) FROM gone) AS removed,
       coalesce(array_agg(hour) FILTER (WHERE n <= 0), '{{}}') AS empty_hours,
       coalesce(array_agg(product_id) FILTER (WHERE n <= 0), '{{}}') AS empty_products,
       coalesce(array_agg(hour) FILTER (WHERE n > 0 AND stale), '{{}}') AS stale_hours,
       coalesce(array_agg(product_id) FILTER (WHERE n > 0 AND stale), '{{}}') AS stale_products
FROM upd
"""
JOURNAL_PERSONS = 500  # persons of the journal a step handles (the rest: the next steps)
_DROP_HOURS = """
DELETE FROM recs_product_hours AS t USING unnest($1::int4[], $2::text[]) AS k(hour, product_id)
WHERE t.hour = k.hour AND t.product_id = k.product_id
"""
# The latest applied event of a bucket whose latest was removed (one hour of
# the log, by occurred_at's index, for one product).
_LAST_AT = """
UPDATE recs_product_hours AS t
SET last_at = coalesce((
    SELECT max(e.occurred_at) FROM events AS e
    WHERE e.product_id = k.product_id AND e.event_type = ANY($4::text[]) AND e.xid < $3::int8
      AND e.occurred_at >= to_timestamp(k.hour * 3600.0) AND e.occurred_at < to_timestamp((k.hour + 1) * 3600.0)
), t.last_at)
FROM unnest($1::int4[], $2::text[]) AS k(hour, product_id)
WHERE t.hour = k.hour AND t.product_id = k.product_id
"""

TABLES = (  # every aggregate (recs_state and recs_removed aside)
    "recs_user_products",
    "recs_user_days",
    "recs_product_hours",
    "recs_hour_members",
    "recs_session_members",
    "recs_person_pairs",
    "recs_pairs",
    "recs_product_people",
)

_PARTITIONS = """
SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}')
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
"""


@dataclass(frozen=True, slots=True)
class StepResult:
    applied: int  # events read from the window
    removed: int  # journal rows handled
    rebuilt: bool
    applied_through: int | None  # None: another server holds the lease
    caught_up: bool  # the window reached the boundary


class LeaseHeld(Exception):
    """Another server maintains the recommendations now."""


# After a window this large (a backlog, a bulk load's transaction), the
# planner is told what the step wrote before it ranks and pairs: with the
# statistics of before, it takes the step's `touched` rows for a handful and
# picks plans that take minutes instead of seconds.
ANALYZE_EVENTS = 20_000
_ANALYZE = "ANALYZE recs_hour_members, recs_session_members, recs_person_pairs, recs_pairs"


async def apply_window(conn: asyncpg.Connection, start: int, end: int, recomputed: Sequence[str] = ()) -> int:
    """Applies the events with an xid in [start, end); returns how many were
    read. `recomputed`: the persons this step recomputed before (their rows
    carry the step's mark and may be in pairs already)."""
    aggregated = await conn.fetchrow(
        _aggregate_sql(_WINDOW, hours=True), start, end, _WEIGHT_TYPES, _WEIGHT_VALUES, end
    )
    applied: int = aggregated["applied"]
    if applied >= ANALYZE_EVENTS:
        await conn.execute(_ANALYZE)
    again = set(recomputed)
    widened = set(
        zip(aggregated["widened_kinds"], aggregated["widened_users"], aggregated["widened_products"], strict=True)
    )
    displaced: set[tuple[int, str, str]] = set()
    for statement in (_ELIGIBLE_WINDOW_HOURS, _ELIGIBLE_WINDOW_SESSIONS):
        for kind, user_id, product_id, eligible, this_step in await conn.fetch(statement, end):
            # A member this step inserted is in no pair yet (they come next): beyond the cap it is
            # merely not eligible. An older one (or one this step widened) may have witnessed pairs.
            key = (kind, user_id, product_id)
            if not eligible and (not this_step or key in widened or user_id in again):
                displaced.add(key)
    await conn.execute(_PAIRS_WINDOW, end)
    if displaced:
        # A member pushed out of its group's first CAP (it may have been the
        # only witness of some pairs): the person's pairs with that product
        # are found again from its members that are still eligible.
        keys = sorted(displaced)
        columns = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
        await _drop_zero_pairs(conn, await conn.fetch(_FORGET_PRODUCT_PAIRS, *columns))
        await conn.execute(_PAIRS_PRODUCTS, *columns)
    return applied


async def _forget_pairs(conn: asyncpg.Connection, users: list[str]) -> None:
    await _drop_zero_pairs(conn, await conn.fetch(_FORGET_PAIRS, users))


async def _drop_zero_pairs(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    zero = [r for r in rows if r["support"] <= 0]
    if zero:
        await conn.execute(
            _DROP_PAIRS, [r["kind"] for r in zero], [r["product_id"] for r in zero], [r["other_id"] for r in zero]
        )


async def recompute_persons(conn: asyncpg.Connection, users: Sequence[str], through: int, step: int) -> None:
    """Every person-level row of `users` recomputed from their events below
    transaction `through` (the denominators and supports adjusted)."""
    users = sorted(set(users))
    await _forget_pairs(conn, users)
    rows = await conn.fetch(_FORGET_PRODUCTS, users)
    zero = [r for r in rows if r["people"] <= 0]
    if zero:
        await conn.execute(_DROP_PEOPLE, [r["kind"] for r in zero], [r["product_id"] for r in zero])
    await conn.fetchval(_aggregate_sql(_USERS, hours=False), users, through, _WEIGHT_TYPES, _WEIGHT_VALUES, step)
    await conn.execute(_ELIGIBLE_USER_HOURS, users, through, step)
    await conn.execute(_ELIGIBLE_USER_SESSIONS, users, through, step)
    await conn.execute(_PAIRS_USERS, users)


async def rebuild(conn: asyncpg.Connection, through: int) -> int:
    """Every aggregate rebuilt from the events below transaction `through`
    (inside the caller's transaction: readers see the old ones until it
    commits). Returns the events read."""
    for table in TABLES:
        await conn.execute(f"DELETE FROM {table}")
    await conn.execute("DELETE FROM recs_removed")
    applied: int = await conn.fetchval(
        _aggregate_sql(_WINDOW, hours=True), -1, through, _WEIGHT_TYPES, _WEIGHT_VALUES, through
    )
    if applied >= ANALYZE_EVENTS:
        await conn.execute(_ANALYZE)
    await conn.execute(_ELIGIBLE_ALL_HOURS, through)
    await conn.execute(_ELIGIBLE_ALL_SESSIONS, through)
    await conn.execute(_PAIRS_ALL)
    return applied


_LOCK_STATE = (
    "SELECT applied_through, holder, coalesce(lease_until > now(), false) AS leased, partitions,"
    " event_stream_boundary() AS boundary, (" + _PARTITIONS + ") AS current FROM recs_state FOR UPDATE"
)
_ENSURE_STATE = "INSERT INTO recs_state DEFAULT VALUES ON CONFLICT DO NOTHING"
_SAVE_STATE = """
UPDATE recs_state SET applied_through = $1, holder = $2, lease_until = now() + $3 * interval '1 second',
    partitions = $4, updated_at = now(), built_at = CASE WHEN $5 THEN now() ELSE built_at END
"""


async def step(
    conn: asyncpg.Connection, holder: str, *, lease_seconds: float, max_span: int, force_rebuild: bool = False
) -> StepResult:
    """One step of the maintainer (see the module's docstring), in one
    REPEATABLE READ transaction on `conn`. Raises LeaseHeld when another
    holder's lease is in force; asyncpg's SerializationError when another
    step committed meanwhile (retry)."""
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute(_ENSURE_STATE)  # the row is gone after a TRUNCATE of every table (tests)
        state = await conn.fetchrow(_LOCK_STATE)
        if state["leased"] and state["holder"] != holder and not force_rebuild:
            raise LeaseHeld(state["holder"])
        boundary: int = state["boundary"]
        current: list[str] = list(state["current"])
        known = state["partitions"]
        applied_through = state["applied_through"]
        vanished = known is not None and bool(set(known) - set(current))
        if force_rebuild or applied_through is None or vanished:
            if vanished:
                _log.info("a partition of the log is gone (retention): rebuilding the recommendations")
            started = time.monotonic()
            applied = await rebuild(conn, boundary)
            await conn.execute(_SAVE_STATE, boundary, holder, lease_seconds, current, True)
            _log.info("recommendations rebuilt from %d events in %.1f s", applied, time.monotonic() - started)
            return StepResult(applied, 0, True, boundary, True)
        start: int = applied_through
        end = min(boundary, start + max_span) if start > 0 else boundary
        journal = await conn.fetchrow(_JOURNAL, JOURNAL_PERSONS, start, _WEIGHT_TYPES, _WEIGHT_VALUES)
        users: list[str] = journal["users"]
        if users:
            await recompute_persons(conn, users, start, end)
            if journal["empty_hours"]:
                await conn.execute(_DROP_HOURS, journal["empty_hours"], journal["empty_products"])
            if journal["stale_hours"]:
                await conn.execute(_LAST_AT, journal["stale_hours"], journal["stale_products"], start, _WEIGHT_TYPES)
        applied = 0
        if end > start:
            applied = await apply_window(conn, start, end, users)
        await conn.execute(_SAVE_STATE, max(start, end), holder, lease_seconds, current, False)
        more = len(users) >= JOURNAL_PERSONS  # the journal holds more persons: no pause before the next step
        return StepResult(applied, journal["removed"], False, max(start, end), end >= boundary and not more)


# --- reads -------------------------------------------------------------------------------------

# Reads by a user id answer for its person (person_of, migrations/0008): a
# linked anonymous id's events are stored under the person.
_RECENTLY_VIEWED = f"""
SELECT u.product_id, u.view_n, u.view_last FROM recs_user_products AS u
WHERE u.user_id = person_of($1) AND u.view_n > 0 AND u.product_id <> ALL($2::text[]) AND (NOT $3 OR u.buy_n = 0)
  AND (NOT $4 OR NOT EXISTS (
      SELECT FROM user_cart AS c WHERE c.user_id = person_of($1) AND c.product_id = u.product_id))
ORDER BY u.view_last DESC, u.product_id {_C}
LIMIT $5
"""


@dataclass(frozen=True, slots=True)
class Scored:
    product_id: str
    score: float
    support: int
    last_occurred_at: datetime | None


async def recently_viewed(
    pool: asyncpg.Pool,
    user_id: str,
    limit: int,
    *,
    exclude: Sequence[str],
    exclude_purchased: bool,
    exclude_in_cart: bool,
) -> list[Scored]:
    rows = await pool.fetch(_RECENTLY_VIEWED, user_id, list(exclude), exclude_purchased, exclude_in_cart, limit)
    return [Scored(r[0], float(r[1]), r[1], r[2]) for r in rows]


_TOGETHER = f"""
SELECT p.other_id, p.support, p.support::float8 / greatest(coalesce(pp.people, 0), 1)
FROM recs_pairs AS p
LEFT JOIN recs_product_people AS pp ON pp.kind = p.kind AND pp.product_id = p.product_id
WHERE p.kind = $1 AND p.product_id = $2 AND p.support > 0 AND p.other_id <> ALL($3::text[])
ORDER BY p.support DESC, p.other_id {_C}
LIMIT $4
"""


async def together(
    pool: asyncpg.Pool, kind: int, product_id: str, limit: int, *, exclude: Sequence[str]
) -> list[Scored]:
    """FrequentlyBoughtTogether (PURCHASES) or AlsoViewed (VIEWS)."""
    rows = await pool.fetch(_TOGETHER, kind, product_id, list(exclude), limit)
    return [Scored(r[0], r[2], r[1], None) for r in rows]


def _decayed(bucket_start: str, width_hours: float, *, fast: bool, latest: str | None = None) -> str:
    """SQL: a bucket's decayed weight from its moments, with the decay rate
    a = $1 per hour and now = $2 in hours: sum of w * e^(-a (now - t)) =
    e^(-a (now - mid)) * sum over k of a^k / k! * m_k (the series of e^(a x)
    around the midpoint, by Horner's rule). `fast` (the series is accurate:
    a * width / 2 at most SERIES_ACCURATE) computes just that; otherwise in
    log space, kept within what the bucket's edges allow (every event lies
    in it, and none after `latest`, hours, when given: also the answer when
    a half-life far shorter than the bucket makes the series useless). Both
    kept within float range."""
    series = f"m{MOMENTS - 1}"
    for k in reversed(range(MOMENTS - 1)):
        series = f"m{k} + $1::float8 / {k + 1} * ({series})"
    age = f"($2::float8 - {bucket_start} - {width_hours / 2})"  # now minus the midpoint
    if fast:
        return f"({series}) * exp(greatest(-$1::float8 * {age}, -700))"
    end = f"{bucket_start} + {width_hours}" if latest is None else f"least({bucket_start} + {width_hours}, {latest})"
    low = f"ln(m0) - $1::float8 * ({age} + {width_hours / 2})"
    high = f"ln(m0) - $1::float8 * ($2::float8 - ({end}))"
    log = f"ln(greatest({series}, 1e-300)) - $1::float8 * {age}"
    return f"exp(least(greatest(least(greatest({log}, {low}), {high}), -700), 700))"


# Where the series alone is accurate (a * width / 2 at most this: its relative
# error is below 1.1e-8, docs/analytics.md), it is computed without the log
# space and the clamps: about half the cost a bucket (trending reads every
# bucket of its window).
SERIES_ACCURATE = 0.35


def _series_accurate(rate: float, width_hours: float) -> bool:
    return rate * width_hours / 2 <= SERIES_ACCURATE


_TRENDING = {
    fast: f"""
SELECT product_id, sum({_decayed("hour", HOUR_BUCKET_HOURS, fast=fast)}) AS score, sum(n)::int8, max(last_at)
FROM recs_product_hours
WHERE hour >= $3::int4 AND hour <= $4::int4
GROUP BY product_id
ORDER BY score DESC, product_id {_C}
LIMIT $5
"""
    for fast in (False, True)
}


def trending_hours(now: float, window_seconds: float) -> tuple[int, int]:
    """The hour buckets of the window [now - window, now): those whose
    midpoint is at or after now - window, up to the one now is in (the
    documented rounding of the far edge: at most half an hour)."""
    first = math.ceil((now - window_seconds - 1_800) / 3_600)
    last = math.floor(now / 3_600)
    return first, last


async def trending(
    pool: asyncpg.Pool, now: float, window_seconds: float, half_life_seconds: float, limit: int
) -> list[Scored]:
    first, last = trending_hours(now, window_seconds)
    if first > last:
        return []
    rate = math.log(2) / (half_life_seconds / 3_600)
    rows = await pool.fetch(_TRENDING[_series_accurate(rate, HOUR_BUCKET_HOURS)], rate, now / 3_600, first, last, limit)
    return [Scored(r[0], r[1], r[2], r[3]) for r in rows]


_AFFINITIES = f"""
SELECT u.product_id, u.train_w, u.train_n, u.train_last FROM recs_user_products AS u
WHERE u.user_id = person_of($1) AND u.train_n > 0 AND u.product_id <> ALL($2::text[])
  AND (NOT $3 OR NOT EXISTS (
      SELECT FROM user_cart AS c WHERE c.user_id = person_of($1) AND c.product_id = u.product_id))
ORDER BY u.train_w DESC, u.product_id {_C}
LIMIT $4
"""
# With a half-life: the threshold algorithm (Fagin's), exact, so that a
# heavy person's call reads a few of its products instead of all of them
# (the bench's heaviest persons have most of the catalog). The products come
# by the index of their training weight, the heaviest first, a page a round;
# no event is later than now + MAX_FUTURE_SECONDS (the events' bound), so a
# product not read yet scores at most the next weight times e^(a x that
# bound). A product read scores at most its weight decayed from its latest
# event (`bound`): its decayed score, from its day buckets, is computed only
# when that bound reaches the limit-th best score so far. Once that best
# score exceeds what the products not read could score, no other can enter.
_AFFINITY_PAGE = f"""
SELECT u.product_id, u.train_w,
       u.train_w * exp(-$1::float8 * ($2::float8 - date_part('epoch', u.train_last) / 3600)) AS bound
FROM recs_user_products AS u
WHERE u.user_id = person_of($3) AND u.train_n > 0 AND u.product_id <> ALL($4::text[])
  AND (NOT $5 OR NOT EXISTS (
      SELECT FROM user_cart AS c WHERE c.user_id = person_of($3) AND c.product_id = u.product_id))
  AND u.train_w <= $6::float8 AND (u.train_w < $6::float8 OR u.product_id {_C} > $7::text)
ORDER BY u.train_w DESC, u.product_id {_C}
LIMIT $8
"""
# The person and the products on both sides: the planner then reads both by
# index (without, it hashed the whole person's recs_user_products: 86 ms a
# call on 1M events with a generic plan, 11 of 20 ms for the heaviest at 10M).
# A bucket's events are none later than the product's latest: the bound above holds for the estimate too
# (within the series' own error where it is accurate: BOUND_SLACK).
_DECAYED_AFFINITIES = {
    fast: f"""
SELECT d.product_id,
       sum({_decayed("d.day * 24.0", DAY_BUCKET_HOURS, fast=fast, latest="date_part('epoch', u.train_last) / 3600")})
       AS score, min(u.train_n), min(u.train_last)
FROM recs_user_days AS d
JOIN recs_user_products AS u ON u.user_id = d.user_id AND u.product_id = d.product_id
WHERE d.user_id = person_of($3) AND u.user_id = person_of($3)
  AND d.product_id = ANY($4::text[]) AND u.product_id = ANY($4::text[])
GROUP BY d.product_id
"""
    for fast in (False, True)
}
# The reads' pool plans every call for its parameters: a generic plan cannot
# see how many rows a person or an ANY(array) has, and twice chose to read
# a heavy person's whole rows (86 ms, then 70 ms a call for the bench's
# heaviest at 1M events, against 2 and 14 ms planned per call).
RECOMMENDATIONS_READ_SETTINGS = {"plan_cache_mode": "force_custom_plan"}
AFFINITY_FIRST_TAKE = 200  # products read in the first round (at least 4 x limit); x 4 a round after
FUTURE_HOURS = MAX_FUTURE_SECONDS / 3_600  # how far after now an event can be
BOUND_SLACK = 1 + 1e-6  # the bounds are widened by more than the series' relative error


async def affinities(
    pool: asyncpg.Pool,
    user_id: str,
    now: float,
    half_life_seconds: float | None,
    limit: int,
    *,
    exclude: Sequence[str],
    exclude_in_cart: bool,
) -> list[Scored]:
    if half_life_seconds is None:
        rows = await pool.fetch(_AFFINITIES, user_id, list(exclude), exclude_in_cart, limit)
        return [Scored(r[0], float(r[1]), r[2], r[3]) for r in rows]
    rate = math.log(2) / (half_life_seconds / 3_600)
    hours = now / 3_600
    take = max(AFFINITY_FIRST_TAKE, 4 * limit)
    decayed = _DECAYED_AFFINITIES[_series_accurate(rate, DAY_BUCKET_HOURS)]
    best: list[Scored] = []  # the best scored so far, by score then product_id
    weight, after = math.inf, ""  # where the next page starts
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        while True:  # one snapshot: the pages and the buckets agree
            page = await conn.fetch(
                _AFFINITY_PAGE, rate, hours, user_id, list(exclude), exclude_in_cart, weight, after, take + 1
            )
            # The page's products by bound, scored the likeliest first: the first few set the
            # limit-th best score, and of the rest only those whose bound reaches it are scored.
            pending = sorted(page[:take], key=lambda r: -r["bound"])
            chunk = 2 * limit
            while pending:
                floor = best[limit - 1].score if len(best) >= limit else -math.inf
                wanted = [r["product_id"] for r in pending[:chunk] if r["bound"] * BOUND_SLACK >= floor]
                if not wanted:
                    break  # by bound: the rest are below the floor too
                scored = await conn.fetch(decayed, rate, hours, user_id, wanted)
                best = sorted(
                    (*best, *(Scored(r[0], float(r[1]), r[2], r[3]) for r in scored)),
                    key=lambda s: (-s.score, s.product_id),  # code point order: COLLATE "C"
                )[:limit]
                pending, chunk = pending[chunk:], len(pending)
            if len(page) <= take:
                break  # every product read
            unread = page[take]["train_w"] * math.exp(rate * FUTURE_HOURS) * BOUND_SLACK
            if len(best) >= limit and best[-1].score > unread:
                break
            weight, after = page[take - 1]["train_w"], page[take - 1]["product_id"]
            take *= 4
    return best


def utc_now() -> float:
    return datetime.now(UTC).timestamp()


# --- the maintainer --------------------------------------------------------------------------

DEFAULT_INTERVAL = 0.5  # seconds between steps once caught up (freshness: this plus a step)
BUSY_SHARE = 0.6  # of the host's CPU time, taken by others: ingest near full speed (0.85 at full speed here)
LEASE_SECONDS = 30.0  # another server takes over this long after the holder stopped stepping
TARGET_EVENTS = 20_000  # events a step aims at: the window's span of xids adapts to it
FIRST_SPAN = 256  # xids of the first window after a (re)start
RETRY_BACKOFF = (0.2, 5.0)


class HostCpu:
    """The share of this host's CPU time that processes other than one
    (the maintainer's own backend) kept busy since the previous call
    (Linux's /proc; None elsewhere, or on the first call)."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._last: tuple[int, int, int] | None = None  # busy, all, the excluded process's (clock ticks)
        self._excluded: int | None = None

    def _ticks(self, pid: int | None) -> tuple[int, int, int] | None:
        try:
            with open(f"{self._proc}/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:9]]  # user .. steal
            own = 0
            if pid is not None:
                with open(f"{self._proc}/{pid}/stat", encoding="utf-8", errors="replace") as process:
                    after_name = process.read().rsplit(")", 1)[1].split()
                own = int(after_name[11]) + int(after_name[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + fields[4]  # idle, iowait
        return sum(fields) - idle, sum(fields), own

    def busy_share(self, exclude: int | None) -> float | None:
        now, last = self._ticks(exclude), self._last
        same = exclude == self._excluded
        self._last, self._excluded = now, exclude
        if now is None or last is None or not same or now[1] <= last[1]:
            return None
        return max(0.0, (now[0] - last[0]) - (now[2] - last[2])) / (now[1] - last[1])


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RecommendationsMaintainer:
    """Steps the recommendations forward from the committed events, once per
    host (the database side: the supervisor with --workers, the single
    process otherwise) and, by the lease in recs_state, once per deployment.
    Bulk work on its own connection: it never takes a connection of the
    serving pools, and its SQL runs in PostgreSQL, not on the event loop of
    the calls.

    Ingest first: given `busy` (the share of the database host's CPU that
    others than its own backend, whose pid it is given, kept busy since the
    last call: HostCpu when the database is on this host), the maintainer
    does not step while that share is at least BUSY_SHARE (a bulk ingest
    near full speed, which the maintenance would slow by a third:
    docs/analytics.md, "Ingest first"), for at most `yield_seconds` in a
    row; then it steps until it has caught up, whatever the load, so that
    the reads stay within the freshness promise."""

    def __init__(
        self,
        dsn: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        statement_cache_size: int = 100,
        holder: str | None = None,
        busy: Callable[[int | None], float | None] | None = None,
        yield_seconds: float = 0.0,
    ) -> None:
        self._dsn = dsn
        self._interval = interval
        self._statement_cache_size = statement_cache_size
        self.holder = holder or holder_name()
        self._task: asyncio.Task[None] | None = None
        self._span = FIRST_SPAN
        self._busy = busy if yield_seconds > 0 else None
        self._yield_seconds = yield_seconds
        self._yielding_since: float | None = None  # time.monotonic() of the first wait of this run of waits
        self._catching_up = False  # the waits' budget is spent: steps until caught up
        self.steps = 0  # committed steps (tests, logs)
        self.yields = 0  # waits for ingest (tests, logs)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="recommendations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        backoff = RETRY_BACKOFF[0]
        conn: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(
                            self._dsn,
                            statement_cache_size=self._statement_cache_size,
                            server_settings={"application_name": APPLICATION_NAME},
                        )
                    if self._yields(conn.get_server_pid()):
                        self.yields += 1
                        await asyncio.sleep(self._interval)
                        continue
                    result = await step(conn, self.holder, lease_seconds=LEASE_SECONDS, max_span=self._span)
                    self.steps += 1
                    backoff = RETRY_BACKOFF[0]
                    self._adapt(result)
                    if result.caught_up:
                        self._catching_up = False
                        await asyncio.sleep(self._interval)
                except LeaseHeld:
                    await asyncio.sleep(LEASE_SECONDS / 3)
                except asyncpg.TransactionRollbackError:
                    # Another server stepped meanwhile (serialization failure), or the step was the victim
                    # of a deadlock with an operator's DDL or TRUNCATE: nothing was applied, step again.
                    await asyncio.sleep(self._interval)
                except Exception as exc:
                    if not is_database_unavailable(exc):
                        _log.exception("a step of the recommendations failed; retrying")
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_BACKOFF[1])
        finally:
            if conn is not None:
                conn.terminate()

    def _yields(self, backend: int) -> bool:
        """Whether to wait instead of stepping: the host is saturated and the
        budget of waits in a row is not spent (see the class's docstring)."""
        if self._busy is None or self._catching_up:
            return False
        share = self._busy(backend)
        if share is None or share < BUSY_SHARE:
            self._yielding_since = None
            return False
        now = time.monotonic()
        if self._yielding_since is None:
            self._yielding_since = now
        elif now - self._yielding_since >= self._yield_seconds:
            self._yielding_since = None
            self._catching_up = True
            _log.info(
                "recommendations: the host stayed saturated for %.0f s; stepping until caught up", self._yield_seconds
            )
            return False
        return True

    def _adapt(self, result: StepResult) -> None:
        """About TARGET_EVENTS per step: halve the span after a larger step, double it after a small full one."""
        if result.applied > TARGET_EVENTS:
            self._span = max(1, self._span // 2)
        elif not result.caught_up and result.applied < TARGET_EVENTS // 4:
            self._span = min(self._span * 2, 1 << 30)


APPLICATION_NAME = "interactions-recommendations"
_CAUGHT_UP = "SELECT coalesce(applied_through >= $1, false) AND NOT EXISTS (SELECT FROM recs_removed) FROM recs_state"
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8"


async def wait_applied(conn: asyncpg.Connection | asyncpg.Pool, within: float) -> float:
    """Waits until every transaction committed before the call is in the
    aggregates and the journal of removals is empty; returns the seconds it
    took (TimeoutError after `within`)."""
    started = time.monotonic()
    target: int = await conn.fetchval(_NEXT_XID)
    async with asyncio.timeout(within):
        while not await conn.fetchval(_CAUGHT_UP, target):  # noqa: ASYNC110 - another process's progress
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def rebuild_now(dsn: str, *, statement_cache_size: int = 100) -> StepResult:
    """`interactions-server rebuild-recommendations`: a rebuild from the log, now."""
    conn = await asyncpg.connect(
        dsn, statement_cache_size=statement_cache_size, server_settings={"application_name": APPLICATION_NAME}
    )
    try:
        return await step(conn, holder_name(), lease_seconds=0, max_span=0, force_rebuild=True)
    finally:
        await conn.close()
