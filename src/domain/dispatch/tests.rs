use super::*;
use crate::domain::agent::{Exhaustion, ExhaustionReason};
use crate::domain::recovery::{RecoveryEstimate, RecoverySource};
use chrono::TimeZone;
use proptest::prelude::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 7, 13, 0, 0).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn selector(pairs: &[(&str, &str)], exprs: Vec<Requirement>) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: exprs,
    }
}

fn exhaustion(until: DateTime<Utc>) -> Exhaustion {
    Exhaustion {
        reason: ExhaustionReason::RateLimit,
        recovery: RecoveryEstimate {
            recovery_at: until,
            source: RecoverySource::Explicit,
            hint: String::new(),
        },
    }
}

/// An agent in `status` since `t0() + since` seconds.
fn agent(id: &str, status: AgentStatus, since: i64, pairs: &[(&str, &str)]) -> Agent {
    Agent {
        agent_id: id.into(),
        labels: labels(pairs),
        quota_pools: Vec::new(),
        pool_holds: Default::default(),
        registered_at: t0() - Duration::days(1),
        last_transition_at: t0() + Duration::seconds(since),
        revision: 10,
        state: AgentState {
            status,
            last_heartbeat_at: t0(),
            exhaustion: (status == AgentStatus::Exhausted)
                .then(|| exhaustion(t0() + Duration::hours(1))),
        },
        cordon_reason: None,
        claim: None,
    }
}

fn candidates<'a>(agents: &'a [Agent], cordoned: &[&str]) -> Vec<Candidate<'a>> {
    agents
        .iter()
        .map(|a| Candidate {
            agent: a,
            cordoned: cordoned.contains(&a.agent_id.as_str()),
        })
        .collect()
}

fn claim(token: i64, expires_in: i64) -> Claim {
    Claim {
        claim_id: "c1".into(),
        agent_id: "a".into(),
        fencing_token: token,
        slot_type: SlotType::Work,
        holder: "scheduler".into(),
        request_id: String::new(),
        claimed_at: t0(),
        lease_expires_at: t0() + Duration::seconds(expires_in),
    }
}

// ---- selectors

#[test]
fn empty_selector_matches_every_agent() {
    let s = LabelSelector::default();
    assert!(s.validate().is_ok());
    assert!(s.matches(&Labels::new()));
    assert!(s.matches(&labels(&[("team", "infra")])));
}

#[test]
fn operators_follow_kubernetes() {
    let with = labels(&[("team", "infra")]);
    let other = labels(&[("team", "web")]);
    let without = labels(&[("zone", "a")]);
    let cases = [
        (Operator::In, [true, false, false]),
        (Operator::NotIn, [false, true, true]),
        (Operator::Exists, [true, true, false]),
        (Operator::DoesNotExist, [false, false, true]),
    ];
    for (op, expected) in cases {
        let values: &[&str] = if op.takes_values() { &["infra"] } else { &[] };
        let r = req("team", op, values);
        let got = [r.matches(&with), r.matches(&other), r.matches(&without)];
        assert_eq!(got, expected, "{op:?}");
    }
}

#[test]
fn match_labels_and_expressions_all_hold() {
    let s = selector(
        &[("team", "infra")],
        vec![req("gpu", Operator::Exists, &[])],
    );
    assert!(s.matches(&labels(&[("team", "infra"), ("gpu", "a100")])));
    assert!(!s.matches(&labels(&[("team", "infra")])));
    assert!(!s.matches(&labels(&[("team", "web"), ("gpu", "a100")])));
    // An empty value is a value: it must be present and equal.
    let empty = selector(&[("tier", "")], vec![]);
    assert!(empty.matches(&labels(&[("tier", "")])));
    assert!(!empty.matches(&Labels::new()));
}

fn refused(s: &LabelSelector) -> InvalidArgument {
    s.validate().expect_err("refused")
}

