-- Healing: agent errors, recovery actions, what was learned, and post actions.

CREATE TABLE error_events (
    id          bigserial   PRIMARY KEY,
    agent_id    text        NOT NULL,
    message     text        NOT NULL,
    context     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error_type  text        NOT NULL,
    severity    float8      NOT NULL CHECK (severity >= 0 AND severity <= 1),
    critical    boolean     NOT NULL,
    recurring   boolean     NOT NULL,
    occurred_at timestamptz NOT NULL
);
-- "Recurring" counts an agent's events of one type in the last hour.
CREATE INDEX error_events_recurrence_idx ON error_events (agent_id, error_type, occurred_at);
CREATE INDEX error_events_occurred_idx ON error_events (occurred_at);
CREATE INDEX error_events_type_idx ON error_events (error_type, id);

CREATE TABLE recovery_actions (
    id                    bigserial   PRIMARY KEY,
    error_event_id        bigint      NOT NULL REFERENCES error_events (id),
    agent_id              text        NOT NULL,
    error_type            text        NOT NULL,
    context_signature     text        NOT NULL,
    strategy              text        NOT NULL,
    chosen_strategy       text        NOT NULL,
    parameters            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    estimated_duration_ms bigint      NOT NULL,
    success_probability   float8      NOT NULL,
    risk                  float8      NOT NULL,
    escalated             boolean     NOT NULL,
    reason                text        NOT NULL,
    -- ACTIVE past its lease reads as EXPIRED; it is rewritten when the agent next plans.
    status                text        NOT NULL
                          CHECK (status IN ('ACTIVE', 'SUCCEEDED', 'FAILED', 'EXPIRED')),
    created_at            timestamptz NOT NULL,
    lease_expires_at      timestamptz NOT NULL,
    completed_at          timestamptz,
    duration_ms           bigint,
    details               text
);
-- At most one active recovery per agent, enforced by the database under concurrency.
CREATE UNIQUE INDEX recovery_actions_one_active_idx ON recovery_actions (agent_id) WHERE status = 'ACTIVE';
CREATE INDEX recovery_actions_agent_idx ON recovery_actions (agent_id, id);

-- What the planner learned, per (error type, matching context, strategy).
CREATE TABLE healing_patterns (
    error_type        text        NOT NULL,
    context_signature text        NOT NULL,
    strategy          text        NOT NULL,
    successes         bigint      NOT NULL DEFAULT 0,
    failures          bigint      NOT NULL DEFAULT 0,
    total_recovery_ms float8      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (error_type, context_signature, strategy)
);

-- One row per post that was ever claimed: locking it serialises claims on the post.
CREATE TABLE post_locks (
    post_id text PRIMARY KEY
);

CREATE TABLE post_actions (
    idempotency_key  text        PRIMARY KEY,
    post_id          text        NOT NULL,
    action_type      text        NOT NULL CHECK (action_type IN ('comment', 'edit', 'thread')),
    tier             integer     NOT NULL CHECK (tier BETWEEN 1 AND 3),
    status           text        NOT NULL CHECK (status IN ('RUNNING', 'SUCCEEDED', 'FAILED')),
    outcome          jsonb,
    error_code       text,
    attempts         integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    lease_expires_at timestamptz
);
CREATE INDEX post_actions_post_idx ON post_actions (post_id, created_at);
