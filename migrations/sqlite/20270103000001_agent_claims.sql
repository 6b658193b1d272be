-- Claims (DispatchService.ClaimAgent, issue 22). An agent's active claim lives
-- on its row (NULL columns: none), so the batch that reads the agent reads
-- and writes it with its status; `claims` records every claim made, for
-- RenewClaim / ReleaseClaim to find a claim's agent and for ClaimAgent's
-- idempotency keys (holder, request_id). Rows there are pruned with the
-- transition history they belong to. Times are microseconds since the epoch.
ALTER TABLE agents ADD COLUMN claim_id TEXT;
ALTER TABLE agents ADD COLUMN claim_holder TEXT;
ALTER TABLE agents ADD COLUMN claim_token INTEGER;
ALTER TABLE agents ADD COLUMN claim_request_id TEXT;
ALTER TABLE agents ADD COLUMN claimed_at INTEGER;
ALTER TABLE agents ADD COLUMN lease_expires_at INTEGER;

CREATE TABLE claims (
    claim_id         TEXT    PRIMARY KEY,
    agent_id         TEXT    NOT NULL,
    holder           TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    fencing_token    INTEGER NOT NULL,
    slot_type        TEXT    NOT NULL,
    claimed_at       INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL
);
-- One claim per idempotency key of one caller.
CREATE UNIQUE INDEX claims_request_idx ON claims (holder, request_id) WHERE request_id <> '';
CREATE INDEX claims_claimed_idx ON claims (claimed_at);

-- The claim's choice: the schedulable IDLE agents, idle longest first.
CREATE INDEX agents_claimable_idx ON agents (last_transition_at, agent_id)
    WHERE status = 'IDLE' AND cordon_reason IS NULL;
-- The sweeper's expired leases, and its OFFLINE agents past retention.
CREATE INDEX agents_lease_idx ON agents (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX agents_offline_since_idx ON agents (last_transition_at) WHERE status = 'OFFLINE';
