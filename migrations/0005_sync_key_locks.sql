-- The per-(user, product) state-sync locks, taken by the batch's insert
-- statement itself (one round trip fewer per syncing batch): transaction-
-- scoped advisory locks, in one consistent order (so concurrent batches
-- cannot deadlock), held until commit. Per key rather than per user: a hot
-- user's batches only wait for each other where they touch the same product.
-- The insert statement calls this before anything else (an InitPlan of its
-- batch), and the batch reads the state lines only in later statements, whose
-- snapshots see what the previous holder of a lock committed.
CREATE FUNCTION lock_sync_keys(users text[], products text[]) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7301, k)
    FROM (SELECT DISTINCT hashtext(u || '/' || p) AS k FROM unnest(users, products) AS r(u, p) ORDER BY k) AS keys;
    RETURN true;
END $$;
