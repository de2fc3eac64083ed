-- A fingerprint of each logged event's content as the client sent it, kept
-- with its dedup key: a resend with the same (user_id, event_id) and the same
-- content is a duplicate, with other content a conflict (ALREADY_EXISTS).
-- Keys logged before this migration have none (NULL): unknown, treated as
-- matching any content.
ALTER TABLE event_keys ADD COLUMN fingerprint bigint;