#[test]
fn selector_refusals_name_the_field() {
    let e = refused(&selector(&[], vec![req("", Operator::Exists, &[])]));
    assert_eq!(e.field, "selector.match_expressions[0].key");
    assert_eq!(
        e.to_string(),
        "selector.match_expressions[0].key is required"
    );

    let e = refused(&selector(
        &[],
        vec![
            req("ok", Operator::Exists, &[]),
            req("team", Operator::Exists, &["x"]),
        ],
    ));
    assert_eq!(e.field, "selector.match_expressions[1].values");
    assert_eq!(
        e.to_string(),
        "selector.match_expressions[1].values must be empty with operator EXISTS"
    );

    let e = refused(&selector(
        &[],
        vec![req("team", Operator::DoesNotExist, &["x"])],
    ));
    assert_eq!(e.problem, "must be empty with operator DOES_NOT_EXIST");

    let e = refused(&selector(&[], vec![req("team", Operator::In, &[])]));
    assert_eq!(
        e.to_string(),
        "selector.match_expressions[0].values must not be empty with operator IN"
    );
    let e = refused(&selector(&[], vec![req("team", Operator::NotIn, &[])]));
    assert_eq!(e.problem, "must not be empty with operator NOT_IN");

    let e = refused(&selector(&[], vec![req("bad key", Operator::Exists, &[])]));
    assert_eq!(e.field, "selector.match_expressions[0].key");
    assert_eq!(
        e.problem,
        "\"bad key\" must be 1 to 63 characters of letters, digits and . _ / -"
    );

    let long = "v".repeat(labels::MAX_LABEL_VALUE + 1);
    let e = refused(&selector(
        &[],
        vec![req("team", Operator::In, &["a", long.as_str()])],
    ));
    assert_eq!(e.field, "selector.match_expressions[0].values[1]");
    assert_eq!(e.problem, "is longer than 256 characters");
}

#[test]
fn match_labels_refusals_name_the_field() {
    let e = refused(&selector(&[("", "x")], vec![]));
    assert_eq!(e.field, "selector.match_labels");
    assert_eq!(
        e.problem,
        "key \"\" must be 1 to 63 characters of letters, digits and . _ / -"
    );
    let long = "v".repeat(labels::MAX_LABEL_VALUE + 1);
    let e = refused(&selector(&[("team", long.as_str())], vec![]));
    assert_eq!(
        e.to_string(),
        "selector.match_labels value of \"team\" is longer than 256 characters"
    );
}

#[test]
fn selector_size_bounds() {
    let many: Vec<Requirement> = (0..=MAX_SELECTOR_REQUIREMENTS)
        .map(|i| req(&format!("k{i}"), Operator::Exists, &[]))
        .collect();
    let e = refused(&selector(&[], many));
    assert_eq!(e.field, "selector");
    assert_eq!(e.problem, "has 65 requirements, at most 64 allowed");

    let values: Vec<String> = (0..=MAX_SELECTOR_VALUES).map(|i| i.to_string()).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let e = refused(&selector(&[], vec![req("team", Operator::In, &values)]));
    assert_eq!(e.field, "selector.match_expressions[0].values");
    assert_eq!(e.problem, "has 65 entries, at most 64 allowed");
    assert!(
        selector(&[], vec![req("team", Operator::In, &values[1..])])
            .validate()
            .is_ok()
    );
}

#[test]
fn operator_names() {
    for op in Operator::ALL {
        assert_eq!(Operator::parse(0, op.as_str()), Ok(op));
    }
    let e = Operator::parse(3, "OPERATOR_UNSPECIFIED").unwrap_err();
    assert_eq!(e.field, "selector.match_expressions[3].operator");
    assert_eq!(
        e.problem,
        "\"OPERATOR_UNSPECIFIED\" is not one of IN, NOT_IN, EXISTS, DOES_NOT_EXIST"
    );
}

// ---- claim requests

#[test]
fn lease_bounds() {
    let max = DEFAULT_MAX_CLAIM_LEASE;
    assert_eq!(
        lease_duration(Duration::seconds(1), max),
        Ok(Duration::seconds(1))
    );
    assert_eq!(lease_duration(max, max), Ok(max));
    let e = lease_duration(Duration::milliseconds(999), max).unwrap_err();
    assert_eq!(
        e.to_string(),
        "lease_duration is 999 ms, at least 1 s required"
    );
    let e = lease_duration(Duration::zero(), max).unwrap_err();
    assert_eq!(e.field, "lease_duration");
    let e = lease_duration(max + Duration::seconds(1), max).unwrap_err();
    assert_eq!(
        e.to_string(),
        "lease_duration is 3601 s, at most 3600 s allowed (--max-claim-lease)"
    );
    let e = lease_duration(Duration::seconds(61), Duration::minutes(1)).unwrap_err();
    assert_eq!(e.field, "lease_duration");
    assert!(max_claim_lease_setting(Duration::milliseconds(500)).is_err());
    assert_eq!(max_claim_lease_setting(max), Ok(max));
}

