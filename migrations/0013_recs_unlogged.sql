-- The recommendations' tables (0011) become UNLOGGED (issue 20: ingest
-- first; docs/analytics.md "Ingest first"). They are derived from the log and
-- rebuilt from it, yet their upkeep wrote more WAL per event than ingest
-- itself (about 800 bytes against 667), and every commit of the write path
-- waited for that WAL's flush too. Unlogged, they cost no WAL; a crash (or a
-- promoted standby, or a restored backup) finds them all empty, recs_state
-- included, and the maintainer's first step then rebuilds from the log, as it
-- does for a database that never had them. They go together: a logged
-- recs_state beside emptied aggregates would claim what they no longer hold.
ALTER TABLE recs_state SET UNLOGGED;
ALTER TABLE recs_removed SET UNLOGGED;
ALTER TABLE recs_user_products SET UNLOGGED;
ALTER TABLE recs_user_days SET UNLOGGED;
ALTER TABLE recs_product_hours SET UNLOGGED;
ALTER TABLE recs_hour_members SET UNLOGGED;
ALTER TABLE recs_session_members SET UNLOGGED;
ALTER TABLE recs_person_pairs SET UNLOGGED;
ALTER TABLE recs_pairs SET UNLOGGED;
ALTER TABLE recs_product_people SET UNLOGGED;

-- UserAffinities with a half-life reads the day buckets of the person's
-- likeliest products only (storage/_recommendations.py: the threshold
-- algorithm over recs_user_products' bounds), so the buckets are keyed by
-- (person, product, day): a product's days are one index range. The upsert's
-- ON CONFLICT (user_id, day, product_id) infers this key (column order aside).
ALTER TABLE recs_user_days DROP CONSTRAINT recs_user_days_pkey;
ALTER TABLE recs_user_days ADD PRIMARY KEY (user_id, product_id, day);
