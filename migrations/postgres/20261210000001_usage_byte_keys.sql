-- Group commit: a first run writes every file's entries and messages in a few
-- large statements, so what each row costs in its indexes is what the run
-- costs. The usage tables' text keys compare byte-wise (COLLATE "C", the
-- order Rust sorts them in, and so the lock order; C.UTF-8 orders the same
-- but through strcoll), and the surrogate key nothing reads goes.

ALTER TABLE usage_entries DROP COLUMN id;
ALTER TABLE usage_entries
    ALTER COLUMN path TYPE text COLLATE "C",
    ALTER COLUMN dedup_key TYPE text COLLATE "C";
ALTER TABLE usage_messages
    ALTER COLUMN dedup_key TYPE text COLLATE "C",
    ALTER COLUMN user_name TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C",
    ALTER COLUMN model TYPE text COLLATE "C";
ALTER TABLE usage_cells
    ALTER COLUMN user_name TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C",
    ALTER COLUMN model TYPE text COLLATE "C";
