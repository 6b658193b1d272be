-- Cordons (DispatchService.CordonAgent / UncordonAgent, issue 22): the reason
-- an agent was taken out of rotation, NULL while it is schedulable. A
-- cordoned agent keeps its status and its work but is never claimed.
ALTER TABLE agents ADD COLUMN cordon_reason TEXT;
