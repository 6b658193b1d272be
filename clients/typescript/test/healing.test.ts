import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";

import { timestampFromDate } from "@bufbuild/protobuf/wkt";

import {
  Code,
  ErrorType,
  IneligibleReason,
  PostActionStatus,
  PostActionType,
  RecoveryStatus,
  RecoveryStrategy,
} from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";
import { uniqueId } from "./helpers/server.js";

const live = useServer();

test("ReportError -> PlanRecovery -> ReportRecoveryOutcome -> GetHealingStatistics", async () => {
  const h = live.client.healing;
  const agentId = uniqueId("healer");

  const { event } = await h.reportError({ agentId, message: "tool execution failed", context: { step: "build" } });
  assert.ok(event);
  assert.ok(event.id > 0n);
  assert.equal(event.agentId, agentId);
  assert.equal(event.errorType, ErrorType.EXECUTION_FAILURE, "classified from the message");
  assert.ok(event.severity > 0 && event.severity <= 1);
  assert.deepEqual(event.context, { step: "build" });

  const { action } = await h.planRecovery({ errorEventId: event.id });
  assert.ok(action);
  assert.equal(action.errorEventId, event.id);
  assert.equal(action.agentId, agentId);
  assert.equal(action.status, RecoveryStatus.ACTIVE);
  assert.equal(action.strategy, RecoveryStrategy.RETRY, "the heuristic for execution failures");
  assert.equal(action.escalated, false);
  assert.ok(action.leaseExpiresAt, "an active recovery has a lease");

  // At most one active recovery per agent.
  const { event: again } = await h.reportError({ agentId, message: "tool execution failed" });
  await rejectsWithCode(h.planRecovery({ errorEventId: again!.id }), Code.FailedPrecondition);

  const { action: done } = await h.reportRecoveryOutcome({
    actionId: action.id,
    success: true,
    duration: { seconds: 12n },
    details: "retried",
  });
  assert.equal(done?.status, RecoveryStatus.SUCCEEDED);
  assert.equal(done?.duration?.seconds, 12n);
  assert.equal(done?.details, "retried");
  assert.ok(done?.completedAt);
  await rejectsWithCode(h.reportRecoveryOutcome({ actionId: action.id, success: false }), Code.FailedPrecondition);

  const stats = await h.getHealingStatistics({});
  assert.equal(stats.totalErrors, 2n);
  assert.equal(stats.errorsLastHour, 2n);
  assert.equal(stats.activeRecoveries, 0n);
  assert.deepEqual(
    stats.errorsByType.map((c) => [c.errorType, c.count]),
    [[ErrorType.EXECUTION_FAILURE, 2n]],
  );
  assert.equal(stats.patterns.length, 1);
  const p = stats.patterns[0];
  assert.deepEqual(
    [p.errorType, p.strategy, p.successes, p.failures, p.useCount],
    [ErrorType.EXECUTION_FAILURE, RecoveryStrategy.RETRY, 1n, 0n, 1n],
  );
  assert.equal(p.successRate, 1);
  assert.equal(p.meanRecoveryTime?.seconds, 12n);
  assert.equal(stats.overallSuccessRate, 1);
});

/** The server's default --post-window: keys belong to windows this long. */
const POST_WINDOW_MS = 90 * 60_000;

/**
 * The key of an action ("post:action:tier") proposed at `at`, as the proto
 * documents: "shealw_<window>_" + the first 32 hex characters of
 * SHA-256("post:action:tier:window"), window = floor(Unix ms / window ms).
 */
function idempotencyKey(text: string, at: Date): string {
  const window = Math.floor(at.getTime() / POST_WINDOW_MS);
  return `shealw_${window}_` + createHash("sha256").update(`${text}:${window}`).digest("hex").slice(0, 32);
}

