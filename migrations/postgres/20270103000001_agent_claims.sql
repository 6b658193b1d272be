-- Claims (DispatchService.ClaimAgent, issue 22). An agent's active claim lives
-- on its row (NULL columns: none), so the batch that locks the agent reads
-- and writes it with its status; `claims` records every claim made, for
-- RenewClaim / ReleaseClaim to find a claim's agent and for ClaimAgent's
-- idempotency keys (holder, request_id). Rows there are pruned with the
-- transition history they belong to.
ALTER TABLE agents
    ADD COLUMN claim_id         TEXT,
    ADD COLUMN claim_holder     TEXT,
    ADD COLUMN claim_token      BIGINT,
    ADD COLUMN claim_request_id TEXT,
    ADD COLUMN claimed_at       TIMESTAMPTZ,
    ADD COLUMN lease_expires_at TIMESTAMPTZ;

CREATE TABLE claims (
    claim_id         TEXT        PRIMARY KEY,
    agent_id         TEXT        NOT NULL,
    holder           TEXT        NOT NULL,
    request_id       TEXT        NOT NULL,
    fencing_token    BIGINT      NOT NULL,
    slot_type        TEXT        NOT NULL,
    claimed_at       TIMESTAMPTZ NOT NULL,
    lease_expires_at TIMESTAMPTZ NOT NULL
);
-- One claim per idempotency key of one caller.
CREATE UNIQUE INDEX claims_request_idx ON claims (holder, request_id) WHERE request_id <> '';
CREATE INDEX claims_claimed_idx ON claims (claimed_at);

-- The claim's choice: the schedulable IDLE agents, idle longest first. A
-- partial index: at any moment a small part of the fleet is idle, and the
-- heartbeat flush (which rewrites last_heartbeat_at only) stays a HOT update.
CREATE INDEX agents_claimable_idx ON agents (last_transition_at, agent_id)
    WHERE status = 'IDLE' AND cordon_reason IS NULL;
-- The sweeper's expired leases, and its OFFLINE agents past retention.
CREATE INDEX agents_lease_idx ON agents (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX agents_offline_since_idx ON agents (last_transition_at) WHERE status = 'OFFLINE';
