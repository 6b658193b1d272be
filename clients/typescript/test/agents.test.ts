import assert from "node:assert/strict";
import { test } from "node:test";

import { AgentStatus, Code, SlotType, TransitionCause } from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";
import { uniqueId } from "./helpers/server.js";

const live = useServer();

test("an agent registers IDLE, works BUSY, finishes IDLE", async () => {
  const c = live.client.agentStatus;
  const agentId = uniqueId("agent");

  const reg = await c.registerAgent({ agentId, labels: { team: "infra" } });
  assert.equal(reg.created, true);
  assert.equal(reg.agent?.agentId, agentId);
  assert.equal(reg.agent?.status, AgentStatus.IDLE);
  assert.deepEqual(reg.agent?.labels, { team: "infra" });
  assert.ok(reg.agent!.revision > 0n);

  const again = await c.registerAgent({ agentId, labels: { team: "infra" } });
  assert.equal(again.created, false, "registration is idempotent");
  assert.equal(again.agent?.revision, reg.agent!.revision, "no new transition");

  const started = await c.startWork({ agentId, slotType: SlotType.WORK });
  assert.equal(started.agent?.status, AgentStatus.BUSY);
  const t1 = started.transition!;
  assert.equal(t1.agentId, agentId);
  assert.equal(t1.fromStatus, AgentStatus.IDLE);
  assert.equal(t1.toStatus, AgentStatus.BUSY);
  assert.equal(t1.cause, TransitionCause.WORK_STARTED);
  assert.ok(t1.revision > reg.agent!.revision);
  assert.equal(started.agent?.revision, t1.revision);

  const finished = await c.finishWork({ agentId });
  assert.equal(finished.agent?.status, AgentStatus.IDLE);
  assert.equal(finished.transition?.fromStatus, AgentStatus.BUSY);
  assert.equal(finished.transition?.cause, TransitionCause.WORK_FINISHED);
  assert.ok(finished.transition!.revision > t1.revision);

  const got = await c.getAgent({ agentId });
  assert.equal(got.agent?.status, AgentStatus.IDLE);
  assert.equal(got.agent?.revision, finished.transition!.revision);

  const history = await c.listTransitions({ agentId });
  assert.deepEqual(
    history.transitions.map((t) => [t.fromStatus, t.toStatus]),
    [
      [AgentStatus.UNSPECIFIED, AgentStatus.IDLE],
      [AgentStatus.IDLE, AgentStatus.BUSY],
      [AgentStatus.BUSY, AgentStatus.IDLE],
    ],
  );
});

test("a refused transition is FAILED_PRECONDITION and changes nothing", async () => {
  const c = live.client.agentStatus;
  const agentId = uniqueId("busy");
  await c.registerAgent({ agentId });
  const started = await c.startWork({ agentId, slotType: SlotType.WORK });

  const err = await rejectsWithCode(c.startWork({ agentId, slotType: SlotType.ON_CALL }), Code.FailedPrecondition);
  assert.match(err.rawMessage, /\S/, "the server says why");

  const got = await c.getAgent({ agentId });
  assert.equal(got.agent?.status, AgentStatus.BUSY);
  assert.equal(got.agent?.revision, started.transition!.revision);
});

test("an unknown agent is NOT_FOUND, a malformed id INVALID_ARGUMENT", async () => {
  const c = live.client.agentStatus;
  await rejectsWithCode(c.getAgent({ agentId: uniqueId("nobody") }), Code.NotFound);
  await rejectsWithCode(c.finishWork({ agentId: uniqueId("nobody") }), Code.NotFound);
  await rejectsWithCode(c.registerAgent({ agentId: "not a valid id" }), Code.InvalidArgument);
});

test("ListAgents filters by label and status, orders by id and pages", async () => {
  const c = live.client.agentStatus;
  const run = uniqueId("run");
  const ids = [`${run}-c`, `${run}-a`, `${run}-b`];
  for (const agentId of ids) await c.registerAgent({ agentId, labels: { run } });
  await c.startWork({ agentId: `${run}-b`, slotType: SlotType.WORK });

  const all = await c.listAgents({ labels: { run } });
  assert.deepEqual(
    all.agents.map((a) => a.agentId),
    [...ids].sort(),
  );
  assert.equal(all.nextPageToken, "");

  const busy = await c.listAgents({ labels: { run }, statuses: [AgentStatus.BUSY] });
  assert.deepEqual(
    busy.agents.map((a) => [a.agentId, a.status]),
    [[`${run}-b`, AgentStatus.BUSY]],
  );

  const first = await c.listAgents({ labels: { run }, pageSize: 2 });
  assert.equal(first.agents.length, 2);
  assert.notEqual(first.nextPageToken, "");
  const second = await c.listAgents({ labels: { run }, pageSize: 2, pageToken: first.nextPageToken });
  assert.deepEqual(
    [...first.agents, ...second.agents].map((a) => a.agentId),
    [...ids].sort(),
  );
  assert.equal(second.nextPageToken, "");
});
