use super::*;
use chrono::TimeZone;
use proptest::prelude::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn secs(s: i64) -> Duration {
    Duration::seconds(s)
}

fn name(s: &str) -> PoolName {
    pool_name("quota_pool", s).expect("a valid name")
}

fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn report(headers: &[(&str, &str)], message: &str) -> ExhaustionReport {
    ExhaustionReport {
        reason: ExhaustionReason::RateLimit,
        explicit_recovery_at: None,
        headers: hdrs(headers),
        message: message.into(),
        time_zone: None,
        default_recovery: Duration::hours(5),
        default_billing_recovery: Duration::hours(24),
    }
}

fn window_of(headers: &[(&str, &str)], message: &str) -> Window {
    infer_window(&report(headers, message), None, t0()).window
}

fn park_for(until: DateTime<Utc>, by: &str) -> WindowPark {
    WindowPark {
        until,
        source: ParkSource::Report(RecoverySource::Message),
        hint: format!("report of {by}"),
        reported_by: by.into(),
        reported_at: t0(),
    }
}

/// A pool parked for `window` until `t0 + secs`.
fn parked(window: Window, secs_: i64) -> PoolState {
    let mut pool = PoolState::default();
    pool.park(window, park_for(t0() + secs(secs_), "a1"), t0());
    pool
}

fn agent(status: AgentStatus, exhaustion: Option<Exhaustion>) -> AgentState {
    AgentState {
        status,
        last_heartbeat_at: t0(),
        exhaustion,
    }
}

fn own(until: DateTime<Utc>) -> Exhaustion {
    Exhaustion {
        reason: ExhaustionReason::RateLimit,
        recovery: RecoveryEstimate {
            recovery_at: until,
            source: RecoverySource::RetryAfterHeader,
            hint: "retry-after: 60".into(),
        },
    }
}

// ---------------------------------------------------------------------------
// Names and membership

#[test]
fn pool_names_are_1_to_128_characters_of_the_charset() {
    for ok in [
        "anthropic/acct-42",
        "anthropic/acct-42/opus",
        "openai:org-7/gpt-4o",
        "key_1.prod",
        "a",
        &"p".repeat(MAX_POOL_NAME),
    ] {
        assert_eq!(pool_name("quota_pool", ok).unwrap().as_str(), ok);
        assert!(PoolName::is_valid(ok), "{ok}");
    }
    for bad in [
        "",
        "with space",
        "acct@42",
        "a*",
        "é",
        "tab\t",
        &"p".repeat(MAX_POOL_NAME + 1),
    ] {
        let err = pool_name("quota_pools[2]", bad).unwrap_err();
        assert_eq!(err.field, "quota_pools[2]", "{bad:?}");
        assert!(err.to_string().starts_with("quota_pools[2] "), "{err}");
        assert!(err.to_string().contains(POOL_NAME_RULE), "{err}");
    }
    assert!(POOL_NAME_RULE.contains(&MAX_POOL_NAME.to_string()));
}

#[test]
fn a_long_bad_name_is_not_echoed_whole() {
    let bad = format!("{} x", "p".repeat(10_000));
    let err = pool_name("quota_pool", &bad).unwrap_err();
    assert!(err.to_string().len() < 300, "{err}");
    assert!(err.problem.contains('…'));
}

#[test]
fn a_pool_list_keeps_its_order_and_refuses_repeats_and_excess() {
    let list = ["anthropic/acct-42", "anthropic/acct-42/opus", "b"];
    let pools = pool_names("quota_pools", &list).unwrap();
    let got: Vec<&str> = pools.iter().map(PoolName::as_str).collect();
    assert_eq!(got, list);
    assert_eq!(pool_names::<&str>("quota_pools", &[]), Ok(vec![]));

    let err = pool_names("quota_pools", &["a", "b", "a b"]).unwrap_err();
    assert_eq!(err.field, "quota_pools[2]");

    let err = pool_names("quota_pools", &["a", "b", "c", "b"]).unwrap_err();
    assert_eq!(err.field, "quota_pools[3]");
    assert_eq!(
        err.to_string(),
        "quota_pools[3] \"b\" repeats quota_pools[1]"
    );

    let sixteen: Vec<String> = (0..MAX_POOLS_PER_AGENT).map(|i| format!("p{i}")).collect();
    assert_eq!(pool_names("quota_pools", &sixteen).unwrap().len(), 16);
    let seventeen: Vec<String> = (0..=MAX_POOLS_PER_AGENT).map(|i| format!("p{i}")).collect();
    let err = pool_names("quota_pools", &seventeen).unwrap_err();
    assert_eq!(err.field, "quota_pools");
    assert_eq!(
        err.to_string(),
        "quota_pools has 17 entries, at most 16 allowed"
    );
}

#[test]
fn a_report_parks_the_named_pool_or_the_only_one_or_the_agent() {
    let acct = name("anthropic/acct-42");
    let opus = name("anthropic/acct-42/opus");
    let one = [acct.clone()];
    let two = [acct.clone(), opus.clone()];
    assert_eq!(
        report_target("a1", None, &one),
        Ok(ReportTarget::Pool(acct.clone()))
    );
    assert_eq!(report_target("a1", None, &two), Ok(ReportTarget::Agent));
    assert_eq!(report_target("a1", None, &[]), Ok(ReportTarget::Agent));
    assert_eq!(
        report_target("a1", Some(&opus), &two),
        Ok(ReportTarget::Pool(opus.clone()))
    );
    let err = report_target("a1", Some(&opus), &one).unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent \"a1\" is not a member of quota pool \"anthropic/acct-42/opus\"; \
         its pools: \"anthropic/acct-42\""
    );
    let err = report_target("a1", Some(&opus), &[]).unwrap_err();
    assert!(err.to_string().ends_with("; it is in no pool"), "{err}");
}

// ---------------------------------------------------------------------------
// Windows

#[test]
fn windows_round_trip_through_their_spelling() {
    for window in Window::ALL {
        assert_eq!(Window::parse(window.as_str()), Some(window));
        assert_eq!(stated_window("window", window.as_str()), Ok(Some(window)));
    }
    assert_eq!(Window::parse("five_hour"), None);
    assert_eq!(stated_window("window", ""), Ok(None));
    assert_eq!(stated_window("window", "UNSPECIFIED"), Ok(None));
    let err = stated_window("window", "MONTHLY").unwrap_err();
    assert_eq!(
        err.to_string(),
        "window \"MONTHLY\" is not one of FIVE_HOUR, WEEKLY, REQUESTS, TOKENS, BILLING, OTHER"
    );
    assert_eq!(Window::Billing.reason(), ExhaustionReason::Billing);
    assert_eq!(Window::Weekly.reason(), ExhaustionReason::RateLimit);
}

#[test]
fn claude_code_messages_name_their_window() {
    let cases = [
        ("5-hour limit reached ∙ resets 2am", Window::FiveHour),
        (
            "You've hit your session limit · resets 12:50am (America/Los_Angeles)",
            Window::FiveHour,
        ),
        (
            "You've hit your weekly limit · resets 3am (Europe/London)",
            Window::Weekly,
        ),
        (
            "Opus weekly limit reached ∙ resets Oct 9, 2am",
            Window::Weekly,
        ),
        ("Claude AI usage limit reached|1772373600", Window::Other),
        (
            "You're out of extra usage · resets 11:30am (Asia/Colombo)",
            Window::Other,
        ),
        (
            "You've hit your usage limit. Upgrade to Pro (https://chatgpt.com/explore/pro), \
             or try again in 5 days 22 hours 11 minutes.",
            Window::Other,
        ),
        ("", Window::Other),
    ];
    for (message, window) in cases {
        let inferred = infer_window(&report(&[], message), None, t0());
        assert_eq!(inferred.window, window, "{message}: {inferred:?}");
    }
    let inferred = infer_window(
        &report(&[], "5-hour limit reached ∙ resets 2am"),
        None,
        t0(),
    );
    assert_eq!(inferred.evidence, "message: \"5-hour limit\"");
}

