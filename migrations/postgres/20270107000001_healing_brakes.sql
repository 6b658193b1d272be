-- Remediation brakes (issue 24): every decision on a request for a plan,
-- braked or not, with the numbers it was taken on; operators' pauses; a
-- breaker per (error type, strategy), fleet-wide.
CREATE TABLE healing_decisions (
    id                      bigserial   PRIMARY KEY,
    error_event_id          bigint      NOT NULL,
    agent_id                text        NOT NULL,
    decided_at              timestamptz NOT NULL,
    verdict                 text        NOT NULL CHECK (verdict IN ('PLANNED', 'DRY_RUN', 'BRAKED')),
    reason                  text,
    message                 text        NOT NULL,
    strategy                text,
    recovery_action_id      bigint,
    fleet_counted           bigint      NOT NULL,
    fleet_unhealthy         bigint      NOT NULL,
    group_name              text,
    group_counted           bigint      NOT NULL,
    group_unhealthy         bigint      NOT NULL,
    fleet_plans_last_minute bigint      NOT NULL,
    group_plans_last_minute bigint      NOT NULL,
    agent_plans_in_window   bigint      NOT NULL,
    actor                   text        NOT NULL
);
CREATE INDEX healing_decisions_agent_idx ON healing_decisions (agent_id, id);
CREATE INDEX healing_decisions_event_idx ON healing_decisions (error_event_id);
CREATE INDEX healing_decisions_decided_idx ON healing_decisions (decided_at);
-- The group's rate: its plans in the last minute.
CREATE INDEX healing_decisions_planned_group_idx ON healing_decisions (group_name, decided_at)
    WHERE verdict = 'PLANNED';

CREATE TABLE healing_pauses (
    -- 'fleet' or 'group:<value of the policy's group_by label>'
    scope     text        PRIMARY KEY,
    reason    text        NOT NULL,
    paused_by text        NOT NULL,
    paused_at timestamptz NOT NULL
);

CREATE TABLE healing_breakers (
    error_type text        NOT NULL,
    strategy   text        NOT NULL,
    state      text        NOT NULL CHECK (state IN ('CLOSED', 'OPEN', 'HALF_OPEN')),
    failures   bigint      NOT NULL,
    -- Open since, or the half-open trial's time.
    since      timestamptz,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (error_type, strategy)
);

-- The brakes count plans per minute and per agent by creation time.
CREATE INDEX recovery_actions_agent_created_idx ON recovery_actions (agent_id, created_at);
