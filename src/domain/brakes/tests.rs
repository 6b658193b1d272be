use chrono::TimeZone;

use super::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
}

fn grouped() -> HealingPolicy {
    HealingPolicy {
        group_by: Some("team".into()),
        ..HealingPolicy::default()
    }
}

fn request(fleet: Census, group: Census) -> Request<'static> {
    Request {
        agent_status: AgentStatus::Idle,
        agent_unhealthy: false,
        group: Some("infra"),
        fleet,
        group_census: group,
        fleet_plans_last_minute: 0,
        group_plans_last_minute: 0,
        agent_plans_in_window: 0,
        pauses: &[],
    }
}

fn census(counted: u32, unhealthy: u32) -> Census {
    Census { counted, unhealthy }
}

#[test]
fn a_storm_in_one_group_is_planned_up_to_the_share_and_braked_after() {
    let policy = grouped();
    // 100 agents in one group of a fleet of 1,000: 40 % of the group.
    let mut planned = 0;
    let mut braked = Vec::new();
    for _ in 0..100 {
        let mut r = request(census(1000, planned), census(100, planned));
        r.fleet_plans_last_minute = 0; // the rate is checked apart below
        match check(&policy, &r) {
            Ok(()) => planned += 1,
            Err(b) => braked.push(b),
        }
    }
    assert_eq!(planned, 40);
    assert_eq!(braked.len(), 60);
    assert_eq!(
        braked[0],
        Braked::UnhealthyShare {
            scope: Scope::Group("infra".into()),
            unhealthy: 40,
            counted: 100,
            after: 41,
            allowed: 40
        }
    );
    assert_eq!(braked[0].reason(), "HEALING_BRAKE_UNHEALTHY_SHARE");
    assert_eq!(
        braked[0].to_string(),
        "group \"infra\" has 40 of 100 agents unhealthy; a plan would make 41, above the 40 allowed"
    );
}

#[test]
fn the_floor_lets_a_tiny_group_heal_one_at_a_time_and_an_offline_agent_adds_nothing() {
    let policy = grouped();
    assert_eq!(
        allowed_unhealthy(&policy, 2),
        1,
        "40 % of 2 is 0: the floor"
    );
    assert!(check(&policy, &request(census(1000, 0), census(2, 0))).is_ok());
    assert!(matches!(
        check(&policy, &request(census(1000, 1), census(2, 1))),
        Err(Braked::UnhealthyShare { allowed: 1, .. })
    ));
    // An OFFLINE agent is counted unhealthy already: planning it adds none.
    let mut offline = request(census(1000, 1), census(2, 1));
    offline.agent_status = AgentStatus::Offline;
    offline.agent_unhealthy = true;
    assert!(check(&policy, &offline).is_ok());
}

#[test]
fn the_fleet_share_holds_without_groups_and_the_group_is_ignored_then() {
    let policy = HealingPolicy::default();
    let r = request(census(10, 4), census(1, 1));
    assert!(matches!(
        check(&policy, &r),
        Err(Braked::UnhealthyShare {
            scope: Scope::Fleet,
            ..
        })
    ));
    assert!(check(&policy, &request(census(10, 3), census(1, 1))).is_ok());
}

#[test]
fn an_exhausted_agent_is_never_planned_and_not_counted() {
    let mut r = request(census(10, 0), census(10, 0));
    r.agent_status = AgentStatus::Exhausted;
    assert_eq!(check(&grouped(), &r), Err(Braked::Exhausted));
    assert!(!counts(AgentStatus::Exhausted));
    assert!(!unhealthy(AgentStatus::Exhausted, true));
    assert!(
        unhealthy(AgentStatus::Busy, true),
        "under remediation is unhealthy"
    );
    assert!(unhealthy(AgentStatus::Offline, false));
    assert!(!unhealthy(AgentStatus::Idle, false));
}

#[test]
fn a_pause_of_the_fleet_or_of_the_agents_group_brakes_first() {
    let pause = |scope| Pause {
        scope,
        reason: "provider outage".into(),
        by: "alice".into(),
        at: t0(),
    };
    let other = [pause(Scope::Group("web".into()))];
    let mut r = request(census(10, 0), census(10, 0));
    r.pauses = &other;
    assert!(check(&grouped(), &r).is_ok(), "another group's pause");
    let fleet = [pause(Scope::Fleet)];
    r.pauses = &fleet;
    let braked = check(&grouped(), &r).unwrap_err();
    assert_eq!(braked.reason(), "HEALING_PAUSED");
    assert_eq!(
        braked.to_string(),
        "healing is paused for the fleet by alice: provider outage"
    );
    let mine = [pause(Scope::Group("infra".into()))];
    r.pauses = &mine;
    assert!(matches!(check(&grouped(), &r), Err(Braked::Paused(_))));
}

