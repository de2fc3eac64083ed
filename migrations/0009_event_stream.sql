-- The subscription (EventStreamService, docs/subscribe.md): every logged event
-- is stamped with the id of the transaction that wrote it, and a reader takes
-- only rows below the oldest transaction still running, so no later commit can
-- add a row behind it.

-- The writing transaction's id (pg_current_xact_id(), the 64-bit xid8, as a
-- bigint: BRIN has no xid8 operator class). Rows logged before this migration
-- get 0: one "transaction" before every other, in the order of the per-user
-- index. Added with a constant default first, so that no partition is
-- rewritten, then the default every new row gets.
ALTER TABLE events ADD COLUMN xid bigint NOT NULL DEFAULT 0;
ALTER TABLE events ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint);

-- How the reader finds a window of transaction ids. xids grow with time and
-- the log is append-mostly, so a block range holds a narrow range of them; a
-- BRIN costs an insert almost nothing where a B-tree would cost a leaf entry
-- per event (docs/subscribe.md, "Cost"). The reader summarizes the ranges
-- filled since its last read itself (event_stream_summarize), so that its
-- reads never scan an unsummarized tail; autosummarize covers the time when
-- nobody subscribes.
CREATE INDEX events_xid_brin ON events USING brin (xid) WITH (pages_per_range = 32, autosummarize = on);

-- Where the stream may read up to: every transaction below it has finished.
-- Called inside the reading statement, whose snapshot it is, so that every
-- committed row below the boundary is visible to that same statement.
CREATE FUNCTION event_stream_boundary() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
RETURN pg_snapshot_xmin(pg_current_snapshot())::text::bigint;

-- The partition hash of a user (SubscribeEventsRequest.partition): the first
-- 4 bytes of SHA-256 of the UTF-8 user_id, as an unsigned big-endian integer.
-- Consumers may compute it themselves; the server's Python does not need to.
CREATE FUNCTION event_stream_partition_hash(user_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN ('x' || substr(encode(sha256(convert_to(user_id, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint;

-- Summarizes the block ranges of the xid index that were filled since the
-- last call, in every partition of the log, so that the reader's next read
-- skips them. A partition whose lock is taken (by autovacuum, which
-- summarizes too, or by another server's reader) is skipped this time.
-- Returns the ranges summarized.
CREATE FUNCTION event_stream_summarize() RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    index regclass;
    summarized integer := 0;
BEGIN
    SET LOCAL lock_timeout = '10ms';
    FOR index IN
        SELECT i.inhrelid::regclass FROM pg_inherits AS i
        WHERE i.inhparent = 'events_xid_brin'::regclass
    LOOP
        BEGIN
            summarized := summarized + brin_summarize_new_values(index);
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
    RETURN summarized;
END $$;

-- What retention removed, for the check of old cursors: a cursor at or
-- before `removed_through` (the largest xid among the removed events) may
-- have missed a removed event, and is refused with FAILED_PRECONDITION; the
-- oldest position available is the one right after it. One row; absent
-- until something was removed. Whatever removes events from the log (today
-- drop_event_partitions_before; the lifecycle's policies and purges) records
-- it here with note_events_removed(largest xid removed), in the transaction
-- that removes them (storage/_lifecycle.py does, for every batch).
CREATE TABLE event_stream_horizon (
    only_row         boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    removed_through  bigint      NOT NULL,
    removed_at       timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION note_events_removed(through bigint) RETURNS void
LANGUAGE sql VOLATILE AS $$
    INSERT INTO event_stream_horizon AS h (removed_through) SELECT through WHERE through IS NOT NULL
    ON CONFLICT (only_row) DO UPDATE
    SET removed_through = excluded.removed_through, removed_at = now()
    WHERE excluded.removed_through > h.removed_through  -- raised only; no write when it stays
$$;

-- drop_event_partitions_before (0001) as before, now recording the largest
-- xid it removed. A partition is locked against writes (SHARE: reads go on)
-- before its largest xid is read, so that no late event can land in it
-- between that read and the DROP.
CREATE OR REPLACE FUNCTION drop_event_partitions_before(cutoff date) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    boundary timestamptz := date_trunc('month', cutoff);
    part record;
    removed bigint;
    largest bigint;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{4}_[0-9]{2}$'
          AND to_date(substr(c.relname, 8), 'YYYY_MM') + interval '1 month' <= boundary
        ORDER BY c.relname
    LOOP
        EXECUTE format('LOCK TABLE %I IN SHARE MODE', part.relname);
        EXECUTE format('SELECT max(xid) FROM %I', part.relname) INTO largest;
        removed := greatest(removed, largest);
        EXECUTE format('DROP TABLE %I', part.relname);
        RETURN NEXT part.relname;
    END LOOP;
    WITH gone AS (DELETE FROM events_default WHERE occurred_at < boundary RETURNING xid)
    SELECT greatest(removed, max(xid)) INTO removed FROM gone;
    DELETE FROM event_keys WHERE occurred_at < boundary;
    PERFORM note_events_removed(removed);
END $$;

