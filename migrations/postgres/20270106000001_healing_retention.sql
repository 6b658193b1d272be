-- Healing records end (issue 24): --healing-retention prunes ended recovery
-- actions by their creation time (error events have error_events_occurred_idx),
-- and recovery actions are listed by the error event they were planned for.
CREATE INDEX recovery_actions_error_event_idx ON recovery_actions (error_event_id);
CREATE INDEX recovery_actions_created_idx ON recovery_actions (created_at);
