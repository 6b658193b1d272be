// The convenience client against a tiny in-process gRPC server (connect-node's
// own handler on a plaintext HTTP/2 server), to see exactly what it sends (the
// real server does not check tokens yet). TLS is tested against the real
// server, in tls.test.ts.

import assert from "node:assert/strict";
import { createServer, type Http2Server } from "node:http2";
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

async function listen(s: Http2Server): Promise<string> {
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
