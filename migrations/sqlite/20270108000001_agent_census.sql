-- The brakes' census kept rather than counted (issue 24), as
-- migrations/postgres/20270108000001: for the fleet (label_key =
-- label_value = '') and for every label pair an agent carries, how many
-- agents there are and how many are OFFLINE or EXHAUSTED; every batch adds
-- its changes in its transaction.
CREATE TABLE agent_census (
    label_key   TEXT    NOT NULL,
    label_value TEXT    NOT NULL,
    agents      INTEGER NOT NULL,
    offline     INTEGER NOT NULL,
    exhausted   INTEGER NOT NULL,
    PRIMARY KEY (label_key, label_value)
) WITHOUT ROWID;

INSERT INTO agent_census (label_key, label_value, agents, offline, exhausted)
SELECT p.key, p.value, count(*), sum(p.status = 'OFFLINE'), sum(p.status = 'EXHAUSTED')
FROM (SELECT '' AS key, '' AS value, status FROM agents
      UNION ALL
      SELECT j.key, j.value, a.status FROM agents a, json_each(a.labels) j) p
GROUP BY p.key, p.value;
