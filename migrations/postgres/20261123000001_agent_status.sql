-- Agent status: the current state of every agent, and the durable, revisioned
-- history of every status change.

CREATE TABLE agents (
    agent_id           text        PRIMARY KEY,
    status             text        NOT NULL
                       CHECK (status IN ('IDLE', 'BUSY', 'ON_CALL', 'OFFLINE', 'EXHAUSTED')),
    labels             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    registered_at      timestamptz NOT NULL,
    last_heartbeat_at  timestamptz NOT NULL,
    last_transition_at timestamptz NOT NULL,
    revision           bigint      NOT NULL,
    -- Kept while OFFLINE after EXHAUSTED, so a heartbeat cannot wake the agent early.
    exhaustion_reason  text        CHECK (exhaustion_reason IN ('RATE_LIMIT', 'BILLING')),
    recovery_at        timestamptz,
    recovery_source    text,
    recovery_hint      text
);

CREATE INDEX agents_status_idx ON agents (status, agent_id);
CREATE INDEX agents_labels_idx ON agents USING gin (labels jsonb_path_ops);
-- The sweeper's two questions: who is silent, who has recovered.
CREATE INDEX agents_heartbeat_idx ON agents (last_heartbeat_at) WHERE status <> 'OFFLINE';
CREATE INDEX agents_recovery_idx ON agents (recovery_at) WHERE status = 'EXHAUSTED';

-- One row. Every transition increments head_revision in its own transaction:
-- the row lock makes revision allocation and commit serial, so revisions commit
-- in order and without gaps, and a watcher reading "revision > n" never skips one
-- that commits late.
CREATE TABLE revision_head (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    head_revision  bigint  NOT NULL
);
INSERT INTO revision_head (singleton, head_revision) VALUES (true, 0);

-- Kept apart from revision_head so that pruning never holds the allocation lock.
CREATE TABLE revision_retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint  NOT NULL
);
INSERT INTO revision_retention (singleton, pruned_through) VALUES (true, 0);

CREATE TABLE transitions (
    revision          bigint      PRIMARY KEY,
    agent_id          text        NOT NULL,
    from_status       text,
    to_status         text        NOT NULL,
    cause             text        NOT NULL,
    occurred_at       timestamptz NOT NULL,
    exhaustion_reason text,
    recovery_at       timestamptz
);

CREATE INDEX transitions_agent_idx ON transitions (agent_id, revision);
CREATE INDEX transitions_occurred_idx ON transitions (occurred_at);
