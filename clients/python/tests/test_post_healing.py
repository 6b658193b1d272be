"""PostHealingService.EvaluatePost: stagnation score, tier, idempotency key, claim,
and the verdicts that leave a post alone (healthy, low exposure)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta, timezone
from typing import List, Sequence, Tuple

import grpc
import pytest
from google.protobuf import timestamp_pb2

from fleetcare import FleetcareClient
from fleetcare.v1 import healing_pb2 as pb

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def ts(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def points(series: Sequence[Tuple[int, int, int]], at: datetime = NOW) -> List[pb.MetricPoint]:
    """(minutes before `at`, impressions, engagements) -> metric points."""
    return [
        pb.MetricPoint(observed_at=ts(at - timedelta(minutes=m)), impressions=i, engagements=e)
        for m, i, e in series
    ]


# The server's default --post-window: keys belong to windows of this length.
POST_WINDOW = timedelta(minutes=90)


def window_of(at: datetime) -> int:
    """The index of the key window `at` is in: floor(Unix ms / window ms)."""
    millis = (at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    return millis // (POST_WINDOW // timedelta(milliseconds=1))


def key(post_id: str, action: str, tier: int, at: datetime) -> str:
    """The key of the action proposed at `at`: shealw_<window>_ + SHA-256("post:action:tier:window")."""
    window = window_of(at)
    digest = hashlib.sha256(f"{post_id}:{action}:tier_{tier}:{window}".encode()).hexdigest()
    return f"shealw_{window}_{digest[:32]}"


def seed_key(post_id: str, action: str, tier: int) -> str:
    """The seed's key, with no time part, of records made before keys had windows."""
    return "sheal_" + hashlib.sha256(f"{post_id}:{action}:tier_{tier}".encode()).hexdigest()[:32]


def test_stagnating_post_gets_a_thread_then_is_claimed_once(client: FleetcareClient) -> None:
    posts = client.post_healing
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    # Out of order on purpose. 2 engagements per 2000 impressions: rate 0.001,
    # stagnation 1 - min(1, 20 x 0.001) = 0.98, so tier 3 (thread).
    # A claim is decided at the server's time (`now` with `claim` is refused),
    # so the points are recent.
    now = datetime.now(timezone.utc)
    stagnating = points([(10, 3000, 12), (30, 1000, 10), (20, 2000, 11)], at=now)

    verdict = posts.EvaluatePost(pb.EvaluatePostRequest(post_id=post_id, points=stagnating, now=ts(now)))
    assert verdict.eligible
    assert verdict.ineligible_reason == pb.INELIGIBLE_REASON_UNSPECIFIED
    assert verdict.reason == ""
    assert verdict.engagement_rate == pytest.approx(0.001)
    assert verdict.stagnation_score == pytest.approx(0.98)
    assert verdict.tier == 3
    assert verdict.action_type == pb.POST_ACTION_TYPE_THREAD
    assert verdict.idempotency_key == key(post_id, "thread", 3, now)
    assert verdict.sample_count == 3 and verdict.impressions_gained == 2000
    assert not verdict.claimed and not verdict.HasField("action")  # no claim asked

    with pytest.raises(grpc.RpcError) as refused:
        posts.EvaluatePost(pb.EvaluatePostRequest(post_id=post_id, points=stagnating, now=ts(now), claim=True))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    claimed = posts.EvaluatePost(pb.EvaluatePostRequest(post_id=post_id, points=stagnating, claim=True))
    assert claimed.eligible and claimed.claimed
    assert claimed.action.post_id == post_id
    assert claimed.action.status == pb.POST_ACTION_STATUS_RUNNING
    assert claimed.action.tier == 3 and claimed.action.attempts == 0
    stamped = claimed.action.created_at.ToDatetime(tzinfo=timezone.utc)
    assert abs(stamped - now) < timedelta(minutes=1)  # stamped with the server's time
    # The key of the window the server's clock was in (the dry run's, unless a
    # window ended in between).
    assert claimed.action.idempotency_key == key(post_id, "thread", 3, stamped)
    assert claimed.idempotency_key == claimed.action.idempotency_key

    duplicate = posts.EvaluatePost(pb.EvaluatePostRequest(post_id=post_id, points=stagnating, claim=True))
    assert not duplicate.eligible and not duplicate.claimed
    assert duplicate.ineligible_reason == pb.INELIGIBLE_REASON_DUPLICATE_ACTION
    assert duplicate.reason == "duplicate_action"

    listed = posts.ListActions(pb.ListActionsRequest(post_id=post_id))
    assert [a.idempotency_key for a in listed.actions] == [claimed.action.idempotency_key]


