// TLS and the bearer token against the real server: `fleetcare serve
// --tls-cert/--tls-key` (and `--tls-client-ca` for mutual TLS) with
// certificates from a test CA made with the openssl CLI (helpers/pki.ts).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";

import {
  ConnectError,
  createFleetcareClient,
  HealthCheckResponse_ServingStatus as ServingStatus,
  AgentStatus,
  type FleetcareClient,
} from "../src/index.js";
import { haveOpenssl, makePki, type Pki } from "./helpers/pki.js";
import { startServer, type FleetcareServer } from "./helpers/server.js";

const skip = haveOpenssl() ? false : "the openssl CLI is needed to make test certificates";

let pki: Pki;
let server: FleetcareServer;
let mutual: FleetcareServer;

before(async () => {
  if (skip) return;
  pki = makePki();
  [server, mutual] = await Promise.all([
    startServer({ args: pki.serverArgs() }),
    startServer({ args: pki.serverArgs(true) }),
  ]);
});

after(async () => {
  await Promise.all([server?.stop(), mutual?.stop()]);
  pki?.remove();
});

async function withClient<T>(client: FleetcareClient, f: (c: FleetcareClient) => Promise<T>): Promise<T> {
  try {
    return await f(client);
  } finally {
    client.close();
  }
}

const healthOf = (c: FleetcareClient) => c.health.check({}, { timeoutMs: 10_000 }).then((r) => r.status);

test("tls: a client with the CA file and a token reaches the real server", { skip }, async () => {
  const client = createFleetcareClient({
    address: server.address,
    tls: { ca: readFileSync(pki.ca) },
    token: "s3cret",
  });
  await withClient(client, async (c) => {
    assert.equal(await healthOf(c), ServingStatus.SERVING);
    // A fleetcare call that reads no agent: only the connection is under test.
    const explained = await c.agentStatus.explainRecovery(
      { message: "rate limit exceeded, try again in 30 seconds" },
      { timeoutMs: 10_000 },
    );
    assert.ok(explained.recoveryAt, "recoveryAt");
  });
});

test("tls: plaintext and clients that do not trust the CA are refused", { skip }, async () => {
  // The system's roots do not include the test CA.
  const untrusting = createFleetcareClient({ address: server.address, tls: true });
  await withClient(untrusting, (c) =>
    assert.rejects(healthOf(c), (e: unknown) => {
      assert.ok(e instanceof ConnectError);
      assert.match(e.message, /certificate/i);
      return true;
    }),
  );
  const plaintext = createFleetcareClient({ address: server.address });
  await withClient(plaintext, (c) => assert.rejects(healthOf(c), ConnectError));
});

test("tls: RegisterAgent over TLS with a token", { skip }, async () => {
  const client = createFleetcareClient({
    address: server.address,
    tls: { ca: readFileSync(pki.ca) },
    token: "s3cret",
  });
  await withClient(client, async (c) => {
    const agentId = `ts-tls-${process.pid}`;
    const { agent } = await c.agentStatus.registerAgent({ agentId }, { timeoutMs: 10_000 });
    assert.equal(agent?.agentId, agentId);
    const got = await c.agentStatus.getAgent({ agentId }, { timeoutMs: 10_000 });
    assert.equal(got.agent?.status, AgentStatus.IDLE);
  });
});

test("mutual tls: only a client with a certificate from the client CA gets in", { skip }, async () => {
  const ca = readFileSync(pki.ca);
  const anonymous = createFleetcareClient({ address: mutual.address, tls: { ca } });
  await withClient(anonymous, (c) =>
    assert.rejects(healthOf(c), ConnectError),
  );
  const identified = createFleetcareClient({
    address: mutual.address,
    tls: { ca, cert: readFileSync(pki.clientCert), key: readFileSync(pki.clientKey) },
    token: "s3cret",
  });
  assert.equal(await withClient(identified, healthOf), ServingStatus.SERVING);
});
