-- Recommendations (RecommendationService, issue 20; server/interactions_server/
-- storage/_recommendations.py, docs/analytics.md "Recommendations"): aggregates
-- the reads are served from, maintained by one maintainer per deployment from
-- the committed events (the stream's transaction ids, migrations/0009), never
-- by a scan of the log per call, and rebuildable from the log.
--
-- Person-level rows are keyed by user_id first (like every table here,
-- docs/scaling.md); product-level rows are sums over persons or events.

-- The maintainer's position and lease. Every event whose transaction id is
-- below applied_through is in the aggregates, none above; a step moves it in
-- the transaction that applies the events, so each event is applied exactly
-- once. NULL: never built (the first step rebuilds from the log). The lease
-- keeps the other servers of a deployment from doing the same work; the row
-- lock of each step keeps two from ever applying the same events.
CREATE TABLE recs_state (
    only_row          boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    applied_through   bigint,
    holder            text,
    lease_until       timestamptz,
    partitions        text[],      -- the log's partitions at the last step: one gone means retention dropped it
    built_at          timestamptz, -- the last rebuild
    updated_at        timestamptz
);
INSERT INTO recs_state DEFAULT VALUES;

-- What was removed from the log after it may have been applied: every row
-- with a product that leaves events (a deletion, an identity link's move,
-- retention's and purges' row deletes). The maintainer recomputes the
-- persons concerned from what the log still holds, subtracts the applied
-- ones (xid below its position) from the trending buckets, then forgets
-- them. Dropped partitions fire no trigger: recs_state.partitions catches those.
CREATE TABLE recs_removed (
    user_id      text        NOT NULL,
    product_id   text        NOT NULL,
    event_type   text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    xid          bigint      NOT NULL
);

CREATE FUNCTION recs_note_removed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recs_removed (user_id, product_id, event_type, occurred_at, xid)
    VALUES (OLD.user_id, OLD.product_id, OLD.event_type, OLD.occurred_at, OLD.xid);
    RETURN NULL;
END $$;

-- Row-level, so that it is cloned to every partition (a DELETE on a
-- partition itself, events_default's in drop_event_partitions_before, fires it too).
CREATE TRIGGER events_recs_removed AFTER DELETE ON events
FOR EACH ROW WHEN (OLD.product_id IS NOT NULL) EXECUTE FUNCTION recs_note_removed();

-- A person's products: RecentlyViewed (view, product_view, click), purchases
-- (exclude_purchased, the purchasers of a product) and the row of the
-- training matrix (UserAffinities without decay).
CREATE TABLE recs_user_products (
    user_id     text        NOT NULL,
    product_id  text        NOT NULL,
    view_n      bigint      NOT NULL,
    view_last   timestamptz,
    buy_n       bigint      NOT NULL,
    train_n     bigint      NOT NULL,  -- events of types with an ml_weight
    train_w     float8      NOT NULL,  -- the sum of their ml_weights
    train_last  timestamptz,
    PRIMARY KEY (user_id, product_id)
);

-- The training weight of a person's product by UTC day, with its moments
-- in time (m_k = sum of w * x^k, x: hours from the day's midpoint, k < 8),
-- from which the decayed sum for any half-life is computed (a Taylor series
-- of the decay around the midpoint; docs/analytics.md: the error bound).
CREATE TABLE recs_user_days (
    user_id     text   NOT NULL,
    day         int4   NOT NULL,  -- days since 1970-01-01
    product_id  text   NOT NULL,
    n           bigint NOT NULL,
    m0          float8 NOT NULL,  -- sum of w
    m1          float8 NOT NULL,  -- sum of w * x^1
    m2          float8 NOT NULL,  -- sum of w * x^2
    m3          float8 NOT NULL,  -- sum of w * x^3
    m4          float8 NOT NULL,  -- sum of w * x^4
    m5          float8 NOT NULL,  -- sum of w * x^5
    m6          float8 NOT NULL,  -- sum of w * x^6
    m7          float8 NOT NULL,  -- sum of w * x^7
    PRIMARY KEY (user_id, day, product_id)
);

-- Trending: the training weight of a product by UTC hour, with its moments
-- (as above, x: hours from the hour's midpoint) and its latest event.
CREATE TABLE recs_product_hours (
    hour        int4        NOT NULL,  -- hours since 1970-01-01 00:00 UTC
    product_id  text        NOT NULL,
    n           bigint      NOT NULL,
    m0          float8      NOT NULL,
    m1          float8      NOT NULL,
    m2          float8      NOT NULL,
    m3          float8      NOT NULL,
    m4          float8      NOT NULL,
    m5          float8      NOT NULL,
    m6          float8      NOT NULL,
    m7          float8      NOT NULL,
    last_at     timestamptz NOT NULL,
    PRIMARY KEY (hour, product_id)
);

-- Together (FrequentlyBoughtTogether: kind 2, purchases; AlsoViewed: kind 1,
-- view/product_view/click). A person's products of a kind by UTC hour, with
-- the first and last occurrence in that hour: two occurrences in the same
-- hour are within one hour of each other, and across adjacent hours the
-- closest two are the earlier hour's last and the later hour's first, so
-- "within one hour" is decided exactly from these rows. `eligible`: among
-- the first 20 products of the (kind, person, hour) by first occurrence (the
-- cap that bounds a heavy person's pairs, docs/analytics.md).
CREATE TABLE recs_hour_members (
    kind        int2        NOT NULL,
    user_id     text        NOT NULL,
    hour        int4        NOT NULL,
    product_id  text        NOT NULL,
    first_at    timestamptz NOT NULL,
    last_at     timestamptz NOT NULL,
    eligible    boolean     NOT NULL,
    touched     bigint      NOT NULL,  -- the step (its applied_through) that last widened it
    PRIMARY KEY (kind, user_id, hour, product_id)
);

-- A step finds what it changed (the groups to rank again, the members to
-- pair) by `touched`.
CREATE INDEX recs_hour_members_touched ON recs_hour_members (touched);

-- The same by non-empty session_id (any two occurrences in one session are together).
CREATE TABLE recs_session_members (
    kind        int2        NOT NULL,
    user_id     text        NOT NULL,
    session_id  text        NOT NULL,
    product_id  text        NOT NULL,
    first_at    timestamptz NOT NULL,
    eligible    boolean     NOT NULL,
    touched     bigint      NOT NULL,
    PRIMARY KEY (kind, user_id, session_id, product_id)
);
CREATE INDEX recs_session_members_touched ON recs_session_members (touched);

-- The pairs a person has together (a < b by code point): existence, so
-- that a pair counts once per person however often it recurs.
CREATE TABLE recs_person_pairs (
    kind     int2 NOT NULL,
    user_id  text NOT NULL,
    a        text NOT NULL,
    b        text NOT NULL,
    PRIMARY KEY (kind, user_id, a, b)
);
CREATE INDEX recs_person_pairs_b ON recs_person_pairs (kind, user_id, b);  -- a product's pairs, from either side

-- support(p, q): the persons who have p and q together; both directions stored.
CREATE TABLE recs_pairs (
    kind        int2   NOT NULL,
    product_id  text   NOT NULL,
    other_id    text   NOT NULL,
    support     bigint NOT NULL,
    PRIMARY KEY (kind, product_id, other_id)
);
CREATE INDEX recs_pairs_top ON recs_pairs (kind, product_id, support DESC, other_id COLLATE "C");

-- The persons with at least one event of a kind on a product (the denominator).
CREATE TABLE recs_product_people (
    kind        int2   NOT NULL,
    product_id  text   NOT NULL,
    people      bigint NOT NULL,
    PRIMARY KEY (kind, product_id)
);
