-- The state keeps its own history and checkpoints of its fold (issue 17,
-- items 2 and 3; server/interactions_server/ingest/_fold.py explains the
-- algebra, _sync.py the write path's use of it).
--
-- Item 2: the fold of a late event used to re-read the key's events from the
-- log, which retention (drop_event_partitions_before) and, later, purges cut:
-- a late event after a retention rebuilt the line without what retention had
-- removed. The fold now never reads the log: the events that fold into
-- cart_lines and wishlist_lines are kept in state_history, which is part of
-- the state (only DeleteUserData deletes from it).
--
-- Item 3: a late event used to refold the key's whole history (215,000 events:
-- 1.7-4.1 s). Every fold step is a function of a closed family (cart:
-- q -> max(q + a, b), a NULL meaning the constant b; wishlist: s -> b when a is
-- NULL, else s when s is set, else b), and a run of steps composes into one
-- such (a, b). A key's history is cut into sealed segments of about
-- SEGMENT_EVENTS (1024) events, each stored as its composed function; the line
-- holds the state at the end of its last segment (base) and the function of
-- the events since (its open tail). A late event then costs O(N + total/N)
-- rows: the rows of the one segment (or the tail) it falls in, and the
-- functions of the key's segments.

-- Every event ever accepted that folds into a state line, as the fold reads
-- it: the key, the table it folds into, its position (occurred_at, event_id)
-- and what it does (event_type, event_value). Written by the statement that
-- writes the lines. Keys lead with user_id (docs/scaling.md).
CREATE TABLE state_history (
    user_id      text        NOT NULL,
    product_id   text        NOT NULL,
    state_table  text        NOT NULL CHECK (state_table IN ('cart_lines', 'wishlist_lines')),
    occurred_at  timestamptz NOT NULL,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    event_value  bigint      NOT NULL,
    PRIMARY KEY (user_id, product_id, state_table, occurred_at, event_id)
);

-- The sealed segments of each key's history: a segment holds the history rows
-- after the previous segment's end, through its own end (until_at,
-- until_event_id), and their composed function (a, b). For wishlist_lines, b
-- is an added_at in epoch microseconds.
CREATE TABLE state_segments (
    user_id         text        NOT NULL,
    product_id      text        NOT NULL,
    state_table     text        NOT NULL CHECK (state_table IN ('cart_lines', 'wishlist_lines')),
    until_at        timestamptz NOT NULL,
    until_event_id  uuid        NOT NULL,
    events          integer     NOT NULL CHECK (events > 0),
    a               bigint,
    b               bigint,
    PRIMARY KEY (user_id, product_id, state_table, until_at, until_event_id)
);

-- On each line: the end of its last sealed segment (NULL: none), the state
-- there (base), the function and count of the history rows after it (the
-- open tail), and its origin: the state before its first history row. The
-- origin is NULL (nothing) but for lines this migration finds already cut by
-- retention (below). Invariant: value = tail(base), base = segments(origin).
ALTER TABLE cart_lines
    ADD COLUMN sealed_at        timestamptz,
    ADD COLUMN sealed_event_id  uuid,
    ADD COLUMN base             bigint,
    ADD COLUMN tail_a           bigint DEFAULT 0,
    ADD COLUMN tail_b           bigint DEFAULT 0,
    ADD COLUMN tail_events      integer NOT NULL DEFAULT 0,
    ADD COLUMN origin           bigint;

ALTER TABLE wishlist_lines
    ADD COLUMN sealed_at        timestamptz,
    ADD COLUMN sealed_event_id  uuid,
    ADD COLUMN base             timestamptz,
    ADD COLUMN tail_a           bigint DEFAULT 0,
    ADD COLUMN tail_b           bigint,
    ADD COLUMN tail_events      integer NOT NULL DEFAULT 0,
    ADD COLUMN origin           timestamptz;

-- The history of existing data, from the log. A log that retention has cut
-- gives an incomplete history; the lines below get an origin for that.
-- (A resend of an event whose key retention had deleted may be in the log
-- twice: one history row.)
INSERT INTO state_history (user_id, product_id, state_table, occurred_at, event_id, event_type, event_value)
SELECT user_id, product_id,
       CASE WHEN event_type = 'wishlist' THEN 'wishlist_lines' ELSE 'cart_lines' END,
       occurred_at, event_id, event_type, event_value
FROM events
WHERE syncs_state AND product_id IS NOT NULL
  AND event_type IN ('add_to_cart', 'remove_from_cart', 'update_cart_quantity', 'wishlist')
