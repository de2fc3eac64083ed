-- The server's keys, the audit log, and what exports need to notice a
-- deletion their snapshot predates (issue 17, items 7-9).

-- Secrets every worker and host of a deployment shares (interactions_server
-- .keyring): 'cursor' keys seal the tokens handed to callers (AES-SIV, 64
-- bytes), 'audit' keys hash the ids the audit log names (HMAC-SHA256, 32
-- bytes). Created by the first server that starts (storage.load_keyring:
-- INSERT ... ON CONFLICT DO NOTHING, then read back, so servers starting
-- together agree), not here: a migration has no good source of random bytes
-- without pgcrypto. The newest version of a purpose is used; older ones
-- still open the tokens they sealed.
CREATE TABLE server_keys (
    purpose     text        NOT NULL CHECK (purpose IN ('cursor', 'audit')),
    version     smallint    NOT NULL CHECK (version BETWEEN 1 AND 255),
    secret      bytea       NOT NULL CHECK (length(secret) IN (32, 64)),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (purpose, version)
);

-- Who did what to whose data, and when (storage.record_audit), in the
-- transaction that did it: deletions (AdminService.DeleteUserData) and,
-- later, removals by the data lifecycle. The user is named only by a keyed
-- hash (subject_hash, under audit key subject_key): the log holds no raw id,
-- and knowing an id is not enough to find its rows without the key.
CREATE TABLE audit_log (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    action       text        NOT NULL,  -- e.g. 'delete_user_data'
    actor        text        NOT NULL,  -- e.g. 'token:ops', 'unauthenticated', 'system:retention'
    subject_hash bytea       CHECK (length(subject_hash) = 32),  -- NULL: not about one user
    subject_key  smallint,
    counts       jsonb       NOT NULL DEFAULT '{}',  -- {"events": 600, ...}
    detail       jsonb       NOT NULL DEFAULT '{}',  -- e.g. {"deleted_through": "..."}
    CHECK ((subject_hash IS NULL) = (subject_key IS NULL))
);
CREATE INDEX audit_log_subject ON audit_log (subject_hash, at) WHERE subject_hash IS NOT NULL;

-- The transaction that last deleted each user's data. An export reads from a
-- REPEATABLE READ snapshot, which still holds the rows of a deletion that
-- committed after it began; before each response it asks, on another
-- connection, for the deletions its snapshot does not see
-- (pg_visible_in_snapshot), and leaves those users out. The index keeps that
-- check a range scan past the snapshot's xmin, whatever the number of users
-- ever deleted. Rows before this migration get its xid: visible to any
-- snapshot taken after it.
ALTER TABLE user_deletions ADD COLUMN deleted_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX user_deletions_xid ON user_deletions (deleted_xid);