#[test]
fn wait_timeout_bounds() {
    assert_eq!(wait_timeout(Duration::zero()), Ok(Duration::zero()));
    assert_eq!(
        wait_timeout(Duration::seconds(30)),
        Ok(Duration::seconds(30))
    );
    assert_eq!(wait_timeout(Duration::hours(2)), Ok(MAX_WAIT_TIMEOUT));
    let e = wait_timeout(Duration::milliseconds(-1)).unwrap_err();
    assert_eq!(e.to_string(), "wait_timeout must not be negative");
}

#[test]
fn request_id_bounds() {
    assert_eq!(request_id(""), Ok(None));
    let max = "é".repeat(MAX_REQUEST_ID);
    assert_eq!(request_id(&max), Ok(Some(max.as_str())));
    let e = request_id(&"x".repeat(MAX_REQUEST_ID + 1)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "request_id is 129 characters, at most 128 allowed"
    );
}

fn claim_request() -> ClaimRequest {
    ClaimRequest {
        selector: LabelSelector::default(),
        slot_type: SlotType::Work,
        lease_duration: Duration::seconds(30),
        wait_timeout: Duration::minutes(10),
        request_id: "r-1".into(),
    }
}

#[test]
fn claim_request_validation_in_field_order() {
    let ok = claim_request().validate(DEFAULT_MAX_CLAIM_LEASE).unwrap();
    assert_eq!(ok.wait_timeout, MAX_WAIT_TIMEOUT);
    let mut bad = claim_request();
    bad.selector = selector(&[], vec![req("", Operator::In, &[])]);
    bad.lease_duration = Duration::zero();
    let e = bad.validate(DEFAULT_MAX_CLAIM_LEASE).unwrap_err();
    assert_eq!(e.field, "selector.match_expressions[0].key");
    let mut bad = claim_request();
    bad.lease_duration = Duration::zero();
    bad.request_id = "x".repeat(200);
    assert_eq!(
        bad.validate(DEFAULT_MAX_CLAIM_LEASE).unwrap_err().field,
        "lease_duration"
    );
    let mut bad = claim_request();
    bad.request_id = "x".repeat(200);
    assert_eq!(
        bad.validate(DEFAULT_MAX_CLAIM_LEASE).unwrap_err().field,
        "request_id"
    );
}

#[test]
fn idempotency_is_per_caller() {
    let r = claim_request();
    let a = r.idempotency_key("alice").unwrap();
    assert_ne!(Some(a.clone()), r.idempotency_key("bob"));
    assert_eq!(Some(a), r.idempotency_key("alice"));
    let mut none = claim_request();
    none.request_id.clear();
    assert_eq!(none.idempotency_key("alice"), None);
}

// ---- choice

#[test]
fn choice_is_the_least_recently_used_idle_schedulable_match() {
    use AgentStatus::*;
    let agents = [
        agent("busy-oldest", Busy, -500, &[("team", "infra")]),
        agent("cordoned-old", Idle, -400, &[("team", "infra")]),
        agent("other-team", Idle, -300, &[("team", "web")]),
        agent("b", Idle, -100, &[("team", "infra")]),
        agent("a", Idle, -100, &[("team", "infra")]),
        agent("fresh", Idle, 0, &[("team", "infra")]),
    ];
    let cs = candidates(&agents, &["cordoned-old"]);
    let s = selector(&[("team", "infra")], vec![]);
    // a and b became IDLE at the same time: the smaller id wins.
    assert_eq!(choose(&s, &cs).unwrap().agent_id, "a");
    assert_eq!(
        choose(&LabelSelector::default(), &cs).unwrap().agent_id,
        "other-team"
    );
}

