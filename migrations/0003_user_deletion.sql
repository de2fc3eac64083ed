-- Deleting a user's data (AdminService.DeleteUserData) and keeping it deleted.

-- The deletion watermark of each user whose data was deleted: an event of
-- that user with occurred_at at or before deleted_through is refused, so a
-- replay of an old stream or import cannot bring the data back.
CREATE TABLE user_deletions (
    user_id          text        PRIMARY KEY,
    deleted_through  timestamptz NOT NULL,
    deleted_at       timestamptz NOT NULL DEFAULT now()  -- of the last deletion
);

-- Called by every ingest statement with the users of its batch: takes the
-- users' deletion locks in shared mode (ingests never wait for each other),
-- then returns the watermarks of those users. A deletion takes the same lock
-- exclusively, holds it until it commits, and records the watermark and
-- deletes what it has not deleted yet only once it holds it, so:
--  * an ingest that holds the lock commits before the deletion goes on, and
--    the deletion sees (and deletes) what it wrote;
--  * an ingest that comes later waits until the deletion commits, and then
--    sees the new watermark. It does, although its own statement began
--    before the deletion committed: a VOLATILE function takes a fresh
--    snapshot for each statement it runs (READ COMMITTED), and the SELECT
--    below runs only once the locks are held.
-- Locks are per bucket of users (hashtext(user_id) modulo 64), so a batch
-- takes at most 64 locks, whatever its size (the lock table is shared and
-- bounded); a deletion briefly holds up the batches with users in its bucket
-- (it deletes the user's events before taking the lock).
-- They are taken in key order, so no two callers can deadlock on them.
CREATE FUNCTION lock_users_for_ingest(users text[])
RETURNS TABLE (user_id text, deleted_through timestamptz)
-- ROWS 1: few of a batch's users were ever deleted; the planner then joins
-- the batch to the result by hashing it instead of sorting the batch.
LANGUAGE plpgsql VOLATILE ROWS 1 AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7303, b)
    FROM (SELECT DISTINCT hashtext(u) & 63 AS b FROM unnest(users) AS u ORDER BY b) AS buckets;
    -- A join, not `= ANY(users)`: that sorts the array (collation compares),
    -- which costs more than the whole lookup. `users` may repeat a user.
    RETURN QUERY
        SELECT DISTINCT d.user_id, d.deleted_through
        FROM unnest(users) AS u JOIN user_deletions AS d ON d.user_id = u;
END $$;
