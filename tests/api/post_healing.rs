//! PostHealingService through the API: stagnation tiers, every refusal reason,
//! claims under concurrency, outcomes, leases and retries.

use chrono::{DateTime, Duration, TimeZone, Utc};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::post_healing_service_client::PostHealingServiceClient;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb};

fn client(app: &TestApp) -> PostHealingServiceClient<Channel> {
    PostHealingServiceClient::new(app.channel.clone())
}

fn ts(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap()
}

/// Three points in the 30 minutes before `now`, 1,000 impressions apart, with
/// `per_thousand` engagements per 1,000 impressions (given out of order).
fn points(now: DateTime<Utc>, per_thousand: i64) -> Vec<pb::MetricPoint> {
    let p = |mins: i64, k: i64| pb::MetricPoint {
        observed_at: Some(ts(now - Duration::minutes(mins))),
        impressions: 1000 * k,
        engagements: per_thousand * k,
    };
    vec![p(10, 2), p(30, 0), p(20, 1)]
}

const THREAD: i64 = 5; // rate 0.005: score 0.9, tier 3
const EDIT: i64 = 20; // rate 0.02: score 0.6, tier 2
const COMMENT: i64 = 50; // rate 0.05: score 0, tier 1

/// Evaluates at `now`: a dry run at that time, or, with `claim`, a claim at
/// the server's time (a client's clock is refused with a claim), so `now`
/// must then be the real time.
async fn evaluate(
    c: &mut PostHealingServiceClient<Channel>,
    post: &str,
    now: DateTime<Utc>,
    per_thousand: i64,
    claim: bool,
) -> pb::EvaluatePostResponse {
    c.evaluate_post(pb::EvaluatePostRequest {
        post_id: post.into(),
        points: points(now, per_thousand),
        now: (!claim).then(|| ts(now)),
        claim,
    })
    .await
    .expect("evaluate")
    .into_inner()
}

fn seed_key(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sheal_{}", &hex[..32])
}

async fn record(
    c: &mut PostHealingServiceClient<Channel>,
    key: &str,
    status: pb::PostActionStatus,
    error: &str,
) -> pb::RecordActionOutcomeResponse {
    c.record_action_outcome(pb::RecordActionOutcomeRequest {
        idempotency_key: key.into(),
        status: status as i32,
        outcome_json: r#"{"comment_id": "c1"}"#.into(),
        error_code: error.into(),
        ..Default::default()
    })
    .await
    .expect("record outcome")
    .into_inner()
}

#[tokio::test]
async fn stagnation_picks_the_tier_and_a_seed_compatible_key() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    for (per_thousand, tier, action, name) in [
        (THREAD, 3, pb::PostActionType::Thread, "thread"),
        (EDIT, 2, pb::PostActionType::Edit, "edit"),
        (COMMENT, 1, pb::PostActionType::Comment, "comment"),
    ] {
        let r = evaluate(&mut c, "p1", t0(), per_thousand, false).await;
        assert!(r.eligible, "{r:?}");
        assert_eq!(r.tier, tier);
        assert_eq!(r.action_type, action as i32);
        assert_eq!(
            r.idempotency_key,
            seed_key(&format!("p1:{name}:tier_{tier}"))
        );
        assert!(!r.claimed);
    }
    let r = evaluate(&mut c, "p1", t0(), THREAD, false).await;
    assert!((r.stagnation_score - 0.9).abs() < 1e-9);
    assert!((r.engagement_rate - 0.005).abs() < 1e-12);
    assert_eq!(r.sample_count, 3);

    // Points outside the 90-minute window are ignored: two left is too few.
    let mut old = points(t0(), THREAD);
    old[1].observed_at = Some(ts(t0() - Duration::minutes(91)));
    let r = c
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: "p1".into(),
            points: old,
            now: Some(ts(t0())),
            claim: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.eligible);
    assert_eq!(r.reason, "insufficient_samples");
    assert_eq!(
        r.ineligible_reason,
        pb::IneligibleReason::InsufficientSamples as i32
    );
    assert_eq!(
        r.sample_count, 2,
        "the seed's sample_count: the points in the window"
    );
    assert!(!r.claimed);
}