#[test]
fn waiters_are_served_in_arrival_order_when_they_match() {
    let a = agent("a", AgentStatus::Idle, 0, &[("team", "infra")]);
    let narrow = selector(&[("team", "web")], vec![]);
    let infra = selector(&[("team", "infra")], vec![]);
    let any = LabelSelector::default();
    let c = Candidate {
        agent: &a,
        cordoned: false,
    };
    assert_eq!(waiter_for([&narrow, &infra, &any], &c), Some(1));
    assert_eq!(waiter_for([&narrow], &c), None);
    assert_eq!(waiter_for([], &c), None);
    let cordoned = Candidate {
        agent: &a,
        cordoned: true,
    };
    assert_eq!(waiter_for([&any], &cordoned), None);
    let busy = agent("b", AgentStatus::Busy, 0, &[]);
    let busy = Candidate {
        agent: &busy,
        cordoned: false,
    };
    assert_eq!(waiter_for([&any], &busy), None);
}

#[test]
fn refusal_counts_matching_agents_by_status() {
    use AgentStatus::*;
    let mut agents = Vec::new();
    for i in 0..7 {
        agents.push(agent(&format!("busy{i}"), Busy, 0, &[("team", "infra")]));
    }
    for (i, minutes) in [(0, 65), (1, 90), (2, 70)] {
        let mut a = agent(&format!("ex{i}"), Exhausted, 0, &[("team", "infra")]);
        a.state.exhaustion = Some(exhaustion(t0() + Duration::minutes(minutes)));
        agents.push(a);
    }
    agents.push(agent("cord0", Idle, 0, &[("team", "infra")]));
    agents.push(agent("cord1", Exhausted, 0, &[("team", "infra")]));
    agents.push(agent("web", Idle, 0, &[("team", "web")]));
    let cs = candidates(&agents, &["cord0", "cord1"]);
    let s = selector(&[("team", "infra")], vec![]);
    let refusal = choose(&s, &cs).unwrap_err();
    assert_eq!(refusal.matching, 12);
    assert_eq!(refusal.cordoned, 2);
    assert_eq!(refusal.of_status(Busy), 7);
    assert_eq!(refusal.of_status(Exhausted), 3);
    assert_eq!(
        refusal.message(t0()),
        "0 of 12 matching agents idle: 7 BUSY, 3 EXHAUSTED until 14:05 UTC, 2 cordoned"
    );
}

#[test]
fn refusal_message_orders_rounds_and_dates() {
    use AgentStatus::*;
    let mut ex = agent("ex", Exhausted, 0, &[]);
    ex.state.exhaustion = Some(exhaustion(
        t0() + Duration::hours(12) + Duration::seconds(1),
    ));
    let agents = [
        agent("off", Offline, 0, &[]),
        agent("call", OnCall, 0, &[]),
        ex,
        agent("busy", Busy, 0, &[]),
    ];
    let cs = candidates(&agents, &[]);
    let refusal = choose(&LabelSelector::default(), &cs).unwrap_err();
    // 13:00 + 12 h 1 s is the next day, rounded up to 01:01.
    assert_eq!(
        refusal.message(t0()),
        "0 of 4 matching agents idle: 1 BUSY, 1 ON_CALL, 1 EXHAUSTED until 2026-12-08 01:01 UTC, 1 OFFLINE"
    );
    let none = choose(&selector(&[("team", "x")], vec![]), &cs).unwrap_err();
    assert_eq!(
        none.message(t0()),
        "0 of 0 matching agents idle: no agent matches the selector"
    );
    assert_eq!(
        choose(&LabelSelector::default(), &[]).unwrap_err().matching,
        0
    );
}

#[test]
fn until_is_never_early() {
    assert_eq!(until(t0() + Duration::minutes(5), t0()), "13:05 UTC");
    assert_eq!(
        until(
            t0() + Duration::minutes(5) + Duration::milliseconds(1),
            t0()
        ),
        "13:06 UTC"
    );
}

// ---- claims, leases, fencing