ORDER BY user_id, product_id, occurred_at, event_id
ON CONFLICT DO NOTHING;

-- The fold read the log through this index; nothing reads the log by key
-- and product any more, and every syncing insert paid for it.
DROP INDEX events_state_history;

-- Existing lines are sealed here, in segments of 1024 history rows, so that
-- the first late event on a long key after the upgrade is as cheap as the
-- next (doing it on that event instead would cost the whole history once,
-- within that caller's deadline: a retry would pay it again). The functions
-- below mirror ingest/_fold.py for this one conversion and are dropped at
-- the end; tests/test_fold_checkpoints.py checks the result against the
-- server's own fold.

-- (a, b) then (a2, b2): NULL + x is NULL (a constant absorbs what came before),
-- greatest() ignores NULLs.
CREATE FUNCTION fold_then_cart(f bigint[], a bigint, b bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN a IS NULL THEN ARRAY[NULL, b]::bigint[] ELSE ARRAY[f[1] + a, greatest(f[2] + a, b)] END
$$;
CREATE FUNCTION fold_then_wishlist(f bigint[], a bigint, b bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN a IS NULL THEN ARRAY[NULL, b]::bigint[] ELSE ARRAY[f[1] + a, coalesce(f[2], b)] END
$$;
CREATE AGGREGATE fold_cart(bigint, bigint) (SFUNC = fold_then_cart, STYPE = bigint[], INITCOND = '{0,0}');
CREATE AGGREGATE fold_wishlist(bigint, bigint) (SFUNC = fold_then_wishlist, STYPE = bigint[], INITCOND = '{0,NULL}');

-- Each history row's step, numbered in fold order within its key.
CREATE TEMPORARY TABLE fold_steps ON COMMIT DROP AS
SELECT user_id, product_id, state_table, occurred_at, event_id,
       (row_number() OVER (PARTITION BY user_id, product_id, state_table ORDER BY occurred_at, event_id) - 1)
           / 1024 AS chunk,
       CASE
           WHEN event_type = 'add_to_cart' THEN ARRAY[event_value, 0]
           WHEN event_type = 'remove_from_cart' AND event_value = 0 THEN ARRAY[NULL, 0]::bigint[]
           WHEN event_type = 'remove_from_cart' THEN ARRAY[-event_value, 0]
           WHEN event_type = 'update_cart_quantity' THEN ARRAY[NULL, event_value]::bigint[]
           WHEN event_value = 0 THEN ARRAY[NULL, NULL]::bigint[]  -- wishlist: remove
           ELSE ARRAY[0, (extract(epoch FROM occurred_at) * 1000000)::int8]  -- wishlist: add
       END AS f
FROM state_history;

-- Each run of 1024 rows of a key composed into one function; the last run of
-- a key is a sealed segment only when it is full, else it is the open tail.
CREATE TEMPORARY TABLE fold_chunks ON COMMIT DROP AS
SELECT user_id, product_id, state_table, chunk, events, until_at, until_event_id, f[1] AS a, f[2] AS b
FROM (
    SELECT user_id, product_id, state_table, chunk, count(*)::int AS events,
           max(occurred_at) AS until_at,
           (array_agg(event_id ORDER BY occurred_at DESC, event_id DESC))[1] AS until_event_id,
           CASE WHEN state_table = 'cart_lines' THEN fold_cart(f[1], f[2] ORDER BY occurred_at, event_id)
                ELSE fold_wishlist(f[1], f[2] ORDER BY occurred_at, event_id) END AS f
    FROM fold_steps
    GROUP BY user_id, product_id, state_table, chunk
) AS c;

INSERT INTO state_segments (user_id, product_id, state_table, until_at, until_event_id, events, a, b)
SELECT user_id, product_id, state_table, until_at, until_event_id, events, a, b
FROM fold_chunks WHERE events = 1024
ORDER BY user_id, product_id, state_table, until_at, until_event_id;

-- Per key: the composition of its segments, where they end, and the tail
-- (identity when the key has no partial run).
CREATE TEMPORARY TABLE fold_keys ON COMMIT DROP AS
SELECT user_id, product_id, state_table,
       CASE WHEN state_table = 'cart_lines'
            THEN fold_cart(a, b ORDER BY chunk) FILTER (WHERE events = 1024)
            ELSE fold_wishlist(a, b ORDER BY chunk) FILTER (WHERE events = 1024) END AS sealed,
       max(until_at) FILTER (WHERE events = 1024) AS sealed_at,
       (array_agg(until_event_id ORDER BY chunk DESC) FILTER (WHERE events = 1024))[1] AS sealed_event_id,
       CASE WHEN bool_or(events < 1024) THEN ARRAY[(array_agg(a) FILTER (WHERE events < 1024))[1],
                                                  (array_agg(b) FILTER (WHERE events < 1024))[1]]
            WHEN state_table = 'cart_lines' THEN '{0,0}'::bigint[]
            ELSE '{0,NULL}'::bigint[] END AS tail,
       coalesce(sum(events) FILTER (WHERE events < 1024), 0)::int AS tail_events
FROM fold_chunks
GROUP BY user_id, product_id, state_table;

-- The origin: the state that the history must start from to give the line's
-- value (NULL when nothing is missing). It is not NULL only where retention
-- had already removed events of the key: their state becomes the origin
-- (cart: the q >= 0 with tail(segments(q)) = quantity, which exists whenever
-- the history has no constant step; wishlist: the line's added_at).
-- apply(f, q): cart f[2] if f[1] is NULL else greatest(coalesce(q, 0) + f[1], f[2]);
-- wishlist f[2] if f[1] is NULL else coalesce(q, f[2]).
UPDATE cart_lines AS l
SET sealed_at = k.sealed_at, sealed_event_id = k.sealed_event_id,
    tail_a = k.tail[1], tail_b = k.tail[2], tail_events = k.tail_events,
    origin = k.origin,
    base = CASE WHEN k.sealed[1] IS NULL THEN k.sealed[2]
                ELSE greatest(coalesce(k.origin, 0) + k.sealed[1], k.sealed[2]) END
FROM (
    SELECT w.*,
           CASE WHEN w.whole[1] IS NULL OR greatest(w.whole[1], w.whole[2]) = w.quantity THEN NULL
                ELSE greatest(w.quantity - w.whole[1], 0) END AS origin
    FROM (
        SELECT f.*, c.quantity, fold_then_cart(f.sealed, f.tail[1], f.tail[2]) AS whole
        FROM fold_keys AS f JOIN cart_lines AS c USING (user_id, product_id)
        WHERE f.state_table = 'cart_lines'
    ) AS w
) AS k
WHERE l.user_id = k.user_id AND l.product_id = k.product_id;

UPDATE wishlist_lines AS l
SET sealed_at = k.sealed_at, sealed_event_id = k.sealed_event_id,
    tail_a = k.tail[1], tail_b = k.tail[2], tail_events = k.tail_events,
    origin = k.origin,
    base = CASE WHEN k.sealed[1] IS NULL THEN timestamptz 'epoch' + k.sealed[2] * interval '1 microsecond'
                ELSE coalesce(k.origin, timestamptz 'epoch' + k.sealed[2] * interval '1 microsecond') END
FROM (
    SELECT w.*,
           CASE WHEN w.whole[1] IS NULL
                  OR (timestamptz 'epoch' + w.whole[2] * interval '1 microsecond') IS NOT DISTINCT FROM w.added_at
                THEN NULL ELSE w.added_at END AS origin
    FROM (
        SELECT f.*, c.added_at, fold_then_wishlist(f.sealed, f.tail[1], f.tail[2]) AS whole
        FROM fold_keys AS f JOIN wishlist_lines AS c USING (user_id, product_id)
        WHERE f.state_table = 'wishlist_lines'
    ) AS w
) AS k
WHERE l.user_id = k.user_id AND l.product_id = k.product_id;

-- Lines without any history left (retention removed all their events): the
-- line's state is their origin and base.
UPDATE cart_lines AS l SET origin = quantity, base = quantity
WHERE quantity <> 0 AND NOT EXISTS (
    SELECT FROM state_history AS h
    WHERE h.user_id = l.user_id AND h.product_id = l.product_id AND h.state_table = 'cart_lines');
UPDATE wishlist_lines AS l SET origin = added_at, base = added_at
WHERE added_at IS NOT NULL AND NOT EXISTS (
    SELECT FROM state_history AS h
    WHERE h.user_id = l.user_id AND h.product_id = l.product_id AND h.state_table = 'wishlist_lines');

DROP AGGREGATE fold_cart(bigint, bigint);
DROP AGGREGATE fold_wishlist(bigint, bigint);
DROP FUNCTION fold_then_cart(bigint[], bigint, bigint);
DROP FUNCTION fold_then_wishlist(bigint[], bigint, bigint);
