// Bearer tokens against the real server, started with an auth file: the
// client's token is what the server authenticates, each role is held to what
// it may do, and every change records who made it.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Code, createFleetcareClient, type FleetcareClient } from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { startServer, type FleetcareServer } from "./helpers/server.js";

function entry(name: string, role: string, token: string, agents: string[] = []): string {
  const digest = createHash("sha256").update(token).digest("hex");
  const lines = ["[[caller]]", `name = "${name}"`, `role = "${role}"`, `token_sha256 = "${digest}"`];
  if (agents.length > 0) lines.push(`agents = [${agents.map((a) => `"${a}"`).join(", ")}]`);
  return lines.join("\n") + "\n\n";
}

const dir = mkdtempSync(join(tmpdir(), "fleetcare-ts-auth-"));
const callers = join(dir, "callers.toml");
let server: FleetcareServer;
const clients: FleetcareClient[] = [];

function as(token?: string): FleetcareClient {
  const client = createFleetcareClient({ address: server.address, token });
  clients.push(client);
  return client;
}

before(async () => {
  writeFileSync(
    callers,
    entry("alice", "operator", "alice-token") +
      entry("carol", "reader", "carol-token") +
      entry("runner", "agent", "runner-token", ["ts-eu-*"]),
  );
  server = await startServer({ args: ["--auth-file", callers] });
});

after(async () => {
  for (const client of clients) client.close();
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test("calls without a known token are UNAUTHENTICATED", async () => {
  await rejectsWithCode(as().agentStatus.listAgents({}), Code.Unauthenticated);
  await rejectsWithCode(as("garbage").agentStatus.listAgents({}), Code.Unauthenticated);
});

test("each role is held to its calls, and the actor is recorded", async () => {
  await as("alice-token").agentStatus.registerAgent({ agentId: "ts-us-1" });
  const runner = as("runner-token");
  await runner.agentStatus.registerAgent({ agentId: "ts-eu-1" });
  await runner.agentStatus.heartbeat({ agentId: "ts-eu-1" });
  const outside = await rejectsWithCode(runner.agentStatus.heartbeat({ agentId: "ts-us-1" }), Code.PermissionDenied);
  assert.match(outside.rawMessage, /ts-us-1/);
  const { event } = await runner.healing.reportError({ agentId: "ts-eu-1", message: "tool call failed" });
  assert.equal(event?.actor, "runner");

  const carol = as("carol-token");
  const { agents } = await carol.agentStatus.listAgents({});
  assert.equal(agents.length, 2);
  const denied = await rejectsWithCode(carol.agentStatus.markOffline({ agentId: "ts-eu-1" }), Code.PermissionDenied);
  assert.match(denied.rawMessage, /carol \(reader\) may not call MarkOffline/);

  const alice = as("alice-token");
  const { transition } = await alice.agentStatus.markOffline({ agentId: "ts-eu-1" });
  assert.equal(transition?.actor, "alice");
  const { transitions } = await alice.agentStatus.listTransitions({ agentId: "ts-eu-1" });
  assert.deepEqual(
    transitions.map((t) => t.actor),
    ["runner", "alice"],
  );
});
