-- Post actions keep who claimed them (or created them by a report) and who
-- reported their last outcome, as recovery actions do. Rows written before
-- this migration keep empty names.
ALTER TABLE post_actions ADD COLUMN actor text NOT NULL DEFAULT '';
ALTER TABLE post_actions ADD COLUMN outcome_actor text NOT NULL DEFAULT '';
