// claimAgent / withClaim against the real server: the claim makes the agent
// BUSY under its holder, the lease is renewed in the background, the end of
// the work releases it (also when the work throws), two claimers never get the
// same agent, finishWork ends the claim, a claim ended behind the handle's back
// is reported lost, and a ClaimAgent retried after a lost answer is the same claim.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { timestampMs } from "@bufbuild/protobuf/wkt";

import {
  AgentStatus,
  ClaimLostError,
  Code,
  ConnectError,
  ExhaustionReason,
  SelectorOperator,
  SlotType,
  TransitionCause,
  claimAgent,
  createFleetcareClient,
  errorReason,
  withClaim,
  type Agent,
  type ClaimHandle,
  type FleetcareClient,
} from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";
import { eventually, startServer, uniqueId } from "./helpers/server.js";

const live = useServer();

/** Registers `size` IDLE agents carrying a label of their own: that label and their ids. */
async function pool(client: FleetcareClient, size = 1): Promise<{ labels: Record<string, string>; ids: string[] }> {
  const name = uniqueId("ts-claim");
  const labels = { pool: name };
  const ids = Array.from({ length: size }, (_, i) => `${name}-${i}`);
  for (const agentId of ids) await client.agentStatus.registerAgent({ agentId, labels });
  return { labels, ids };
}

async function agent(agentId: string, client = live.client): Promise<Agent> {
  return (await client.agentStatus.getAgent({ agentId })).agent!;
}

async function lastTransition(agentId: string) {
  const { transitions } = await live.client.agentStatus.listTransitions({ agentId, pageSize: 1000 });
  return transitions[transitions.length - 1]!;
}

test("withClaim holds the agent, renews the lease in the background and releases at the end", async () => {
  const { labels, ids } = await pool(live.client);
  const leaseMs = 1000;
  let handle: ClaimHandle | undefined;
  const result = await withClaim(live.client, { selector: labels, leaseMs }, async (claim) => {
    handle = claim;
    assert.equal(claim.agentId, ids[0]);
    assert.equal(claim.agent.status, AgentStatus.BUSY);
    assert.equal(claim.transition?.cause, TransitionCause.CLAIMED);
    assert.equal(claim.fencingToken, claim.transition!.revision);
    const first = claim.claim;
    assert.equal(first.holder, "anonymous");
    assert.equal(first.slotType, SlotType.WORK);
    assert.equal(first.requestId, claim.requestId);
    assert.notEqual(claim.requestId, "");
    const held = await agent(claim.agentId);
    assert.equal(held.status, AgentStatus.BUSY);
    assert.equal(held.claim?.claimId, first.claimId);

    // Still held after several leases, the expiry moving forward with each renewal.
    await eventually(
      "renewals past three leases",
      () =>
        claim.renewals >= 4 &&
        timestampMs(claim.claim.leaseExpiresAt!) > timestampMs(first.claimedAt!) + 3 * leaseMs,
    );
    const still = await agent(claim.agentId);
    assert.equal(still.status, AgentStatus.BUSY);
    assert.equal(still.claim?.claimId, first.claimId);
    assert.ok(timestampMs(still.claim!.leaseExpiresAt!) > timestampMs(first.leaseExpiresAt!) + leaseMs);
    assert.ok(claim.active && claim.lost === undefined && !claim.signal.aborted);
    return "done";
  });
  assert.equal(result, "done");
  const after = await agent(ids[0]!);
  assert.equal(after.status, AgentStatus.IDLE);
  assert.equal(after.claim, undefined);
  assert.equal(handle!.active, false);
  const last = await lastTransition(ids[0]!);
  assert.equal(last.cause, TransitionCause.CLAIM_RELEASED);
  const { claims } = await live.client.dispatch.listClaims({});
  assert.ok(!claims.some((c) => c.claimId === handle!.claimId));
});

