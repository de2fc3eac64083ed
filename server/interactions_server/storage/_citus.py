"""Citus: what the database is (plain PostgreSQL, a Citus coordinator, a Citus
worker), where each table lives on a cluster, the work of
`interactions-server distribute`, and the connections that make the write
path use the statements Citus routes to shards (_citus_write.py).

Every write goes through the coordinator: the write path's advisory locks
(the state-sync key locks of migrations/0005, the deletion buckets of 0003)
are per node, so they hold only while every transaction takes them on the
same node. A server pointed at a worker therefore refuses to start.

Where each table lives (docs/scaling.md explains each choice):

- distributed by user_id, co-located with `events` (so one user's rows are
  on one worker and every per-user statement is a router query): every table
  keyed by the user;
- kept on the coordinator, as plain local tables: the tables only the
  coordinator reads or writes, in statements that must run there.

A table of the schema that is in neither list stops `distribute` (and the
test that checks the list against the migrations): every new table must say
where it lives on a cluster.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import asyncpg

from interactions_server.errors import StartupError

_log = logging.getLogger("interactions_server.citus")

ANCHOR = "events"  # the table the others are co-located with

# Table -> its distribution column (co-located with ANCHOR).
DISTRIBUTED: dict[str, str] = {
    "events": "user_id",  # the log (its monthly partitions are distributed alike)
    "event_keys": "user_id",  # dedup: (user_id, event_id)
    "cart_lines": "user_id",
    "wishlist_lines": "user_id",
    "purchase_history": "user_id",
    "state_history": "user_id",  # the fold's history, read with its lines (0006)
    "state_segments": "user_id",
}

# Table -> why it stays a local table of the coordinator.
LOCAL: dict[str, str] = {
    "schema_migrations": "the migration runner's own bookkeeping, read and written only by the coordinator",
    "user_deletions": "read by resolve_users_for_ingest on the coordinator under the deletion lock taken there; "
    "its upsert sets deleted_at = now() and deleted_xid = pg_current_xact_id(), which Citus refuses on a "
    "reference table, and exports compare deleted_xid with the coordinator's snapshot",
    "identity_links": "read by resolve_users_for_ingest in the write path's first statement, on the "
    "coordinator (a correlated probe per user, which Citus refuses over a distributed table), and by "
    "person_of before every per-user read; one row per linked guest, written only at link time",
    "server_keys": "read once by each server at start, through the coordinator; nothing on a worker needs it",
    "audit_log": "written in the deletion's transaction on the coordinator, read by operators; an identity key",
    "event_stream_horizon": "one row: what retention removed, written by note_events_removed in the "
    "coordinator's transaction that removes events",
    "retention_schedule": "the daily retention run's lease (one row), claimed and renewed through the coordinator",
    "retention_detached": "the names of the log's partitions retention detached, and its walk's position: "
    "bookkeeping of the coordinator's DDL",
    # The recommendations' aggregates (migrations/0011): on a cluster the
    # maintainer does not run (the journal's trigger cannot be on a
    # distributed table, and the log's transaction ids are per node), so the
    # tables stay, empty, on the coordinator (docs/scaling.md).
    **{
        table: "the recommendations' aggregates: not maintained on a cluster (docs/scaling.md), empty on the coordinator"
        for table in (
            "recs_state",
            "recs_removed",
            "recs_user_products",
            "recs_user_days",
            "recs_product_hours",
            "recs_hour_members",
            "recs_session_members",
            "recs_person_pairs",
            "recs_pairs",
            "recs_product_people",
        )
    },
}


class DatabaseKind(NamedTuple):
    """What a database is, for the server and `distribute`."""

    citus: str | None  # the Citus extension's version; None: not installed in this database
    worker: bool  # a Citus worker node (pg_dist_local_group.groupid <> 0)
    workers: int  # on a coordinator: its active primary worker nodes
    distributed: bool  # the event log is a distributed table: use the Citus statements

    @property
    def cluster(self) -> bool:
        """A Citus coordinator whose event log is distributed."""
        return self.citus is not None and not self.worker and self.distributed


PLAIN = DatabaseKind(None, False, 0, False)


async def database_kind(conn: asyncpg.Connection) -> DatabaseKind:
    """What the database of `conn` is (a few catalog reads)."""
    version: str | None = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
    if version is None:
        return PLAIN
    row = await conn.fetchrow(
        """
        SELECT (SELECT groupid FROM pg_dist_local_group) <> 0 AS worker,
               (SELECT count(*) FROM pg_dist_node
                WHERE groupid <> 0 AND noderole = 'primary' AND isactive)::int AS workers,
               EXISTS (SELECT FROM pg_dist_partition
                       WHERE logicalrelid = to_regclass($1) AND partmethod = 'h') AS distributed
        """,
        ANCHOR,
    )
    return DatabaseKind(version, row["worker"], row["workers"], row["distributed"])


async def refuse_worker(conn: asyncpg.Connection) -> DatabaseKind:
    """The database's kind; raises StartupError on a Citus worker."""
    kind = await database_kind(conn)
    if kind.worker:
        where = await conn.fetchval(
            "SELECT coalesce(host(inet_server_addr()), 'localhost') || ':' || inet_server_port() || '/' || current_database()"
        )
        raise StartupError(
            f"the database at {where} is a Citus worker node: point --database-url at the coordinator "
            "(every write goes through it, see docs/scaling.md)"
        )
    return kind


