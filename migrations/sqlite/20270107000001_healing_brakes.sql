-- Remediation brakes (issue 24), as migrations/postgres/20270107000001:
-- every decision on a request for a plan, operators' pauses, breakers.
CREATE TABLE healing_decisions (
    id                      INTEGER PRIMARY KEY NOT NULL,
    error_event_id          INTEGER NOT NULL,
    agent_id                TEXT    NOT NULL,
    decided_at              INTEGER NOT NULL,
    verdict                 TEXT    NOT NULL CHECK (verdict IN ('PLANNED', 'DRY_RUN', 'BRAKED')),
    reason                  TEXT,
    message                 TEXT    NOT NULL,
    strategy                TEXT,
    recovery_action_id      INTEGER,
    fleet_counted           INTEGER NOT NULL,
    fleet_unhealthy         INTEGER NOT NULL,
    group_name              TEXT,
    group_counted           INTEGER NOT NULL,
    group_unhealthy         INTEGER NOT NULL,
    fleet_plans_last_minute INTEGER NOT NULL,
    group_plans_last_minute INTEGER NOT NULL,
    agent_plans_in_window   INTEGER NOT NULL,
    actor                   TEXT    NOT NULL
);
CREATE INDEX healing_decisions_agent_idx ON healing_decisions (agent_id, id);
CREATE INDEX healing_decisions_event_idx ON healing_decisions (error_event_id);
CREATE INDEX healing_decisions_decided_idx ON healing_decisions (decided_at);
-- The group's rate: its plans in the last minute.
CREATE INDEX healing_decisions_planned_group_idx ON healing_decisions (group_name, decided_at)
    WHERE verdict = 'PLANNED';

CREATE TABLE healing_pauses (
    scope     TEXT    PRIMARY KEY NOT NULL,
    reason    TEXT    NOT NULL,
    paused_by TEXT    NOT NULL,
    paused_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE healing_breakers (
    error_type TEXT    NOT NULL,
    strategy   TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('CLOSED', 'OPEN', 'HALF_OPEN')),
    failures   INTEGER NOT NULL,
    since      INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (error_type, strategy)
) WITHOUT ROWID;

CREATE INDEX recovery_actions_agent_created_idx ON recovery_actions (agent_id, created_at);
