-- Healing records end (issue 24): --healing-retention prunes ended recovery
-- actions by their creation time (error events have error_events_occurred_idx,
-- and recovery_actions_error_event_idx serves the listing by event).
CREATE INDEX recovery_actions_created_idx ON recovery_actions (created_at);