#[test]
fn a_new_claim_takes_its_transitions_revision_and_the_requested_lease() {
    let request = ClaimRequest {
        selector: LabelSelector::default(),
        slot_type: SlotType::OnCall,
        lease_duration: Duration::seconds(30),
        wait_timeout: Duration::zero(),
        request_id: "r-1".into(),
    };
    let c = new_claim("c".into(), "a", 42, &request, "sched".into(), t0());
    assert_eq!(c.fencing_token, 42);
    assert_eq!(c.agent_id, "a");
    assert_eq!(c.slot_type, SlotType::OnCall);
    assert_eq!(c.request_id, "r-1");
    assert_eq!(c.holder, "sched");
    assert_eq!(c.claimed_at, t0());
    assert_eq!(c.lease_expires_at, t0() + Duration::seconds(30));
}

#[test]
fn leases_expire_at_their_instant() {
    let c = claim(5, 30);
    assert!(!lease_expired(&c, t0() + Duration::milliseconds(29_999)));
    assert!(lease_expired(&c, t0() + Duration::seconds(30)));
    assert_eq!(lease_end(t0(), Duration::MAX), DateTime::<Utc>::MAX_UTC);
}

#[test]
fn renewal_runs_from_now_and_never_shortens() {
    let c = claim(5, 30);
    let longer = renew(&c, Duration::seconds(60), t0() + Duration::seconds(10)).unwrap();
    assert_eq!(longer.lease_expires_at, t0() + Duration::seconds(70));
    // A late retry of a short renewal does not cut the longer lease.
    let late = renew(&longer, Duration::seconds(5), t0() + Duration::seconds(20)).unwrap();
    assert_eq!(late.lease_expires_at, longer.lease_expires_at);
    assert_eq!(late.fencing_token, 5);
    let e = renew(&c, Duration::seconds(60), t0() + Duration::seconds(30)).unwrap_err();
    assert_eq!(e.kind, StaleKind::LeaseExpired);
    assert_eq!(
        e.to_string(),
        "fencing token 5 is stale: the lease of its claim on agent \"a\" has expired"
    );
}

#[test]
fn fencing_accepts_only_the_live_active_token() {
    let c = claim(7, 30);
    let now = t0() + Duration::seconds(1);
    assert_eq!(check_fencing("a", None, None, now), Ok(()));
    assert_eq!(check_fencing("a", Some(&c), Some(7), now), Ok(()));

    let e = check_fencing("a", Some(&c), None, now).unwrap_err();
    assert_eq!(e.kind, StaleKind::Missing);
    assert_eq!(
        e.to_string(),
        "agent \"a\" is claimed; the claim's fencing token is required"
    );
    let e = check_fencing("a", Some(&c), Some(6), now).unwrap_err();
    assert_eq!(e.kind, StaleKind::Older { active: 7 });
    assert_eq!(
        e.to_string(),
        "fencing token 6 is stale: agent \"a\" is claimed with fencing token 7"
    );
    let e = check_fencing("a", Some(&c), Some(8), now).unwrap_err();
    assert_eq!(e.kind, StaleKind::Unknown { active: 7 });
    assert_eq!(
        e.to_string(),
        "fencing token 8 was never issued for agent \"a\": its claim has fencing token 7"
    );
    let e = check_fencing("a", None, Some(7), now).unwrap_err();
    assert_eq!(e.kind, StaleKind::NoActiveClaim);
    assert_eq!(
        e.to_string(),
        "fencing token 7 is stale: agent \"a\" has no active claim"
    );
    let e = check_fencing("a", Some(&c), Some(7), t0() + Duration::seconds(30)).unwrap_err();
    assert_eq!(e.kind, StaleKind::LeaseExpired);
}

