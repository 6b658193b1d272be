// Agents sharing one Claude Code subscription: register them in its quota pool,
// report a 429 from one of them, and see the whole pool parked.
//
//   FLEETCARE_SERVER=127.0.0.1:50051 node dist/examples/quota_pools.js

import { timestampDate } from "@bufbuild/protobuf/wkt";

import {
  AgentStatus,
  createFleetcareClient,
  ExhaustionReason,
  QuotaPoolPhase,
  QuotaWindow,
} from "@fleetcare/client";

const fleet = createFleetcareClient({ address: process.env.FLEETCARE_SERVER ?? "127.0.0.1:50051" });
const agents = fleet.agentStatus;
const account = "anthropic/acct-42"; // the subscription: its 5-hour and weekly limits bind every agent on it
const opus = `${account}/opus`; // a per-model limit within it
const members: Record<string, string[]> = {
  "claude-opus-1": [account, opus],
  "claude-sonnet-1": [account],
  "claude-sonnet-2": [account],
};

try {
  for (const [agentId, quotaPools] of Object.entries(members)) {
    const { agent } = await agents.registerAgent({ agentId, labels: { provider: "anthropic" }, quotaPools });
    console.log(`registered ${agentId} in ${agent!.quotaPools.join(", ")}`);
  }

  // claude-sonnet-1's run got a 429: the subscription's 5-hour limit. Reported for
  // the pool, it parks every IDLE agent on the account in the same commit.
  const report = await agents.reportExhausted({
    agentId: "claude-sonnet-1",
    reason: ExhaustionReason.RATE_LIMIT,
    message: "You've hit your session limit · resets 12:50am (America/Los_Angeles)",
    quotaPool: account,
    window: QuotaWindow.FIVE_HOUR,
  });
  console.log(`claude-sonnet-1 reported ${report.transition!.quotaPool}: ${AgentStatus[report.agent!.status]}`);

  for (const agentId of Object.keys(members)) {
    const { agent } = await agents.getAgent({ agentId });
    console.log(`${agentId} is ${AgentStatus[agent!.status]}, held by ${agent!.heldByPools.join(", ")}`);
  }

  // The operator's view: every pool, parked or not (fleet.quota is the QuotaService client).
  const { pools } = await fleet.quota.listQuotaPools({});
  for (const pool of pools) {
    const windows = pool.windows
      .filter((w) => w.inForce)
      .map((w) => `, ${QuotaWindow[w.window]} until ${timestampDate(w.until!).toISOString()}`)
      .join("");
    console.log(`pool ${pool.name}: ${QuotaPoolPhase[pool.phase]}, ${pool.held} held${windows}`);
  }
} finally {
  fleet.close();
}