#[tokio::test]
async fn guardrails_refuse_duplicates_frequency_and_cooldowns() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);

    // Claims are decided at the server's time; later times are judged by dry
    // runs (a client's `now` is allowed only without a claim).
    let t0 = Utc::now();
    // t0: a comment is claimed, and succeeds.
    let first = evaluate(&mut c, "post-9", t0, COMMENT, true).await;
    assert!(first.claimed);
    let action = first.action.unwrap();
    assert_eq!(action.status, pb::PostActionStatus::Running as i32);
    let again = evaluate(&mut c, "post-9", Utc::now(), COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action", "running is a duplicate");
    record(
        &mut c,
        &first.idempotency_key,
        pb::PostActionStatus::Succeeded,
        "",
    )
    .await;
    let again = evaluate(&mut c, "post-9", Utc::now(), COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action", "succeeded is a duplicate");
    let dry = evaluate(&mut c, "post-9", t0 + Duration::minutes(2), COMMENT, false).await;
    assert_eq!(dry.reason, "duplicate_action", "a dry run sees the same");

    // An edit is allowed (2 actions in the window)...
    let edit = evaluate(&mut c, "post-9", Utc::now(), EDIT, true).await;
    assert!(edit.claimed, "{edit:?}");
    // ...but a third action in the same 90 minutes is not.
    for at in [Utc::now(), t0 + Duration::minutes(40)] {
        let thread = evaluate(
            &mut c,
            "post-9",
            at,
            THREAD,
            at != t0 + Duration::minutes(40),
        )
        .await;
        assert_eq!(thread.reason, "window_frequency_exceeded");
        assert_eq!(
            thread.ineligible_reason,
            pb::IneligibleReason::WindowFrequencyExceeded as i32
        );
        assert!(!thread.claimed);
    }

    // t0+100m: both left the window; the edit (never reported, lease
    // expired: failed with "timeout") is within its 2 h cooldown.
    let edit_again = evaluate(&mut c, "post-9", t0 + Duration::minutes(100), EDIT, false).await;
    assert_eq!(edit_again.reason, "action_cooldown_active");
    // A thread has no cooldown running and the window has room: eligible.
    let thread = evaluate(&mut c, "post-9", t0 + Duration::minutes(100), THREAD, false).await;
    assert!(thread.eligible && !thread.claimed, "{thread:?}");

    let listed = c
        .list_actions(pb::ListActionsRequest {
            post_id: "post-9".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.actions.len(), 1, "dry runs stored nothing");
    assert_eq!(
        listed.actions[0].action_type,
        pb::PostActionType::Edit as i32,
        "newest first"
    );
    let rest = c
        .list_actions(pb::ListActionsRequest {
            post_id: "post-9".into(),
            page_size: 2,
            page_token: listed.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.actions.len(), 1);
    assert_eq!(
        rest.actions[0].action_type,
        pb::PostActionType::Comment as i32
    );
    assert_eq!(rest.actions[0].outcome_json, r#"{"comment_id":"c1"}"#);
}

#[tokio::test]
async fn concurrent_claims_on_one_post_have_exactly_one_winner() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let calls = (0..32).map(|_| {
        let mut c = client(&app);
        tokio::spawn(async move { evaluate(&mut c, "hot-post", Utc::now(), THREAD, true).await })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results.iter().filter(|r| r.claimed).count(), 1);
    assert_eq!(results.iter().filter(|r| r.eligible).count(), 1);
    assert!(
        results
            .iter()
            .filter(|r| !r.eligible)
            .all(|r| r.reason == "duplicate_action")
    );
}

#[tokio::test]
async fn outcomes_attempts_and_retries() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    // An executor records an action fleetcare never planned, with the seed's key.
    let key = seed_key("p7:comment:tier_1");
    let created = c
        .record_action_outcome(pb::RecordActionOutcomeRequest {
            idempotency_key: key.clone(),
            status: pb::PostActionStatus::Failed as i32,
            error_code: "rate_limit".into(),
            post_id: "p7".into(),
            action_type: pb::PostActionType::Comment as i32,
            tier: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    assert_eq!(created.action.as_ref().unwrap().attempts, 1);

    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.retry, "{retry:?}");
    let not_before = retry.not_before.unwrap().seconds;
    assert!(
        not_before > Utc::now().timestamp(),
        "backoff puts the retry in the future"
    );

    // Two more failures use up the attempts.
    record(&mut c, &key, pb::PostActionStatus::Failed, "timeout").await;
    let third = record(&mut c, &key, pb::PostActionStatus::Failed, "timeout").await;
    assert_eq!(third.action.unwrap().attempts, 3);
    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!retry.retry);

    // A permanent error is never retried.
    let key2 = seed_key("p7:edit:tier_2");
    c.record_action_outcome(pb::RecordActionOutcomeRequest {
        idempotency_key: key2.clone(),
        status: pb::PostActionStatus::Failed as i32,
        error_code: "content_rejected".into(),
        post_id: "p7".into(),
        action_type: pb::PostActionType::Edit as i32,
        tier: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: key2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!retry.retry);
    assert!(retry.not_before.is_none());

    // Refusals.
    let cases = [
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: "nope".into(),
                status: 2,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: seed_key("x:comment:tier_1"),
                status: 2,
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: key.clone(),
                status: 0,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: key.clone(),
                status: 2,
                outcome_json: "[1]".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: key.clone(),
                status: 2,
                outcome_json: "{oops".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RecordActionOutcomeRequest {
                idempotency_key: seed_key("p8:thread:tier_3"),
                status: 2,
                post_id: "p8".into(),
                action_type: pb::PostActionType::Comment as i32,
                tier: 1,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
    ];
    for (request, code) in cases {
        let err = c.record_action_outcome(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
    }
    let err = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: seed_key("none:comment:tier_1"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn an_expired_claim_counts_as_a_transient_failure() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    // Claimed with the server's clock; its 15-minute lease is then judged from the
    // future by passing `now`.
    let now = Utc::now();
    let claimed = evaluate(&mut c, "p5", now, THREAD, true).await;
    assert!(claimed.claimed);
    let key = claimed.idempotency_key.clone();
    // Within its lease the claim is running, not a retry candidate.
    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!retry.retry, "{retry:?}");
    let later = evaluate(&mut c, "p5", now + Duration::minutes(20), THREAD, false).await;
    // Not a duplicate any more (the lease expired), but still in the thread cooldown.
    assert_eq!(later.reason, "action_cooldown_active");
    // A dry run: a claim is decided at the server's time only.
    let after_cooldown = evaluate(&mut c, "p5", now + Duration::hours(4), THREAD, false).await;
    assert!(
        after_cooldown.eligible,
        "the expired claim does not block the post: {after_cooldown:?}"
    );
}

#[tokio::test]
async fn malformed_metrics_are_rejected() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let mut negative = points(t0(), THREAD);
    negative[0].engagements = -1;
    let too_many: Vec<_> = (0..10_001)
        .map(|i| pb::MetricPoint {
            observed_at: Some(ts(t0() - Duration::seconds(i))),
            impressions: i,
            engagements: 0,
        })
        .collect();
    let mut no_time = points(t0(), THREAD);
    no_time[2].observed_at = None;
    for (post, pts) in [
        ("p1", negative),
        ("p1", too_many),
        ("p1", no_time),
        ("bad post id", points(t0(), THREAD)),
    ] {
        let err = c
            .evaluate_post(pb::EvaluatePostRequest {
                post_id: post.into(),
                points: pts,
                now: None,
                claim: true,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let listed = c
        .list_actions(pb::ListActionsRequest {
            post_id: "p1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.actions.is_empty(), "refused requests stored nothing");
}

#[tokio::test]
async fn a_crashed_worker_s_claim_becomes_a_retryable_timeout() {
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.healing.post_claim_lease = std::time::Duration::from_millis(500);
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    let claimed = c
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: "p6".into(),
            points: points(Utc::now(), COMMENT),
            now: None,
            claim: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.claimed);
    // Within the lease the claim holds: no retry yet.
    clock.advance(chrono::Duration::milliseconds(499));
    let early = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: claimed.idempotency_key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!early.retry, "{early:?}");
    clock.advance(chrono::Duration::milliseconds(2));
    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: claimed.idempotency_key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.retry, "{retry:?}");
    assert_eq!(retry.attempts, 1, "the lost attempt counts");
    let listed = c
        .list_actions(pb::ListActionsRequest {
            post_id: "p6".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let action = &listed.actions[0];
    assert_eq!(action.status, pb::PostActionStatus::Failed as i32);
    assert_eq!(action.error_code, "timeout");
}

#[tokio::test]
async fn unknown_post_enum_values_are_refused_naming_the_field_and_value() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let key = seed_key("p1:comment:tier_1");
    let bad_status = c
        .record_action_outcome(pb::RecordActionOutcomeRequest {
            idempotency_key: key.clone(),
            status: 9,
            post_id: "p1".into(),
            action_type: pb::PostActionType::Comment as i32,
            tier: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let bad_action = c
        .record_action_outcome(pb::RecordActionOutcomeRequest {
            idempotency_key: key.clone(),
            status: pb::PostActionStatus::Succeeded as i32,
            post_id: "p1".into(),
            action_type: 7,
            tier: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    for (status, needle) in [(bad_status, "status 9"), (bad_action, "action_type 7")] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{}", status.message());
    }
    // Neither created the record.
    let missing = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: key,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn action_pages_follow_their_tokens_to_the_end() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let mut keys = Vec::new();
    for (action, name, tier) in [
        (pb::PostActionType::Comment, "comment", 1),
        (pb::PostActionType::Edit, "edit", 2),
        (pb::PostActionType::Thread, "thread", 3),
    ] {
        let key = seed_key(&format!("p1:{name}:tier_{tier}"));
        let created = c
            .record_action_outcome(pb::RecordActionOutcomeRequest {
                idempotency_key: key.clone(),
                status: pb::PostActionStatus::Succeeded as i32,
                post_id: "p1".into(),
                action_type: action as i32,
                tier,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(created.created);
        keys.push(key);
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_actions(pb::ListActionsRequest {
                post_id: "p1".into(),
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= 2);
        seen.extend(page.actions.into_iter().map(|a| a.idempotency_key));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    seen.sort();
    keys.sort();
    assert_eq!(seen, keys, "every record once");
    let foreign = c
        .list_actions(pb::ListActionsRequest {
            post_id: "p1".into(),
            page_token: "after:12/not-a-key".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
}
