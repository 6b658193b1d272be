-- Every processor run is kept, not only the last one per processor: who or
-- what started it (`started_by`: 'scheduler' for the scheduler's ticks, 'call'
-- for a RunProcessor call, whose caller is the `actor`), when, and its stats
-- (counts, the first errors, root_error) as before. The runs kept until this
-- migration become the first rows of the history, with an empty started_by and
-- actor (unknown). Old runs are pruned by the server (--run-retention),
-- always keeping each processor's newest.
CREATE TABLE pipeline_runs_history (
    id          bigserial   PRIMARY KEY,
    processor   text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    started_by  text        NOT NULL DEFAULT '',
    actor       text        NOT NULL DEFAULT '',
    stats       jsonb       NOT NULL
);
INSERT INTO pipeline_runs_history (processor, started_at, finished_at, stats)
    SELECT processor, started_at, finished_at, stats FROM pipeline_runs
    ORDER BY started_at, processor;
DROP TABLE pipeline_runs;
ALTER TABLE pipeline_runs_history RENAME TO pipeline_runs;
ALTER SEQUENCE pipeline_runs_history_id_seq RENAME TO pipeline_runs_id_seq;
ALTER INDEX pipeline_runs_history_pkey RENAME TO pipeline_runs_pkey;
-- Listing (newest first, paged by (started_at, id)), a processor's newest run,
-- and pruning by age all walk these.
CREATE INDEX pipeline_runs_started_idx ON pipeline_runs (started_at, id);
CREATE INDEX pipeline_runs_processor_started_idx ON pipeline_runs (processor, started_at, id);