def test_engaging_post_gets_a_comment(client: FleetcareClient) -> None:
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    # 30 engagements per 1000 impressions: rate 0.03, under the 0.05 healthy
    # floor; stagnation 1 - 20 x 0.03 = 0.4, tier 1 (comment).
    verdict = client.post_healing.EvaluatePost(
        pb.EvaluatePostRequest(post_id=post_id, points=points([(30, 0, 0), (20, 500, 15), (10, 1000, 30)]), now=ts(NOW))
    )
    assert verdict.eligible
    assert verdict.stagnation_score == pytest.approx(0.4)
    assert (verdict.tier, verdict.action_type) == (1, pb.POST_ACTION_TYPE_COMMENT)
    assert verdict.idempotency_key == key(post_id, "comment", 1, NOW)
    # The key names its window.
    assert verdict.idempotency_key.startswith(f"shealw_{window_of(NOW)}_")


def test_healthy_post_gets_no_action(client: FleetcareClient) -> None:
    posts = client.post_healing
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    # 100 engagements per 1000 impressions: rate 0.1, at or above the default
    # --post-healthy-rate (0.05): HEALTHY, no action proposed, nothing claimed.
    now = datetime.now(timezone.utc)
    engaging = points([(30, 0, 0), (20, 500, 50), (10, 1000, 100)], at=now)
    for request in (
        pb.EvaluatePostRequest(post_id=post_id, points=engaging, now=ts(now)),
        pb.EvaluatePostRequest(post_id=post_id, points=engaging, claim=True),
    ):
        verdict = posts.EvaluatePost(request)
        assert not verdict.eligible and not verdict.claimed
        assert verdict.ineligible_reason == pb.INELIGIBLE_REASON_HEALTHY
        assert verdict.reason == "healthy"
        assert verdict.engagement_rate == pytest.approx(0.1)
        assert verdict.stagnation_score == pytest.approx(0.0)
        assert (verdict.tier, verdict.action_type, verdict.idempotency_key) == (0, pb.POST_ACTION_TYPE_UNSPECIFIED, "")
        assert verdict.sample_count == 3 and verdict.impressions_gained == 1000
    assert list(posts.ListActions(pb.ListActionsRequest(post_id=post_id)).actions) == []


def test_barely_seen_post_gets_no_stagnation_verdict(client: FleetcareClient) -> None:
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    # 80 new impressions, no engagement: under the default --post-min-impressions
    # (100), so LOW_EXPOSURE rather than a stalled post's thread.
    verdict = client.post_healing.EvaluatePost(
        pb.EvaluatePostRequest(post_id=post_id, points=points([(30, 900, 3), (20, 940, 3), (10, 980, 3)]), now=ts(NOW))
    )
    assert not verdict.eligible
    assert verdict.ineligible_reason == pb.INELIGIBLE_REASON_LOW_EXPOSURE
    assert verdict.reason == "low_exposure"
    assert (verdict.tier, verdict.stagnation_score, verdict.idempotency_key) == (0, 0.0, "")
    assert verdict.sample_count == 3 and verdict.impressions_gained == 80


def test_an_outcome_under_a_seed_key_is_still_recorded(client: FleetcareClient) -> None:
    posts = client.post_healing
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    old = seed_key(post_id, "edit", 2)
    made = posts.RecordActionOutcome(
        pb.RecordActionOutcomeRequest(
            idempotency_key=old,
            status=pb.POST_ACTION_STATUS_FAILED,
            error_code="rate_limit",
            post_id=post_id,
            action_type=pb.POST_ACTION_TYPE_EDIT,
            tier=2,
        )
    )
    assert made.created and made.action.idempotency_key == old
    again = posts.RecordActionOutcome(
        pb.RecordActionOutcomeRequest(idempotency_key=old, status=pb.POST_ACTION_STATUS_SUCCEEDED)
    )
    assert not again.created and again.action.attempts == 2
    assert again.action.status == pb.POST_ACTION_STATUS_SUCCEEDED


def test_too_few_points_is_insufficient_samples(client: FleetcareClient) -> None:
    post_id = f"post-{uuid.uuid4().hex[:12]}"
    # Three points, but one is older than the 90-minute window.
    verdict = client.post_healing.EvaluatePost(
        pb.EvaluatePostRequest(post_id=post_id, points=points([(120, 0, 0), (20, 500, 1), (10, 1000, 2)]), now=ts(NOW))
    )
    assert not verdict.eligible
    assert verdict.ineligible_reason == pb.INELIGIBLE_REASON_INSUFFICIENT_SAMPLES
    assert verdict.reason == "insufficient_samples"
    assert verdict.tier == 0
