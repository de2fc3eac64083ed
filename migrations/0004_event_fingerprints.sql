-- A fingerprint of each logged event's content as the client sent it, kept
-- with its dedup key: a resend with the same (user_id, event_id) and the same
-- content is a duplicate, with other content a conflict (ALREADY_EXISTS).
-- Keys logged before this migration have none (NULL): unknown, treated as
-- matching any content.
ALTER TABLE event_keys ADD COLUMN fingerprint bigint;

-- The write path's guard against late commits: a statement evaluating it
-- after the caller's deadline (epoch seconds; NULL: none) fails with
-- query_canceled, so its transaction rolls back. It runs in PostgreSQL, so it
-- also holds when the database was frozen while the statement waited.
CREATE FUNCTION deadline_guard(deadline double precision) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF deadline IS NOT NULL AND extract(epoch FROM clock_timestamp()) > deadline THEN
        RAISE EXCEPTION 'the caller''s deadline has passed' USING ERRCODE = 'query_canceled';
    END IF;
    RETURN true;
END $$;
