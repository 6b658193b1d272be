-- Usage follows ccusage 20 (src/domain/usage.rs): the copies of one message
-- are keyed by its message id alone ('m:' || id); a side question's or
-- sub-agent's replay (isSidechain) loses to any other copy, then the most
-- complete copy (the larger total) wins, then the earlier path and line. The
-- file's first entry no longer decides, so its column goes.
--
-- Old keys ('<byte length of the message id>:<message id>:<request id>') are
-- rewritten; line keys ('line:<path>:<line>') stay. The counted copies and
-- the cells are rebuilt by the new rule. The entries stored so far hold the
-- first copy of a streamed message, not the most complete: the usage
-- processor's version goes to 2, so every file still on disk is read again
-- and its entries replaced.
ALTER TABLE usage_entries ADD COLUMN sidechain boolean NOT NULL DEFAULT false;
ALTER TABLE usage_entries DROP COLUMN file_first_at;
UPDATE usage_entries
SET dedup_key = 'm:' || convert_from(
        substring(convert_to(dedup_key, 'UTF8')
                  FROM strpos(dedup_key, ':') + 1
                  FOR split_part(dedup_key, ':', 1)::int),
        'UTF8')
WHERE dedup_key NOT LIKE 'line:%';

DELETE FROM usage_messages;
ALTER TABLE usage_messages ADD COLUMN sidechain boolean NOT NULL DEFAULT false;
ALTER TABLE usage_messages DROP COLUMN file_first_at;
INSERT INTO usage_messages
    (dedup_key, path, line_no, sidechain, user_name, session_id, model, occurred_at, day,
     input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens)
SELECT DISTINCT ON (dedup_key)
       dedup_key, path, line_no, sidechain, user_name, session_id, COALESCE(model, ''),
       occurred_at, (occurred_at AT TIME ZONE 'UTC')::date,
       input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens
FROM usage_entries
ORDER BY dedup_key, sidechain,
         input_tokens + output_tokens + cache_creation_tokens + cache_read_tokens DESC,
         path, line_no;

DELETE FROM usage_cells;
INSERT INTO usage_cells
SELECT day, user_name, session_id, model,
       sum(input_tokens), sum(output_tokens), sum(cache_creation_tokens), sum(cache_read_tokens),
       count(*), min(occurred_at), max(occurred_at)
FROM usage_messages
GROUP BY day, user_name, session_id, model;
