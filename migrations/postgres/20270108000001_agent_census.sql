-- The brakes' census kept rather than counted (issue 24): for the fleet
-- (label_key = label_value = '') and for every label pair an agent carries,
-- how many agents there are and how many of them are OFFLINE or EXHAUSTED.
-- A plan reads its fleet's and its group's row instead of scanning the
-- agents. Every batch that changes an agent's status between those that
-- count, its labels, or creates or deletes it, adds its changes in the same
-- statement as its writes (`domain::brakes::census_changes`); `fleetcare
-- copy` counts it again on the target. (Triggers on `agents` were tried: a
-- row trigger made parking 10,000 agents in one commit take seconds, each
-- update of the fleet's row in one transaction longer than the last, and a
-- statement trigger with transition tables doubled the heartbeat flush.)
CREATE TABLE agent_census (
    label_key   text   NOT NULL,
    label_value text   NOT NULL,
    agents      bigint NOT NULL,
    offline     bigint NOT NULL,
    exhausted   bigint NOT NULL,
    PRIMARY KEY (label_key, label_value)
);

INSERT INTO agent_census (label_key, label_value, agents, offline, exhausted)
SELECT p.k, p.v, count(*), count(*) FILTER (WHERE a.status = 'OFFLINE'),
       count(*) FILTER (WHERE a.status = 'EXHAUSTED')
FROM agents a
CROSS JOIN LATERAL (SELECT '' AS k, '' AS v
                    UNION ALL
                    SELECT key, value FROM jsonb_each_text(a.labels)) p
GROUP BY p.k, p.v;
