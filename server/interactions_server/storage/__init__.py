"""Every SQL statement of the service (outside migrations/) and the database's
lifecycle: the pools, the embedded PostgreSQL, the migrations, the partition
upkeep. Nothing here knows of gRPC; callers pass pools and connections in.

- `_pool`: pools, connections terminated when broken, deadline-bounded
  transactions, the health probe's connection;
- `_events`: the write path's log statement and the reads of the state
  (cart, wishlist, purchases); `_state`: the state tables' sync (lines,
  their history and sealed segments, purchases);
- `_analytics`: the AnalyticsService's reads; `_deletion`: DeleteUserData;
- `_lifecycle`: removals by the retention policy and purges (bulk, paced,
  audited); `_retention`: the policy's daily run (in `_database`'s Database)
  and the `interactions-server retention` command's;
- `_user_data`: a person's data for the right of access (ExportUserData);
- `_keys`: the server's keys (load_keyring); `_audit`: the audit log
  (record_audit, in the transaction of what it records; audit_records);
- `_identity`: identity links (their locks and facts, the move of an
  anonymous id's rows under its person, GetIdentity);
- `_event_stream`: the subscription's reads (the stream's order and positions);
- `_recommendations`: the RecommendationService's aggregates, their maintainer
  (in `_database`'s Database, once per host) and rebuild, and its reads;
- `_database`: the database side of a host (embedded PostgreSQL, migrations,
  partitions), and the operator's errors of a database that refuses us;
- `_migrate`, `_partitions`, `_embedded`: what `_database` runs;
- `_citus`: what the database is (plain, a Citus coordinator or worker),
  where each table lives on a cluster, `distribute`; `_citus_write`: the
  write path's statements on a cluster (the same semantics as _events' and
  _state's, in statements Citus routes to shards).
"""

from interactions_server.storage._analytics import (
    ActiveUsers,
    EventRow,
    SearchOutcome,
    SessionEvent,
    SessionStart,
    TrainingRow,
    TypeActivity,
    TypeFilter,
    Window,
    active_users,
    export_events,
    search_outcomes,
    session_events,
    session_timeline,
    sessions_page,
    snapshot,
    snapshot_of,
    training_rows,
    user_activity,
    user_events,
    users_deleted_since,
)
from interactions_server.storage._audit import (
    DELETE_USER_DATA,
    AuditRecord,
    StoredAuditRecord,
    actor_of,
    audit_records,
    record_audit,
)
from interactions_server.storage._citus import DatabaseKind, database_kind, kind_of, on_citus
from interactions_server.storage._database import Database, database_error, distribute, migrate_when_reachable
from interactions_server.storage._deletion import DeletionCounts, count_user_data, delete_user_data
from interactions_server.storage._embedded import EmbeddedPostgres, start_tuned
from interactions_server.storage._event_stream import (
    Poll,
    StreamDeletion,
    StreamFilter,
    StreamKey,
    StreamPosition,
    StreamRead,
    poll_stream,
    read_stream,
    removed_through,
    row_position,
    summarize_stream,
)
from interactions_server.storage._events import (
    CartRow,
    EventColumns,
    InsertOutcome,
    PurchaseRecord,
    WishlistRow,
    fetch_cart,
    fetch_purchases,
    fetch_wishlist,
    insert_events,
)
from interactions_server.storage._identity import (
    Identity,
    IdentityFacts,
    Link,
    MovedEvent,
    fetch_identity,
    lock_identities,
    move_linked,
    person_ids,
    person_of,
)
from interactions_server.storage._keys import load_keyring
from interactions_server.storage._lifecycle import (
    PURGE_EVENTS,
    RETENTION,
    Pace,
    PurgeFilter,
    Removed,
    RetentionPlan,
    count_purge,
    count_retention,
    purge_events,
)
from interactions_server.storage._migrate import MigrationError, MigrationFailed, migrate
from interactions_server.storage._pool import (
    Probe,
    acquire,
    close_pool,
    open_pool,
    quiet_pool_logs,
    renew_connections,
    transaction,
)
from interactions_server.storage._recommendations import (
    BUSY_SHARE,
    PURCHASES,
    RECOMMENDATIONS_READ_SETTINGS,
    VIEWS,
    RecommendationsMaintainer,
    Scored,
    affinities,
    rebuild_now,
    recently_viewed,
    together,
    trending,
    wait_applied,
)
from interactions_server.storage._retention import RetentionBusy, RetentionKeeper, run_retention
from interactions_server.storage._state import (
    STATE_TABLES,
    FoldRows,
    HistoryRow,
    LatePosition,
    PurchaseRow,
    Segment,
    StateLine,
    StoredRow,
    TailStart,
    fetch_fold_rows,
    fetch_state_lines,
    lock_state_keys,
    write_state,
)
from interactions_server.storage._user_data import USER_DATA_PARTS, UserHeader, user_data_part, user_header

