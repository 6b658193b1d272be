// Quota pools against the real server: agents registered with quotaPools, one
// member's report (claim.reportExhausted with quotaPool and window) parking its
// IDLE sibling, client.quota (QuotaService) showing the pool PARKED, an
// operator's parkPool and releasePool (the canary first, the rest after its
// work slot), and examples/quota_pools.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import { timestampFromMs } from "@bufbuild/protobuf/wkt";

import {
  AgentStatus,
  createFleetcareClient,
  ExhaustionReason,
  QuotaPoolPhase,
  QuotaWindow,
  SlotType,
  TransitionCause,
  withClaim,
  type Agent,
  type FleetcareClient,
} from "../src/index.js";
import { useServer } from "./helpers/fixture.js";
import { eventually, packageRoot, startServer, uniqueId } from "./helpers/server.js";

const live = useServer();

/** Registers `size` IDLE agents with a label of their own, each a member of `quotaPools`. */
async function members(
  client: FleetcareClient,
  quotaPools: string[],
  size = 2,
): Promise<{ labels: Record<string, string>; ids: string[] }> {
  const name = uniqueId("ts-quota");
  const labels = { pool: name };
  const ids = Array.from({ length: size }, (_, i) => `${name}-${i}`);
  for (const agentId of ids) {
    const { agent } = await client.agentStatus.registerAgent({ agentId, labels, quotaPools });
    assert.deepEqual(agent?.quotaPools, quotaPools);
    assert.equal(agent?.status, AgentStatus.IDLE);
  }
  return { labels, ids };
}

async function agent(agentId: string, client = live.client): Promise<Agent> {
  return (await client.agentStatus.getAgent({ agentId })).agent!;
}

async function lastTransition(agentId: string, client = live.client) {
  const { transitions } = await client.agentStatus.listTransitions({ agentId, pageSize: 1000 });
  return transitions[transitions.length - 1]!;
}

test("a report for the pool parks the idle sibling, and client.quota shows the pool PARKED", async () => {
  const pool = `anthropic/${uniqueId("acct")}`;
  const { labels, ids } = await members(live.client, [pool]);

  // One member's run hits the 5-hour limit: it reports for the pool, with its claim's token.
  const resets = Math.floor(Date.now() / 1000) + 2 * 3600;
  const { reporter, report } = await withClaim(live.client, { selector: labels, leaseMs: 5000 }, async (claim) => ({
    reporter: claim.agentId,
    report: await claim.reportExhausted({
      reason: ExhaustionReason.RATE_LIMIT,
      message: `Claude AI usage limit reached|${resets}`,
      quotaPool: pool,
      window: QuotaWindow.FIVE_HOUR,
    }),
  }));
  const sibling = ids.find((id) => id !== reporter)!;
  assert.equal(report.agent?.status, AgentStatus.EXHAUSTED);
  assert.deepEqual(report.agent?.heldByPools, [pool]);
  assert.equal(report.transition?.cause, TransitionCause.EXHAUSTED);
  assert.equal(report.transition?.quotaPool, pool);

  // The sibling, IDLE, was parked in the same commit, held by the pool.
  const parked = await agent(sibling);
  assert.equal(parked.status, AgentStatus.EXHAUSTED);
  assert.deepEqual(parked.heldByPools, [pool]);
  const last = await lastTransition(sibling);
  assert.equal(last.cause, TransitionCause.POOL_EXHAUSTED);
  assert.equal(last.quotaPool, pool);
  assert.equal(last.revision, report.transition!.revision + 1n);

  // The operator's view through client.quota.
  const got = await live.client.quota.getQuotaPool({ pool });
  assert.equal(got.pool?.name, pool);
  assert.equal(got.pool?.phase, QuotaPoolPhase.PARKED);
  assert.equal(got.pool?.held, 2n);
  assert.deepEqual(got.heldAgentIds, [...ids].sort());
  assert.equal(got.pool?.parkedUntil?.seconds, BigInt(resets));
  assert.equal(got.pool?.windows.length, 1);
  const window = got.pool!.windows[0]!;
  assert.equal(window.window, QuotaWindow.FIVE_HOUR);
  assert.equal(window.inForce, true);
  assert.equal(window.reportedBy, reporter);
  assert.deepEqual(
    got.pool?.members.map((m) => [m.status, m.count]),
    [[AgentStatus.EXHAUSTED, 2n]],
  );

  const { pools: parkedPools } = await live.client.quota.listQuotaPools({ parkedOnly: true });
  const mine = parkedPools.filter((p) => p.name === pool);
  assert.equal(mine.length, 1);
  assert.equal(mine[0]!.phase, QuotaPoolPhase.PARKED);
  assert.equal(mine[0]!.held, 2n);
  const names = (await live.client.quota.listQuotaPools({})).pools.map((p) => p.name);
  assert.ok(names.includes(pool));
  assert.deepEqual(names, [...names].sort());
});

