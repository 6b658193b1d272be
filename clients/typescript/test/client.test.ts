// The convenience client against a tiny in-process gRPC server (connect-node's
// own handler on a plaintext HTTP/2 server), to see exactly what it sends.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createSecureServer, createServer, type Http2SecureServer, type Http2Server } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { ConnectRouter } from "@connectrpc/connect";

import {
  AgentStatusService,
  baseUrlFor,
  Code,
  ConnectError,
  createFleetcareClient,
  isRetryableWatchError,
  watchTransitions,
} from "../src/index.js";

interface Seen {
  method: string;
  protocol: string;
  authorization: string | null;
  trace: string | null;
}

const seen: Seen[] = [];
let routes: (router: ConnectRouter) => void;
let server: Http2Server;
let address = "";

before(async () => {
  const record = (method: string, ctx: { protocolName: string; requestHeader: Headers }) =>
    seen.push({
      method,
      protocol: ctx.protocolName,
      authorization: ctx.requestHeader.get("authorization"),
      trace: ctx.requestHeader.get("x-trace"),
    });
  routes = (router) =>
    router.service(AgentStatusService, {
      getAgent(req, ctx) {
        record("GetAgent", ctx);
        return { agent: { agentId: req.agentId } };
      },
      async *watchTransitions(_req, ctx) {
        record("WatchTransitions", ctx);
        yield { event: { case: "transition", value: { revision: 8n, agentId: "a" } } };
      },
    });
  server = createServer(connectNodeAdapter({ routes }));
  address = await listen(server);
});

async function listen(s: Http2Server | Http2SecureServer): Promise<string> {
  await new Promise<void>((res) => s.listen(0, "127.0.0.1", () => res()));
  const addr = s.address();
  assert.ok(addr && typeof addr === "object");
  return `127.0.0.1:${addr.port}`;
}

after(async () => {
  await new Promise<void>((res) => server.close(() => res()));
});

test("the token is sent as 'authorization: Bearer <token>' on unary and streaming calls, over gRPC", async () => {
  seen.length = 0;
  const client = createFleetcareClient({ address, token: "s3cret" });
  try {
    const res = await client.agentStatus.getAgent({ agentId: "a-1" });
    assert.equal(res.agent?.agentId, "a-1");
    const got = [];
    for await (const t of watchTransitions(client.agentStatus, { sinceRevision: 7n })) {
      got.push(t.revision);
      break;
    }
    assert.deepEqual(got, [8n]);
  } finally {
    client.close();
  }
  assert.deepEqual(seen, [
    { method: "GetAgent", protocol: "grpc", authorization: "Bearer s3cret", trace: null },
    { method: "WatchTransitions", protocol: "grpc", authorization: "Bearer s3cret", trace: null },
  ]);
});

test("without a token no authorization header is sent; extra interceptors run", async () => {
  seen.length = 0;
  const client = createFleetcareClient({
    address: `http://${address}`,
    interceptors: [
      (next) => async (req) => {
        req.header.set("x-trace", "t-1");
        return next(req);
      },
    ],
  });
  try {
    await client.agentStatus.getAgent({ agentId: "a-2" });
  } finally {
    client.close();
  }
  assert.deepEqual(seen, [{ method: "GetAgent", protocol: "grpc", authorization: null, trace: "t-1" }]);
});

test("addresses become base URLs; TLS picks https", () => {
  assert.equal(baseUrlFor("127.0.0.1:50051", false), "http://127.0.0.1:50051");
  assert.equal(baseUrlFor("fleet.example:443", true), "https://fleet.example:443");
  assert.equal(baseUrlFor("https://fleet.example/", true), "https://fleet.example");
});

test("watch errors: transport failures are retried, server verdicts are not", () => {
  const nodeError = (code: string) => Object.assign(new Error(code), { code });
  const err = (code: Code, cause?: Error) => new ConnectError("x", code, undefined, undefined, cause);
  assert.equal(isRetryableWatchError(err(Code.Unavailable)), true);
  assert.equal(isRetryableWatchError(err(Code.Aborted, nodeError("ECONNRESET"))), true, "connection reset");
  assert.equal(isRetryableWatchError(err(Code.Internal, nodeError("ERR_HTTP2_SESSION_ERROR"))), true);
  assert.equal(isRetryableWatchError(err(Code.Aborted)), false, "ABORTED from the server");
  assert.equal(isRetryableWatchError(err(Code.Internal, new Error("bug"))), false);
  assert.equal(isRetryableWatchError(err(Code.OutOfRange)), false);
  assert.equal(isRetryableWatchError(err(Code.InvalidArgument)), false);
  assert.equal(isRetryableWatchError(err(Code.Canceled, nodeError("ECONNRESET"))), false);
});

test("tls: the client verifies the server against the given CA", async (t) => {
  // A self-signed certificate for 127.0.0.1, made with the openssl CLI.
  const dir = mkdtempSync(join(tmpdir(), "fleetcare-ts-tls-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const made = spawnSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-days", "1",
    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
  ]);
  if (made.error || made.status !== 0) {
    t.skip(`openssl is not available: ${made.error ?? made.stderr}`);
    return;
  }
  const cert = readFileSync(join(dir, "cert.pem"));
  const tlsServer = createSecureServer({ key: readFileSync(join(dir, "key.pem")), cert }, connectNodeAdapter({ routes }));
  const tlsAddress = await listen(tlsServer);
  t.after(() => new Promise<void>((res) => tlsServer.close(() => res())));

  seen.length = 0;
  const trusted = createFleetcareClient({ address: tlsAddress, tls: { ca: cert }, token: "over-tls" });
  try {
    const res = await trusted.agentStatus.getAgent({ agentId: "tls-1" });
    assert.equal(res.agent?.agentId, "tls-1");
  } finally {
    trusted.close();
  }
  assert.deepEqual(seen, [{ method: "GetAgent", protocol: "grpc", authorization: "Bearer over-tls", trace: null }]);

  // The system roots do not include it: the handshake fails, nothing reaches the server.
  const untrusted = createFleetcareClient({ address: tlsAddress, tls: true });
  try {
    await assert.rejects(untrusted.agentStatus.getAgent({ agentId: "tls-2" }), (e: unknown) => {
      assert.ok(e instanceof ConnectError);
      assert.match(e.message, /self[- ]signed|certificate/i);
      return true;
    });
  } finally {
    untrusted.close();
  }
  // Plaintext HTTP/2 to a TLS port fails too.
  const plain = createFleetcareClient({ address: tlsAddress });
  try {
    await assert.rejects(plain.agentStatus.getAgent({ agentId: "tls-3" }), ConnectError);
  } finally {
    plain.close();
  }
  assert.equal(seen.length, 1);
});