test("a throwing work still releases, and its error is the one thrown", async () => {
  const { labels, ids } = await pool(live.client);
  await assert.rejects(
    withClaim(live.client, { selector: labels, leaseMs: 5000 }, async () => {
      assert.equal((await agent(ids[0]!)).status, AgentStatus.BUSY);
      throw new Error("the work failed");
    }),
    /the work failed/,
  );
  const after = await agent(ids[0]!);
  assert.equal(after.status, AgentStatus.IDLE);
  assert.equal(after.claim, undefined);
});

test("await using releases at the end of the block, also on a throw", async () => {
  const { labels, ids } = await pool(live.client);
  const work = async () => {
    await using claim = await claimAgent(live.client, { selector: labels, leaseMs: 5000 });
    assert.equal((await agent(claim.agentId)).status, AgentStatus.BUSY);
    throw new Error("out of the block");
  };
  await assert.rejects(work(), /out of the block/);
  assert.equal((await agent(ids[0]!)).status, AgentStatus.IDLE);
});

test("two claimers of one idle agent: one gets it, the other NO_AGENT_AVAILABLE", async () => {
  const { labels, ids } = await pool(live.client);
  const outcomes = await Promise.allSettled([
    claimAgent(live.client, { selector: labels, leaseMs: 10_000 }),
    claimAgent(live.client, { selector: labels, leaseMs: 10_000 }),
  ]);
  const won = outcomes.flatMap((o) => (o.status === "fulfilled" ? [o.value] : []));
  const refused = outcomes.flatMap((o) => (o.status === "rejected" ? [o.reason as unknown] : []));
  try {
    assert.equal(won.length, 1, String(refused));
    assert.equal(refused.length, 1);
    const error = refused[0];
    assert.ok(error instanceof ConnectError);
    assert.equal(error.code, Code.ResourceExhausted);
    assert.equal(errorReason(error), "NO_AGENT_AVAILABLE");
    assert.equal(won[0]!.agentId, ids[0]);
  } finally {
    for (const claim of won) await claim.release();
  }
  assert.equal((await agent(ids[0]!)).status, AgentStatus.IDLE);
});

test("finishWork ends the claim and the end of the work releases nothing", async () => {
  const { labels, ids } = await pool(live.client);
  const finished = await withClaim(live.client, { selector: labels, leaseMs: 5000 }, async (claim) => {
    const response = await claim.finishWork();
    assert.equal(response.agent?.status, AgentStatus.IDLE);
    assert.equal(response.agent?.claim, undefined);
    assert.equal(claim.active, false);
    return response;
  });
  assert.equal((await lastTransition(ids[0]!)).revision, finished.transition!.revision);
  assert.equal((await agent(ids[0]!)).status, AgentStatus.IDLE);
});

test("reportExhausted with the token ends the claim", async () => {
  const { labels, ids } = await pool(live.client);
  await withClaim(live.client, { selector: labels, leaseMs: 5000 }, async (claim) => {
    const report = await claim.reportExhausted({
      reason: ExhaustionReason.RATE_LIMIT,
      message: "Claude AI usage limit reached|4102444800",
    });
    assert.equal(report.agent?.status, AgentStatus.EXHAUSTED);
  });
  const after = await agent(ids[0]!);
  assert.equal(after.status, AgentStatus.EXHAUSTED);
  assert.equal(after.claim, undefined);
});

test("a claim ended behind the handle's back is lost: lost, signal, onLost", async () => {
  const { labels, ids } = await pool(live.client);
  const seen: ClaimLostError[] = [];
  await withClaim(live.client, { selector: labels, leaseMs: 1000, onLost: (e) => seen.push(e) }, async (claim) => {
    await live.client.dispatch.releaseClaim({ claimId: claim.claimId, fencingToken: claim.fencingToken });
    await new Promise<void>((resolve) => claim.signal.addEventListener("abort", () => resolve(), { once: true }));
    assert.ok(claim.lost instanceof ClaimLostError);
    assert.equal(claim.lost.reason, "STALE_FENCING_TOKEN");
    assert.equal(claim.signal.reason, claim.lost);
    assert.deepEqual(seen, [claim.lost]);
    assert.throws(() => claim.check(), ClaimLostError);
  }); // the release at the end is answered STALE_FENCING_TOKEN: not an error
  assert.equal((await agent(ids[0]!)).status, AgentStatus.IDLE);
});

