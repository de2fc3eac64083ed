-- The event log and the per-user state it maintains. Every key leads with
-- user_id so that the tables can be distributed by user_id (docs/scaling.md).

-- The idempotency index of the log: every accepted (user_id, event_id) once,
-- whatever its occurred_at and whichever partition holds the event. A batch
-- inserts its keys here first (ON CONFLICT DO NOTHING) and logs only the
-- events whose key was new, in the same statement.
CREATE TABLE event_keys (
    user_id      text        NOT NULL,
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL,  -- where the event is: retention deletes keys with their partition
    PRIMARY KEY (user_id, event_id)
);

-- Every accepted event. Partitioned by month of occurred_at, so retention
-- drops whole partitions (drop_event_partitions_before) instead of deleting
-- rows. Uniqueness is event_keys' job: a unique index here would have to
-- include occurred_at and so could not catch a resend with another time.
CREATE TABLE events (
    user_id      text        NOT NULL,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,  -- the seed name, or a custom type's name
    session_id   text,
    product_id   text,
    event_value  bigint      NOT NULL,  -- the type's default when the event set none
    occurred_at  timestamptz NOT NULL,
    details      jsonb,
    attributes   jsonb,
    syncs_state  boolean     NOT NULL,  -- the type updates a state table (the catalog's sync target)
    received_at  timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);

-- Events older than the first monthly partition (historic imports).
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Recomputing a (user, product) state after an out-of-order event reads that
-- key's events in (occurred_at, event_id) order. Partial: only the few events
-- that sync state are ever read this way, so most inserts skip the index.
CREATE INDEX events_state_history ON events (user_id, product_id, occurred_at, event_id) WHERE syncs_state;

-- Creates the monthly partitions covering [first, last] that do not exist
-- yet. The server runs it at start-up and daily for the months around now,
-- so current events never land in the default partition.
CREATE FUNCTION ensure_event_partitions(first date, last date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month date := date_trunc('month', first);
    created integer := 0;
    name text;
BEGIN
    WHILE month <= last LOOP
        name := format('events_%s', to_char(month, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                name, month::timestamptz, (month + interval '1 month')::timestamptz);
            created := created + 1;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END $$;

-- Retention: forgets the events older than the month of `cutoff` (whole
-- months only): drops their monthly partitions, deletes older rows of the
-- default partition, and deletes their dedup keys. Returns the dropped tables.
CREATE FUNCTION drop_event_partitions_before(cutoff date) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    boundary timestamptz := date_trunc('month', cutoff);
    part record;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{4}_[0-9]{2}$'
          AND to_date(substr(c.relname, 8), 'YYYY_MM') + interval '1 month' <= boundary
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        RETURN NEXT part.relname;
    END LOOP;
    DELETE FROM events_default WHERE occurred_at < boundary;
    DELETE FROM event_keys WHERE occurred_at < boundary;
END $$;

SELECT ensure_event_partitions((now() - interval '1 month')::date, (now() + interval '2 months')::date);

-- State tables keep a line per (user, product) ever touched, with the
-- position (occurred_at, event_id) of the last event folded into it: an
-- event older than that position triggers a recompute from the log. Lines
-- at zero stay as tombstones so that the position survives a removal; the
-- user_cart and user_wishlist views show only the live lines.
CREATE TABLE cart_lines (
    user_id        text        NOT NULL,
    product_id     text        NOT NULL,
    quantity       bigint      NOT NULL CHECK (quantity >= 0),
    updated_at     timestamptz NOT NULL,  -- occurred_at of the last event folded in
    last_event_id  uuid        NOT NULL,
    PRIMARY KEY (user_id, product_id)
);

CREATE VIEW user_cart AS
    SELECT user_id, product_id, quantity, updated_at
    FROM cart_lines
    WHERE quantity > 0;

CREATE TABLE wishlist_lines (
    user_id        text        NOT NULL,
    product_id     text        NOT NULL,
    added_at       timestamptz,           -- NULL: not on the wishlist
    updated_at     timestamptz NOT NULL,
    last_event_id  uuid        NOT NULL,
    PRIMARY KEY (user_id, product_id)
);

CREATE VIEW user_wishlist AS
    SELECT user_id, product_id, added_at
    FROM wishlist_lines
    WHERE added_at IS NOT NULL;

-- Purchases are appended; the key also orders a user's history for paging.
CREATE TABLE purchase_history (
    user_id       text        NOT NULL,
    purchased_at  timestamptz NOT NULL,
    event_id      uuid        NOT NULL,
    product_id    text        NOT NULL,
    session_id    text,
    PRIMARY KEY (user_id, purchased_at, event_id)
);
