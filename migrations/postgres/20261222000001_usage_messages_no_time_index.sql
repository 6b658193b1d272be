-- A first run writes every distinct message once, so each index on
-- usage_messages is paid per message. The time index served only reports
-- whose range cuts through a day; those now find the messages of the cut
-- days through the cells of those days and usage_messages_cell_idx
-- (domain::usage::split_range), so it goes.
DROP INDEX IF EXISTS usage_messages_occurred_idx;
