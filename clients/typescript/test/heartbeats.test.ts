import { create } from "@bufbuild/protobuf";
import { DurationSchema, timestampMs } from "@bufbuild/protobuf/wkt";
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Code,
  createFleetcareClient,
  isRetryableHeartbeatError,
  nextHeartbeatIntervalMs,
  runHeartbeats,
  startHeartbeats,
  AgentStatus,
  HeartbeatResponseSchema,
  TransitionCause,
  type HeartbeatResponse,
  type HeartbeatRetryEvent,
} from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";
import { TcpProxy } from "./helpers/proxy.js";
import { uniqueId } from "./helpers/server.js";

// Agents are told to heartbeat every 200 ms (a handful of agents at the
// default --max-heartbeat-rate stays far under the minimum).
const live = useServer({ args: ["--min-heartbeat-interval", "200ms"] });

/** Timer and scheduling noise allowed against the interval the server asked for. */
const TOLERANCE_MS = 20;

interface Beat {
  at: number;
  response: HeartbeatResponse;
}

/** Collects responses; `next()` resolves with the next one (never a sleep). */
function recorder() {
  const beats: Beat[] = [];
  const waiting: ((b: Beat) => void)[] = [];
  let read = 0;
  return {
    beats,
    onResponse: (response: HeartbeatResponse) => {
      const beat = { at: performance.now(), response };
      beats.push(beat);
      waiting.shift()?.(beat);
    },
    /** The next beat not yet read. */
    next(timeoutMs = 30_000): Promise<Beat> {
      if (read < beats.length) return Promise.resolve(beats[read++]);
      read++;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no heartbeat within ${timeoutMs} ms`)), timeoutMs);
        waiting.push((b) => {
          clearTimeout(timer);
          resolve(b);
        });
      });
    },
    skipQueued() {
      read = beats.length;
    },
  };
}

const ms = (r: HeartbeatResponse) => Number(r.nextHeartbeatInterval!.seconds) * 1000 + r.nextHeartbeatInterval!.nanos / 1e6;

test("heartbeats keep to the server's interval and stop when asked", async () => {
  const agentId = uniqueId("ts-hb-paced");
  const { agent: registered } = await live.client.agentStatus.registerAgent({ agentId });
  const rec = recorder();
  const handle = startHeartbeats(live.client, agentId, { onResponse: rec.onResponse });
  const seen: Beat[] = [];
  try {
    for (let i = 0; i < 4; i++) seen.push(await rec.next());
  } finally {
    const asked = performance.now();
    await handle.stop();
    assert.ok(performance.now() - asked < 1000, "stop() returns promptly");
  }
  const stopped = performance.now();
  for (let i = 1; i < seen.length; i++) {
    const askedMs = ms(seen[i - 1].response);
    assert.equal(askedMs, 200, "the server's pacing");
    const spacing = seen[i].at - seen[i - 1].at;
    assert.ok(spacing + TOLERANCE_MS >= askedMs, `heartbeat after ${spacing} ms, sooner than ${askedMs} ms`);
    assert.ok(spacing < 4000, `heartbeat after ${spacing} ms: not the server's interval`);
  }
  assert.ok(seen.every((b) => b.response.agent?.agentId === agentId));
  assert.ok(handle.heartbeats >= 4);
  assert.equal(handle.lastResponse, rec.beats[rec.beats.length - 1].response);
  await handle.done; // resolved: stopped, not failed
  const { agent } = await live.client.agentStatus.getAgent({ agentId });
  assert.ok(
    timestampMs(agent!.lastHeartbeatAt!) > timestampMs(registered!.lastHeartbeatAt!),
    "the server recorded the heartbeats",
  );
  assert.ok(rec.beats.every((b) => b.at <= stopped), "nothing after stop()");
});

