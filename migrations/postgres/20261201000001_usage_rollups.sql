-- Usage rollups: GetUsage answers from totals maintained in the transaction
-- that replaces a file's usage entries, instead of de-duplicating every entry
-- at read time.
--
--   usage_entries   every file's copy of every message (as before), now with
--                   its de-duplication key;
--   usage_messages  one row per distinct message: the winning copy (ccusage's
--                   rule, decided in src/domain/usage.rs);
--   usage_cells     totals of the winning copies per (day, user, session,
--                   model): every grouping and any day-aligned range is a sum
--                   over cells.
--
-- The key: "<bytes of message id>:<message id>:<request id>" when the entry has
-- both ids, else "line:<path>:<line>" (never de-duplicated). Computed in Rust
-- by domain::usage::dedup_key; the backfill below computes the same.

ALTER TABLE usage_entries ADD COLUMN dedup_key text;
UPDATE usage_entries SET dedup_key =
    CASE WHEN message_id IS NOT NULL AND request_id IS NOT NULL
         THEN octet_length(message_id) || ':' || message_id || ':' || request_id
         ELSE 'line:' || path || ':' || line_no END;
ALTER TABLE usage_entries ALTER COLUMN dedup_key SET NOT NULL;
DROP INDEX usage_entries_message_idx;
DROP INDEX usage_entries_occurred_idx;
CREATE INDEX usage_entries_dedup_idx ON usage_entries (dedup_key);

CREATE TABLE usage_messages (
    dedup_key             text        PRIMARY KEY,
    -- The winning copy: its file and line, and what it counts for.
    path                  text        NOT NULL,
    line_no               integer     NOT NULL,
    file_first_at         timestamptz NOT NULL,
    user_name             text        NOT NULL,
    session_id            text        NOT NULL,
    model                 text        NOT NULL,  -- '' when the entry names none
    occurred_at           timestamptz NOT NULL,
    day                   date        NOT NULL,  -- occurred_at's UTC date
    input_tokens          bigint      NOT NULL,
    output_tokens         bigint      NOT NULL,
    cache_creation_tokens bigint      NOT NULL,
    cache_read_tokens     bigint      NOT NULL
);
-- Recomputing a cell's first and last message; non-day-aligned ranges.
CREATE INDEX usage_messages_cell_idx ON usage_messages (user_name, session_id, day, model);
CREATE INDEX usage_messages_occurred_idx ON usage_messages (occurred_at);

CREATE TABLE usage_cells (
    day                   date        NOT NULL,
    user_name             text        NOT NULL,
    session_id            text        NOT NULL,
    model                 text        NOT NULL,
    input_tokens          bigint      NOT NULL,
    output_tokens         bigint      NOT NULL,
    cache_creation_tokens bigint      NOT NULL,
    cache_read_tokens     bigint      NOT NULL,
    messages              bigint      NOT NULL,
    first_at              timestamptz NOT NULL,
    last_at               timestamptz NOT NULL,
    PRIMARY KEY (day, user_name, session_id, model)
);

-- Backfill from what earlier versions stored, with the same rule.
INSERT INTO usage_messages
SELECT DISTINCT ON (dedup_key)
       dedup_key, path, line_no, file_first_at, user_name, session_id, COALESCE(model, ''),
       occurred_at, (occurred_at AT TIME ZONE 'UTC')::date,
       input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens
FROM usage_entries
ORDER BY dedup_key, file_first_at, path, line_no;

INSERT INTO usage_cells
SELECT day, user_name, session_id, model,
       sum(input_tokens), sum(output_tokens), sum(cache_creation_tokens), sum(cache_read_tokens),
       count(*), min(occurred_at), max(occurred_at)
FROM usage_messages
GROUP BY day, user_name, session_id, model;