#[test]
fn a_stale_token_is_refused_after_expiry_and_reclaim() {
    let first = claim(7, 30);
    let second = Claim {
        claim_id: "c2".into(),
        fencing_token: 12,
        ..claim(12, 90)
    };
    let now = t0() + Duration::seconds(40);
    assert!(check_fencing("a", Some(&first), Some(7), now).is_err());
    assert_eq!(
        check_fencing("a", Some(&second), Some(7), now)
            .unwrap_err()
            .kind,
        StaleKind::Older { active: 12 }
    );
    let e = check_claim_call("a", Some(&second), "c1", 7, now).unwrap_err();
    assert_eq!(e.kind, StaleKind::ClaimEnded);
    assert_eq!(
        e.to_string(),
        "fencing token 7 is stale: its claim on agent \"a\" has ended"
    );
    assert_eq!(check_claim_call("a", Some(&second), "c2", 12, now), Ok(()));
    assert_eq!(
        check_claim_call("a", None, "c2", 12, now).unwrap_err().kind,
        StaleKind::ClaimEnded
    );
    assert_eq!(
        check_claim_call("a", Some(&second), "c2", 11, now)
            .unwrap_err()
            .kind,
        StaleKind::Older { active: 12 }
    );
}

#[test]
fn claims_end_when_work_ends() {
    use AgentStatus::*;
    assert!(ends_claim(Busy, Idle));
    assert!(ends_claim(OnCall, Exhausted));
    assert!(ends_claim(Busy, Offline));
    assert!(!ends_claim(Idle, Busy));
    assert!(!ends_claim(Exhausted, Idle));
    assert!(!ends_claim(Offline, Idle));
}

#[test]
fn claim_and_release_decisions_reuse_the_state_machine() {
    use AgentStatus::*;
    let a = agent("a", Idle, 0, &[]);
    let d = claim_decision(&a.state, &a.labels, SlotType::OnCall, t0()).unwrap();
    assert_eq!((d.from, d.to, d.cause), (Idle, OnCall, Cause::Claimed));
    let e = claim_decision(&d.state, &a.labels, SlotType::Work, t0()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot start work: agent is ON_CALL, must be IDLE"
    );
    let r = claim_end_decision(&d.state, &a.labels, ClaimEnd::Released, t0()).unwrap();
    assert_eq!(
        (r.from, r.to, r.cause),
        (OnCall, Idle, Cause::ClaimReleased)
    );
    let x = claim_end_decision(&d.state, &a.labels, ClaimEnd::Expired, t0()).unwrap();
    assert_eq!(x.cause, Cause::ClaimExpired);
    assert!(claim_end_decision(&a.state, &a.labels, ClaimEnd::Expired, t0()).is_err());
}

// ---- operator overrides

#[test]
fn resume_only_from_exhausted() {
    use AgentStatus::*;
    let ex = agent("a", Exhausted, 0, &[]);
    let d = resume_decision(&ex.state).unwrap();
    assert_eq!((d.from, d.to, d.cause), (Exhausted, Idle, Cause::Resumed));
    assert_eq!(d.state.exhaustion, None);
    assert_eq!(d.state.last_heartbeat_at, ex.state.last_heartbeat_at);
    for status in [Idle, Busy, OnCall, Offline] {
        let e = resume_decision(&agent("a", status, 0, &[]).state).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot resume: agent is {status}, must be EXHAUSTED")
        );
        assert_eq!(e.current, status);
    }
}

#[test]
fn cordon_and_uncordon_change_only_what_is_not_as_asked() {
    assert_eq!(cordon_decision(None, true), Some(Cause::Cordoned));
    assert_eq!(
        cordon_decision(Some("disk"), false),
        Some(Cause::Uncordoned)
    );
    assert_eq!(cordon_decision(Some(""), false), Some(Cause::Uncordoned));
    // Idempotent: a cordoned agent cordoned again (any reason), a schedulable
    // one uncordoned.
    assert_eq!(cordon_decision(Some("disk"), true), None);
    assert_eq!(cordon_decision(Some(""), true), None);
    assert_eq!(cordon_decision(None, false), None);
}

#[test]
fn delete_refused_while_a_claim_is_live() {
    let c = claim(7, 30);
    assert_eq!(check_delete(None, t0()), Ok(()));
    let e = check_delete(Some(&c), t0()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot delete agent \"a\": it is claimed by \"scheduler\" (claim c1) until 2026-12-07 13:00:30 UTC; release the claim first"
    );
    assert_eq!(check_delete(Some(&c), t0() + Duration::seconds(30)), Ok(()));
}