test("an abort signal ends a long wait at once", async () => {
  // A client-side floor of 5 s outweighs the server's 200 ms: after the
  // first heartbeat the loop is in a 5 s wait, which the abort must cut short.
  const agentId = uniqueId("ts-hb-long");
  await live.client.agentStatus.registerAgent({ agentId });
  const rec = recorder();
  const abort = new AbortController();
  const running = runHeartbeats(live.client.agentStatus, agentId, {
    signal: abort.signal,
    onResponse: rec.onResponse,
    minIntervalMs: 5000,
  });
  await rec.next();
  const asked = performance.now();
  abort.abort();
  await running; // resolves, does not reject
  assert.ok(performance.now() - asked < 1000, `stop took ${performance.now() - asked} ms`);
  assert.equal(rec.beats.length, 1, "one heartbeat, then the 5 s wait cut short");
});

test("an unknown agent ends the loop with NOT_FOUND", async () => {
  const rec = recorder();
  const handle = startHeartbeats(live.client, uniqueId("ts-hb-nobody"), { onResponse: rec.onResponse });
  await rejectsWithCode(handle.done, Code.NotFound);
  assert.equal(rec.beats.length, 0);
  assert.equal(handle.heartbeats, 0);
  await handle.stop(); // harmless after the failure
  await rejectsWithCode(runHeartbeats(live.client, uniqueId("ts-hb-nobody")), Code.NotFound);
});

test("a cut connection is retried", async () => {
  const agentId = uniqueId("ts-hb-cut");
  await live.client.agentStatus.registerAgent({ agentId });
  const proxy = await TcpProxy.start(live.server.address);
  const viaProxy = createFleetcareClient({ address: proxy.address });
  const rec = recorder();
  const retries: HeartbeatRetryEvent[] = [];
  let retried!: () => void;
  const threeRetries = new Promise<void>((res) => (retried = res));
  const handle = startHeartbeats(viaProxy, agentId, {
    onResponse: rec.onResponse,
    maxBackoffMs: 200,
    onRetry: (e) => {
      retries.push(e);
      if (retries.length === 3) retried();
    },
  });
  try {
    await rec.next();
    proxy.cut();
    await threeRetries;
    for (const r of retries) {
      // UNAVAILABLE, or the connection reset under the call (ABORTED with ECONNRESET).
      assert.ok(isRetryableHeartbeatError(r.error), `${Code[r.error.code]}: ${r.error.message}`);
      assert.ok(r.delayMs <= 200);
    }
    rec.skipQueued(); // responses before the cut
    proxy.up();
    const back = await rec.next();
    assert.equal(back.response.agent?.agentId, agentId);
  } finally {
    await handle.stop();
    viaProxy.close();
    await proxy.close();
  }
  await handle.done;
});

test("an agent marked OFFLINE comes back with the next heartbeat", async () => {
  const agentId = uniqueId("ts-hb-back");
  await live.client.agentStatus.registerAgent({ agentId });
  const rec = recorder();
  const handle = startHeartbeats(live.client, agentId, { onResponse: rec.onResponse });
  try {
    await rec.next();
    await live.client.agentStatus.markOffline({ agentId });
    let back: Beat;
    do back = await rec.next();
    while (back.response.transition === undefined);
    const t = back.response.transition;
    assert.equal(t.fromStatus, AgentStatus.OFFLINE);
    assert.equal(t.toStatus, AgentStatus.IDLE);
    assert.equal(t.cause, TransitionCause.HEARTBEAT_RESUMED);
    assert.equal(back.response.agent?.status, AgentStatus.IDLE);
  } finally {
    await handle.stop();
  }
});

test("intervals fall back and have a floor", () => {
  const with_ = (seconds: bigint, nanos: number) =>
    create(HeartbeatResponseSchema, { nextHeartbeatInterval: create(DurationSchema, { seconds, nanos }) });
  assert.equal(nextHeartbeatIntervalMs(create(HeartbeatResponseSchema), 5000, 100), 5000, "absent");
  assert.equal(nextHeartbeatIntervalMs(with_(0n, 0), 5000, 100), 5000, "zero");
  assert.equal(nextHeartbeatIntervalMs(with_(-1n, 0), 5000, 100), 5000, "negative");
  assert.equal(nextHeartbeatIntervalMs(with_(0n, 1_000_000), 5000, 100), 100, "raised to the floor");
  assert.equal(nextHeartbeatIntervalMs(with_(2n, 500_000_000), 5000, 100), 2500);
});
