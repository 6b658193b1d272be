-- The embedded store's schema: the same tables and columns as the Postgres
-- schema (migrations/postgres, as of 20261210000001), so `fleetcare copy`
-- moves rows column for column. What differs is only how values are kept:
--
--   timestamps  INTEGER, microseconds since the Unix epoch, UTC (Postgres
--               keeps microseconds too, so a copy either way is exact, and
--               integers compare and index in time order);
--   dates       TEXT 'YYYY-MM-DD' (fixed width: text order is date order);
--   json        TEXT holding the JSON document;
--   booleans    INTEGER 0 or 1.
--
-- Text compares byte-wise (SQLite's BINARY collation), the order Rust sorts
-- strings in, as the Postgres usage tables' COLLATE "C" does.

CREATE TABLE agents (
    agent_id           TEXT    PRIMARY KEY NOT NULL,
    status             TEXT    NOT NULL
                       CHECK (status IN ('IDLE', 'BUSY', 'ON_CALL', 'OFFLINE', 'EXHAUSTED')),
    labels             TEXT    NOT NULL DEFAULT '{}',
    registered_at      INTEGER NOT NULL,
    last_heartbeat_at  INTEGER NOT NULL,
    last_transition_at INTEGER NOT NULL,
    revision           INTEGER NOT NULL,
    -- Kept while OFFLINE after EXHAUSTED, so a heartbeat cannot wake the agent early.
    exhaustion_reason  TEXT    CHECK (exhaustion_reason IN ('RATE_LIMIT', 'BILLING')),
    recovery_at        INTEGER,
    recovery_source    TEXT,
    recovery_hint      TEXT
) WITHOUT ROWID;
CREATE INDEX agents_status_idx ON agents (status, agent_id);
CREATE INDEX agents_status_recovery_idx ON agents (status, recovery_at);

-- One row: the last allocated revision. SQLite has one writer at a time, so
-- allocation and commit are serial by construction; the row is what makes the
-- revision survive a history pruned to nothing.
CREATE TABLE revision_head (
    singleton      INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (singleton = 1),
    head_revision  INTEGER NOT NULL
);
INSERT INTO revision_head (singleton, head_revision) VALUES (1, 0);

CREATE TABLE revision_retention (
    singleton      INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (singleton = 1),
    pruned_through INTEGER NOT NULL
);
INSERT INTO revision_retention (singleton, pruned_through) VALUES (1, 0);

CREATE TABLE transitions (
    revision          INTEGER PRIMARY KEY NOT NULL,
    agent_id          TEXT    NOT NULL,
    from_status       TEXT,
    to_status         TEXT    NOT NULL,
    cause             TEXT    NOT NULL,
    occurred_at       INTEGER NOT NULL,
    exhaustion_reason TEXT,
    recovery_at       INTEGER
);
CREATE INDEX transitions_agent_idx ON transitions (agent_id, revision);
CREATE INDEX transitions_occurred_idx ON transitions (occurred_at);

-- Healing.
CREATE TABLE error_events (
    id          INTEGER PRIMARY KEY NOT NULL,
    agent_id    TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    context     TEXT    NOT NULL DEFAULT '{}',
    error_type  TEXT    NOT NULL,
    severity    REAL    NOT NULL CHECK (severity >= 0 AND severity <= 1),
    critical    INTEGER NOT NULL,
    recurring   INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL,
    source_path TEXT,
    source_key  TEXT
);
CREATE INDEX error_events_recurrence_idx ON error_events (agent_id, error_type, occurred_at);
CREATE INDEX error_events_occurred_idx ON error_events (occurred_at);
CREATE INDEX error_events_type_idx ON error_events (error_type, id);
CREATE UNIQUE INDEX error_events_source_idx ON error_events (source_path, source_key)
    WHERE source_path IS NOT NULL;

CREATE TABLE recovery_actions (
    id                    INTEGER PRIMARY KEY NOT NULL,
    error_event_id        INTEGER NOT NULL REFERENCES error_events (id),
    agent_id              TEXT    NOT NULL,
    error_type            TEXT    NOT NULL,
    context_signature     TEXT    NOT NULL,
    strategy              TEXT    NOT NULL,
    chosen_strategy       TEXT    NOT NULL,
    parameters            TEXT    NOT NULL DEFAULT '{}',
    estimated_duration_ms INTEGER NOT NULL,
    success_probability   REAL    NOT NULL,
    risk                  REAL    NOT NULL,
    escalated             INTEGER NOT NULL,
    reason                TEXT    NOT NULL,
    status                TEXT    NOT NULL
                          CHECK (status IN ('ACTIVE', 'SUCCEEDED', 'FAILED', 'EXPIRED')),
    created_at            INTEGER NOT NULL,
    lease_expires_at      INTEGER NOT NULL,
    completed_at          INTEGER,
    duration_ms           INTEGER,
    details               TEXT
);
-- At most one active recovery per agent, enforced by the database.
CREATE UNIQUE INDEX recovery_actions_one_active_idx ON recovery_actions (agent_id) WHERE status = 'ACTIVE';
CREATE INDEX recovery_actions_agent_idx ON recovery_actions (agent_id, id);

CREATE TABLE healing_patterns (
    error_type        TEXT    NOT NULL,
    context_signature TEXT    NOT NULL,
    strategy          TEXT    NOT NULL,
    successes         INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    total_recovery_ms REAL    NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (error_type, context_signature, strategy)
) WITHOUT ROWID;

-- Kept for parity with Postgres (where locking the row serialises claims on a
-- post); with one writer the write transaction already serialises them.
CREATE TABLE post_locks (
    post_id TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;

CREATE TABLE post_actions (
    idempotency_key  TEXT    PRIMARY KEY NOT NULL,
    post_id          TEXT    NOT NULL,
    action_type      TEXT    NOT NULL CHECK (action_type IN ('comment', 'edit', 'thread')),
    tier             INTEGER NOT NULL CHECK (tier BETWEEN 1 AND 3),
    status           TEXT    NOT NULL CHECK (status IN ('RUNNING', 'SUCCEEDED', 'FAILED')),
    outcome          TEXT,
    error_code       TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    lease_expires_at INTEGER
) WITHOUT ROWID;
CREATE INDEX post_actions_post_idx ON post_actions (post_id, created_at);

-- Session pipeline.
CREATE TABLE session_states (
    processor         TEXT    NOT NULL,
    path              TEXT    NOT NULL,
    user_name         TEXT    NOT NULL,
    size              INTEGER NOT NULL,
    mtime_ns          INTEGER NOT NULL,
    observed_at       INTEGER NOT NULL,
    sha256            TEXT    NOT NULL,
    processor_version INTEGER NOT NULL,
    processed_at      INTEGER,
    items_count       INTEGER NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    status            TEXT    NOT NULL CHECK (status IN ('PROCESSED', 'FAILED', 'DEAD')),
    next_attempt_at   INTEGER,
    PRIMARY KEY (processor, path)
) WITHOUT ROWID;
CREATE INDEX session_states_status_idx ON session_states (processor, status, path);

CREATE TABLE usage_entries (
    path                  TEXT    NOT NULL,
    user_name             TEXT    NOT NULL,
    session_id            TEXT    NOT NULL,
    line_no               INTEGER NOT NULL,
    file_first_at         INTEGER NOT NULL,
    message_id            TEXT,
    request_id            TEXT,
    model                 TEXT,
    occurred_at           INTEGER NOT NULL,
    input_tokens          INTEGER NOT NULL,
    output_tokens         INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cache_read_tokens     INTEGER NOT NULL,
    dedup_key             TEXT    NOT NULL
);
CREATE INDEX usage_entries_path_idx ON usage_entries (path);
CREATE INDEX usage_entries_dedup_idx ON usage_entries (dedup_key);

CREATE TABLE usage_messages (
    dedup_key             TEXT    PRIMARY KEY NOT NULL,
    path                  TEXT    NOT NULL,
    line_no               INTEGER NOT NULL,
    file_first_at         INTEGER NOT NULL,
    user_name             TEXT    NOT NULL,
    session_id            TEXT    NOT NULL,
    model                 TEXT    NOT NULL,
    occurred_at           INTEGER NOT NULL,
    day                   TEXT    NOT NULL,
    input_tokens          INTEGER NOT NULL,
    output_tokens         INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cache_read_tokens     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX usage_messages_cell_idx ON usage_messages (user_name, session_id, day, model);
CREATE INDEX usage_messages_occurred_idx ON usage_messages (occurred_at);

CREATE TABLE usage_cells (
    day                   TEXT    NOT NULL,
    user_name             TEXT    NOT NULL,
    session_id            TEXT    NOT NULL,
    model                 TEXT    NOT NULL,
    input_tokens          INTEGER NOT NULL,
    output_tokens         INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cache_read_tokens     INTEGER NOT NULL,
    messages              INTEGER NOT NULL,
    first_at              INTEGER NOT NULL,
    last_at               INTEGER NOT NULL,
    PRIMARY KEY (day, user_name, session_id, model)
) WITHOUT ROWID;

CREATE TABLE pipeline_runs (
    processor   TEXT    PRIMARY KEY NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    stats       TEXT    NOT NULL
) WITHOUT ROWID;
