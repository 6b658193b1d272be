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
            fencing_token: 0,
            ..Default::default()
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
    // Within the one-year horizon (beyond it is refused: see limits.rs).
    let explicit_secs = chrono::Utc::now().timestamp() + 200 * 86_400;
    let explicit = prost_types::Timestamp {
        seconds: explicit_secs,
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
            fencing_token: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent = resp.agent.unwrap();
    assert_eq!(agent.recovery_at.unwrap().seconds, explicit_secs);
    assert_eq!(agent.recovery_source, Src::Explicit as i32);
    assert_eq!(
        agent.exhaustion_reason,
        pb::ExhaustionReason::Billing as i32
    );
}

// ---------------------------------------------------------------------------
// The fixture of real forms (tests/fixtures/recovery/forms.json), through
// ReportExhausted and ExplainRecovery on the real clock
// ---------------------------------------------------------------------------

use chrono::{DateTime, Datelike, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

const FORMS: &str = include_str!("../fixtures/recovery/forms.json");

fn ts_of(ts: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32).unwrap()
}

/// The fixture's placeholders against `now` (the same expansion as the
/// domain test's `expand_template`).
fn expand(text: &str, now: DateTime<Utc>, form: &Value) -> String {
    let re = regex::Regex::new(r"\{(epoch|epoch_ms|codex_at)\+([0-9]+)\}").unwrap();
    re.replace_all(text, |caps: &regex::Captures<'_>| {
        let at = now + chrono::Duration::seconds(caps[2].parse().unwrap());
        match &caps[1] {
            "epoch" => at.timestamp().to_string(),
            "epoch_ms" => at.timestamp_millis().to_string(),
            _ => {
                let zone: Tz = form["time_zone"].as_str().unwrap_or("UTC").parse().unwrap();
                let local = at.with_timezone(&zone);
                let day = local.day();
                let suffix = match (day % 10, day % 100) {
                    (_, 11..=13) => "th",
                    (1, _) => "st",
                    (2, _) => "nd",
                    (3, _) => "rd",
                    _ => "th",
                };
                format!(
                    "{} {day}{suffix}, {}",
                    local.format("%b"),
                    local.format("%Y %-I:%M %p")
                )
            }
        }
    })
    .into_owned()
}

/// The next time the clock in `zone` shows `hh:mm` after `after`, computed
/// here independently of the server.
fn next_occurrence(zone: Tz, hh_mm: &str, after: DateTime<Utc>) -> DateTime<Utc> {
    let (h, m) = hh_mm.split_once(':').unwrap();
    let (h, m): (u32, u32) = (h.parse().unwrap(), m.parse().unwrap());
    let today = after.with_timezone(&zone).date_naive();
    (0..=2)
        .filter_map(|d| {
            let date = today + chrono::Days::new(d);
            zone.from_local_datetime(&date.and_hms_opt(h, m, 0)?)
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .find(|t| *t > after)
        .unwrap()
}

fn source_name(value: i32) -> &'static str {
    Src::try_from(value)
        .unwrap()
        .as_str_name()
        .strip_prefix("RECOVERY_SOURCE_")
        .unwrap()
}

fn reason_name(value: i32) -> &'static str {
    pb::ExhaustionReason::try_from(value)
        .unwrap()
        .as_str_name()
        .strip_prefix("EXHAUSTION_REASON_")
        .unwrap()
}

fn reason_of(form: &Value) -> i32 {
    match form["reason"].as_str().unwrap_or("RATE_LIMIT") {
        "BILLING" => pb::ExhaustionReason::Billing as i32,
        _ => pb::ExhaustionReason::RateLimit as i32,
    }
}

/// Checks an inferred time against the form's `check`, given the server's
/// `now` for that call and the time the placeholders were expanded at.
fn check_time(form: &Value, got: DateTime<Utc>, now: DateTime<Utc>, expanded_at: DateTime<Utc>) {
    let name = form["name"].as_str().unwrap();
    let fixed_now: DateTime<Utc> = FORMS_NOW.parse().unwrap();
    let expected_fixed: DateTime<Utc> = form["expect"]["recovery_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let offset = || chrono::Duration::seconds(form["offset_seconds"].as_i64().unwrap());
    match form["check"].as_str().unwrap() {
        "delay" => assert_eq!(got - now, expected_fixed - fixed_now, "{name}"),
        "epoch" => assert_eq!(
            got.timestamp_millis(),
            (expanded_at + offset()).timestamp() * 1000,
            "{name}"
        ),
        "minute" => {
            let at = expanded_at + offset();
            assert_eq!(
                got.timestamp(),
                at.timestamp() - at.timestamp() % 60,
                "{name}"
            );
        }
        "wall_clock" => {
            assert!(
                got > now && got <= now + chrono::Duration::hours(24),
                "{name}: {got} from {now}"
            );
            let zone: Tz = form["zone"].as_str().unwrap().parse().unwrap();
            let expected = next_occurrence(zone, form["wall_clock"].as_str().unwrap(), now);
            assert_eq!(got, expected, "{name}");
        }
        other => panic!("{name}: unknown check {other}"),
    }
}

static FORMS_NOW: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let fixture: Value = serde_json::from_str(FORMS).unwrap();
    fixture["now"].as_str().unwrap().to_owned()
});

