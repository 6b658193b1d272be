-- The sweeper's candidate query compares columns with bounds the domain
-- computes (which statuses can go silent, before when, recovered by when); the
-- rule itself is no longer written into partial-index predicates.
--
-- last_heartbeat_at is deliberately not indexed: the heartbeat flush rewrites it
-- for every live agent every second, and an index on it would turn each of those
-- writes into an index insertion in every index of the table (no HOT update).
-- Finding silent agents is then one sequential pass per sweep, about 3 ms per
-- 100,000 agents. Room left on each page (fillfactor) keeps the flush's updates
-- on their page.
DROP INDEX IF EXISTS agents_heartbeat_idx;
DROP INDEX IF EXISTS agents_recovery_idx;
CREATE INDEX agents_status_recovery_idx ON agents (status, recovery_at);
ALTER TABLE agents SET (fillfactor = 70);
