-- Every processor run is kept, not only the last one per processor: who or
-- what started it (`started_by`: 'scheduler' for the scheduler's ticks, 'call'
-- for a RunProcessor call, whose caller is the `actor`), when (microseconds
-- since the epoch), and its stats (counts, the first errors, root_error) as
-- before. The runs kept until this migration become the first rows of the
-- history, with an empty started_by and actor (unknown). Old runs are pruned by
-- the server (--run-retention), always keeping each processor's newest.
-- AUTOINCREMENT: a pruned run's id is never given to another.
CREATE TABLE pipeline_runs_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    processor   TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    started_by  TEXT    NOT NULL DEFAULT '',
    actor       TEXT    NOT NULL DEFAULT '',
    stats       TEXT    NOT NULL
);
INSERT INTO pipeline_runs_history (processor, started_at, finished_at, stats)
    SELECT processor, started_at, finished_at, stats FROM pipeline_runs
    ORDER BY started_at, processor;
DROP TABLE pipeline_runs;
ALTER TABLE pipeline_runs_history RENAME TO pipeline_runs;
-- Listing (newest first, paged by (started_at, id)), a processor's newest run,
-- and pruning by age all walk these.
CREATE INDEX pipeline_runs_started_idx ON pipeline_runs (started_at, id);
CREATE INDEX pipeline_runs_processor_started_idx ON pipeline_runs (processor, started_at, id);
