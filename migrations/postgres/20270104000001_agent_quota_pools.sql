-- Quota pools (issue 23): the provider limits an agent shares with others
-- (RegisterAgentRequest.quota_pools), a JSON array of pool names in the
-- order registered; replaced by each registration.
ALTER TABLE agents ADD COLUMN quota_pools JSONB NOT NULL DEFAULT '[]';