test("an operator parks and releases a pool: the canary first, the rest after its work slot", async () => {
  // No spread: the members after the canary follow as soon as it completes a work slot.
  const server = await startServer({ args: ["--heartbeat-timeout", "1h", "--pool-release-spread", "0s"] });
  const client = createFleetcareClient({ address: server.address });
  try {
    const pool = `key/${uniqueId("op")}`;
    const { ids } = await members(client, [pool]);
    const parked = await client.quota.parkPool({
      pool,
      until: timestampFromMs(Date.now() + 3600_000),
      window: QuotaWindow.BILLING,
      reason: "invoice unpaid",
    });
    assert.equal(parked.membersParked, 2n);
    assert.equal(parked.pool?.phase, QuotaPoolPhase.PARKED);
    assert.equal(parked.pool?.windows[0]?.source, "OPERATOR");
    for (const id of ids) {
      const a = await agent(id, client);
      assert.equal(a.status, AgentStatus.EXHAUSTED);
      assert.deepEqual(a.heldByPools, [pool]);
    }

    const released = await client.quota.releasePool({ pool, reason: "paid" });
    assert.ok(!released.pool?.windows.some((w) => w.inForce));
    const canary = await eventually("the canary released", async () => {
      const { pool: p } = await client.quota.getQuotaPool({ pool });
      return p?.canaryAgentId || undefined;
    });
    const back = await agent(canary, client);
    assert.equal(back.status, AgentStatus.IDLE);
    assert.deepEqual(back.heldByPools, []);
    const last = await lastTransition(canary, client);
    assert.equal(last.cause, TransitionCause.POOL_RELEASED);
    assert.equal(last.quotaPool, pool);
    await client.agentStatus.startWork({ agentId: canary, slotType: SlotType.WORK });
    await client.agentStatus.finishWork({ agentId: canary });
    await eventually("every member released", async () => {
      for (const id of ids) if ((await agent(id, client)).status !== AgentStatus.IDLE) return false;
      return true;
    });
    await eventually(
      "the pool open",
      async () => (await client.quota.getQuotaPool({ pool })).pool?.phase === QuotaPoolPhase.OPEN,
    );
  } finally {
    client.close();
    await server.stop();
  }
});

test("examples/quota_pools parks a subscription's pool and lists the pools", async () => {
  const server = await startServer({ args: ["--heartbeat-timeout", "1h"] });
  const client = createFleetcareClient({ address: server.address });
  try {
    const script = join(packageRoot, "dist", "examples", "quota_pools.js");
    const child = await promisify(execFile)(process.execPath, [script], {
      env: { ...process.env, FLEETCARE_SERVER: server.address },
      timeout: 60_000,
    });
    const lines = child.stdout.trim().split("\n");
    assert.deepEqual(lines.slice(0, 7), [
      "registered claude-opus-1 in anthropic/acct-42, anthropic/acct-42/opus",
      "registered claude-sonnet-1 in anthropic/acct-42",
      "registered claude-sonnet-2 in anthropic/acct-42",
      "claude-sonnet-1 reported anthropic/acct-42: EXHAUSTED",
      "claude-opus-1 is EXHAUSTED, held by anthropic/acct-42",
      "claude-sonnet-1 is EXHAUSTED, held by anthropic/acct-42",
      "claude-sonnet-2 is EXHAUSTED, held by anthropic/acct-42",
    ]);
    assert.equal(lines.length, 9, child.stdout);
    assert.match(lines[7]!, /^pool anthropic\/acct-42: PARKED, 3 held, FIVE_HOUR until \S+Z$/);
    assert.equal(lines[8], "pool anthropic/acct-42/opus: OPEN, 0 held");

    // The server agrees with what the example printed.
    const got = await client.quota.getQuotaPool({ pool: "anthropic/acct-42" });
    assert.deepEqual(got.heldAgentIds, ["claude-opus-1", "claude-sonnet-1", "claude-sonnet-2"]);
    assert.equal(got.pool?.windows[0]?.reportedBy, "claude-sonnet-1");
    assert.deepEqual((await agent("claude-opus-1", client)).quotaPools, ["anthropic/acct-42", "anthropic/acct-42/opus"]);
  } finally {
    client.close();
    await server.stop();
  }
});
