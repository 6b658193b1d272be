-- The sweeper's candidate query compares indexed columns with bounds the domain
-- computes (which statuses can go silent, before when, recovered by when); the
-- rule itself is no longer written into partial-index predicates.
DROP INDEX IF EXISTS agents_heartbeat_idx;
DROP INDEX IF EXISTS agents_recovery_idx;
CREATE INDEX agents_status_heartbeat_idx ON agents (status, last_heartbeat_at);
CREATE INDEX agents_status_recovery_idx ON agents (status, recovery_at);