__all__ = [
    "BUSY_SHARE",
    "DELETE_USER_DATA",
    "PURCHASES",
    "PURGE_EVENTS",
    "RECOMMENDATIONS_READ_SETTINGS",
    "RETENTION",
    "STATE_TABLES",
    "USER_DATA_PARTS",
    "VIEWS",
    "ActiveUsers",
    "AuditRecord",
    "CartRow",
    "Database",
    "DatabaseKind",
    "DeletionCounts",
    "EmbeddedPostgres",
    "EventColumns",
    "EventRow",
    "FoldRows",
    "HistoryRow",
    "Identity",
    "IdentityFacts",
    "InsertOutcome",
    "LatePosition",
    "Link",
    "MigrationError",
    "MigrationFailed",
    "MovedEvent",
    "Pace",
    "Poll",
    "Probe",
    "PurchaseRecord",
    "PurchaseRow",
    "PurgeFilter",
    "RecommendationsMaintainer",
    "Removed",
    "RetentionBusy",
    "RetentionKeeper",
    "RetentionPlan",
    "Scored",
    "SearchOutcome",
    "Segment",
    "SessionEvent",
    "SessionStart",
    "StateLine",
    "StoredAuditRecord",
    "StoredRow",
    "StreamDeletion",
    "StreamFilter",
    "StreamKey",
    "StreamPosition",
    "StreamRead",
    "TailStart",
    "TrainingRow",
    "TypeActivity",
    "TypeFilter",
    "UserHeader",
    "Window",
    "WishlistRow",
    "acquire",
    "active_users",
    "actor_of",
    "affinities",
    "audit_records",
    "close_pool",
    "count_purge",
    "count_retention",
    "count_user_data",
    "database_error",
    "database_kind",
    "delete_user_data",
    "distribute",
    "export_events",
    "fetch_cart",
    "fetch_fold_rows",
    "fetch_identity",
    "fetch_purchases",
    "fetch_state_lines",
    "fetch_wishlist",
    "insert_events",
    "kind_of",
    "load_keyring",
    "lock_identities",
    "lock_state_keys",
    "migrate",
    "migrate_when_reachable",
    "move_linked",
    "on_citus",
    "open_pool",
    "person_ids",
    "person_of",
    "poll_stream",
    "purge_events",
    "quiet_pool_logs",
    "read_stream",
    "rebuild_now",
    "recently_viewed",
    "record_audit",
    "removed_through",
    "renew_connections",
    "row_position",
    "run_retention",
    "search_outcomes",
    "session_events",
    "session_timeline",
    "sessions_page",
    "snapshot",
    "snapshot_of",
    "start_tuned",
    "summarize_stream",
    "together",
    "training_rows",
    "transaction",
    "trending",
    "user_activity",
    "user_data_part",
    "user_events",
    "user_header",
    "users_deleted_since",
    "wait_applied",
    "write_state",
]
