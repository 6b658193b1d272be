-- Usage follows ccusage 20: copies keyed by message id alone, a sidechain's
-- replay loses, then the most complete copy wins (the Postgres migration of
-- the same name says why; the usage processor's version goes to 2 so every
-- file on disk is read again).
ALTER TABLE usage_entries ADD COLUMN sidechain INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_entries DROP COLUMN file_first_at;
UPDATE usage_entries
SET dedup_key = 'm:' || CAST(substr(CAST(dedup_key AS BLOB),
                                    instr(dedup_key, ':') + 1,
                                    CAST(substr(dedup_key, 1, instr(dedup_key, ':') - 1) AS INTEGER))
                             AS TEXT)
WHERE dedup_key NOT LIKE 'line:%';

DELETE FROM usage_messages;
ALTER TABLE usage_messages ADD COLUMN sidechain INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_messages DROP COLUMN file_first_at;
INSERT INTO usage_messages
    (dedup_key, path, line_no, sidechain, user_name, session_id, model, occurred_at, day,
     input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens)
SELECT dedup_key, path, line_no, sidechain, user_name, session_id, model, occurred_at,
       date(occurred_at / 1000000, 'unixepoch'),
       input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens
FROM (SELECT dedup_key, path, line_no, sidechain, user_name, session_id,
             COALESCE(model, '') AS model, occurred_at,
             input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens,
             row_number() OVER (
                 PARTITION BY dedup_key
                 ORDER BY sidechain,
                          input_tokens + output_tokens + cache_creation_tokens
                              + cache_read_tokens DESC,
                          path, line_no) AS rank
      FROM usage_entries)
WHERE rank = 1;

DELETE FROM usage_cells;
INSERT INTO usage_cells
SELECT day, user_name, session_id, model,
       sum(input_tokens), sum(output_tokens), sum(cache_creation_tokens), sum(cache_read_tokens),
       count(*), min(occurred_at), max(occurred_at)
FROM usage_messages
GROUP BY day, user_name, session_id, model;