#[test]
fn stream_json_rate_limit_type_names_the_window_unless_allowed() {
    let event = |status: &str, kind: &str| {
        format!(
            r#"{{"type":"rate_limit_event","rate_limit_info":{{"status":"{status}","resetsAt":1772380800,"rateLimitType":"{kind}","overageStatus":"rejected"}},"session_id":"s"}}"#
        )
    };
    let inferred = infer_window(&report(&[], &event("rejected", "five_hour")), None, t0());
    assert_eq!(inferred.window, Window::FiveHour);
    assert_eq!(
        inferred.evidence,
        "rate_limit_info.rateLimitType: five_hour"
    );
    for kind in ["seven_day", "seven_day_opus", "seven_day_sonnet"] {
        assert_eq!(
            window_of(&[], &event("rejected", kind)),
            Window::Weekly,
            "{kind}"
        );
    }
    assert_eq!(window_of(&[], &event("rejected", "overage")), Window::Other);
    // A warning event is not what stopped the agent.
    assert_eq!(
        window_of(&[], &event("allowed_warning", "seven_day")),
        Window::Other
    );
    // Flat fields, and a transcript of lines whose last event is the rejection.
    let flat = r#"{"type":"rate_limit_event","status":"rejected","resetsAt":1772380800,"rateLimitType":"seven_day"}"#;
    assert_eq!(window_of(&[], flat), Window::Weekly);
    let lines = format!(
        "{}\n{}\n",
        event("allowed_warning", "five_hour"),
        event("rejected", "seven_day")
    );
    assert_eq!(window_of(&[], &lines), Window::Weekly);
}

#[test]
fn a_json_body_is_read_by_its_fields_never_by_its_text() {
    let anthropic = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization of 50 requests per minute."}}"#;
    let inferred = infer_window(&report(&[], anthropic), None, t0());
    assert_eq!(inferred.window, Window::Requests);
    assert_eq!(inferred.evidence, "error.message: \"requests per min\"");
    let tokens = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
    assert_eq!(window_of(&[], tokens), Window::Tokens);
    // A phrase in a field that is not read does not count.
    let other = r#"{"detail":"your weekly limit","error":{"type":"usage_limit_reached"}}"#;
    assert_eq!(window_of(&[], other), Window::Other);
}

