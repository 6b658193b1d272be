import assert from "node:assert/strict";
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { Code, ConnectError, UsageGrouping, type RunProcessorResponse, type UsageRow } from "../src/index.js";
import { useServer } from "./helpers/fixture.js";
import { eventually, repoRoot } from "./helpers/server.js";

// No scheduled runs: the test decides when the usage processor runs.
const live = useServer({ args: ["--pipeline-interval-usage", "0", "--pipeline-interval-errors", "0"] });

// Fixture A1 of tests/fixtures/EXPECTED.md: spans midnight UTC; message `a` repeated on 3 lines.
const A1 = "0b6e3c1a-5f2d-4a8e-9b71-3c2d1e0f4a51";
const SONNET = "claude-sonnet-4-20250514";

/** RunProcessor, retried while another run (e.g. at start-up) holds the processor (ABORTED). */
async function runUsage(): Promise<RunProcessorResponse> {
  return eventually("a usage run", async () => {
    try {
      return await live.client.sessionPipeline.runProcessor({ name: "usage" });
    } catch (e) {
      if (ConnectError.from(e).code === Code.Aborted) return undefined;
      throw e;
    }
  });
}

/** [key, input, output, cache creation, cache read, total, messages] */
const figures = (r: UsageRow | undefined) => [
  r?.key,
  r?.inputTokens,
  r?.outputTokens,
  r?.cacheCreationTokens,
  r?.cacheReadTokens,
  r?.totalTokens,
  r?.messages,
];

test("a copied transcript is processed and GetUsage matches EXPECTED.md", async () => {
  const userDir = join(live.server.sessionDir, "alice");
  mkdirSync(userDir, { recursive: true });
  copyFileSync(join(repoRoot, "tests", "fixtures", "sessions", "alice", `${A1}.jsonl`), join(userDir, `${A1}.jsonl`));

  const { stats } = await runUsage();
  assert.ok(stats);
  assert.equal(stats.scanned, 1n);
  assert.equal(stats.processed, 1n);
  assert.equal(stats.failed, 0n);
  assert.deepEqual(stats.errors, []);

  const p = live.client.sessionPipeline;
  // Per day (UTC): 2026-03-14 is a+b+c (the day table's row), 2026-03-15 is d alone.
  const byDay = await p.getUsage({ groupBy: UsageGrouping.DAY });
  assert.deepEqual(byDay.rows.map(figures), [
    ["2026-03-14", 36n, 90n, 1500n, 2200n, 3826n, 3n],
    ["2026-03-15", 16n, 50n, 0n, 1500n, 1566n, 1n],
  ]);
  // The session table's A1 row: 52 / 140 / 1500 / 3700 = 5392 over 4 messages.
  assert.deepEqual(figures(byDay.totals).slice(1), [52n, 140n, 1500n, 3700n, 5392n, 4n]);

  const byModel = await p.getUsage({ groupBy: UsageGrouping.MODEL });
  assert.deepEqual(byModel.rows.map(figures), [[SONNET, 52n, 140n, 1500n, 3700n, 5392n, 4n]]);
  assert.deepEqual(byModel.rows[0].models, [SONNET]);

  // Incremental: an unchanged file is skipped and counted once.
  const { stats: second } = await runUsage();
  assert.equal(second?.processed, 0n);
  assert.equal(second?.skipped, 1n);
  const after = await p.getUsage({ groupBy: UsageGrouping.DAY });
  assert.deepEqual(after.rows.map(figures), byDay.rows.map(figures));
});
