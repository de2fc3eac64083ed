-- Citus (issue 22): lock_identities (0008) with its facts read as statements
-- Citus can run when the log and the state's history are distributed and
-- identity_links is the coordinator's (docs/scaling.md): the reads of those
-- two tables are uncorrelated, filtered by the ids (an index probe per id on
-- PostgreSQL, as before: events_logins and state_history's key), because
-- Citus refuses a subquery over a distributed table correlated with a set
-- returning function. The locks are 0008's, unchanged.
CREATE OR REPLACE FUNCTION lock_identities(users text[], anonymous_ids text[], targets text[])
RETURNS TABLE (id text, person text, is_person boolean, products text[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held integer[] := '{}';
    taken integer;
    bucket record;
    ids text[] := array(SELECT DISTINCT x FROM unnest(anonymous_ids || targets) AS x);
    logged_in text[];
    history_users text[];
    history_products text[];
BEGIN
    LOOP
        taken := 0;
        FOR bucket IN
            SELECT w.b, bool_or(w.x) AS x
            FROM (
                SELECT hashtext(u) & 63 AS b, false AS x
                FROM unnest(users || targets || array(
                    SELECT (SELECT l.user_id FROM identity_links AS l WHERE l.anonymous_id = t.id)
                    FROM unnest(targets) AS t(id)
                )) AS u
                WHERE u IS NOT NULL
                UNION ALL
                SELECT hashtext(a) & 63, true FROM unnest(anonymous_ids) AS a
            ) AS w
            WHERE NOT w.b = ANY(held)
            GROUP BY w.b
            ORDER BY w.b
        LOOP
            IF bucket.x THEN
                PERFORM pg_advisory_xact_lock(7303, bucket.b);
            ELSE
                PERFORM pg_advisory_xact_lock_shared(7303, bucket.b);
            END IF;
            held := held || bucket.b;
            taken := taken + 1;
        END LOOP;
        EXIT WHEN taken = 0;
    END LOOP;
    -- Which ids logged in, and the (anonymous id, product) pairs of the
    -- anonymous ids' state history: one statement each, under the locks.
    logged_in := array(SELECT DISTINCT e.user_id FROM events AS e
                       WHERE e.user_id = ANY(ids) AND e.event_type = 'login');
    SELECT array_agg(h.user_id), array_agg(h.product_id) INTO history_users, history_products
    FROM (SELECT DISTINCT s.user_id, s.product_id FROM state_history AS s
          WHERE s.user_id = ANY(anonymous_ids)) AS h;
    RETURN QUERY
        SELECT i.id, (SELECT l.user_id FROM identity_links AS l WHERE l.anonymous_id = i.id),
               EXISTS (SELECT FROM identity_links AS m WHERE m.user_id = i.id) OR i.id = ANY(logged_in),
               CASE WHEN i.id = ANY(anonymous_ids) THEN array(
                   SELECT h.p FROM unnest(history_users, history_products) AS h(u, p) WHERE h.u = i.id
               ) END
        FROM unnest(ids) AS i(id);
END $$;