#[test]
fn openai_messages_and_headers_say_requests_or_tokens() {
    let tpm = "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): \
               Limit 30000, Used 30000, Requested 1200. Please try again in 2.4s.";
    assert_eq!(window_of(&[], tpm), Window::Tokens);
    let rpm = "Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): \
               Limit 500, Used 500, Requested 1.";
    assert_eq!(window_of(&[], rpm), Window::Requests);

    // The exhausted limit decides (remaining 0), as it decides the deadline.
    let tokens_spent = [
        ("x-ratelimit-remaining-requests", "499"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-requests", "120ms"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ];
    let inferred = infer_window(&report(&tokens_spent, ""), None, t0());
    assert_eq!(inferred.window, Window::Tokens);
    assert_eq!(inferred.evidence, "x-ratelimit-reset-tokens: 6m0s");
    let requests_spent = [
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-remaining-tokens", "1200"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ];
    assert_eq!(window_of(&requests_spent, ""), Window::Requests);
    // Without `remaining`, the earliest reset decides, as for the deadline.
    let resets_only = [
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ];
    assert_eq!(window_of(&resets_only, ""), Window::Requests);
    // Headers are trusted over the prose.
    assert_eq!(window_of(&tokens_spent, rpm), Window::Tokens);
}

#[test]
fn anthropic_api_headers_say_requests_or_tokens() {
    let requests = [
        ("retry-after", "27"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", "2026-03-01T12:00:30Z"),
    ];
    assert_eq!(window_of(&requests, ""), Window::Requests);
    let tokens = [
        ("anthropic-ratelimit-input-tokens-remaining", "0"),
        (
            "anthropic-ratelimit-input-tokens-reset",
            "2026-03-01T12:01:00Z",
        ),
        ("anthropic-ratelimit-requests-remaining", "40"),
        ("anthropic-ratelimit-requests-reset", "2026-03-01T12:00:10Z"),
    ];
    assert_eq!(window_of(&tokens, ""), Window::Tokens);
    // retry-after alone names no window.
    assert_eq!(window_of(&[("retry-after", "27")], ""), Window::Other);
}

#[test]
fn claude_subscription_headers_name_the_binding_window() {
    let five = t0().timestamp() + 5400;
    let week = t0().timestamp() + 345_600;
    let (five, week) = (five.to_string(), week.to_string());
    let claim = |claim: &'static str| {
        vec![
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-5h-reset", five.as_str()),
            ("anthropic-ratelimit-unified-7d-reset", week.as_str()),
            ("anthropic-ratelimit-unified-representative-claim", claim),
        ]
    };
    let inferred = infer_window(&report(&claim("five_hour"), ""), None, t0());
    assert_eq!(inferred.window, Window::FiveHour);
    assert_eq!(
        inferred.evidence,
        "anthropic-ratelimit-unified-representative-claim: five_hour"
    );
    assert_eq!(window_of(&claim("seven_day"), ""), Window::Weekly);
    assert_eq!(window_of(&claim("seven_day_opus"), ""), Window::Weekly);

    // No claim: the rejected window's reset decides, as for the deadline.
    let rejected_week = [
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-5h-status", "allowed"),
        ("anthropic-ratelimit-unified-5h-reset", five.as_str()),
        ("anthropic-ratelimit-unified-7d-status", "rejected"),
        ("anthropic-ratelimit-unified-7d-reset", week.as_str()),
    ];
    let inferred = infer_window(&report(&rejected_week, ""), None, t0());
    assert_eq!(inferred.window, Window::Weekly);
    assert!(
        inferred
            .evidence
            .starts_with("anthropic-ratelimit-unified-7d-reset: "),
        "{inferred:?}"
    );
    // Resets only: the earliest.
    let resets = [
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-7d-reset", week.as_str()),
        ("anthropic-ratelimit-unified-5h-reset", five.as_str()),
    ];
    assert_eq!(window_of(&resets, ""), Window::FiveHour);

    // An `allowed` subscription did not stop the agent: its claim says nothing.
    let mut allowed = claim("seven_day");
    allowed[0].1 = "allowed";
    assert_eq!(window_of(&allowed, "tokens per min (TPM)"), Window::Tokens);
}

#[test]
fn billing_stops_are_recognised_as_recovery_recognises_them() {
    let cases = [
        r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        "Error code: 429 - {'error': {'message': 'You exceeded your current quota, please check your plan and billing details.', 'type': 'insufficient_quota', 'param': None, 'code': 'insufficient_quota'}}",
        r#"{"error":{"code":"billing_hard_limit_reached","message":"Billing hard limit has been reached","param":null,"type":"invalid_request_error"}}"#,
        "Your credit balance is too low to access the Anthropic API.",
    ];
    for message in cases {
        let inferred = infer_window(
            &report(&[("x-ratelimit-reset-requests", "20s")], message),
            None,
            t0(),
        );
        assert_eq!(inferred.window, Window::Billing, "{message}");
        assert!(inferred.evidence.starts_with("billing: "), "{inferred:?}");
    }
    let inferred = infer_window(
        &report(&[], r#"{"error":{"code":"insufficient_quota"}}"#),
        None,
        t0(),
    );
    assert_eq!(inferred.evidence, "billing: insufficient_quota");
    // The caller's reason BILLING counts too.
    let mut said = report(&[], "spend cap");
    said.reason = ExhaustionReason::Billing;
    assert_eq!(infer_window(&said, None, t0()).window, Window::Billing);
}

#[test]
fn a_stated_window_wins_over_everything() {
    let billing = report(&[], r#"{"error":{"code":"insufficient_quota"}}"#);
    for window in Window::ALL {
        let inferred = infer_window(&billing, Some(window), t0());
        assert_eq!(inferred.window, window);
        assert_eq!(inferred.evidence, "stated by the caller");
    }
}

/// The window of every form in recovery's fixture of real reports: a form
/// added there must get an expectation here.
#[test]
fn every_recovery_fixture_form_has_its_window() {
    let expected: BTreeMap<&str, Window> = [
        ("claude-code-5-hour-limit-caller-zone", Window::FiveHour),
        (
            "claude-code-5-hour-limit-agent-label-zone",
            Window::FiveHour,
        ),
        ("claude-code-5-hour-limit-utc", Window::FiveHour),
        ("claude-code-session-limit-named-zone", Window::FiveHour),
        ("claude-code-weekly-limit", Window::Weekly),
        ("claude-code-out-of-extra-usage", Window::Other),
        ("claude-code-headless-epoch", Window::Other),
        ("claude-code-stream-json-rejected", Window::FiveHour),
        ("claude-code-stream-json-flat-rejected", Window::FiveHour),
        (
            "claude-code-stream-json-allowed-warning-is-not-a-reset",
            Window::Other,
        ),
        ("anthropic-unified-five-hour-claim", Window::FiveHour),
        ("anthropic-unified-seven-day-claim", Window::Weekly),
        ("anthropic-unified-no-claim-rejected-window", Window::Weekly),
        ("anthropic-unified-no-claim-earliest", Window::FiveHour),
        ("anthropic-api-retry-after", Window::Requests),
        ("codex-usage-limit-date", Window::Other),
        ("codex-usage-limit-compound-duration", Window::Other),
        ("codex-usage-limit-json", Window::Other),
        ("openai-rate-limit-headers", Window::Tokens),
        ("openai-insufficient-quota-json", Window::Billing),
        ("openai-insufficient-quota-sdk-text", Window::Billing),
        ("openai-billing-hard-limit", Window::Billing),
        ("openai-credit-balance-exhausted", Window::Billing),
        ("openai-project-spend-limit", Window::Billing),
    ]
    .into_iter()
    .collect();
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../../tests/fixtures/recovery/forms.json"))
            .expect("fixture is JSON");
    let now = DateTime::parse_from_rfc3339(fixture["now"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let forms = fixture["forms"].as_array().unwrap();
    for form in forms {
        let name = form["name"].as_str().unwrap();
        let expand = |text: &str| recovery::test_support::expand_template(text, now, form);
        let headers: Vec<(String, String)> = form["headers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().into(),
                    expand(h[1].as_str().unwrap()),
                )
            })
            .collect();
        let report = ExhaustionReport {
            headers,
            message: expand(form["message"].as_str().unwrap_or("")),
            ..report(&[], "")
        };
        let want = expected
            .get(name)
            .unwrap_or_else(|| panic!("form {name} has no expected window"));
        let got = infer_window(&report, None, now);
        assert_eq!(got.window, *want, "{name}: {got:?}");
    }
    assert_eq!(forms.len(), expected.len(), "an expectation names no form");
}

// ---------------------------------------------------------------------------
// Pool state

#[test]
fn a_report_parks_a_window_and_the_pool_with_it() {
    let mut pool = PoolState::default();
    assert!(!pool.is_parked(t0()));
    assert_eq!(pool.parked_until(t0()), None);
    assert_eq!(pool.deadline(), None);
    let until = t0() + Duration::hours(2);
    assert_eq!(
        pool.park(Window::FiveHour, park_for(until, "a1"), t0()),
        Parked::NewEpisode
    );
    assert!(pool.is_parked(t0()));
    assert_eq!(pool.parked_until(t0()), Some(until));
    assert_eq!(pool.binding_window(t0()).unwrap().0, Window::FiveHour);
    assert!(pool.is_parked(until - Duration::microseconds(1)));
    assert!(!pool.is_parked(until), "a window lifts at its deadline");
    assert_eq!(pool.deadline(), Some(until));
}

#[test]
fn a_later_report_never_shortens_a_window() {
    let mut pool = parked(Window::FiveHour, 3600);
    let longer = park_for(t0() + secs(7200), "a2");
    assert_eq!(
        pool.park(Window::FiveHour, longer.clone(), t0() + secs(10)),
        Parked::Extended
    );
    assert_eq!(pool.windows[&Window::FiveHour], longer);
    let shorter = park_for(t0() + secs(60), "a3");
    assert_eq!(
        pool.park(Window::FiveHour, shorter, t0() + secs(20)),
        Parked::Kept
    );
    assert_eq!(
        pool.windows[&Window::FiveHour],
        longer,
        "source, hint and reporter are the longer report's"
    );
    let equal = park_for(t0() + secs(7200), "a4");
    assert_eq!(
        pool.park(Window::FiveHour, equal, t0() + secs(30)),
        Parked::Kept
    );
    assert_eq!(pool.windows[&Window::FiveHour].reported_by, "a2");
}

#[test]
fn windows_are_kept_apart_and_the_pool_is_parked_while_any_is() {
    let mut pool = parked(Window::Requests, 60);
    let week = t0() + Duration::days(4);
    assert_eq!(
        pool.park(Window::Weekly, park_for(week, "a2"), t0()),
        Parked::Added
    );
    assert_eq!(pool.windows.len(), 2);
    assert_eq!(pool.parked_until(t0()), Some(week));
    assert_eq!(pool.binding_window(t0()).unwrap().0, Window::Weekly);
    // The minute passes: still parked for the week.
    let later = t0() + secs(61);
    assert!(pool.is_parked(later));
    assert_eq!(pool.parked_until(later), Some(week));
    // A lifted window parked again joins as new (its old deadline is past).
    assert_eq!(
        pool.park(Window::Requests, park_for(later + secs(60), "a3"), later),
        Parked::Added
    );
    assert_eq!(pool.windows.len(), 2);
}

#[test]
fn a_deadline_already_past_parks_nobody() {
    let mut pool = PoolState::default();
    assert_eq!(
        pool.park(Window::Requests, park_for(t0(), "a1"), t0()),
        Parked::NotParked
    );
    assert_eq!(pool, PoolState::default());
    let mut pool = parked(Window::Weekly, 3600);
    let before = pool.clone();
    assert_eq!(
        pool.park(Window::Requests, park_for(t0() - secs(5), "a1"), t0()),
        Parked::NotParked
    );
    assert_eq!(pool, before);
}

#[test]
fn a_report_after_the_lift_starts_a_new_episode() {
    let mut pool = parked(Window::FiveHour, 60);
    pool.park(Window::Requests, park_for(t0() + secs(30), "a1"), t0());
    let lifted = t0() + secs(90);
    pool.canary_released("a1", lifted);
    let again = park_for(lifted + secs(600), "a1");
    assert_eq!(
        pool.park(Window::Tokens, again.clone(), lifted),
        Parked::NewEpisode
    );
    assert_eq!(pool.windows, BTreeMap::from([(Window::Tokens, again)]));
    assert_eq!(pool.canary, None, "the release stopped");
}

#[test]
fn an_operator_sets_a_window_exactly_and_releases_all_now() {
    let mut pool = parked(Window::Weekly, 86_400);
    // Shorten: the operator's time is the truth.
    assert_eq!(
        pool.operator_park(
            Window::Weekly,
            t0() + secs(600),
            "ops",
            "limit raised",
            t0()
        ),
        Parked::Shortened
    );
    let w = &pool.windows[&Window::Weekly];
    assert_eq!(w.until, t0() + secs(600));
    assert_eq!(w.source, ParkSource::Operator);
    assert_eq!(w.hint, "parked by ops: limit raised");
    assert_eq!(w.reported_by, "ops");
    // Extend, add another window.
    assert_eq!(
        pool.operator_park(Window::Weekly, t0() + secs(900), "ops", "", t0()),
        Parked::Extended
    );
    // The same time again: kept, first reason and all.
    assert_eq!(
        pool.operator_park(Window::Weekly, t0() + secs(900), "ops2", "again", t0()),
        Parked::Kept
    );
    assert_eq!(pool.windows[&Window::Weekly].reported_by, "ops");
    assert_eq!(
        pool.operator_park(Window::Billing, t0() + secs(1800), "ops", "invoice", t0()),
        Parked::Added
    );
    // A past time lifts that window only.
    assert_eq!(
        pool.operator_park(Window::Billing, t0() - secs(1), "ops", "paid", t0()),
        Parked::Shortened
    );
    assert_eq!(pool.parked_until(t0()), Some(t0() + secs(900)));
    // Release: everything ends now.
    let now = t0() + secs(100);
    assert!(pool.operator_release(now));
    assert!(!pool.is_parked(now));
    assert_eq!(pool.deadline(), Some(now));
    assert!(!pool.operator_release(now), "nothing left in force");
    // Parking a lifted pool in the past changes nothing.
    let before = pool.clone();
    assert_eq!(
        pool.operator_park(Window::Other, now - secs(1), "ops", "", now),
        Parked::NotParked
    );
    assert_eq!(pool, before);
    // ... and in the future starts a new episode.
    assert_eq!(
        pool.operator_park(Window::Other, now + secs(60), "ops", "hold", now),
        Parked::NewEpisode
    );
}

#[test]
fn an_operators_park_time_is_bounded_like_an_explicit_recovery() {
    assert_eq!(
        check_park_until("until", t0() + secs(60), t0()),
        Ok(t0() + secs(60))
    );
    assert_eq!(
        check_park_until("until", t0() - secs(60), t0()),
        Ok(t0() - secs(60))
    );
    let err = check_park_until("until", t0() + Duration::days(400), t0()).unwrap_err();
    assert_eq!(err.field, "until");
    assert!(err.to_string().starts_with("until 2027-"), "{err}");
    assert!(err.to_string().contains("366 days"), "{err}");
}

#[test]
fn park_sources_round_trip() {
    for source in RecoverySource::ALL {
        let s = ParkSource::Report(source);
        assert_eq!(ParkSource::parse(s.as_str()), Some(s));
        assert_eq!(s.recovery_source(), source);
    }
    assert_eq!(ParkSource::parse("OPERATOR"), Some(ParkSource::Operator));
    assert_eq!(
        ParkSource::Operator.recovery_source(),
        RecoverySource::Explicit
    );
    assert_eq!(ParkSource::parse("operator"), None);
}

#[test]
fn a_pool_report_infers_deadline_and_window_from_one_report() {
    let headers = [
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-5h-reset", "1772380800"),
        (
            "anthropic-ratelimit-unified-representative-claim",
            "five_hour",
        ),
    ];
    let r = pool_report(&report(&headers, ""), &Labels::new(), None, "a1", t0());
    assert_eq!(r.window, Window::FiveHour);
    assert_eq!(r.park.until, Utc.timestamp_opt(1_772_380_800, 0).unwrap());
    assert_eq!(
        r.park.source,
        ParkSource::Report(RecoverySource::ProviderResetHeader)
    );
    assert_eq!(r.park.reported_by, "a1");
    assert_eq!(r.park.reported_at, t0());
    let stated = pool_report(
        &report(&headers, ""),
        &Labels::new(),
        Some(Window::Weekly),
        "a1",
        t0(),
    );
    assert_eq!(stated.window, Window::Weekly);
    assert_eq!(stated.park.until, r.park.until);
}

#[test]
fn a_pool_shows_its_binding_window_to_the_members_it_holds() {
    let acct = name("anthropic/acct-42");
    let mut pool = parked(Window::FiveHour, 3600);
    pool.park(Window::Billing, park_for(t0() + secs(7200), "a2"), t0());
    let e = pool.exhaustion(&acct, t0()).unwrap();
    assert_eq!(e.reason, ExhaustionReason::Billing);
    assert_eq!(e.recovery.recovery_at, t0() + secs(7200));
    assert_eq!(e.recovery.source, RecoverySource::Message);
    assert_eq!(
        e.recovery.hint,
        "quota pool anthropic/acct-42 parked (BILLING): report of a2"
    );
    // Lifted: the last deadline, saying so.
    let e = pool.exhaustion(&acct, t0() + secs(8000)).unwrap();
    assert_eq!(e.recovery.recovery_at, t0() + secs(7200));
    assert!(e.recovery.hint.contains("lifted"), "{e:?}");
    assert_eq!(PoolState::default().exhaustion(&acct, t0()), None);
    // Hints stay bounded.
    let mut long = PoolState::default();
    let mut p = park_for(t0() + secs(60), "a1");
    p.hint = "x".repeat(1000);
    long.park(Window::Other, p, t0());
    let e = long.exhaustion(&acct, t0()).unwrap();
    assert_eq!(e.recovery.hint.chars().count(), MAX_HINT_CHARS);
}

#[test]
fn the_canary_is_recorded_once_and_completes_once() {
    let mut pool = PoolState::default();
    assert!(!pool.canary_completed("a1", t0()));
    assert!(pool.canary_released("a1", t0()));
    assert!(
        !pool.canary_released("a2", t0() + secs(1)),
        "first one stands"
    );
    assert!(
        !pool.canary_completed("a2", t0() + secs(5)),
        "not the canary"
    );
    assert!(pool.canary_completed("a1", t0() + secs(5)));
    assert!(!pool.canary_completed("a1", t0() + secs(9)));
    let canary = pool.canary.unwrap();
    assert_eq!(canary.agent_id, "a1");
    assert_eq!(canary.completed_at, Some(t0() + secs(5)));
}

#[test]
fn only_a_finished_work_slot_completes_the_canary() {
    use AgentStatus::*;
    assert!(completes_canary(Busy, Cause::WorkFinished));
    assert!(completes_canary(Busy, Cause::ClaimReleased));
    assert!(!completes_canary(Busy, Cause::ClaimExpired));
    assert!(!completes_canary(OnCall, Cause::WorkFinished));
    assert!(!completes_canary(Busy, Cause::Exhausted));
    assert!(!completes_canary(Idle, Cause::Claimed));
}

// ---------------------------------------------------------------------------
// Members

/// The member's pools: (name, state, holds).
fn member_pools<'a>(pools: &'a [(PoolName, PoolState, bool)]) -> Vec<MemberPool<'a>> {
    pools
        .iter()
        .map(|(name, state, holds)| MemberPool {
            name,
            state,
            holds: *holds,
        })
        .collect()
}

#[test]
fn causes_are_spelled_as_transitions_are() {
    let spelled: Vec<&str> = PoolCause::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(spelled, ["EXHAUSTED", "POOL_EXHAUSTED", "POOL_RELEASED"]);
    for cause in PoolCause::ALL {
        assert_eq!(cause.agent_cause().as_str(), cause.as_str());
        assert_eq!(Cause::parse(cause.as_str()), Some(cause.agent_cause()));
    }
}

#[test]
fn an_idle_member_is_parked_in_the_same_commit() {
    let acct = name("anthropic/acct-42");
    let pools = [(acct.clone(), parked(Window::FiveHour, 3600), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Idle, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let OnPark::Park(d) = member.on_pool_parked(&acct, t0()) else {
        panic!("parked")
    };
    assert_eq!(
        d.change,
        Some(PoolChange {
            from: AgentStatus::Idle,
            to: AgentStatus::Exhausted,
            cause: PoolCause::PoolExhausted,
            pool: acct.clone(),
        })
    );
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    assert_eq!(d.state.last_heartbeat_at, t0());
    let e = d.state.exhaustion.unwrap();
    assert_eq!(e.recovery.recovery_at, t0() + secs(3600));
    assert_eq!(e.reason, ExhaustionReason::RateLimit);
    assert!(
        e.recovery
            .hint
            .starts_with("quota pool anthropic/acct-42 parked (FIVE_HOUR)"),
        "{e:?}"
    );
    assert_eq!(d.holds, BTreeSet::from([acct.clone()]));
    assert!(!member.claimable(t0()));
}

#[test]
fn busy_and_offline_members_are_parked_later_and_held_ones_not_again() {
    let acct = name("acct");
    for (status, expected) in [
        (AgentStatus::Busy, OnPark::AtSlotEnd),
        (AgentStatus::OnCall, OnPark::AtSlotEnd),
        (AgentStatus::Offline, OnPark::OnReturn),
    ] {
        let pools = [(acct.clone(), parked(Window::Weekly, 3600), false)];
        let pools = member_pools(&pools);
        let state = agent(status, None);
        let member = Member {
            state: &state,
            own: None,
            pools: &pools,
        };
        assert_eq!(member.on_pool_parked(&acct, t0()), expected, "{status}");
    }
    // Already held (the pool extended by a later report): unchanged.
    let pools = [(acct.clone(), parked(Window::Weekly, 3600), true)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Exhausted, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert_eq!(member.on_pool_parked(&acct, t0()), OnPark::Unchanged);
    // Not parked, or not a member: unchanged.
    let pools = [(acct.clone(), PoolState::default(), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Idle, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert_eq!(member.on_pool_parked(&acct, t0()), OnPark::Unchanged);
    assert_eq!(
        member.on_pool_parked(&name("other"), t0()),
        OnPark::Unchanged
    );
}

#[test]
fn an_exhausted_member_is_held_and_shows_the_later_recovery() {
    let acct = name("acct");
    let mine = own(t0() + secs(600));
    // The pool runs longer: a transition shows the new time.
    let pools = [(acct.clone(), parked(Window::FiveHour, 3600), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Exhausted, Some(mine.clone()));
    let member = Member {
        state: &state,
        own: Some(&mine),
        pools: &pools,
    };
    let OnPark::Park(d) = member.on_pool_parked(&acct, t0()) else {
        panic!("held")
    };
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    let change = d.change.unwrap();
    assert_eq!(
        (change.from, change.to, change.cause),
        (
            AgentStatus::Exhausted,
            AgentStatus::Exhausted,
            PoolCause::PoolExhausted
        )
    );
    assert_eq!(
        d.state.exhaustion.unwrap().recovery.recovery_at,
        t0() + secs(3600)
    );
    assert_eq!(d.holds, BTreeSet::from([acct.clone()]));
    // Its own runs longer: held, no transition, its own time shown.
    let long = own(t0() + secs(7200));
    let state = agent(AgentStatus::Exhausted, Some(long.clone()));
    let member = Member {
        state: &state,
        own: Some(&long),
        pools: &pools,
    };
    let OnPark::Park(d) = member.on_pool_parked(&acct, t0()) else {
        panic!("held")
    };
    assert_eq!(d.change, None);
    assert_eq!(d.state.exhaustion, Some(long));
    assert_eq!(d.holds, BTreeSet::from([acct]));
}

#[test]
fn the_reporter_is_exhausted_by_its_report_and_held_by_the_pool() {
    let acct = name("acct");
    for status in AgentStatus::ALL {
        let pools = [(acct.clone(), parked(Window::Tokens, 60), false)];
        let pools = member_pools(&pools);
        let state = agent(status, None);
        let member = Member {
            state: &state,
            own: None,
            pools: &pools,
        };
        let d = member.on_report(&acct, t0()).unwrap();
        assert_eq!(
            d.change,
            Some(PoolChange {
                from: status,
                to: AgentStatus::Exhausted,
                cause: PoolCause::Reported,
                pool: acct.clone(),
            })
        );
        assert_eq!(d.holds, BTreeSet::from([acct.clone()]));
        assert_eq!(
            d.state.exhaustion.unwrap().recovery.recovery_at,
            t0() + secs(60)
        );
    }
    // A report whose deadline had passed parks no pool: decided as one agent's.
    let pools = [(acct.clone(), PoolState::default(), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Busy, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert_eq!(member.on_report(&acct, t0()), None);
}

#[test]
fn a_slot_that_ends_while_the_pool_is_parked_lands_exhausted() {
    let acct = name("acct");
    let pools = [(acct.clone(), parked(Window::FiveHour, 3600), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Busy, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let finished = agent::decide(&state, &Labels::new(), agent::Event::FinishWork, t0()).unwrap();
    let d = member
        .on_arrival(AgentStatus::Busy, &finished.state, t0() + secs(10))
        .unwrap();
    assert_eq!(
        d.change,
        Some(PoolChange {
            from: AgentStatus::Busy,
            to: AgentStatus::Exhausted,
            cause: PoolCause::PoolExhausted,
            pool: acct.clone(),
        })
    );
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    assert_eq!(d.holds, BTreeSet::from([acct]));
    // After the lift the state machine's IDLE stands.
    assert_eq!(
        member.on_arrival(AgentStatus::Busy, &finished.state, t0() + secs(3600)),
        None
    );
}

#[test]
fn an_offline_member_returns_exhausted_while_the_pool_is_parked() {
    let acct = name("acct");
    let pools = [(acct.clone(), parked(Window::Weekly, 3600), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Offline, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let back = t0() + secs(120);
    let returned = agent::decide(&state, &Labels::new(), agent::Event::Heartbeat, back).unwrap();
    assert_eq!(returned.state.status, AgentStatus::Idle);
    let d = member
        .on_arrival(AgentStatus::Offline, &returned.state, back)
        .unwrap();
    let change = d.change.unwrap();
    assert_eq!(
        (change.from, change.to),
        (AgentStatus::Offline, AgentStatus::Exhausted)
    );
    assert_eq!(d.state.last_heartbeat_at, back);

    // Its own exhaustion still running: the state machine's transition stands,
    // showing the later of the two.
    let mine = own(t0() + secs(600));
    let state = agent(AgentStatus::Offline, Some(mine.clone()));
    let member = Member {
        state: &state,
        own: Some(&mine),
        pools: &pools,
    };
    let returned = agent::decide(&state, &Labels::new(), agent::Event::Heartbeat, back).unwrap();
    assert_eq!(returned.state.status, AgentStatus::Exhausted);
    let d = member
        .on_arrival(AgentStatus::Offline, &returned.state, back)
        .unwrap();
    assert_eq!(d.change, None);
    assert_eq!(
        d.state.exhaustion.unwrap().recovery.recovery_at,
        t0() + secs(3600)
    );
    assert_eq!(d.holds, BTreeSet::from([acct]));
}

#[test]
fn a_member_held_by_a_releasing_pool_returns_exhausted_until_its_turn() {
    let acct = name("acct");
    let pools = [(acct.clone(), parked(Window::Requests, 60), true)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Offline, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let back = t0() + secs(120);
    let idle = agent(AgentStatus::Idle, None);
    let d = member
        .on_arrival(AgentStatus::Offline, &idle, back)
        .unwrap();
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    assert_eq!(d.holds, BTreeSet::from([acct]));
}

#[test]
fn registering_into_a_parked_pool_parks_at_once() {
    let acct = name("anthropic/acct-42");
    let opus = name("anthropic/acct-42/opus");
    let pools = [
        (acct.clone(), parked(Window::FiveHour, 600), false),
        (opus.clone(), parked(Window::Weekly, 86_400), false),
        (name("spare"), PoolState::default(), false),
    ];
    let pools = member_pools(&pools);
    let (state, _) = agent::registered(t0());
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let d = member.on_arrival(AgentStatus::Idle, &state, t0()).unwrap();
    let change = d.change.unwrap();
    assert_eq!(
        (change.from, change.to, change.cause),
        (
            AgentStatus::Idle,
            AgentStatus::Exhausted,
            PoolCause::PoolExhausted
        )
    );
    assert_eq!(change.pool, opus, "named by the pool holding it longest");
    assert_eq!(d.holds, BTreeSet::from([acct, opus]));
    assert_eq!(
        d.state.exhaustion.unwrap().recovery.recovery_at,
        t0() + Duration::days(1)
    );
    // Into pools none of which is parked: nothing.
    let free = [(name("spare"), PoolState::default(), false)];
    let free = member_pools(&free);
    let member = Member {
        state: &state,
        own: None,
        pools: &free,
    };
    assert_eq!(member.on_arrival(AgentStatus::Idle, &state, t0()), None);
    assert!(member.claimable(t0()));
}

#[test]
fn own_exhaustion_and_a_pool_both_must_lift() {
    let acct = name("acct");
    let mine = own(t0() + secs(600));
    let pool = parked(Window::FiveHour, 300);
    let pools = [(acct.clone(), pool, true)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Exhausted, Some(mine.clone()));
    let member = Member {
        state: &state,
        own: Some(&mine),
        pools: &pools,
    };
    assert_eq!(
        member
            .effective_recovery(t0())
            .unwrap()
            .recovery
            .recovery_at,
        t0() + secs(600)
    );
    // Own lifted, pool still holding: no wake by the clock.
    assert!(!member.wakes(t0() + secs(900)));
    // The pool releases it before its own lifted: still EXHAUSTED, own shown.
    let d = member.on_release(&acct, t0() + secs(400)).unwrap();
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    assert_eq!(d.state.exhaustion, Some(mine.clone()));
    let change = d.change.unwrap();
    assert_eq!(
        (change.from, change.to, change.cause),
        (
            AgentStatus::Exhausted,
            AgentStatus::Exhausted,
            PoolCause::PoolReleased
        )
    );
    assert!(d.holds.is_empty());
    // Released after its own lifted: IDLE.
    let d = member.on_release(&acct, t0() + secs(700)).unwrap();
    assert_eq!(d.state.status, AgentStatus::Idle);
    assert_eq!(d.state.exhaustion, None);
    // Without the hold, its own time alone decides.
    let free = [(acct.clone(), PoolState::default(), false)];
    let free = member_pools(&free);
    let member = Member {
        state: &state,
        own: Some(&mine),
        pools: &free,
    };
    assert!(!member.wakes(t0() + secs(599)));
    assert!(member.wakes(t0() + secs(600)));
}

#[test]
fn two_pools_both_must_release() {
    let acct = name("acct");
    let opus = name("acct/opus");
    let pools = [
        (acct.clone(), parked(Window::FiveHour, 300), true),
        (opus.clone(), parked(Window::Weekly, 3000), true),
    ];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Exhausted, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let e = member.effective_recovery(t0()).unwrap();
    assert_eq!(e.recovery.recovery_at, t0() + secs(3000));
    assert!(e.recovery.hint.contains("acct/opus"), "{e:?}");
    let d = member.on_release(&acct, t0() + secs(400)).unwrap();
    assert_eq!(d.state.status, AgentStatus::Exhausted);
    assert_eq!(d.holds, BTreeSet::from([opus.clone()]));
    assert_eq!(
        d.state.exhaustion.unwrap().recovery.recovery_at,
        t0() + secs(3000)
    );
}

#[test]
fn a_release_happens_once_and_offline_members_are_released_in_place() {
    let acct = name("acct");
    let pools = [(acct.clone(), parked(Window::FiveHour, 60), false)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Exhausted, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert_eq!(member.on_release(&acct, t0() + secs(90)), None, "not held");

    let pools = [(acct.clone(), parked(Window::FiveHour, 60), true)];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Offline, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    let d = member.on_release(&acct, t0() + secs(90)).unwrap();
    assert_eq!(d.state.status, AgentStatus::Offline);
    assert_eq!(d.state.exhaustion, None, "its return is IDLE");
    let change = d.change.unwrap();
    assert_eq!(
        (change.from, change.to, change.cause),
        (
            AgentStatus::Offline,
            AgentStatus::Offline,
            PoolCause::PoolReleased
        )
    );
    // A member resumed by an operator meanwhile: nothing to release.
    let state = agent(AgentStatus::Idle, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert_eq!(member.on_release(&acct, t0() + secs(90)), None);
}

#[test]
fn claims_skip_members_of_parked_pools() {
    let pools = [
        (name("a"), PoolState::default(), false),
        (name("b"), parked(Window::Requests, 30), false),
    ];
    let pools = member_pools(&pools);
    let state = agent(AgentStatus::Idle, None);
    let member = Member {
        state: &state,
        own: None,
        pools: &pools,
    };
    assert!(!member.claimable(t0()));
    assert!(member.claimable(t0() + secs(30)));
    let member = Member {
        state: &state,
        own: None,
        pools: &[],
    };
    assert!(member.claimable(t0()));
}

// ---------------------------------------------------------------------------
// Settings

#[test]
fn release_settings_have_their_defaults_and_bounds() {
    let d = ReleaseSettings::default();
    assert_eq!(d.canary_timeout, secs(60));
    assert_eq!(d.spread, secs(30));
    assert_eq!(d.rate, 10);
    assert_eq!(
        ReleaseSettings::new(d.canary_timeout, d.spread, d.rate),
        Ok(d)
    );
    assert_eq!(
        ReleaseSettings::new(Duration::zero(), Duration::zero(), 1).map(|s| s.rate),
        Ok(1)
    );
    let cases = [
        (
            ReleaseSettings::new(secs(-1), secs(30), 10),
            "--pool-canary-timeout must not be negative",
        ),
        (
            ReleaseSettings::new(Duration::hours(2), secs(30), 10),
            "--pool-canary-timeout must be at most 1h",
        ),
        (
            ReleaseSettings::new(secs(60), secs(-1), 10),
            "--pool-release-spread must not be negative",
        ),
        (
            ReleaseSettings::new(secs(60), Duration::hours(2), 10),
            "--pool-release-spread must be at most 1h",
        ),
        (
            ReleaseSettings::new(secs(60), secs(30), 0),
            "--pool-release-rate must be at least 1 agent per second",
        ),
        (
            ReleaseSettings::new(secs(60), secs(30), 1001),
            "--pool-release-rate must be at most 1000 agents per second",
        ),
    ];
    for (got, message) in cases {
        assert_eq!(got, Err(message.to_owned()));
    }
    assert_eq!(
        ReleaseSettings::default().step(),
        Duration::milliseconds(100)
    );
    let three = ReleaseSettings {
        rate: 3,
        ..ReleaseSettings::default()
    };
    assert_eq!(three.step(), Duration::microseconds(333_334), "rounded up");
}

// ---------------------------------------------------------------------------
// The release

fn held(id: &str, parked_at_secs: i64) -> HeldMember {
    HeldMember {
        agent_id: id.into(),
        parked_at: t0() + secs(parked_at_secs),
        offline: false,
        released_at: None,
    }
}

#[test]
fn offsets_are_stable_across_builds_and_in_the_spread() {
    // Pinned: replicas of different builds must agree, so this value may
    // never change (a change is a new schedule for every pool in flight).
    let offset = release_offset("agent-1", t0(), secs(30));
    assert_eq!(
        offset,
        Duration::microseconds(offset.num_microseconds().unwrap())
    );
    assert_eq!(offset, release_offset("agent-1", t0(), secs(30)));
    assert_eq!(offset.num_microseconds(), Some(PINNED_OFFSET_US));
    assert!(offset >= Duration::zero() && offset < secs(30));
    // The store's precision: a deadline read back equals the one written.
    let precise = t0() + Duration::nanoseconds(1_234_567);
    let stored = t0() + Duration::microseconds(1_234);
    assert_eq!(
        release_offset("agent-1", precise, secs(30)),
        release_offset("agent-1", stored, secs(30))
    );
    assert_eq!(
        release_offset("agent-1", t0(), Duration::zero()),
        Duration::zero()
    );
}

/// `release_offset("agent-1", 2026-03-01T12:00:00Z, 30 s)` in microseconds,
/// computed apart from this code: SHA-256 of `b"fleetcare quota pool release
/// v1\0agent-1\0"` and the deadline's epoch microseconds (i64, big-endian);
/// its first 8 bytes (big-endian) times 30,000,000, shifted right by 64.
const PINNED_OFFSET_US: i64 = 13_329_215;

#[test]
fn the_canary_is_the_longest_parked_online_member() {
    let mut members = vec![held("c", 10), held("b", 5), held("a", 5), held("d", 1)];
    members[3].offline = true;
    assert_eq!(choose_canary(&members).unwrap().agent_id, "a", "tie by id");
    members[2].released_at = Some(t0());
    assert_eq!(choose_canary(&members).unwrap().agent_id, "b");
    for m in &mut members[..3] {
        m.offline = true;
    }
    assert_eq!(
        choose_canary(&members).unwrap().agent_id,
        "d",
        "all offline: the longest parked"
    );
    assert_eq!(choose_canary(&[]), None);
}

#[test]
fn nobody_is_released_from_a_parked_pool_then_the_canary_alone() {
    let settings = ReleaseSettings::default();
    let mut pool = parked(Window::FiveHour, 3600);
    let members = vec![held("a", 0), held("b", 10), held("c", 20)];
    assert!(due_releases(&pool, &members, &settings, t0() + secs(3599)).is_empty());
    assert_eq!(release_schedule(&pool, &members, &settings, t0()), None);
    let lift = t0() + secs(3600);
    assert_eq!(due_releases(&pool, &members, &settings, lift), ["a"]);
    let schedule = release_schedule(&pool, &members, &settings, lift).unwrap();
    assert_eq!(schedule.deadline, lift);
    assert_eq!(schedule.canary.as_deref(), Some("a"));
    assert_eq!(schedule.gate, None);
    assert!(schedule.releases.is_empty());

    // The canary released: the others wait for its slot or the timeout.
    pool.canary_released("a", lift);
    let mut members = members;
    members[0].released_at = Some(lift);
    for wait in [0, 1, 30, 59] {
        let due = due_releases(&pool, &members, &settings, lift + secs(wait));
        assert!(due.is_empty(), "{wait}s: {due:?}");
    }
    let after_timeout = lift + secs(60) + settings.spread + secs(1);
    let due = due_releases(&pool, &members, &settings, after_timeout);
    assert_eq!(due.len(), 2, "{due:?}");
    let schedule = release_schedule(&pool, &members, &settings, after_timeout).unwrap();
    assert_eq!(schedule.gate, Some(lift + secs(60)));
    for (id, at) in &schedule.releases {
        let offset = release_offset(id, lift, settings.spread);
        assert!(*at >= lift + secs(60) + offset, "{id} {at}");
        assert!(*at < lift + secs(60) + settings.spread + settings.step() * 2);
    }
}

#[test]
fn a_completed_canary_slot_opens_the_gate_early() {
    let settings = ReleaseSettings::default();
    let mut pool = parked(Window::FiveHour, 60);
    let lift = t0() + secs(60);
    let mut members = vec![held("a", 0), held("b", 1)];
    pool.canary_released("a", lift);
    members[0].released_at = Some(lift);
    pool.canary_completed("a", lift + secs(5));
    let schedule = release_schedule(&pool, &members, &settings, lift + secs(6)).unwrap();
    assert_eq!(schedule.gate, Some(lift + secs(5)));
    let (_, at) = &schedule.releases[0];
    let offset = release_offset("b", lift, settings.spread);
    let step = settings.step();
    let expected_index = ((offset.num_microseconds().unwrap() + 99_999) / 100_000).max(0);
    assert_eq!(*at, lift + secs(5) + step * expected_index as i32);
    assert_eq!(due_releases(&pool, &members, &settings, *at), ["b"]);
    assert!(due_releases(&pool, &members, &settings, *at - Duration::microseconds(1)).is_empty());
}

#[test]
fn a_canary_that_hits_the_limit_again_stops_the_release() {
    let settings = ReleaseSettings::default();
    let mut pool = parked(Window::FiveHour, 60);
    let lift = t0() + secs(60);
    let mut members = [held("a", 0), held("b", 1), held("c", 2)];
    pool.canary_released("a", lift);
    members[0].released_at = Some(lift);
    // The canary reports again: a new episode, the canary forgotten.
    let again = lift + secs(3);
    let outcome = pool.park(Window::FiveHour, park_for(again + secs(600), "a"), again);
    assert_eq!(outcome, Parked::NewEpisode);
    assert_eq!(pool.canary, None);
    // The new episode's held members: the canary again (its report), the others still.
    let members: Vec<HeldMember> = [("a", 3), ("b", 1), ("c", 2)]
        .iter()
        .map(|(id, at)| held(id, *at))
        .collect();
    for late in [0, 60, 120, 599] {
        assert!(due_releases(&pool, &members, &settings, again + secs(late)).is_empty());
    }
    // At the new deadline the canary is the longest parked: b.
    assert_eq!(
        due_releases(&pool, &members, &settings, again + secs(600)),
        ["b"]
    );
}

#[test]
fn a_late_sweeper_catches_up_at_the_rate() {
    let settings = ReleaseSettings {
        rate: 2,
        ..ReleaseSettings::default()
    };
    let mut pool = parked(Window::FiveHour, 60);
    let lift = t0() + secs(60);
    let mut members: Vec<HeldMember> = (0..20).map(|i| held(&format!("m{i:02}"), i)).collect();
    pool.canary_released("m00", lift);
    members[0].released_at = Some(lift);
    // Everyone is due an hour later; two at a time.
    let late = lift + Duration::hours(1);
    let due = due_releases(&pool, &members, &settings, late);
    assert_eq!(due.len(), 2);
    for id in &due {
        members
            .iter_mut()
            .find(|m| m.agent_id == *id)
            .unwrap()
            .released_at = Some(late);
    }
    assert!(
        due_releases(
            &pool,
            &members,
            &settings,
            late + Duration::milliseconds(999)
        )
        .is_empty()
    );
    assert_eq!(
        due_releases(&pool, &members, &settings, late + secs(1)).len(),
        2
    );
}

#[test]
fn the_rate_stretches_a_large_pool_past_the_spread() {
    let settings = ReleaseSettings {
        canary_timeout: Duration::zero(),
        spread: secs(1),
        rate: 5,
    };
    let mut pool = parked(Window::Requests, 1);
    let lift = t0() + secs(1);
    let members: Vec<HeldMember> = (0..51).map(|i| held(&format!("m{i:02}"), i)).collect();
    pool.canary_released("m00", lift);
    let schedule = release_schedule(&pool, &members, &settings, lift).unwrap();
    assert_eq!(schedule.releases.len(), 50);
    let last = schedule.releases.last().unwrap().1;
    // 50 at 5 a second, the first a step after the canary: 10 s.
    assert_eq!(last, lift + Duration::milliseconds(200 * 50));
}

// ---------------------------------------------------------------------------
// Properties

fn any_window() -> impl Strategy<Value = Window> {
    prop::sample::select(Window::ALL.to_vec())
}

fn ids() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-z][a-z0-9-]{0,12}", 1..60)
        .prop_map(|set| set.into_iter().collect())
}

fn any_settings() -> impl Strategy<Value = ReleaseSettings> {
    (0i64..120_000, 0i64..60_000, 1u32..50).prop_map(|(timeout, spread, rate)| ReleaseSettings {
        canary_timeout: Duration::milliseconds(timeout),
        spread: Duration::milliseconds(spread),
        rate,
    })
}

/// The largest number of `instants` in any half-open second.
fn busiest_second(mut instants: Vec<DateTime<Utc>>) -> usize {
    instants.sort();
    (0..instants.len())
        .map(|i| {
            instants[i..]
                .iter()
                .take_while(|at| **at < instants[i] + secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

proptest! {
    /// Whatever reports arrive, in any order, every window runs at least
    /// until the latest deadline reported for it that is still ahead, and
    /// the pool is parked exactly until the latest of those.
    #[test]
    fn reports_never_shorten_a_window(
        reports in prop::collection::vec((any_window(), 0i64..600, 1i64..7200), 1..40),
    ) {
        let mut pool = PoolState::default();
        let mut made: Vec<(Window, DateTime<Utc>)> = Vec::new();
        let mut now = t0();
        for (window, step, ahead) in reports {
            now += secs(step);
            let before = pool.windows.get(&window).map(|w| w.until).filter(|u| *u > now);
            let until = now + secs(ahead);
            pool.park(window, park_for(until, "a"), now);
            made.push((window, until));
            let after = pool.windows[&window].until;
            prop_assert!(after >= until);
            if let Some(before) = before {
                prop_assert!(after >= before, "{window}: {before} cut to {after}");
            }
            for (w, u) in &made {
                if *u > now {
                    prop_assert!(pool.windows[w].until >= *u);
                }
            }
            let latest = made.iter().map(|(_, u)| *u).filter(|u| *u > now).max();
            prop_assert_eq!(pool.parked_until(now), latest);
        }
    }

    /// Offsets lie in [0, spread), are equal for the same id and deadline,
    /// and move when the deadline does.
    #[test]
    fn offsets_are_in_the_spread_and_seeded_by_the_deadline(
        id in "[a-zA-Z0-9._-]{1,40}",
        deadline_us in 0i64..4_000_000_000_000_000,
        spread_ms in 1i64..3_600_000,
    ) {
        let deadline = DateTime::from_timestamp_micros(deadline_us).unwrap();
        let spread = Duration::milliseconds(spread_ms);
        let offset = release_offset(&id, deadline, spread);
        prop_assert!(offset >= Duration::zero() && offset < spread);
        prop_assert_eq!(offset, release_offset(&id, deadline, spread));
        let others: BTreeSet<Duration> = (1..=8)
            .map(|k| release_offset(&id, deadline + secs(k), spread))
            .collect();
        prop_assert!(spread_ms < 10 || others.len() > 1, "{others:?}");
    }

    /// However many members and whatever the settings, no second of the
    /// schedule (the canary's release included) holds more than `rate`
    /// releases, nobody is released before the gate, and each member is
    /// scheduled once.
    #[test]
    fn the_schedule_never_exceeds_the_rate(
        ids in ids(),
        settings in any_settings(),
        completed_after_ms in prop::option::of(0i64..120_000),
    ) {
        let mut pool = parked(Window::FiveHour, 60);
        let lift = t0() + secs(60);
        let members: Vec<HeldMember> = ids.iter().map(|id| held(id, 0)).collect();
        let canary = choose_canary(&members).unwrap().agent_id.clone();
        pool.canary_released(&canary, lift);
        if let Some(ms) = completed_after_ms {
            pool.canary_completed(&canary, lift + Duration::milliseconds(ms));
        }
        let schedule = release_schedule(&pool, &members, &settings, lift).unwrap();
        let gate = schedule.gate.unwrap();
        prop_assert_eq!(schedule.releases.len(), ids.len() - 1);
        let scheduled: BTreeSet<&str> = schedule.releases.iter().map(|(id, _)| id.as_str()).collect();
        prop_assert_eq!(scheduled.len(), ids.len() - 1);
        prop_assert!(!scheduled.contains(canary.as_str()));
        let mut instants = vec![lift];
        for (id, at) in &schedule.releases {
            prop_assert!(*at >= gate + release_offset(id, lift, settings.spread));
            instants.push(*at);
        }
        prop_assert!(busiest_second(instants) <= settings.rate as usize);
    }

    /// The canary is the longest parked of the online members (the longest
    /// parked of all when none is online), ties to the smallest id.
    #[test]
    fn the_canary_is_always_the_longest_parked(
        members in prop::collection::vec(("[a-z]{1,6}", 0i64..100, any::<bool>(), any::<bool>()), 1..30),
    ) {
        let members: Vec<HeldMember> = members
            .into_iter()
            .map(|(id, at, offline, released)| HeldMember {
                agent_id: id,
                parked_at: t0() + secs(at),
                offline,
                released_at: released.then(t0),
            })
            .collect();
        let waiting: Vec<&HeldMember> = members.iter().filter(|m| m.released_at.is_none()).collect();
        match choose_canary(&members) {
            None => prop_assert!(waiting.is_empty()),
            Some(canary) => {
                prop_assert!(canary.released_at.is_none());
                let online: Vec<&&HeldMember> = waiting.iter().filter(|m| !m.offline).collect();
                let field: Vec<&HeldMember> = if online.is_empty() {
                    waiting.clone()
                } else {
                    online.into_iter().copied().collect()
                };
                prop_assert_eq!(canary.offline, field[0].offline);
                for m in field {
                    prop_assert!(
                        (canary.parked_at, &canary.agent_id) <= (m.parked_at, &m.agent_id)
                    );
                }
            }
        }
    }

    /// A sweeper calling `due_releases` as time goes on, recording each
    /// release, releases every member exactly once, the canary first and
    /// nobody else before the gate, never more than `rate` in a second.
    #[test]
    fn every_member_is_released_exactly_once(
        ids in ids(),
        settings in any_settings(),
        steps in prop::collection::vec(1i64..1500, 1..50),
        completes_after_ms in prop::option::of(0i64..90_000),
        offline in prop::collection::vec(any::<bool>(), 60),
    ) {
        let mut pool = parked(Window::Weekly, 60);
        let lift = t0() + secs(60);
        let mut members: Vec<HeldMember> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| HeldMember { offline: offline[i], ..held(id, (i as i64 * 7) % 13) })
            .collect();
        let mut released: Vec<(String, DateTime<Utc>)> = Vec::new();
        let mut now = t0();
        let mut step = steps.iter().cycle();
        // Long enough for the slowest schedule: timeout + spread + n / rate.
        let end = lift + secs(120 + 60 + 60);
        while now <= end && released.len() < ids.len() {
            if let (Some(canary), Some(ms)) = (&pool.canary, completes_after_ms) {
                let done = canary.released_at + Duration::milliseconds(ms);
                if done <= now {
                    let id = canary.agent_id.clone();
                    pool.canary_completed(&id, done);
                }
            }
            let due = due_releases(&pool, &members, &settings, now);
            if now < lift {
                prop_assert!(due.is_empty());
            }
            let gate = release_schedule(&pool, &members, &settings, now).and_then(|s| s.gate);
            for id in due {
                if pool.canary.is_none() {
                    prop_assert!(pool.canary_released(&id, now));
                } else {
                    prop_assert!(gate.is_some_and(|gate| now >= gate), "{id} before the gate");
                }
                let m = members.iter_mut().find(|m| m.agent_id == id).unwrap();
                prop_assert!(m.released_at.is_none(), "{id} released twice");
                m.released_at = Some(now);
                released.push((id, now));
            }
            now += Duration::milliseconds(*step.next().unwrap());
        }
        prop_assert_eq!(released.len(), ids.len(), "{:?}", released);
        let canary = choose_canary(&members.iter().map(|m| HeldMember { released_at: None, ..m.clone() }).collect::<Vec<_>>())
            .unwrap()
            .agent_id
            .clone();
        prop_assert_eq!(&released[0].0, &canary);
        prop_assert!(busiest_second(released.iter().map(|(_, at)| *at).collect()) <= settings.rate as usize);
    }

    /// Window inference never panics, stays bounded, and a stated window wins.
    #[test]
    fn infer_window_never_panics(
        headers in prop::collection::vec(("[a-zA-Z-]{0,50}", ".{0,40}"), 0..6),
        message in ".{0,200}",
        stated in prop::option::of(any_window()),
    ) {
        let mut r = report(&[], &message);
        r.headers = headers;
        let inferred = infer_window(&r, stated, t0());
        prop_assert!(inferred.evidence.chars().count() <= MAX_HINT_CHARS);
        if let Some(stated) = stated {
            prop_assert_eq!(inferred.window, stated);
        }
    }
}
