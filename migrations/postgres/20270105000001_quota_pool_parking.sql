-- Quota pools (issue 23), parking and release. A pool is a row here from the
-- first time it is parked: its windows, its release's canary and episode as
-- one JSON document (storage/quota.rs writes and reads it).
CREATE TABLE quota_pools (
    name TEXT PRIMARY KEY,
    state JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
-- The pools that parked an agent (released ones kept until parked again,
-- for the release's schedule) and its own exhaustion while they hold it.
ALTER TABLE agents ADD COLUMN pool_holds JSONB NOT NULL DEFAULT '{}';
-- Whether any pool holds the agent: the sweeper never wakes a held agent at
-- its recovery time (its pool's release does).
ALTER TABLE agents ADD COLUMN pool_held BOOLEAN NOT NULL DEFAULT false;
-- The pool a transition is for (EXHAUSTED by a pool report, POOL_EXHAUSTED,
-- POOL_RELEASED).
ALTER TABLE transitions ADD COLUMN quota_pool TEXT;
-- A pool's members (quota_pools @> '["name"]') and the agents it holds or
-- held ((pool_holds -> 'pools') ? 'name'), for a report that parks it and
-- its release.
CREATE INDEX agents_quota_pools_idx ON agents USING gin (quota_pools);
CREATE INDEX agents_pool_holds_idx ON agents USING gin ((pool_holds -> 'pools'));