#[test]
fn the_rates_and_the_budget_brake_with_their_numbers() {
    let policy = grouped();
    let mut r = request(census(1000, 0), census(1000, 0));
    r.fleet_plans_last_minute = 60;
    assert_eq!(
        check(&policy, &r),
        Err(Braked::RateLimited {
            scope: Scope::Fleet,
            plans: 60,
            max: 60
        })
    );
    r.fleet_plans_last_minute = 59;
    r.group_plans_last_minute = 20;
    assert!(matches!(
        check(&policy, &r),
        Err(Braked::RateLimited {
            scope: Scope::Group(_),
            ..
        })
    ));
    r.group_plans_last_minute = 0;
    r.agent_plans_in_window = 3;
    let spent = check(&policy, &r).unwrap_err();
    assert_eq!(spent.reason(), "RETRY_BUDGET_SPENT");
    assert_eq!(
        spent.to_string(),
        "the agent had 3 plans within 1h, its budget is 3"
    );
}

#[test]
fn the_budget_starts_again_after_the_healthy_period() {
    let policy = HealingPolicy::default();
    let now = t0();
    assert_eq!(budget_since(&policy, None, now), now - Duration::hours(1));
    // Healthy for 30 min: not yet long enough, the window counts.
    let recent = now - Duration::minutes(30);
    assert_eq!(
        budget_since(&policy, Some(recent), now),
        now - Duration::hours(1)
    );
    // Healthy for the whole period: plans before it no longer count.
    let policy = HealingPolicy {
        retry_window: Duration::hours(6),
        ..policy
    };
    let since = now - Duration::minutes(90);
    assert_eq!(budget_since(&policy, Some(since), now), since);
}

#[test]
fn a_breaker_opens_after_k_failures_half_opens_after_the_cooldown_and_closes_on_success() {
    let policy = HealingPolicy::default();
    let mut b = Breaker::default();
    for _ in 0..4 {
        b = b.after_outcome(false, &policy, t0());
        assert_eq!(b.admits(&policy, t0()), Admit::Yes);
    }
    b = b.after_outcome(false, &policy, t0());
    assert_eq!(b, Breaker::Open { since: t0() });
    let until = t0() + Duration::minutes(5);
    assert_eq!(
        b.admits(&policy, t0() + Duration::minutes(1)),
        Admit::No { until }
    );
    let trial = b.admits(&policy, until);
    assert_eq!(trial, Admit::Trial);
    b = b.after_admit(trial, until);
    assert_eq!(b, Breaker::HalfOpen { trial_at: until });
    assert!(
        matches!(
            b.admits(&policy, until + Duration::seconds(1)),
            Admit::No { .. }
        ),
        "one trial at a time"
    );
    // The trial fails: open again; the next trial succeeds: closed.
    b = b.after_outcome(false, &policy, until);
    assert_eq!(b, Breaker::Open { since: until });
    b = b.after_admit(Admit::Trial, until + Duration::minutes(5));
    b = b.after_outcome(true, &policy, until + Duration::minutes(6));
    assert_eq!(b, Breaker::Closed { failures: 0 });
    // A success in a row of failures starts the count again.
    let b = Breaker::Closed { failures: 3 }.after_outcome(true, &policy, t0());
    assert_eq!(b, Breaker::Closed { failures: 0 });
}

#[test]
fn with_every_breaker_open_no_strategy_is_admitted_it_never_fails_open() {
    let policy = HealingPolicy::default();
    let open = Breaker::Open { since: t0() };
    let ranked = [1, 2, 3];
    let breakers = BTreeMap::from([(1, open), (2, Breaker::default())]);
    assert_eq!(
        choose_admitted(&ranked, &breakers, &policy, t0()),
        Some((2, Admit::Yes)),
        "the next best"
    );
    let all = BTreeMap::from([(1, open), (2, open), (3, open)]);
    assert_eq!(choose_admitted(&ranked, &all, &policy, t0()), None);
    let later = t0() + Duration::minutes(5);
    assert_eq!(
        choose_admitted(&ranked, &all, &policy, later),
        Some((1, Admit::Trial))
    );
}