#[tokio::test]
async fn every_real_form_in_the_fixture_through_report_exhausted_and_explain_recovery() {
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.sweep_interval = std::time::Duration::from_secs(3600);
    let app = TestApp::spawn_with(args).await;
    let fixture: Value = serde_json::from_str(FORMS).unwrap();
    let forms = fixture["forms"].as_array().unwrap();
    assert!(forms.len() >= 20);
    for (i, form) in forms.iter().enumerate() {
        let name = form["name"].as_str().unwrap();
        let agent_id = format!("form-{i}");
        let mut labels = std::collections::HashMap::new();
        if let Some(zone) = form["agent_time_zone"].as_str() {
            labels.insert("time_zone".to_string(), zone.to_string());
        }
        app.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: agent_id.clone(),
                labels,
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
        let expanded_at = Utc::now();
        let message = expand(form["message"].as_str().unwrap_or(""), expanded_at, form);
        let headers: Vec<pb::Header> = form["headers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|h| {
                header(
                    h[0].as_str().unwrap(),
                    &expand(h[1].as_str().unwrap(), expanded_at, form),
                )
            })
            .collect();
        let time_zone = form["time_zone"].as_str().unwrap_or("").to_owned();
        let expect = &form["expect"];

        let explained = app
            .agents
            .clone()
            .explain_recovery(pb::ExplainRecoveryRequest {
                reason: reason_of(form),
                headers: headers.clone(),
                message: message.clone(),
                time_zone: time_zone.clone(),
                agent_id: agent_id.clone(),
                recovery_at: None,
                window: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            source_name(explained.recovery_source),
            expect["source"],
            "{name}"
        );
        // The quota window the report is for, where the form says.
        if let Some(window) = expect["window"].as_str() {
            let shown = pb::QuotaWindow::try_from(explained.window)
                .unwrap()
                .as_str_name();
            assert_eq!(
                shown.strip_prefix("QUOTA_WINDOW_"),
                Some(window),
                "{name}: {}",
                explained.window_evidence
            );
        }
        assert_eq!(reason_name(explained.reason), expect["reason"], "{name}");
        let hint = expand(expect["hint_contains"].as_str().unwrap(), expanded_at, form);
        assert!(
            explained.recovery_hint.contains(&hint),
            "{name}: {}",
            explained.recovery_hint
        );
        check_time(
            form,
            ts_of(explained.recovery_at.as_ref().unwrap()),
            ts_of(explained.now.as_ref().unwrap()),
            expanded_at,
        );

        let resp = app
            .agents
            .clone()
            .report_exhausted(pb::ReportExhaustedRequest {
                agent_id: agent_id.clone(),
                reason: reason_of(form),
                recovery_at: None,
                headers,
                message,
                time_zone,
                fencing_token: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let agent = resp.agent.unwrap();
        let transition = resp.transition.unwrap();
        assert_eq!(agent.status, pb::AgentStatus::Exhausted as i32, "{name}");
        assert_eq!(
            source_name(agent.recovery_source),
            expect["source"],
            "{name}"
        );
        assert_eq!(
            reason_name(agent.exhaustion_reason),
            expect["reason"],
            "{name}"
        );
        assert_eq!(
            transition.exhaustion_reason, agent.exhaustion_reason,
            "{name}"
        );
        assert!(
            agent.recovery_hint.contains(&hint),
            "{name}: {}",
            agent.recovery_hint
        );
        check_time(
            form,
            ts_of(agent.recovery_at.as_ref().unwrap()),
            ts_of(transition.occurred_at.as_ref().unwrap()),
            expanded_at,
        );
    }
}

#[tokio::test]
async fn unknown_zones_are_refused_in_requests_and_ignored_in_labels() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut agents = app.agents.clone();
    agents
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "z".into(),
            labels: [("time_zone".to_string(), "Mars/Olympus".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap();
    let err = agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "z".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "resets 2am".into(),
            time_zone: "Atlantis/Capital".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("\"Atlantis/Capital\""),
        "{}",
        err.message()
    );
    let err = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            time_zone: "Atlantis/Capital".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("\"Atlantis/Capital\""),
        "{}",
        err.message()
    );
    assert_eq!(app.get("z").await.status, pb::AgentStatus::Idle as i32);

    // The label's unknown zone falls back to UTC.
    let resp = agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "z".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "resets 2am".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = ts_of(resp.agent.unwrap().recovery_at.as_ref().unwrap());
    let occurred = ts_of(resp.transition.unwrap().occurred_at.as_ref().unwrap());
    assert_eq!(got, next_occurrence(Tz::UTC, "02:00", occurred));
}

#[tokio::test]
async fn explain_recovery_reads_but_never_writes() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut agents = app.agents.clone();
    let before = app.register("x").await;

    let err = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            agent_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("ghost"), "{}", err.message());
    let err = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            agent_id: "bad id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            headers: (0..65).map(|i| header(&format!("h{i}"), "1")).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("headers has 65 entries"),
        "{}",
        err.message()
    );
    let err = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            message: "m".repeat(64 * 1024 + 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // With nothing to read: the default, as a rate limit.
    let r = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            agent_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.recovery_source, Src::Default as i32);
    assert_eq!(r.reason, pb::ExhaustionReason::RateLimit as i32);
    assert_eq!(r.recovery_hint, "default 5h");
    let now = ts_of(r.now.as_ref().unwrap());
    assert_eq!(
        ts_of(r.recovery_at.as_ref().unwrap()) - now,
        chrono::Duration::hours(5)
    );
    // An explicit time wins, as in ReportExhausted.
    let explicit = prost_types::Timestamp {
        seconds: now.timestamp() + 600,
        nanos: 0,
    };
    let r = agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            recovery_at: Some(explicit),
            message: "try again in 2 hours".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.recovery_source, Src::Explicit as i32);
    assert_eq!(r.recovery_at, Some(explicit));

    let after = app.get("x").await;
    assert_eq!(after.status, pb::AgentStatus::Idle as i32);
    assert_eq!(after.revision, before.revision);
    assert!(app.history("x").await.len() == 1, "only the registration");
}