#[test]
fn offline_retention() {
    use AgentStatus::*;
    let off = agent("a", Offline, 0, &[]);
    let week = DEFAULT_OFFLINE_AGENT_RETENTION;
    assert!(!offline_expired(&off, week, t0() + week));
    assert!(offline_expired(
        &off,
        week,
        t0() + week + Duration::seconds(1)
    ));
    assert!(!offline_expired(
        &off,
        Duration::zero(),
        t0() + Duration::days(1000)
    ));
    assert!(!offline_expired(
        &agent("a", Idle, 0, &[]),
        week,
        t0() + Duration::days(30)
    ));
    assert!(!offline_expired(
        &agent("a", Exhausted, 0, &[]),
        week,
        t0() + Duration::days(30)
    ));
    assert_eq!(offline_expiry_cutoff(Duration::zero(), t0()), None);
    assert_eq!(offline_expiry_cutoff(week, t0() + week), Some(t0()));
}

// ---- properties

fn any_status() -> impl Strategy<Value = AgentStatus> {
    prop::sample::select(AgentStatus::ALL.to_vec())
}

fn any_labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(vec!["team", "zone", "gpu"]).prop_map(String::from),
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        0..3,
    )
}

fn any_requirement() -> impl Strategy<Value = Requirement> {
    (
        prop::sample::select(vec!["team", "zone", "gpu", "", "bad key"]),
        prop::sample::select(Operator::ALL.to_vec()),
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..3),
    )
        .prop_map(|(k, operator, values)| Requirement {
            key: k.into(),
            operator,
            values: values.into_iter().map(String::from).collect(),
        })
}

fn valid_requirement() -> impl Strategy<Value = Requirement> {
    any_requirement().prop_filter("well formed", |r| {
        labels::key_is_valid(&r.key) && r.operator.takes_values() != r.values.is_empty()
    })
}