#[test]
fn a_policy_file_overrides_the_base_and_names_the_line_of_a_bad_value() {
    let base = HealingPolicy::default();
    let policy = parse_policy(
        "max_unhealthy_percent = 25\ngroup_by = \"team\"\nretry_window = \"2h\"\ndry_run = true\n",
        &base,
    )
    .unwrap();
    assert_eq!(policy.max_unhealthy_percent, 25);
    assert_eq!(policy.group_by.as_deref(), Some("team"));
    assert_eq!(policy.retry_window, Duration::hours(2));
    assert!(policy.dry_run);
    assert_eq!(
        policy.retry_budget, base.retry_budget,
        "unset keys keep the base"
    );
    assert_eq!(
        parse_policy("retry_budget = 3\nmax_unhealthy_percent = 140\n", &base).unwrap_err(),
        "line 2: max_unhealthy_percent must be 0 to 100, not 140"
    );
    assert_eq!(
        parse_policy("breaker_cooldown = \"soon\"\n", &base).unwrap_err(),
        "line 1: breaker_cooldown must be a duration from 1s to 30days (such as 90s or 1h), not \"soon\""
    );
    assert!(
        parse_policy("\nmax_unhealty = 3\n", &base)
            .unwrap_err()
            .starts_with("line 2: "),
        "an unknown key names its line"
    );
    assert!(parse_policy("retry_budget = 0\n", &base).is_err());
    assert_eq!(parse_policy("", &base).unwrap(), base);
}

#[test]
fn the_rate_answers_before_the_share_and_brakes_off_leaves_pauses_and_exhaustion() {
    let policy = grouped();
    // Both the rate and the share would brake: the rate answers; the
    // agent's own brakes pass.
    let mut r = request(census(10, 9), census(10, 9));
    r.fleet_plans_last_minute = policy.max_plans_per_minute;
    assert!(matches!(
        check(&policy, &r),
        Err(Braked::RateLimited { .. })
    ));
    assert!(check_agent(&policy, &r).is_ok());
    r.fleet_plans_last_minute = 0;
    assert!(matches!(
        check_counts(&policy, &r),
        Err(Braked::UnhealthyShare { .. })
    ));

    let off = HealingPolicy {
        brakes: false,
        ..grouped()
    };
    r.fleet_plans_last_minute = 1_000_000;
    r.agent_plans_in_window = 1_000_000;
    assert_eq!(check(&off, &r), Ok(()));
    let pauses = [Pause {
        scope: Scope::Fleet,
        reason: "outage".into(),
        by: "ops".into(),
        at: t0(),
    }];
    let paused = Request {
        pauses: &pauses,
        ..r.clone()
    };
    assert!(matches!(check(&off, &paused), Err(Braked::Paused(_))));
    let exhausted = Request {
        agent_status: AgentStatus::Exhausted,
        ..r
    };
    assert_eq!(check(&off, &exhausted), Err(Braked::Exhausted));
}

#[test]
fn flags_are_checked_naming_the_flag_and_scopes_need_group_by() {
    let flag = |key: &str| format!("--healing-{}", key.replace('_', "-"));
    let bad = HealingPolicy {
        max_unhealthy_percent: 101,
        ..HealingPolicy::default()
    };
    assert_eq!(
        bad.checked(flag).unwrap_err(),
        "--healing-max-unhealthy-percent must be 0 to 100, not 101"
    );
    let bad = HealingPolicy {
        breaker_cooldown: Duration::zero(),
        ..HealingPolicy::default()
    };
    assert!(
        bad.checked(flag)
            .unwrap_err()
            .starts_with("--healing-breaker-cooldown")
    );
    assert!(HealingPolicy::default().checked(flag).is_ok());

    assert_eq!(
        Scope::named(" ", &HealingPolicy::default()),
        Ok(Scope::Fleet)
    );
    assert!(matches!(
        Scope::named("blue", &HealingPolicy::default()),
        Err(ScopeRefused::NoGroups(_))
    ));
    assert_eq!(
        Scope::named("blue", &grouped()),
        Ok(Scope::Group("blue".into()))
    );
    assert!(matches!(
        Scope::named(&"x".repeat(300), &grouped()),
        Err(ScopeRefused::Invalid(_))
    ));
    for scope in [Scope::Fleet, Scope::Group("a:b".into())] {
        assert_eq!(Scope::parse_stored(&scope.stored()), Some(scope));
    }
    assert!(pause(Scope::Fleet, "  ", "ops", t0()).is_err());
}

