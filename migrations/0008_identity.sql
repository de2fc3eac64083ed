-- Identity (IdentityService, issue 18): an anonymous id (a guest's cookie)
-- linked to the user it turned out to be at login, the person. Once linked,
-- the anonymous id's rows live under the person's id (moved at link time;
-- later events are stored under the person by the insert statement), so
-- every key still leads with the person's id (docs/scaling.md).

-- One row per linked anonymous id. user_id is always a person, never itself
-- a linked anonymous id (a link to one is recorded to its person), so
-- resolving an id is one probe of this key. Keyed by the anonymous id: when
-- tables are distributed by user id, a row sits with that id's own events,
-- and the write path probes it by the ids its batch carries, on their shard.
CREATE TABLE identity_links (
    anonymous_id  text        PRIMARY KEY,
    user_id       text        NOT NULL,
    linked_at     timestamptz NOT NULL,  -- occurred_at of the link (its login)
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- The anonymous ids of a person: GetIdentity, deletion, "is it a person".
CREATE INDEX identity_links_user ON identity_links (user_id);

-- "Is this id a person": it logged in (or ids are linked to it). Partial:
-- only login events are indexed, so other inserts pay nothing for it.
CREATE INDEX events_logins ON events (user_id) WHERE event_type = 'login';

-- The person an id belongs to: its link's user, or the id itself. Reads
-- (GetCart, ListUserEvents, ...) name any id and answer the person's rows.
CREATE FUNCTION person_of(id text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT l.user_id FROM identity_links AS l WHERE l.anonymous_id = id), id)
$$;

-- lock_users_for_ingest (0003) with resolution: called by every insert
-- statement with the users of its batch. Takes their deletion locks in
-- shared mode (a LinkIdentity takes an anonymous id's lock exclusively, like
-- a deletion: a batch with that id's events either commits before the link,
-- whose move then sees its rows, or waits and sees the link), then returns,
-- for the users that are linked or deleted: the person (NULL: the user
-- itself) and the watermark that applies (the later of the user's own and
-- the person's). The statement stores the events and takes the state-sync
-- key locks under the person. ROWS 1: few users of a batch are either.
CREATE FUNCTION resolve_users_for_ingest(users text[])
RETURNS TABLE (user_id text, person text, deleted_through timestamptz)
LANGUAGE plpgsql VOLATILE ROWS 1 AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7303, b)
    FROM (SELECT DISTINCT hashtext(u) & 63 AS b FROM unnest(users) AS u ORDER BY b) AS buckets;
    -- Per distinct user, one index probe of each table (scalar subqueries):
    -- a join would let a plan hash a whole table for each batch once the
    -- table is mid-sized (seen at 28k links: a sequential scan per batch);
    -- probes cost the same whatever the tables' sizes.
    RETURN QUERY
        SELECT r.id, r.person,
               greatest((SELECT d.deleted_through FROM user_deletions AS d WHERE d.user_id = r.id),
                        (SELECT d.deleted_through FROM user_deletions AS d WHERE d.user_id = r.person))
        FROM (SELECT u.id, (SELECT l.user_id FROM identity_links AS l WHERE l.anonymous_id = u.id) AS person
              FROM (SELECT DISTINCT x AS id FROM unnest(users) AS x) AS u) AS r
        WHERE r.person IS NOT NULL OR EXISTS (SELECT FROM user_deletions AS d WHERE d.user_id = r.id);
END $$;

-- The first statement of a link (LinkIdentity, or a batch whose logins
-- carry LoginDetails.anonymous_id): takes the deletion locks, exclusively
-- for the anonymous ids, shared for the batch's users, the link targets and
-- the targets' persons, all in one pass in key order (so that, as in every
-- transaction here, all bucket locks come before any state-sync key lock).
-- A target linked meanwhile (seen once the locks are held) adds its person's
-- lock. Then returns what deciding the links needs, per anonymous id and
-- target: its person (NULL: none), whether it is a person itself (ids are
-- linked to it, or it logged in), and for anonymous ids the products of
-- their state's history (0006: the lines' events; the link takes the key
-- locks of the person's lines with these products).
CREATE FUNCTION lock_identities(users text[], anonymous_ids text[], targets text[])
RETURNS TABLE (id text, person text, is_person boolean, products text[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held integer[] := '{}';
    taken integer;
    bucket record;
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
    -- Scalar subqueries: index probes per id, whatever the tables' sizes.
    RETURN QUERY
        SELECT i.id, (SELECT l.user_id FROM identity_links AS l WHERE l.anonymous_id = i.id),
               EXISTS (SELECT FROM identity_links AS m WHERE m.user_id = i.id)
               OR EXISTS (SELECT FROM events AS e WHERE e.user_id = i.id AND e.event_type = 'login'),
               CASE WHEN i.id = ANY(anonymous_ids) THEN array(
                   SELECT DISTINCT h.product_id FROM state_history AS h WHERE h.user_id = i.id
               ) END
        FROM (SELECT DISTINCT x.id FROM unnest(anonymous_ids || targets) AS x(id)) AS i;
END $$;