async def kind_of(dsn: str, *, statement_cache_size: int) -> DatabaseKind:
    """What the database at `dsn` is, on a connection of its own; raises
    StartupError on a Citus worker."""
    conn = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
    try:
        return await refuse_worker(conn)
    finally:
        await conn.close()


class CitusConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """A connection to a Citus coordinator whose tables are distributed: the
    storage functions of the write path see it (also through a pool's proxy,
    which forwards attribute reads) and use the statements of _citus_write."""

    interactions_on_citus = True


def on_citus(conn: asyncpg.Connection) -> bool:
    """Whether `conn` (a connection or a pool's proxy of one) is a CitusConnection."""
    return bool(getattr(conn, "interactions_on_citus", False))


# --- per-user reads ----------------------------------------------------------------

_PERSON = "person_of($1)"


def person_sql(conn: asyncpg.Connection, sql: str) -> str:
    """A per-user read's statement for `conn`: on a cluster, the person as
    parameter $1 instead of person_of($1) (see for_person)."""
    return sql.replace(_PERSON, "$1") if on_citus(conn) else sql


async def for_person(conn: asyncpg.Connection, sql: str, user_id: str) -> tuple[str, str]:
    """A per-user read's statement (filtering by person_of($1)) and its first
    parameter. On PostgreSQL, as given: the statement resolves the id itself.
    On a cluster the id is resolved first, on the coordinator (identity_links
    is its local table), and the statement filters by the person as a
    parameter: Citus prunes to one shard only by a parameter or constant
    distribution column, and person_of inside a shard's query would be a
    nested distributed query, which it refuses."""
    if not on_citus(conn):
        return sql, user_id
    person: str = await conn.fetchval("SELECT person_of($1)", user_id)
    return person_sql(conn, sql), person


# --- placing the tables -----------------------------------------------------------


class Placement(NamedTuple):
    table: str
    method: str  # 'h': hash-distributed, 'n': reference or Citus-local table
    column: str | None
    colocation: int
    shards: int


async def _placements(conn: asyncpg.Connection) -> dict[str, Placement]:
    rows = await conn.fetch(
        """
        SELECT p.logicalrelid::regclass::text AS table, p.partmethod::text AS method,
               CASE WHEN p.partmethod = 'h' THEN column_to_column_name(p.logicalrelid, p.partkey) END AS column,
               p.colocationid AS colocation,
               (SELECT count(*) FROM pg_dist_shard AS s WHERE s.logicalrelid = p.logicalrelid)::int AS shards
        FROM pg_dist_partition AS p
        JOIN pg_class AS c ON c.oid = p.logicalrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND NOT c.relispartition
        """
    )
    return {r["table"]: Placement(*r) for r in rows}


