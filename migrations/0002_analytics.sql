-- Indexes for the AnalyticsService (server/interactions_server/analytics*.py).
-- Each one costs every insert into the log, so only what the reads need
-- (docs/performance.md, "Analytics", has the ingest cost measured).

-- Per-user reads (ListUserEvents, GetUserActivity, ListSessions, GetSession):
-- one range of this index per user, already in (occurred_at, event_id)
-- order. It leads with user_id like every other key (docs/scaling.md).
CREATE INDEX events_user_time ON events (user_id, occurred_at, event_id);

-- Window reads (TopSearchQueries, CountActiveUsers, the exports): the monthly
-- partitions prune to the months of the window, and within a partition this
-- BRIN index skips the blocks outside it. Rows arrive roughly in occurred_at
-- order, so block ranges are narrow; a BRIN costs almost nothing on insert
-- where a B-tree on occurred_at would cost as much as the one above.
CREATE INDEX events_occurred_brin ON events USING brin (occurred_at) WITH (pages_per_range = 32);
