//! Every recovery-time form through ReportExhausted. The recovery time is
//! computed from the same server clock that stamps the transition, so durations
//! are checked exactly against `occurred_at`.

use fleetcare::proto::v1 as pb;
use pb::RecoverySource as Src;

use crate::helpers::{TestApp, TestDb};

fn header(name: &str, value: &str) -> pb::Header {
    pb::Header {
        name: name.into(),
        value: value.into(),
    }
}

fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// Reports exhaustion and returns (recovery_at - occurred_at in ms, recovery_at ms, source, hint).
async fn report(
    app: &TestApp,
    agent: &str,
    headers: Vec<pb::Header>,
    message: &str,
) -> (i64, i64, i32, String) {
    let resp = app
        .agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: agent.into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: None,
            headers,
            message: message.into(),
            time_zone: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let agent = resp.agent.unwrap();
    let t = resp.transition.unwrap();
    let recovery = millis(agent.recovery_at.as_ref().unwrap());
    assert_eq!(t.recovery_at.as_ref().map(millis), Some(recovery));
    let occurred = millis(t.occurred_at.as_ref().unwrap());
    (
        recovery - occurred,
        recovery,
        agent.recovery_source,
        agent.recovery_hint,
    )
}

const S: i64 = 1000;
const M: i64 = 60 * S;
const H: i64 = 60 * M;

#[tokio::test]
async fn every_recovery_form_is_understood() {
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    // Agents that recover "now" must stay EXHAUSTED long enough to read them back.
    args.sweep_interval = std::time::Duration::from_secs(3600);
    let app = TestApp::spawn_with(args).await;
    app.register("a").await;

    let relative: &[(Vec<pb::Header>, &str, i64, Src)] = &[
        (
            vec![header("Retry-After", "30")],
            "",
            30 * S,
            Src::RetryAfterHeader,
        ),
        (
            vec![header("retry-after", "1.5")],
            "",
            1500,
            Src::RetryAfterHeader,
        ),
        (
            vec![header("RETRY-AFTER", "garbage")],
            "reset in 12 mins",
            12 * M,
            Src::Message,
        ),
        (
            vec![
                header("x-ratelimit-reset-requests", "6m0s"),
                header("x-ratelimit-reset-tokens", "1.5s"),
            ],
            "",
            1500,
            Src::ProviderResetHeader,
        ),
        (
            vec![
                header("x-ratelimit-remaining-requests", "0"),
                header("x-ratelimit-remaining-tokens", "100"),
                header("x-ratelimit-reset-requests", "6m0s"),
                header("x-ratelimit-reset-tokens", "1.5s"),
            ],
            "",
            6 * M,
            Src::ProviderResetHeader,
        ),
        (
            vec![
                header("Retry-After", "10"),
                header("x-ratelimit-reset-tokens", "1s"),
            ],
            "reset in 2 hours",
            10 * S,
            Src::RetryAfterHeader,
        ),
        (
            vec![],
            "quota exceeded, reset in 12 mins",
            12 * M,
            Src::Message,
        ),
        (
            vec![],
            "please retry after 30 seconds",
            30 * S,
            Src::Message,
        ),
        (vec![], "limit resets again in 2 hours", 2 * H, Src::Message),
        (vec![], "try again in 20 minutes", 20 * M, Src::Message),
        (vec![], "retry after 500ms", 500, Src::Message),
        (vec![], "resets in 2 days", 48 * H, Src::Message),
        (vec![], "no hint at all", 5 * H, Src::Default),
    ];
    for (headers, message, expected, source) in relative {
        let (delta, _, got_source, hint) = report(&app, "a", headers.clone(), message).await;
        assert_eq!(delta, *expected, "headers {headers:?} message {message:?}");
        assert_eq!(
            got_source, *source as i32,
            "headers {headers:?} message {message:?}"
        );
        assert!(!hint.is_empty());
    }

    // Absolute times a month ahead, written in every form a provider uses.
    let at = (chrono::Utc::now() + chrono::Duration::days(30))
        .with_time(chrono::NaiveTime::from_hms_opt(10, 0, 0).unwrap())
        .unwrap();
    let iso = at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let shifted = (at + chrono::Duration::hours(2))
        .format("%Y-%m-%dT%H:%M:%S+02:00")
        .to_string();
    let naive = at.format("%Y-%m-%dT%H:%M:%S").to_string();
    let http = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let later = (at + chrono::Duration::days(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let absolute: Vec<(Vec<pb::Header>, String, Src)> = vec![
        (
            vec![header("Retry-After", &http)],
            String::new(),
            Src::RetryAfterHeader,
        ),
        (vec![], format!("resets at {iso}."), Src::Message),
        (vec![], format!("resets at {shifted}"), Src::Message),
        (vec![], format!("resets at {naive}"), Src::Message),
        (vec![], format!("resets at {http}"), Src::Message),
        (
            vec![
                header("anthropic-ratelimit-tokens-reset", &iso),
                header("anthropic-ratelimit-requests-reset", &later),
            ],
            String::new(),
            Src::ProviderResetHeader,
        ),
    ];
    for (headers, message, source) in absolute {
        let (_, recovery, got_source, _) = report(&app, "a", headers.clone(), &message).await;
        assert_eq!(
            recovery,
            at.timestamp_millis(),
            "headers {headers:?} message {message:?}"
        );
        assert_eq!(
            got_source, source as i32,
            "headers {headers:?} message {message:?}"
        );
    }

    // A date in the past means recovery now.
    let (delta, _, source, _) = report(&app, "a", vec![], "resets at 2020-01-01T00:00:00Z").await;
    assert_eq!(delta, 0);
    assert_eq!(source, Src::Message as i32);

    // An explicit recovery time wins over everything.
    let explicit = prost_types::Timestamp {
        seconds: 1_900_000_000,
        nanos: 0,
    };
    let resp = app
        .agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: pb::ExhaustionReason::Billing as i32,
            recovery_at: Some(explicit),
            headers: vec![header("Retry-After", "5")],
            message: "reset in 1 min".into(),
            time_zone: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let agent = resp.agent.unwrap();
    assert_eq!(agent.recovery_at.unwrap().seconds, 1_900_000_000);
    assert_eq!(agent.recovery_source, Src::Explicit as i32);
    assert_eq!(
        agent.exhaustion_reason,
        pb::ExhaustionReason::Billing as i32
    );
}
