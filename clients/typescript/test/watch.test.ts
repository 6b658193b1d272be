import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Code,
  createFleetcareClient,
  SlotType,
  watchTransitions,
  type FleetcareClient,
  type ReconnectEvent,
  type Transition,
  type WatchTransitionsOptions,
} from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";
import { TcpProxy } from "./helpers/proxy.js";
import { eventually, startServer, uniqueId } from "./helpers/server.js";

// Progress events every 300 ms, so idle streams also move the resume point.
const live = useServer({ args: ["--watch-progress-interval", "300ms"] });

/** Runs watchTransitions in the background, collecting what it yields. */
function collect(client: FleetcareClient, options: WatchTransitionsOptions) {
  const abort = new AbortController();
  const got: Transition[] = [];
  const reconnects: ReconnectEvent[] = [];
  const opens: bigint[] = [];
  const done = (async () => {
    for await (const t of watchTransitions(client.agentStatus, {
      initialBackoffMs: 20,
      maxBackoffMs: 200,
      ...options,
      signal: abort.signal,
      onReconnect: (e) => reconnects.push(e),
      onOpen: (since) => opens.push(since),
    })) {
      got.push(t);
    }
  })();
  done.catch(() => {}); // surfaced by stop(); never an unhandled rejection
  return {
    got,
    reconnects,
    opens,
    /** Aborts, then waits for the iteration to end (rethrowing anything it threw). */
    stop: async () => {
      abort.abort();
      await done;
    },
    done,
  };
}

const busy = new Set<string>();

/** Toggles each (registered) agent between IDLE and BUSY `rounds` times; returns the transitions made. */
async function churn(client: FleetcareClient, agents: string[], rounds: number): Promise<Transition[]> {
  const made: Transition[] = [];
  for (let i = 0; i < rounds; i++) {
    for (const agentId of agents) {
      const r = busy.has(agentId)
        ? await client.agentStatus.finishWork({ agentId })
        : await client.agentStatus.startWork({ agentId, slotType: SlotType.WORK });
      if (busy.has(agentId)) busy.delete(agentId);
      else busy.add(agentId);
      made.push(r.transition!);
    }
  }
  return made;
}

const key = (t: Transition) => `${t.revision}:${t.agentId}:${t.fromStatus}->${t.toStatus}`;

function assertConsecutive(revisions: bigint[]): void {
  revisions.forEach((r, i) => assert.equal(r, revisions[0] + BigInt(i), `revision #${i} in ${revisions.join(",")}`));
}

test("a watch resumes across a dropped connection with no gap and no duplicate", async () => {
  const direct = live.client;
  const proxy = await TcpProxy.start(live.server.address);
  const viaProxy = createFleetcareClient({ address: proxy.address });
  let watch!: ReturnType<typeof collect>; // unset if the test fails early
  try {
    const agents = [uniqueId("w1"), uniqueId("w2")];
    let since = 0n;
    for (const agentId of agents) since = (await direct.agentStatus.registerAgent({ agentId })).agent!.revision;

    watch = collect(viaProxy, { sinceRevision: since, agentIds: agents });
    const made = await churn(direct, agents, 2); // 4 transitions
    await eventually("the first 4 transitions", () => watch.got.length >= 4);
    assert.equal(proxy.accepted, 1);

    // Drop the connection; transitions go on while the watcher cannot get back in.
    proxy.cut();
    made.push(...(await churn(direct, agents, 3))); // 6 more, while cut off
    await eventually("a refused reconnect", () => proxy.refused >= 1 && watch.reconnects.length >= 2);
    assert.equal(watch.got.length, 4, "nothing arrives while cut off");
    proxy.up();
    made.push(...(await churn(direct, agents, 2))); // 4 more

    await eventually("all 14 transitions", () => watch.got.length >= made.length);
    await watch.stop();

    assert.deepEqual(watch.got.map(key), made.map(key));
    assertConsecutive(watch.got.map((t) => t.revision));
    assert.equal(watch.got[0].revision, since + 1n);
    assert.ok(proxy.accepted >= 2, "the watcher reconnected through the proxy");
    const first = watch.reconnects[0];
    assert.ok(first.error, "the cut surfaced as an error");
    assert.ok([Code.Unavailable, Code.Aborted].includes(first.error.code), first.error.message);
    assert.equal(first.sinceRevision, watch.got[3].revision, "resumes after the last transition seen");
  } finally {
    await watch?.stop().catch(() => {});
    viaProxy.close();
    await proxy.close();
  }
});

