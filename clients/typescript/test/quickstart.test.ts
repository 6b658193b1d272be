import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import { AgentStatus, TransitionCause } from "../src/index.js";
import { useServer } from "./helpers/fixture.js";
import { packageRoot } from "./helpers/server.js";

const live = useServer();

test("examples/quickstart runs against the server and prints the agent's status", async () => {
  const script = join(packageRoot, "dist", "examples", "quickstart.js");
  const child = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, FLEETCARE_SERVER: live.server.address },
    timeout: 60_000,
  });
  const lines = child.stdout.trim().split("\n");
  assert.equal(lines.length, 4, child.stdout);
  const m = /^registered (quickstart-\d+): IDLE \(created: true\)$/.exec(lines[0]);
  assert.ok(m, lines[0]);
  const agentId = m[1];
  assert.match(lines[1], /^started work: BUSY at revision \d+$/);
  assert.match(lines[2], /^finished work: IDLE at revision \d+$/);
  assert.equal(lines[3], `status of ${agentId}: IDLE`);

  // The example really did what it printed.
  const { agent } = await live.client.agentStatus.getAgent({ agentId });
  assert.equal(agent?.status, AgentStatus.IDLE);
  assert.deepEqual(agent?.labels, { team: "docs" });
  const { transitions } = await live.client.agentStatus.listTransitions({ agentId });
  assert.deepEqual(
    transitions.map((t) => t.cause),
    [TransitionCause.REGISTERED, TransitionCause.WORK_STARTED, TransitionCause.WORK_FINISHED],
  );
  assert.equal(lines[2], `finished work: IDLE at revision ${transitions[2].revision}`);
});

test("examples/quickstart fails with a non-zero exit when no server listens", async () => {
  const script = join(packageRoot, "dist", "examples", "quickstart.js");
  // Port 1 on loopback: nothing listens there.
  await assert.rejects(
    promisify(execFile)(process.execPath, [script], {
      env: { ...process.env, FLEETCARE_SERVER: "127.0.0.1:1" },
      timeout: 60_000,
    }),
    (err: { code?: number; stderr?: string }) => {
      assert.notEqual(err.code, 0);
      assert.match(err.stderr ?? "", /unavailable|ECONNREFUSED/i);
      return true;
    },
  );
});
