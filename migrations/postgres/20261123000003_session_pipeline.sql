-- Session pipeline: per-(processor, session file) state, the usage processor's
-- entries, transcript errors in the healing history, and the last run of each processor.

CREATE TABLE session_states (
    processor         text        NOT NULL,
    path              text        NOT NULL,  -- "<user>/<file>.jsonl"
    user_name         text        NOT NULL,
    size              bigint      NOT NULL,
    mtime_ns          bigint      NOT NULL,
    -- When size and mtime were last observed: a file rewritten within the same
    -- timestamp tick as the observation would look unchanged (git's "racy" case).
    observed_at       timestamptz NOT NULL,
    sha256            text        NOT NULL,
    processor_version integer     NOT NULL,
    processed_at      timestamptz,
    items_count       bigint      NOT NULL DEFAULT 0,
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text,
    status            text        NOT NULL CHECK (status IN ('PROCESSED', 'FAILED', 'DEAD')),
    next_attempt_at   timestamptz,
    PRIMARY KEY (processor, path)
);
CREATE INDEX session_states_status_idx ON session_states (processor, status, path);

-- One row per assistant message per file (a message repeated within a file is
-- kept once). The same message in several files (resumed sessions) is kept in
-- each, and counted once at query time.
CREATE TABLE usage_entries (
    id                    bigserial   PRIMARY KEY,
    path                  text        NOT NULL,
    user_name             text        NOT NULL,
    session_id            text        NOT NULL,
    line_no               integer     NOT NULL,
    -- The file's earliest entry: which copy of a duplicated message counts.
    file_first_at         timestamptz NOT NULL,
    message_id            text,
    request_id            text,
    model                 text,
    occurred_at           timestamptz NOT NULL,
    input_tokens          bigint      NOT NULL,
    output_tokens         bigint      NOT NULL,
    cache_creation_tokens bigint      NOT NULL,
    cache_read_tokens     bigint      NOT NULL
);
CREATE INDEX usage_entries_path_idx ON usage_entries (path);
CREATE INDEX usage_entries_message_idx ON usage_entries (message_id, request_id);
CREATE INDEX usage_entries_occurred_idx ON usage_entries (occurred_at);

-- Errors found in transcripts join the healing history, keyed by where they came from.
ALTER TABLE error_events ADD COLUMN source_path text, ADD COLUMN source_key text;
CREATE UNIQUE INDEX error_events_source_idx ON error_events (source_path, source_key)
    WHERE source_path IS NOT NULL;

CREATE TABLE pipeline_runs (
    processor   text        PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    stats       jsonb       NOT NULL
);