fn any_selector() -> impl Strategy<Value = LabelSelector> {
    (
        any_labels(),
        prop::collection::vec(valid_requirement(), 0..3),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn any_fleet() -> impl Strategy<Value = Vec<(Agent, bool)>> {
    prop::collection::vec(
        (any_status(), -50i64..50, any_labels(), any::<bool>()),
        0..12,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (status, since, labels, cordoned))| {
                let mut a = agent(&format!("agent-{i:02}"), status, since, &[]);
                a.labels = labels;
                (a, cordoned)
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn the_choice_is_a_claimable_match_idle_longest(fleet in any_fleet(), s in any_selector()) {
        let cs: Vec<Candidate<'_>> = fleet
            .iter()
            .map(|(agent, cordoned)| Candidate { agent, cordoned: *cordoned })
            .collect();
        let eligible: Vec<&Candidate<'_>> = cs
            .iter()
            .filter(|c| c.claimable() && s.matches(&c.agent.labels))
            .collect();
        match choose(&s, &cs) {
            Ok(chosen) => {
                prop_assert_eq!(chosen.state.status, AgentStatus::Idle);
                prop_assert!(s.matches(&chosen.labels));
                let c = cs.iter().find(|c| c.agent.agent_id == chosen.agent_id).unwrap();
                prop_assert!(!c.cordoned);
                for other in &eligible {
                    prop_assert!(
                        (chosen.last_transition_at, &chosen.agent_id)
                            <= (other.agent.last_transition_at, &other.agent.agent_id)
                    );
                }
            }
            Err(refusal) => {
                prop_assert!(eligible.is_empty());
                let matching = cs.iter().filter(|c| s.matches(&c.agent.labels)).count();
                prop_assert_eq!(refusal.matching, matching);
                prop_assert_eq!(refusal.by_status.iter().sum::<usize>() + refusal.cordoned, matching);
                prop_assert_eq!(refusal.of_status(AgentStatus::Idle), 0);
                let head = format!("0 of {} matching agents idle: ", matching);
                prop_assert!(refusal.message(t0()).starts_with(&head));
            }
        }
    }

    #[test]
    fn not_in_negates_in_on_agents_with_the_key(l in any_labels(), r in valid_requirement()) {
        let flip = |op| Requirement { operator: op, ..r.clone() };
        if r.operator.takes_values() && l.contains_key(&r.key) {
            prop_assert_eq!(flip(Operator::NotIn).matches(&l), !flip(Operator::In).matches(&l));
        }
        if !l.contains_key(&r.key) {
            prop_assert!(!flip(Operator::In).matches(&l));
            prop_assert!(flip(Operator::NotIn).matches(&l));
        }
        let bare = Requirement { values: vec![], ..r.clone() };
        let exists = Requirement { operator: Operator::Exists, ..bare.clone() };
        let absent = Requirement { operator: Operator::DoesNotExist, ..bare };
        prop_assert_eq!(exists.matches(&l), !absent.matches(&l));
    }

    #[test]
    fn match_labels_are_in_with_one_value(l in any_labels(), pairs in any_labels()) {
        let as_labels = LabelSelector { match_labels: pairs.clone(), ..Default::default() };
        let as_in = LabelSelector {
            match_expressions: pairs
                .iter()
                .map(|(k, v)| req(k, Operator::In, &[v.as_str()]))
                .collect(),
            ..Default::default()
        };
        prop_assert!(as_labels.validate().is_ok() && as_in.validate().is_ok());
        prop_assert_eq!(as_labels.matches(&l), as_in.matches(&l));
    }

    /// `validate` accepts exactly the selectors whose every requirement has a
    /// well-formed key and values where (and only where) its operator reads
    /// them; a refused one names a field of the selector.
    #[test]
    fn validate_accepts_exactly_the_well_formed(exprs in prop::collection::vec(any_requirement(), 0..4)) {
        let s = LabelSelector { match_expressions: exprs.clone(), ..Default::default() };
        let well_formed = exprs.iter().all(|r| {
            labels::key_is_valid(&r.key) && r.operator.takes_values() != r.values.is_empty()
        });
        match s.validate() {
            Ok(()) => prop_assert!(well_formed),
            Err(e) => {
                prop_assert!(!well_formed);
                prop_assert!(e.field.starts_with("selector.match_expressions["));
            }
        }
    }

    #[test]
    fn fencing_accepts_exactly_the_live_active_token(
        active in prop::option::of(1i64..20),
        presented in prop::option::of(1i64..20),
        at in 0i64..60,
    ) {
        let c = active.map(|t| claim(t, 30));
        let now = t0() + Duration::seconds(at);
        let accepted = check_fencing("a", c.as_ref(), presented, now).is_ok();
        let expected = match (active, presented) {
            (None, None) => true,
            (Some(a), Some(p)) => a == p && at < 30,
            _ => false,
        };
        prop_assert_eq!(accepted, expected);
    }

    #[test]
    fn renewal_never_shortens_and_keeps_the_token(lease in 1i64..100, at in 0i64..29) {
        let c = claim(3, 30);
        let now = t0() + Duration::seconds(at);
        let r = renew(&c, Duration::seconds(lease), now).unwrap();
        prop_assert!(r.lease_expires_at >= c.lease_expires_at);
        prop_assert!(r.lease_expires_at >= now + Duration::seconds(lease));
        prop_assert_eq!(r.fencing_token, c.fencing_token);
        prop_assert_eq!(&r.claim_id, &c.claim_id);
    }

    #[test]
    fn expiry_query_agrees_with_the_rule(status in any_status(), since in -100i64..100, retention in 0i64..50) {
        let a = agent("a", status, since, &[]);
        let retention = Duration::seconds(retention);
        let selected = offline_expiry_cutoff(retention, t0())
            .is_some_and(|cut| status == AgentStatus::Offline && a.last_transition_at < cut);
        prop_assert_eq!(selected, offline_expired(&a, retention, t0()));
    }
}

#[test]
fn a_claim_id_names_its_agent_and_old_ids_name_none() {
    let id = claim_id("agent-7.eu:a", "3f2a");
    assert_eq!(id, "agent-7.eu:a/3f2a");
    assert_eq!(claim_agent(&id), Some("agent-7.eu:a"));
    // Ids made before claims carried their agent, and malformed ones.
    for old in [
        "6f1c8f5e-0d2b-4d55-9a59-2f4b3c1d9e7a",
        "/3f2a",
        "agent-7/",
        "",
    ] {
        assert_eq!(claim_agent(old), None, "{old:?}");
    }
}
