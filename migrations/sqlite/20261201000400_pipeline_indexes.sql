-- Replacing a session's transcript errors deletes its earlier error events
-- unless a recovery was planned for them: that check, and the foreign key's
-- own check on every deleted event (SQLite looks the referencing rows up,
-- with no index a scan of recovery_actions per event), find recovery actions
-- by their event.
CREATE INDEX IF NOT EXISTS recovery_actions_error_event_idx ON recovery_actions (error_event_id);
