//! PostHealingService through the API: stagnation tiers, healthy and barely
//! seen posts, every refusal reason, keys of a window, claims under
//! concurrency, outcomes, leases and retries.

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
const COMMENT: i64 = 30; // rate 0.03: score 0.4, tier 1
const HEALTHY: i64 = 50; // rate 0.05: --post-healthy-rate, no action

/// The default --post-window, the length of a key's window.
const POST_WINDOW_MS: i64 = 90 * 60 * 1000;

/// The index of the post window `at` is in: floor(Unix ms / window ms).
fn window_of(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis().div_euclid(POST_WINDOW_MS)
}

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

fn hex32(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..32].to_owned()
}

/// A key of the seed's form, with no time part, as records made before keys
/// had windows have: `sheal_` + SHA-256("post:action:tier").
fn seed_key(text: &str) -> String {
    format!("sheal_{}", hex32(text))
}

/// The key of an action ("post:action:tier") proposed in the post window of
/// `at`: `shealw_<window>_` + SHA-256("post:action:tier:window").
fn window_key(text: &str, at: DateTime<Utc>) -> String {
    let window = window_of(at);
    format!("shealw_{window}_{}", hex32(&format!("{text}:{window}")))
}

/// A server on a manual clock, moved to `into` past the start of the next
/// post window, so that a test knows which window each call falls in.
async fn app_in_a_window(
    db: &TestDb,
    into: Duration,
    configure: impl FnOnce(&mut fleetcare::config::ServeArgs),
) -> (TestApp, fleetcare::runtime::clock::ManualClock) {
    let mut args = crate::helpers::test_args(&db.url);
    configure(&mut args);
    let clock = crate::helpers::manual_clock(&mut args);
    let now = clock.now();
    let next = (window_of(now) + 1) * POST_WINDOW_MS;
    clock.advance(Duration::milliseconds(next - now.timestamp_millis()) + into);
    assert_eq!(window_of(clock.now() - into), window_of(clock.now()));
    (TestApp::spawn_with(args).await, clock)
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
async fn stagnation_picks_the_tier_and_a_key_of_the_window() {
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
            window_key(&format!("p1:{name}:tier_{tier}"), t0())
        );
        assert!(!r.claimed);
    }
    // 2026-06-01 12:00 UTC starts post window 329_688 (of 90 minutes): a dry
    // run's key is of the window of its `now`.
    assert_eq!(window_of(t0()), 329_688);
    let r = evaluate(&mut c, "p1", t0(), THREAD, false).await;
    assert!(
        r.idempotency_key.starts_with("shealw_329688_"),
        "{}",
        r.idempotency_key
    );
    let before = evaluate(&mut c, "p1", t0() - Duration::seconds(1), THREAD, false).await;
    assert!(before.idempotency_key.starts_with("shealw_329687_"));
    assert!((r.stagnation_score - 0.9).abs() < 1e-9);
    assert!((r.engagement_rate - 0.005).abs() < 1e-12);
    assert_eq!(r.sample_count, 3);
    assert_eq!(r.impressions_gained, 2000);

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
    // 10 minutes into a post window: the dry runs below up to 40 minutes
    // later are in the same window, the one 100 minutes later in the next.
    let (app, clock) = app_in_a_window(&db, Duration::minutes(10), |_| {}).await;
    let mut c = client(&app);

    // Claims are decided at the server's time; later times are judged by dry
    // runs (a client's `now` is allowed only without a claim).
    let t0 = clock.now();
    // t0: a comment is claimed, and succeeds.
    let first = evaluate(&mut c, "post-9", t0, COMMENT, true).await;
    assert!(first.claimed);
    assert_eq!(
        first.idempotency_key,
        window_key("post-9:comment:tier_1", t0)
    );
    let action = first.action.unwrap();
    assert_eq!(action.status, pb::PostActionStatus::Running as i32);
    let again = evaluate(&mut c, "post-9", t0, COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action", "running is a duplicate");
    record(
        &mut c,
        &first.idempotency_key,
        pb::PostActionStatus::Succeeded,
        "",
    )
    .await;
    let again = evaluate(&mut c, "post-9", t0, COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action", "succeeded is a duplicate");
    let dry = evaluate(&mut c, "post-9", t0 + Duration::minutes(2), COMMENT, false).await;
    assert_eq!(dry.reason, "duplicate_action", "a dry run sees the same");

    // An edit is allowed (2 actions in the window)...
    clock.advance(Duration::seconds(1));
    let t1 = clock.now();
    let edit = evaluate(&mut c, "post-9", t1, EDIT, true).await;
    assert!(edit.claimed, "{edit:?}");
    // ...but a third action in the same 90 minutes is not.
    for at in [t1, t0 + Duration::minutes(40)] {
        let thread = evaluate(&mut c, "post-9", at, THREAD, at == t1).await;
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
    // The comment succeeded, but in the window before: past its 30-minute
    // cooldown it may act again, under the key of this window.
    let comment = evaluate(
        &mut c,
        "post-9",
        t0 + Duration::minutes(100),
        COMMENT,
        false,
    )
    .await;
    assert!(comment.eligible, "{comment:?}");
    assert_eq!(
        comment.idempotency_key,
        window_key("post-9:comment:tier_1", t0 + Duration::minutes(100))
    );
    assert_ne!(comment.idempotency_key, first.idempotency_key);

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
    let (app, clock) = app_in_a_window(&db, Duration::minutes(10), |_| {}).await;
    let now = clock.now();
    let calls = (0..32).map(|_| {
        let mut c = client(&app);
        tokio::spawn(async move { evaluate(&mut c, "hot-post", now, THREAD, true).await })
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

/// Three points in the 30 minutes before `now` gaining `impressions` and
/// `engagements`.
fn gaining(now: DateTime<Utc>, impressions: i64, engagements: i64) -> Vec<pb::MetricPoint> {
    let p = |mins: i64, share: i64| pb::MetricPoint {
        observed_at: Some(ts(now - Duration::minutes(mins))),
        impressions: 5000 + impressions * share / 2,
        engagements: 40 + engagements * share / 2,
    };
    vec![p(30, 0), p(20, 1), p(10, 2)]
}

async fn evaluate_points(
    c: &mut PostHealingServiceClient<Channel>,
    post: &str,
    points: Vec<pb::MetricPoint>,
    now: Option<DateTime<Utc>>,
) -> pb::EvaluatePostResponse {
    c.evaluate_post(pb::EvaluatePostRequest {
        post_id: post.into(),
        points,
        now: now.map(ts),
        claim: now.is_none(),
    })
    .await
    .expect("evaluate")
    .into_inner()
}

async fn actions_of(c: &mut PostHealingServiceClient<Channel>, post: &str) -> Vec<pb::PostAction> {
    c.list_actions(pb::ListActionsRequest {
        post_id: post.into(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner()
    .actions
}

#[tokio::test]
async fn a_healthy_post_gets_no_action() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    // 5 % (the default --post-healthy-rate) and above: HEALTHY, no action
    // proposed, nothing claimed.
    for per_thousand in [HEALTHY, 51, 200] {
        for claim in [false, true] {
            let r = evaluate(&mut c, "fine", Utc::now(), per_thousand, claim).await;
            assert!(!r.eligible && !r.claimed, "{r:?}");
            assert_eq!(r.ineligible_reason, pb::IneligibleReason::Healthy as i32);
            assert_eq!(r.reason, "healthy");
            assert_eq!((r.tier, r.action_type), (0, 0), "no action proposed");
            assert_eq!(r.idempotency_key, "");
            assert!(r.action.is_none());
            assert!((r.engagement_rate - per_thousand as f64 / 1000.0).abs() < 1e-12);
            assert_eq!(r.stagnation_score, 0.0);
            assert_eq!((r.sample_count, r.impressions_gained), (3, 2000));
        }
    }
    assert!(actions_of(&mut c, "fine").await.is_empty());
    // Just under the floor, the post is engaging but stagnating a little: a comment.
    let r = evaluate(&mut c, "fine", Utc::now(), HEALTHY - 1, true).await;
    assert!(r.claimed, "{r:?}");
    assert_eq!(r.action_type, pb::PostActionType::Comment as i32);

    // The floor is --post-healthy-rate.
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.healing.post_healthy_rate = 0.02;
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    let r = evaluate(&mut c, "p", t0(), EDIT, false).await;
    assert_eq!(r.reason, "healthy", "{r:?}");
    let r = evaluate(&mut c, "p", t0(), EDIT - 1, false).await;
    assert!(r.eligible, "{r:?}");
    assert_eq!(r.tier, 2);
}

#[tokio::test]
async fn a_post_seen_too_little_gets_no_stagnation_verdict() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    // Under 100 new impressions (the default --post-min-impressions), not a
    // single engagement or a lot of them: LOW_EXPOSURE, nothing proposed.
    for (impressions, engagements) in [(99, 0), (0, 0), (60, 40)] {
        for now in [Some(t0()), None] {
            let at = now.unwrap_or_else(Utc::now);
            let points = gaining(at, impressions, engagements);
            let r = evaluate_points(&mut c, "quiet", points, now).await;
            assert!(!r.eligible && !r.claimed, "{r:?}");
            assert_eq!(
                r.ineligible_reason,
                pb::IneligibleReason::LowExposure as i32
            );
            assert_eq!(r.reason, "low_exposure");
            assert_eq!((r.tier, r.action_type), (0, 0));
            assert_eq!(r.idempotency_key, "");
            assert_eq!((r.stagnation_score, r.engagement_rate), (0.0, 0.0));
            assert_eq!((r.sample_count, r.impressions_gained), (3, impressions));
        }
    }
    assert!(actions_of(&mut c, "quiet").await.is_empty());
    // At the floor, a stall is judged: a thread.
    let r = evaluate_points(&mut c, "quiet", gaining(t0(), 100, 0), Some(t0())).await;
    assert!(r.eligible, "{r:?}");
    assert_eq!((r.tier, r.impressions_gained), (3, 100));
    // Too few points are still insufficient samples first.
    let mut two = gaining(t0(), 10, 0);
    two.pop();
    let r = evaluate_points(&mut c, "quiet", two, Some(t0())).await;
    assert_eq!(r.reason, "insufficient_samples");

    // --post-min-impressions 0 turns the floor off: no new impressions is a
    // full stall again.
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.healing.post_min_impressions = 0;
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    let r = evaluate_points(&mut c, "quiet", gaining(t0(), 0, 0), Some(t0())).await;
    assert!(r.eligible, "{r:?}");
    assert_eq!((r.tier, r.stagnation_score), (3, 1.0));
}

#[tokio::test]
async fn a_tier_acts_again_in_a_later_window_while_caps_and_cooldowns_hold() {
    let db = TestDb::new();
    let (app, clock) = app_in_a_window(&db, Duration::minutes(10), |_| {}).await;
    let mut c = client(&app);
    // Window N, 10 minutes in: a comment is claimed and succeeds.
    let first = evaluate(&mut c, "p", clock.now(), COMMENT, true).await;
    assert!(first.claimed, "{first:?}");
    let k1 = first.idempotency_key.clone();
    assert_eq!(k1, window_key("p:comment:tier_1", clock.now()));
    record(&mut c, &k1, pb::PostActionStatus::Succeeded, "").await;
    // 70 minutes later, still window N: the 30-minute cooldown is over and the
    // cap has room, but the comment succeeded in this window.
    clock.advance(Duration::minutes(70));
    let again = evaluate(&mut c, "p", clock.now(), COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action", "{again:?}");
    assert_eq!(again.idempotency_key, k1);

    // Window N+1: the comment acts again, under a key of its window.
    clock.advance(Duration::minutes(15));
    let second = evaluate(&mut c, "p", clock.now(), COMMENT, true).await;
    assert!(second.claimed, "{second:?}");
    let k2 = second.idempotency_key.clone();
    assert_ne!(k2, k1);
    assert_eq!(k2, window_key("p:comment:tier_1", clock.now()));
    record(&mut c, &k2, pb::PostActionStatus::Succeeded, "").await;
    // ...once: a duplicate in this window too.
    let again = evaluate(&mut c, "p", clock.now(), COMMENT, true).await;
    assert_eq!(again.reason, "duplicate_action");
    // The cap still holds: two actions in the last 90 minutes.
    let edit = evaluate(&mut c, "p", clock.now(), EDIT, true).await;
    assert_eq!(edit.reason, "window_frequency_exceeded", "{edit:?}");
    let keys: Vec<_> = actions_of(&mut c, "p")
        .await
        .into_iter()
        .map(|a| (a.idempotency_key, a.status))
        .collect();
    let done = pb::PostActionStatus::Succeeded as i32;
    assert_eq!(keys, [(k2, done), (k1, done)], "newest first");

    // The cooldowns still hold: a thread that succeeded late in window N+1 is
    // no duplicate in window N+2, but within its 3-hour cooldown.
    clock.advance(Duration::minutes(75));
    let thread = evaluate(&mut c, "q", clock.now(), THREAD, true).await;
    assert!(thread.claimed, "{thread:?}");
    record(
        &mut c,
        &thread.idempotency_key,
        pb::PostActionStatus::Succeeded,
        "",
    )
    .await;
    clock.advance(Duration::minutes(12));
    let again = evaluate(&mut c, "q", clock.now(), THREAD, true).await;
    assert_eq!(again.reason, "action_cooldown_active", "{again:?}");
    assert_ne!(again.idempotency_key, thread.idempotency_key);
    clock.advance(Duration::hours(3));
    let later = evaluate(&mut c, "q", clock.now(), THREAD, true).await;
    assert!(later.claimed, "{later:?}");
}

#[tokio::test]
async fn seed_keys_keep_working_and_reports_create_records_only_in_the_window() {
    let db = TestDb::new();
    let (app, clock) = app_in_a_window(&db, Duration::minutes(10), |_| {}).await;
    let mut c = client(&app);
    let create = |key: String, post: &str, action: pb::PostActionType, tier: i32| {
        pb::RecordActionOutcomeRequest {
            idempotency_key: key,
            status: pb::PostActionStatus::Succeeded as i32,
            post_id: post.into(),
            action_type: action as i32,
            tier,
            ..Default::default()
        }
    };
    // A record the seed's executor made, under the seed's key, in window N.
    let old = seed_key("p:thread:tier_3");
    let made = c
        .record_action_outcome(create(old.clone(), "p", pb::PostActionType::Thread, 3))
        .await
        .unwrap()
        .into_inner();
    assert!(made.created);
    // It suppresses the thread in its window, like a window key would.
    let dup = evaluate(&mut c, "p", clock.now(), THREAD, true).await;
    assert_eq!(dup.reason, "duplicate_action", "{dup:?}");
    assert_ne!(dup.idempotency_key, old, "claims use window keys");
    // Reports and questions naming the old key still find it.
    let failed = record(&mut c, &old, pb::PostActionStatus::Failed, "rate_limit").await;
    assert!(!failed.created);
    assert_eq!(failed.action.unwrap().attempts, 2);
    let retry = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: old.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.retry, "{retry:?}");
    record(&mut c, &old, pb::PostActionStatus::Succeeded, "").await;
    // In a later window, past the thread's cooldown, the thread acts again.
    clock.advance(Duration::hours(3) + Duration::minutes(1));
    let again = evaluate(&mut c, "p", clock.now(), THREAD, true).await;
    assert!(again.claimed, "{again:?}");
    assert_eq!(
        again.idempotency_key,
        window_key("p:thread:tier_3", clock.now())
    );
    let listed = actions_of(&mut c, "p").await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].idempotency_key, old);

    // A report creates a record under a window key of the current window or
    // the one before (the action was proposed just before it ended)...
    let now = clock.now();
    for (post, at) in [("r1", now), ("r2", now - Duration::minutes(90))] {
        let key = window_key(&format!("{post}:edit:tier_2"), at);
        let made = c
            .record_action_outcome(create(key.clone(), post, pb::PostActionType::Edit, 2))
            .await
            .unwrap()
            .into_inner();
        assert!(made.created, "{post}");
        assert_eq!(made.action.unwrap().idempotency_key, key);
    }
    // ...never of a window the caller picks, earlier or later.
    for at in [now - Duration::minutes(180), now + Duration::minutes(90)] {
        let key = window_key("r3:edit:tier_2", at);
        let err = c
            .record_action_outcome(create(key.clone(), "r3", pb::PostActionType::Edit, 2))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("post window {}", window_of(at)))
                && err.message().contains("current post window"),
            "{}",
            err.message()
        );
    }
    // A window key of another post, action or tier does not fit.
    let err = c
        .record_action_outcome(create(
            window_key("r4:thread:tier_3", now),
            "r4",
            pb::PostActionType::Edit,
            2,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("does not match"),
        "{}",
        err.message()
    );
    assert!(actions_of(&mut c, "r3").await.is_empty());
    assert!(actions_of(&mut c, "r4").await.is_empty());
    // A malformed window key is refused as any malformed key.
    let err = c
        .should_retry(pb::ShouldRetryRequest {
            idempotency_key: format!("shealw_01_{}", "0".repeat(32)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("shealw_"), "{}", err.message());
}

/// A bad --post-healthy-rate or --post-min-impressions stops the server at
/// start, naming the flag.
#[tokio::test]
async fn bad_post_verdict_floors_stop_the_server() {
    let db = TestDb::new();
    // (--post-healthy-rate, --post-min-impressions, the refusal)
    let cases = [
        (0.0, 100, "--post-healthy-rate must be in (0, 1], got 0"),
        (1.5, 100, "--post-healthy-rate must be in (0, 1], got 1.5"),
        (0.05, -1, "--post-min-impressions must be 0 or more, got -1"),
    ];
    for (rate, impressions, expected) in cases {
        let mut args = crate::helpers::test_args(&db.url);
        args.healing.post_healthy_rate = rate;
        args.healing.post_min_impressions = impressions;
        let refused = fleetcare::startup::Application::build(
            args,
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        match refused {
            Err(fleetcare::error::Error::InvalidArgument(message)) => {
                assert_eq!(message, expected)
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("the server must not start"),
        }
    }
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