#[test]
fn breakers_round_trip_their_stored_parts_and_closed_off_lists_the_ones_not_admitting() {
    let policy = HealingPolicy::default();
    let open = Breaker::Open { since: t0() };
    for b in [
        Breaker::Closed { failures: 3 },
        open,
        Breaker::HalfOpen { trial_at: t0() },
    ] {
        let (state, failures, since) = b.parts();
        assert_eq!(Breaker::from_parts(state, failures, since), Some(b));
    }
    assert_eq!(Breaker::from_parts("OPEN", 0, None), None);
    let breakers = [(1, open), (2, Breaker::Closed { failures: 4 })];
    assert_eq!(closed_off(&breakers, &policy, t0()), [1]);
    assert!(closed_off(&breakers, &policy, t0() + policy.breaker_cooldown).is_empty());
    assert_eq!(healthy_since(Some(t0()), 0), Some(t0()));
    assert_eq!(healthy_since(Some(t0()), 1), None);
}

#[test]
fn a_plan_near_a_limit_is_not_decided_beside_others_and_slots_are_stable() {
    let policy = HealingPolicy {
        max_plans_per_minute: 60,
        ..grouped()
    };
    // 1,000 agents, 100 in the group: 400 and 40 allowed.
    let far = request(census(1000, 10), census(100, 5));
    assert!(check(&policy, &far).is_ok());
    assert!(room_for_neighbours(&policy, &far));
    // The group has 40 allowed: 25 unhealthy + this one + 15 others fits,
    // 26 does not.
    let edge = request(census(1000, 10), census(100, 24));
    assert!(room_for_neighbours(&policy, &edge));
    let near = request(census(1000, 10), census(100, 25));
    assert!(check(&policy, &near).is_ok());
    assert!(!room_for_neighbours(&policy, &near));
    let mut rate = far.clone();
    rate.fleet_plans_last_minute = 60 - LOCK_SLOTS;
    assert!(room_for_neighbours(&policy, &rate));
    rate.fleet_plans_last_minute += 1;
    assert!(!room_for_neighbours(&policy, &rate));
    let off = HealingPolicy {
        brakes: false,
        ..policy
    };
    assert!(room_for_neighbours(&off, &rate));
    assert_eq!(lock_slot("agent-7"), lock_slot("agent-7"));
    let slots: std::collections::BTreeSet<u32> =
        (0..200).map(|i| lock_slot(&format!("a{i}"))).collect();
    assert_eq!(slots.len(), LOCK_SLOTS as usize);
}

#[test]
fn the_census_changes_with_what_counts_and_only_that() {
    use crate::domain::labels::Labels;
    use AgentStatus::{Busy, Exhausted, Idle, Offline};
    let team = |t: &str| Labels::from([("team".to_owned(), t.to_owned())]);
    let (x, y, none) = (team("x"), team("y"), Labels::new());
    let change = |key: &str, value: &str, agents, offline, exhausted| CensusChange {
        key: key.into(),
        value: value.into(),
        agents,
        offline,
        exhausted,
    };
    // IDLE to BUSY and back: nothing.
    assert_eq!(census_changes([(Some((Idle, &x)), Some((Busy, &x)))]), []);
    // A registration, an agent gone OFFLINE, one moved from team y to x
    // while EXHAUSTED, an OFFLINE one deleted: summed per scope (the fleet's
    // sums to nothing here: one agent in, one out, one OFFLINE in, one out).
    assert_eq!(
        census_changes([
            (None, Some((Idle, &x))),
            (Some((Busy, &x)), Some((Offline, &x))),
            (Some((Exhausted, &y)), Some((Exhausted, &x))),
            (Some((Offline, &none)), None),
        ]),
        [change("team", "x", 2, 1, 1), change("team", "y", -1, 0, -1)]
    );
    // An agent registered EXHAUSTED into no group: the fleet's row first.
    assert_eq!(
        census_changes([(None, Some((Exhausted, &none))), (None, Some((Idle, &y)))]),
        [change("", "", 2, 0, 1), change("team", "y", 1, 0, 0)]
    );
}