async def schema_tables(conn: asyncpg.Connection) -> list[str]:
    """The tables of the service's schema (partitions aside)."""
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
        ORDER BY c.relname
        """
    )
    return [r["relname"] for r in rows]


RECS_TRIGGER = "events_recs_removed"  # migrations/0011: the recommendations' journal of removals
_HAS_RECS_TRIGGER = (
    f"SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = '{RECS_TRIGGER}' AND tgrelid = '{ANCHOR}'::regclass)"
)


def unplaced(tables: list[str]) -> list[str]:
    """The tables this module does not say where to put."""
    return [t for t in tables if t not in DISTRIBUTED and t not in LOCAL]


async def place_tables(conn: asyncpg.Connection, shard_count: int | None) -> list[str]:
    """Distributes every table of DISTRIBUTED that is not yet, co-located with
    ANCHOR (in `shard_count` shards when ANCHOR is new; else Citus's
    citus.shard_count); checks those already distributed; returns a line per
    table saying what it did. Idempotent. Call it holding the migration lock,
    on a coordinator with workers, with the schema migrated."""
    tables = await schema_tables(conn)
    if unknown := unplaced(tables):
        raise StartupError(
            f"tables with no place on a Citus cluster: {', '.join(unknown)}: add each to DISTRIBUTED or LOCAL "
            "in server/interactions_server/storage/_citus.py (and docs/scaling.md)"
        )
    placed = await _placements(conn)
    lines: list[str] = []
    anchor = placed.get(ANCHOR)
    if anchor is not None and shard_count is not None and anchor.shards != shard_count:
        raise StartupError(
            f"{ANCHOR} is already distributed in {anchor.shards} shards, not {shard_count}: "
            "leave out --shard-count (alter_distributed_table changes a shard count)"
        )
    if ANCHOR not in placed and await conn.fetchval(_HAS_RECS_TRIGGER):
        # Citus refuses to distribute a table with triggers, and this one's
        # function writes recs_removed, a coordinator table a worker's shard
        # could not reach: on a cluster the recommendations are not maintained.
        await conn.execute(f"DROP TRIGGER {RECS_TRIGGER} ON {ANCHOR}")
        lines.append(f"{ANCHOR}: trigger {RECS_TRIGGER} dropped (recommendations are not maintained on a cluster)")
    for table in [ANCHOR, *sorted(set(DISTRIBUTED) - {ANCHOR})]:
        if table not in tables:
            continue  # a migration not applied here
        column = DISTRIBUTED[table]
        current = placed.get(table)
        if current is not None:
            if (
                current.method != "h"
                or current.column != column
                or (anchor and current.colocation != anchor.colocation)
            ):
                raise StartupError(
                    f"{table} is already placed otherwise on this cluster (method {current.method}, column "
                    f"{current.column}, co-location {current.colocation}): undistribute_table('{table}') first"
                )
            lines.append(f"{table}: already distributed by {column} ({current.shards} shards)")
            continue
        if table == ANCHOR:
            if shard_count is None:
                await conn.execute("SELECT create_distributed_table($1, $2)", table, column)
            else:
                await conn.execute(
                    "SELECT create_distributed_table($1, $2, shard_count => $3)", table, column, shard_count
                )
        else:
            await conn.execute("SELECT create_distributed_table($1, $2, colocate_with => $3)", table, column, ANCHOR)
        # The rows already there were copied into the shards; the coordinator's copy goes.
        await conn.execute("SELECT truncate_local_data_after_distributing_table($1)", table)
        placed = await _placements(conn)
        anchor = placed[ANCHOR]
        lines.append(f"{table}: distributed by {column} ({placed[table].shards} shards, co-located with {ANCHOR})")
    for table in sorted(set(LOCAL) & set(tables)):
        if table in placed:
            raise StartupError(f"{table} must stay a local table of the coordinator: undistribute_table('{table}')")
        lines.append(f"{table}: kept on the coordinator (local)")
    return lines
