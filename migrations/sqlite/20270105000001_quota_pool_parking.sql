-- Quota pools (issue 23), parking and release. A pool is a row here from the
-- first time it is parked: its windows, its release's canary and episode as
-- one JSON document (storage/quota.rs writes and reads it).
CREATE TABLE quota_pools (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
-- The pools that parked an agent (released ones kept until parked again,
-- for the release's schedule) and its own exhaustion while they hold it.
ALTER TABLE agents ADD COLUMN pool_holds TEXT NOT NULL DEFAULT '{}';
-- Whether any pool holds the agent: the sweeper never wakes a held agent at
-- its recovery time (its pool's release does).
ALTER TABLE agents ADD COLUMN pool_held INTEGER NOT NULL DEFAULT 0;
-- The pool a transition is for (EXHAUSTED by a pool report, POOL_EXHAUSTED,
-- POOL_RELEASED).
ALTER TABLE transitions ADD COLUMN quota_pool TEXT;