test("a claim waits for an agent to come free", async () => {
  const { labels, ids } = await pool(live.client);
  const first = await claimAgent(live.client, { selector: labels, leaseMs: 10_000 });
  await rejectsWithCode(claimAgent(live.client, { selector: labels, leaseMs: 10_000 }), Code.ResourceExhausted);
  const waiting = claimAgent(live.client, { selector: labels, leaseMs: 10_000, waitMs: 30_000 });
  await first.release();
  const second = await waiting;
  try {
    assert.equal(second.agentId, ids[0]);
    assert.ok(second.fencingToken > first.fencingToken);
  } finally {
    await second.release();
  }
});

test("an expression selector and an ON_CALL slot", async () => {
  const { labels, ids } = await pool(live.client);
  const selector = { matchExpressions: [{ key: "pool", operator: SelectorOperator.IN, values: [labels.pool!] }] };
  await withClaim(live.client, { selector, slotType: SlotType.ON_CALL, leaseMs: 5000 }, async (claim) => {
    assert.equal(claim.agentId, ids[0]);
    assert.equal(claim.claim.slotType, SlotType.ON_CALL);
    assert.equal((await agent(ids[0]!)).status, AgentStatus.ON_CALL);
  });
  assert.equal((await agent(ids[0]!)).status, AgentStatus.IDLE);
});

test("ClaimAgent is retried with the same requestId after a lost answer, and gets the same claim", async () => {
  const { labels, ids } = await pool(live.client, 2);
  const requestIds: string[] = [];
  const dispatch = live.client.dispatch;
  const flaky: FleetcareClient = {
    ...live.client,
    dispatch: {
      ...dispatch,
      claimAgent: async (request, options) => {
        requestIds.push(String(request.requestId));
        const response = await dispatch.claimAgent(request, options);
        if (requestIds.length === 1) throw new ConnectError("connection cut before the answer", Code.Unavailable);
        return response;
      },
    },
  };
  await withClaim(flaky, { selector: labels, leaseMs: 5000 }, async (claim) => {
    assert.deepEqual(requestIds, [claim.requestId, claim.requestId]);
    assert.equal(claim.transition, undefined, "a repeated requestId returns the claim without a transition");
    const held = [];
    for (const id of ids) if ((await agent(id)).claim) held.push(id);
    assert.deepEqual(held, [claim.agentId]);
  });
  for (const id of ids) assert.equal((await agent(id)).status, AgentStatus.IDLE);
});

test("the holder is the authenticated caller", async () => {
  const dir = mkdtempSync(join(tmpdir(), "fleetcare-ts-auth-"));
  const entry = (name: string, role: string, token: string) =>
    `[[caller]]\nname = "${name}"\nrole = "${role}"\ntoken_sha256 = "${createHash("sha256").update(token).digest("hex")}"\n\n`;
  const callers = join(dir, "callers.toml");
  writeFileSync(callers, entry("ops", "operator", "ops-token") + entry("scheduler-eu", "scheduler", "sched-token"));
  const server = await startServer({ args: ["--auth-file", callers] });
  const ops = createFleetcareClient({ address: server.address, token: "ops-token" });
  const scheduler = createFleetcareClient({ address: server.address, token: "sched-token" });
  try {
    const { labels, ids } = await pool(ops);
    await withClaim(scheduler, { selector: labels, leaseMs: 5000 }, async (claim) => {
      assert.equal(claim.claim.holder, "scheduler-eu");
      assert.equal((await agent(ids[0]!, ops)).claim?.holder, "scheduler-eu");
      const { claims } = await scheduler.dispatch.listClaims({ holder: "scheduler-eu" });
      assert.deepEqual(
        claims.map((c) => c.claimId),
        [claim.claimId],
      );
    });
    assert.equal((await agent(ids[0]!, ops)).claim, undefined);
  } finally {
    ops.close();
    scheduler.close();
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
