-- An entry's message and request ids live in its dedup_key (see
-- 20261201000001_usage_rollups.sql) and nothing reads them on their own: a
-- first run writes every entry, so the row is kept to what is read.
ALTER TABLE usage_entries DROP COLUMN message_id, DROP COLUMN request_id;