test("a watch resumes after the server restarts on the same port and database", async () => {
  const first = await startServer();
  let second: Awaited<ReturnType<typeof startServer>> | undefined;
  const client = createFleetcareClient({ address: first.address });
  let watch!: ReturnType<typeof collect>; // unset if the test fails early
  try {
    const agentId = uniqueId("restart");
    const since = (await client.agentStatus.registerAgent({ agentId })).agent!.revision;
    watch = collect(client, { sinceRevision: since, agentIds: [agentId] });
    const made = await churn(client, [agentId], 3);
    await eventually("3 transitions before the restart", () => watch.got.length >= 3);

    await first.terminate(); // graceful: the stream ends with OK
    await eventually("a refused reconnect", () => watch.reconnects.some((e) => e.error?.code === Code.Unavailable));
    second = await startServer({
      listen: first.address,
      dbName: first.dbName,
      sessionDir: first.sessionDir,
    });
    made.push(...(await churn(client, [agentId], 3)));
    await eventually("3 more after the restart", () => watch.got.length >= 6);
    await watch.stop();

    assert.deepEqual(watch.got.map(key), made.map(key));
    assertConsecutive(watch.got.map((t) => t.revision));
    assert.equal(watch.reconnects[0].error, undefined, "the first reconnect follows a clean end of stream");
  } finally {
    await watch?.stop().catch(() => {});
    client.close();
    await second?.stop();
    await first.stop();
  }
});

test("progress events move the resume point of an idle watch", async () => {
  const c = live.client.agentStatus;
  const quiet = uniqueId("quiet");
  await c.registerAgent({ agentId: quiet });
  const busy = uniqueId("busy");
  const since = (await c.registerAgent({ agentId: busy })).agent!.revision;

  const seen: bigint[] = [];
  const abort = new AbortController();
  const done = (async () => {
    for await (const _ of watchTransitions(c, {
      sinceRevision: since,
      agentIds: [quiet],
      signal: abort.signal,
      onRevision: (r) => seen.push(r),
    })) {
      assert.fail("the quiet agent does not transition");
    }
  })();
  const made = await churn(live.client, [busy], 2);
  const head = made[made.length - 1].revision;
  // Only progress events can tell the watcher that the stream got past `head`.
  await eventually("progress past the other agent's transitions", () => seen.some((r) => r >= head));
  abort.abort();
  await done;
  assert.ok(seen.every((r, i) => i === 0 || r > seen[i - 1]), "the resume point only moves forward");
});

test("from now on: a watch without sinceRevision sees only later transitions", async () => {
  const c = live.client.agentStatus;
  const agentId = uniqueId("now");
  await c.registerAgent({ agentId });
  const watch = collect(live.client, { agentIds: [agentId] });
  await eventually("the stream to open", () => watch.opens.length >= 1);
  const made = await churn(live.client, [agentId], 2);
  await eventually("2 transitions", () => watch.got.length >= 2);
  await watch.stop();
  assert.deepEqual(watch.got.map(key), made.map(key), "the registration before the watch is not replayed");
});

test("from now on, on a server without history: nothing committed before the stream opens is lost", async () => {
  const fresh = await startServer();
  const other = createFleetcareClient({ address: fresh.address });
  // Holds the WatchTransitions call back until a transition has been committed:
  // the iterator pinned "now" at head 0, but the stream opens at head 1.
  let held = false;
  const client = createFleetcareClient({
    address: fresh.address,
    interceptors: [
      (next) => async (req) => {
        if (req.method.name === "WatchTransitions" && !held) {
          held = true;
          await other.agentStatus.registerAgent({ agentId: "early" });
        }
        return next(req);
      },
    ],
  });
  let watch!: ReturnType<typeof collect>; // unset if the test fails early
  try {
    watch = collect(client, {});
    await eventually("the stream to open", () => watch.opens.length >= 1);
    assert.deepEqual(watch.opens, [0n]);
    const late = (await other.agentStatus.registerAgent({ agentId: "late" })).agent!;
    await eventually("both registrations", () => watch.got.length >= 2);
    await watch.stop();
    assert.deepEqual(
      watch.got.map((t) => [t.revision, t.agentId]),
      [
        [1n, "early"],
        [late.revision, "late"],
      ],
    );
  } finally {
    await watch?.stop().catch(() => {});
    client.close();
    other.close();
    await fresh.stop();
  }
});

