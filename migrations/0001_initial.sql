-- The event log and the per-user state it maintains. Every key leads with
-- user_id so that the tables can be distributed by user_id (docs/scaling.md).

-- Every accepted event, once: (user_id, event_id) is the idempotency key.
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
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, event_id)
);

-- Recomputing a (user, product) state after an out-of-order event reads that
-- key's events in (occurred_at, event_id) order.
CREATE INDEX events_user_product_time ON events (user_id, product_id, occurred_at, event_id);

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