test("EvaluatePost: a stagnating post gets a tier-3 thread, claimed once", async () => {
  const ph = live.client.postHealing;
  const postId = uniqueId("post");
  // A claim is decided at the server's time (`now` with `claim` is refused),
  // so the points are recent.
  const now = new Date();
  const at = (minutesAgo: number) => timestampFromDate(new Date(now.getTime() - minutesAgo * 60_000));
  // 5 engagements per 1,000 impressions: rate 0.005, stagnation 1 - 20 x 0.005 = 0.9.
  const points = [
    { observedAt: at(10), impressions: 2000n, engagements: 10n },
    { observedAt: at(30), impressions: 0n, engagements: 0n },
    { observedAt: at(20), impressions: 1000n, engagements: 5n },
  ];

  const verdict = await ph.evaluatePost({ postId, points, now: timestampFromDate(now) });
  assert.equal(verdict.eligible, true);
  assert.equal(verdict.ineligibleReason, IneligibleReason.UNSPECIFIED);
  assert.equal(verdict.reason, "");
  assert.ok(Math.abs(verdict.engagementRate - 0.005) < 1e-12, String(verdict.engagementRate));
  assert.ok(Math.abs(verdict.stagnationScore - 0.9) < 1e-9, String(verdict.stagnationScore));
  assert.equal(verdict.tier, 3);
  assert.equal(verdict.actionType, PostActionType.THREAD);
  assert.equal(verdict.idempotencyKey, idempotencyKey(`${postId}:thread:tier_3`, now));
  assert.equal(verdict.sampleCount, 3n);
  assert.equal(verdict.impressionsGained, 2000n);
  assert.equal(verdict.claimed, false, "no claim was asked for");

  await rejectsWithCode(
    ph.evaluatePost({ postId, points, now: timestampFromDate(now), claim: true }),
    Code.InvalidArgument,
  );
  const claim = await ph.evaluatePost({ postId, points, claim: true });
  assert.equal(claim.claimed, true);
  assert.equal(claim.action?.status, PostActionStatus.RUNNING);
  // The key of the window the server's clock was in when it claimed.
  const stamped = new Date(Number(claim.action!.createdAt!.seconds) * 1000 + claim.action!.createdAt!.nanos / 1e6);
  assert.equal(claim.action?.idempotencyKey, idempotencyKey(`${postId}:thread:tier_3`, stamped));
  assert.equal(claim.action?.tier, 3);

  const duplicate = await ph.evaluatePost({ postId, points, claim: true });
  assert.equal(duplicate.eligible, false);
  assert.equal(duplicate.claimed, false);
  assert.equal(duplicate.ineligibleReason, IneligibleReason.DUPLICATE_ACTION);

  const tooFew = await ph.evaluatePost({ postId: uniqueId("post"), points: points.slice(0, 2), now: timestampFromDate(now) });
  assert.equal(tooFew.eligible, false);
  assert.equal(tooFew.ineligibleReason, IneligibleReason.INSUFFICIENT_SAMPLES);
  assert.equal(tooFew.reason, "insufficient_samples");
  assert.equal(tooFew.tier, 0);

  // 60 engagements per 1,000 impressions: rate 0.06, at or above the default
  // --post-healthy-rate (0.05): healthy, no action proposed.
  const engaging = points.map((p) => ({ ...p, engagements: p.impressions * 60n / 1000n }));
  const healthy = await ph.evaluatePost({ postId: uniqueId("post"), points: engaging, claim: true });
  assert.equal(healthy.eligible, false);
  assert.equal(healthy.claimed, false);
  assert.equal(healthy.ineligibleReason, IneligibleReason.HEALTHY);
  assert.equal(healthy.reason, "healthy");
  assert.equal(healthy.tier, 0);
  assert.equal(healthy.idempotencyKey, "");

  // 50 new impressions: under the default --post-min-impressions (100), no verdict.
  const quiet = points.map((p) => ({ ...p, impressions: 1000n + p.impressions / 40n, engagements: 0n }));
  const low = await ph.evaluatePost({ postId: uniqueId("post"), points: quiet, now: timestampFromDate(now) });
  assert.equal(low.ineligibleReason, IneligibleReason.LOW_EXPOSURE);
  assert.equal(low.reason, "low_exposure");
  assert.equal(low.impressionsGained, 50n);
  assert.equal(low.tier, 0);
});