test("server errors are thrown, not retried", async () => {
  const c = live.client.agentStatus;
  const head = (await c.listTransitions({ pageSize: 1 })).headRevision;
  for (const [sinceRevision, code] of [
    [-1n, Code.InvalidArgument],
    [head + 1000n, Code.OutOfRange],
  ] as const) {
    const reconnects: ReconnectEvent[] = [];
    const iterate = async () => {
      for await (const _ of watchTransitions(c, { sinceRevision, onReconnect: (e) => reconnects.push(e) })) {
        assert.fail("no transition expected");
      }
    };
    await rejectsWithCode(iterate(), code);
    assert.equal(reconnects.length, 0);
  }
});

test("reconnect delays grow and are capped", async () => {
  // The proxy refuses every connection: every attempt fails.
  const proxy = await TcpProxy.start(live.server.address);
  const client = createFleetcareClient({ address: proxy.address });
  try {
    proxy.cut();
    const watch = collect(client, { sinceRevision: 1n, initialBackoffMs: 20, maxBackoffMs: 100 });
    await eventually("6 failed attempts", () => watch.reconnects.length >= 6);
    await watch.stop(); // ends quietly
    const delays = watch.reconnects.map((e) => e.delayMs);
    assert.deepEqual(
      watch.reconnects.slice(0, 6).map((e) => e.attempt),
      [1, 2, 3, 4, 5, 6],
    );
    // Jittered in [ceiling/2, ceiling], ceiling = min(100, 20 * 2^(attempt-1)).
    assert.ok(delays[0] <= 20 && delays[2] >= 40, `backoff grows: ${delays.join(",")}`);
    assert.ok(delays.every((d) => d <= 100), `backoff is capped: ${delays.join(",")}`);
    assert.ok(watch.reconnects.every((e) => e.error && e.sinceRevision === 1n));
    assert.equal(watch.got.length, 0);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("aborting the signal during a long backoff ends the iteration at once", { timeout: 20_000 }, async () => {
  const proxy = await TcpProxy.start(live.server.address);
  const client = createFleetcareClient({ address: proxy.address });
  try {
    proxy.cut();
    // The first retry would wait 30 to 60 s; the test's timeout is 20 s.
    const watch = collect(client, { sinceRevision: 1n, initialBackoffMs: 60_000, maxBackoffMs: 60_000 });
    await eventually("the first failed attempt", () => watch.reconnects.length >= 1);
    await watch.stop();
    assert.equal(watch.reconnects.length, 1);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("breaking out of the loop cancels the stream", async () => {
  // An interceptor keeps each WatchTransitions call's abort signal.
  const signals: AbortSignal[] = [];
  const client = createFleetcareClient({
    address: live.server.address,
    interceptors: [
      (next) => async (req) => {
        if (req.method.name === "WatchTransitions") signals.push(req.signal);
        return next(req);
      },
    ],
  });
  try {
    const agentId = uniqueId("brk");
    const since = (await client.agentStatus.registerAgent({ agentId })).agent!.revision;
    const made = await churn(client, [agentId], 3);
    const got: bigint[] = [];
    for await (const t of watchTransitions(client.agentStatus, { sinceRevision: since, agentIds: [agentId] })) {
      got.push(t.revision);
      if (got.length === 2) break;
    }
    assert.deepEqual(got, made.slice(0, 2).map((t) => t.revision));
    assert.equal(signals.length, 1);
    assert.equal(signals[0].aborted, true, "the call was cancelled");
  } finally {
    client.close();
  }
});
