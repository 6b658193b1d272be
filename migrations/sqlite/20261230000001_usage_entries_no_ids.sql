-- An entry's message and request ids live in its dedup_key and nothing reads
-- them on their own (the Postgres migration of the same name).
ALTER TABLE usage_entries DROP COLUMN message_id;
ALTER TABLE usage_entries DROP COLUMN request_id;
