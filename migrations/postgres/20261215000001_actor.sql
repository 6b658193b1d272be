-- Who did it: the authenticated caller's name ("sweeper" for the server's own
-- transitions, "pipeline" for errors found in transcripts). Rows written
-- before this migration keep an empty actor.
ALTER TABLE transitions ADD COLUMN actor text NOT NULL DEFAULT '';
ALTER TABLE error_events ADD COLUMN actor text NOT NULL DEFAULT '';
ALTER TABLE recovery_actions ADD COLUMN actor text NOT NULL DEFAULT '';
-- Who reported the outcome (empty until then, and for expired leases).
ALTER TABLE recovery_actions ADD COLUMN outcome_actor text NOT NULL DEFAULT '';
