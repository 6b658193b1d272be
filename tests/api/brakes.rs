//! The remediation brakes (issue 24) through the API, on both stores: the
//! unhealthy share of a group, replicas racing for the last slot, breakers,
//! retry budgets and their reset, pauses, dry runs, EXHAUSTED agents.

use std::time::Duration;

use fleetcare::config::HealingArgs;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::healing::{client, outcome, plan, report};
use crate::helpers::{TestApp, TestDb, reason, test_args};

type Healing = HealingServiceClient<Channel>;

/// The test servers' healing settings with these brakes (the rest as the
/// defaults, not the other tests' unbraked ones).
fn braked(healing: HealingArgs, set: impl FnOnce(&mut HealingArgs)) -> HealingArgs {
    let defaults = fleetcare::config::ServeArgs::default().healing;
    let mut args = HealingArgs {
        healing_seed: healing.healing_seed,
        ..defaults
    };
    set(&mut args);
    args
}

async fn register(app: &TestApp, agent: &str, team: &str) {
    app.agents
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            agent_id: agent.into(),
            labels: [("team".to_owned(), team.to_owned())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .expect("register");
}

async fn decisions(
    c: &mut Healing,
    request: pb::ListHealingDecisionsRequest,
) -> Vec<pb::HealingDecision> {
    c.list_healing_decisions(pb::ListHealingDecisionsRequest {
        page_size: 1000,
        ..request
    })
    .await
    .expect("list decisions")
    .into_inner()
    .decisions
}

async fn policy(c: &mut Healing) -> pb::GetHealingPolicyResponse {
    c.get_healing_policy(pb::GetHealingPolicyRequest {})
        .await
        .expect("get healing policy")
        .into_inner()
}

/// A request for a plan answered without one: its reason.
fn refused(result: Result<pb::RecoveryAction, tonic::Status>) -> String {
    let status = result.expect_err("braked");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    reason(&status)
}

#[tokio::test]
async fn a_storm_in_one_group_gets_at_most_the_brakes_share_and_every_decision_is_recorded() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_group_by = Some("team".into());
        h.healing_max_unhealthy = 40;
        h.healing_max_plans_per_minute = 1000;
        h.healing_max_group_plans_per_minute = 1000;
    });
    let app = TestApp::spawn_with(args).await;
    let ids: Vec<String> = (0..100).map(|i| format!("storm-{i:03}")).collect();
    for id in &ids {
        register(&app, id, "blue").await;
    }
    // A few agents of another team: the group's share is of its own.
    for i in 0..4 {
        register(&app, &format!("calm-{i}"), "green").await;
    }
    let mut c = client(&app);
    let mut events = Vec::new();
    for id in &ids {
        events.push(
            report(&mut c, id, "tool call failed: connection reset", &[])
                .await
                .id,
        );
    }
    // Every agent asks at once.
    let results = futures::future::join_all(events.iter().map(|&event| {
        let mut c = client(&app);
        async move { plan(&mut c, event).await }
    }))
    .await;
    let planned = results.iter().filter(|r| r.is_ok()).count();
    // 40 % of the 100 in team blue (the fleet's 40 % of 104 is 41).
    assert_eq!(planned, 40);
    for r in results.iter().filter(|r| r.is_err()) {
        let status = r.as_ref().unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            reason(status),
            "HEALING_BRAKE_UNHEALTHY_SHARE",
            "{status:?}"
        );
        assert!(
            status.message().contains("group \"blue\""),
            "{}",
            status.message()
        );
    }
    let all = decisions(&mut c, Default::default()).await;
    assert_eq!(all.len(), 100);
    let planned_decisions: Vec<_> = all
        .iter()
        .filter(|d| d.verdict == pb::HealingVerdict::Planned as i32)
        .collect();
    assert_eq!(planned_decisions.len(), 40);
    assert!(
        planned_decisions
            .iter()
            .all(|d| d.recovery_action_id > 0 && d.reason.is_empty())
    );
    for d in all
        .iter()
        .filter(|d| d.verdict == pb::HealingVerdict::Braked as i32)
    {
        assert_eq!(d.reason, "HEALING_BRAKE_UNHEALTHY_SHARE");
        assert_eq!(d.recovery_action_id, 0);
        let group = d.group.as_ref().expect("the group's numbers");
        assert_eq!((group.group.as_str(), group.counted), ("blue", 100));
        // The numbers it was braked on: the group full to its share.
        assert_eq!((group.unhealthy, group.allowed), (40, 40));
        assert_eq!(d.fleet.as_ref().unwrap().counted, 104);
    }
    // The policy's view: the fleet's share and each group's.
    let view = policy(&mut c).await;
    let shares: Vec<_> = view
        .shares
        .iter()
        .map(|s| (s.group.as_str(), s.counted, s.unhealthy, s.allowed))
        .collect();
    assert_eq!(
        shares,
        [("", 104, 40, 41), ("blue", 100, 40, 40), ("green", 4, 0, 1)]
    );
    // A green agent still heals: its group has room (the fleet has one more).
    let green = report(&mut c, "calm-0", "tool call failed", &[]).await;
    plan(&mut c, green.id).await.expect("green plans");
    // The metrics count the decisions by verdict and reason.
    let m = crate::metrics::scrape(&app).await;
    let counted = |verdict, reason| {
        m.value(
            "fleetcare_healing_decisions_total",
            &[("verdict", verdict), ("reason", reason)],
        )
    };
    assert_eq!(counted("BRAKED", "HEALING_BRAKE_UNHEALTHY_SHARE"), 60.0);
    assert_eq!(counted("PLANNED", ""), 41.0);
}

#[tokio::test]
async fn offline_agents_count_as_unhealthy_and_exhausted_ones_are_never_planned() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_max_unhealthy = 50;
        h.healing_min_unhealthy = 0;
    });
    let app = TestApp::spawn_with(args).await;
    for id in ["a", "b", "c", "d"] {
        register(&app, id, "x").await;
    }
    let mut agents = app.agents.clone();
    agents
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a".into(),
        })
        .await
        .expect("offline");
    agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "d".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            ..Default::default()
        })
        .await
        .expect("exhausted");
    let mut c = client(&app);
    // EXHAUSTED (a quota, not a fault): never planned.
    let d = report(&mut c, "d", "tool call failed", &[]).await;
    assert_eq!(refused(plan(&mut c, d.id).await), "HEALING_AGENT_EXHAUSTED");
    // Counted: a, b, c (d is neither healthy nor unhealthy); a is OFFLINE,
    // so one more of 50 % of 3 (1) would be two: braked.
    let b = report(&mut c, "b", "tool call failed", &[]).await;
    assert_eq!(
        refused(plan(&mut c, b.id).await),
        "HEALING_BRAKE_UNHEALTHY_SHARE"
    );
    // The OFFLINE agent itself may be planned: it is unhealthy already.
    let a = report(&mut c, "a", "tool call failed", &[]).await;
    plan(&mut c, a.id).await.expect("the offline agent plans");
    let listed = decisions(
        &mut c,
        pb::ListHealingDecisionsRequest {
            agent_id: "b".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listed.len(), 1);
    let fleet = listed[0].fleet.as_ref().unwrap();
    assert_eq!((fleet.counted, fleet.unhealthy, fleet.allowed), (3, 1, 1));
}

#[tokio::test]
async fn rates_and_retry_budgets_brake_and_budgets_reset_after_a_healthy_period() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_max_unhealthy = 100;
        h.healing_retry_budget = 2;
        h.healing_retry_window = Duration::from_secs(3600);
        h.healing_min_healthy_period = Duration::from_secs(600);
        h.healing_max_plans_per_minute = 1000;
    });
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    // Time moves a second between the steps, as it would.
    async fn heal_once(
        c: &mut Healing,
        clock: &fleetcare::runtime::clock::ManualClock,
        agent: &str,
    ) -> Result<(), tonic::Status> {
        let event = report(c, agent, "tool call failed", &[]).await;
        clock.advance(chrono::Duration::seconds(1));
        let action = plan(c, event.id).await?;
        clock.advance(chrono::Duration::seconds(1));
        outcome(c, action.id, true, 1).await;
        clock.advance(chrono::Duration::seconds(1));
        Ok(())
    }
    heal_once(&mut c, &clock, "a").await.unwrap();
    heal_once(&mut c, &clock, "a").await.unwrap();
    let third = report(&mut c, "a", "tool call failed", &[]).await;
    assert_eq!(refused(plan(&mut c, third.id).await), "RETRY_BUDGET_SPENT");
    let spent = policy(&mut c).await.spent_budgets;
    assert_eq!(
        spent
            .iter()
            .map(|s| (s.agent_id.as_str(), s.plans))
            .collect::<Vec<_>>(),
        [("a", 2)]
    );
    // Its braked error broke its healthy period: still spent 11 minutes on.
    clock.advance(chrono::Duration::minutes(11));
    let fourth = report(&mut c, "a", "tool call failed", &[]).await;
    assert_eq!(refused(plan(&mut c, fourth.id).await), "RETRY_BUDGET_SPENT");
    // b heals twice, then stays healthy for the period: its budget is back.
    heal_once(&mut c, &clock, "b").await.unwrap();
    heal_once(&mut c, &clock, "b").await.unwrap();
    clock.advance(chrono::Duration::minutes(9));
    let early = report(&mut c, "b", "tool call failed", &[]).await;
    // 9 minutes healthy is not 10: spent (and this error ends its period).
    assert_eq!(refused(plan(&mut c, early.id).await), "RETRY_BUDGET_SPENT");
    heal_once(&mut c, &clock, "c").await.unwrap();
    heal_once(&mut c, &clock, "c").await.unwrap();
    clock.advance(chrono::Duration::minutes(10));
    heal_once(&mut c, &clock, "c")
        .await
        .expect("healthy for the period: budget reset");
    // The window passing resets a too.
    clock.advance(chrono::Duration::minutes(40));
    heal_once(&mut c, &clock, "a")
        .await
        .expect("the window passed");

    // The fleet-wide rate.
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_max_unhealthy = 100;
        h.healing_max_plans_per_minute = 3;
    });
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    for agent in ["r1", "r2", "r3"] {
        heal_once(&mut c, &clock, agent).await.unwrap();
    }
    let fourth = report(&mut c, "r4", "tool call failed", &[]).await;
    assert_eq!(
        refused(plan(&mut c, fourth.id).await),
        "HEALING_RATE_LIMITED"
    );
    clock.advance(chrono::Duration::seconds(55));
    plan(&mut c, fourth.id).await.expect("a minute later");
}

#[tokio::test]
async fn a_breaker_opens_after_failures_in_a_row_half_opens_after_the_cooldown_and_closes_on_success()
 {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_max_unhealthy = 100;
        h.healing_retry_budget = 1000;
        h.healing_breaker_failures = 3;
        h.healing_breaker_cooldown = Duration::from_secs(300);
    });
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    // Each error in a context of its own: no evidence, so the planner plans
    // the heuristic strategy (a cold start) unless its breaker is open.
    let mut n = 0;
    let mut next_plan = |c: &mut Healing| {
        n += 1;
        let agent = format!("k{n}");
        let component = format!("component-{n}");
        let mut c = c.clone();
        async move {
            let event = report(
                &mut c,
                &agent,
                "connection reset by peer",
                &[("component", &component)],
            )
            .await;
            plan(&mut c, event.id).await.unwrap()
        }
    };
    let first = next_plan(&mut c).await;
    let heuristic = first.strategy;
    outcome(&mut c, first.id, false, 1).await;
    for _ in 0..2 {
        let action = next_plan(&mut c).await;
        assert_eq!(action.strategy, heuristic);
        outcome(&mut c, action.id, false, 1).await;
    }
    // Three failures in a row, fleet-wide: open.
    let view = policy(&mut c).await;
    let [breaker] = view.open_breakers.as_slice() else {
        panic!("one open breaker: {view:?}");
    };
    assert_eq!(
        (breaker.strategy, breaker.state),
        (heuristic, pb::BreakerState::Open as i32)
    );
    assert_eq!(
        breaker.retry_at.unwrap().seconds,
        breaker.since.unwrap().seconds + 300
    );
    // Plans take the next best strategy, never the open one.
    for _ in 0..3 {
        let action = next_plan(&mut c).await;
        assert_ne!(action.strategy, heuristic, "{action:?}");
    }
    // After the cooldown, one plan goes through half-open; others wait for it.
    clock.advance(chrono::Duration::seconds(301));
    let trial = next_plan(&mut c).await;
    assert_eq!(trial.strategy, heuristic);
    let view = policy(&mut c).await;
    assert_eq!(
        view.open_breakers[0].state,
        pb::BreakerState::HalfOpen as i32
    );
    let during = next_plan(&mut c).await;
    assert_ne!(during.strategy, heuristic);
    // The trial's success closes it.
    outcome(&mut c, trial.id, true, 1).await;
    assert!(policy(&mut c).await.open_breakers.is_empty());
    assert_eq!(next_plan(&mut c).await.strategy, heuristic);
}

#[tokio::test]
async fn pauses_brake_every_plan_in_their_scope_until_resumed_and_a_dry_run_hands_out_nothing() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_group_by = Some("team".into());
        h.healing_max_unhealthy = 100;
    });
    let app = TestApp::spawn_with(args.clone()).await;
    register(&app, "p1", "red").await;
    register(&app, "p2", "gold").await;
    let mut c = client(&app);
    let missing = c
        .pause_healing(pb::PauseHealingRequest {
            group: String::new(),
            reason: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let pause = c
        .pause_healing(pb::PauseHealingRequest {
            group: "red".into(),
            reason: "bad config pushed to red".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pause
        .unwrap();
    assert_eq!(
        (pause.group.as_str(), pause.paused_by.as_str()),
        ("red", "anonymous")
    );
    let red = report(&mut c, "p1", "tool call failed", &[]).await;
    let status = plan(&mut c, red.id).await.unwrap_err();
    assert_eq!(reason(&status), "HEALING_PAUSED");
    assert!(
        status.message().contains("bad config pushed to red"),
        "{status:?}"
    );
    let gold = report(&mut c, "p2", "tool call failed", &[]).await;
    plan(&mut c, gold.id).await.expect("another group heals");
    assert_eq!(policy(&mut c).await.pauses, [pause]);
    let resumed = c
        .resume_healing(pb::ResumeHealingRequest {
            group: "red".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resumed.resumed);
    plan(&mut c, red.id).await.expect("resumed");
    let again = c
        .resume_healing(pb::ResumeHealingRequest {
            group: "red".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.resumed);
    app.stop().await;

    // Without group_by, a group names nothing.
    let mut ungrouped = args.clone();
    ungrouped.healing.healing_group_by = None;
    ungrouped.healing.healing_dry_run = true;
    let app = TestApp::spawn_with(ungrouped).await;
    let mut c = client(&app);
    let status = c
        .pause_healing(pb::PauseHealingRequest {
            group: "red".into(),
            reason: "r".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // A dry run: decided and recorded, never handed out.
    let event = report(&mut c, "p3", "tool call failed", &[]).await;
    let before = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions
        .len();
    assert_eq!(refused(plan(&mut c, event.id).await), "HEALING_DRY_RUN");
    let after = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions
        .len();
    assert_eq!(before, after);
    let dry = decisions(
        &mut c,
        pb::ListHealingDecisionsRequest {
            error_event_id: event.id,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].verdict, pb::HealingVerdict::DryRun as i32);
    assert_ne!(dry[0].strategy, 0);
    assert!(policy(&mut c).await.policy.unwrap().dry_run);
}

postgres_only! {
    #[tokio::test]
    async fn two_replicas_racing_for_the_last_slot_give_one_plan() {
        let db = TestDb::new();
        let mut args = test_args(&db.url);
        args.healing = braked(args.healing, |h| {
            h.healing_max_unhealthy = 0;
            h.healing_min_unhealthy = 1;
            h.healing_max_plans_per_minute = 1000;
        });
        let one = TestApp::spawn_with(args.clone()).await;
        let two = TestApp::spawn_with(args).await;
        for round in 0..5 {
            let ids: Vec<String> = (0..6).map(|i| format!("race-{round}-{i}")).collect();
            let mut events = Vec::new();
            for id in &ids {
                register(&one, id, "x").await;
                events.push(report(&mut client(&one), id, "tool call failed", &[]).await.id);
            }
            let results = futures::future::join_all(events.iter().enumerate().map(|(i, &event)| {
                let mut c = client(if i % 2 == 0 { &one } else { &two });
                async move { plan(&mut c, event).await }
            }))
            .await;
            let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            // Its success frees the slot for the next round.
            outcome(&mut client(&one), winners[0].id, true, 1).await;
        }
    }

    #[tokio::test]
    async fn two_replicas_planning_side_by_side_stop_exactly_at_the_share() {
        let db = TestDb::new();
        let mut args = test_args(&db.url);
        args.healing = braked(args.healing, |h| {
            h.healing_max_unhealthy = 50;
            h.healing_max_plans_per_minute = 1000;
        });
        let one = TestApp::spawn_with(args.clone()).await;
        let two = TestApp::spawn_with(args).await;
        // 80 agents: 40 allowed. The first plans have room for their
        // neighbours and count side by side under their slots; the last
        // ones are decided alone.
        let mut events = Vec::new();
        for i in 0..80 {
            let id = format!("side-{i:02}");
            register(&one, &id, "x").await;
            events.push(report(&mut client(&two), &id, "tool call failed", &[]).await.id);
        }
        let results = futures::future::join_all(events.iter().enumerate().map(|(i, &event)| {
            let mut c = client(if i % 2 == 0 { &one } else { &two });
            async move { plan(&mut c, event).await }
        }))
        .await;
        let planned = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(planned, 40, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(reason(r), "HEALING_BRAKE_UNHEALTHY_SHARE", "{r:?}");
        }
    }
}

/// The shares the brakes count on follow every kind of write of the agents:
/// registrations, label changes, OFFLINE and back, EXHAUSTED, work slots
/// (which leave them alone), deletions and active recoveries; the fleet's
/// and each group's, as `GetHealingPolicy` shows them.
#[tokio::test]
async fn the_census_follows_registrations_labels_statuses_deletions_and_recoveries() {
    use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing = braked(args.healing, |h| {
        h.healing_group_by = Some("team".into());
        h.healing_max_unhealthy = 100;
    });
    let app = TestApp::spawn_with(args).await;
    for (id, team) in [("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("e", "z")] {
        register(&app, id, team).await;
    }
    app.register("f").await;
    let mut agents = app.agents.clone();
    for id in ["a", "f", "e"] {
        agents
            .mark_offline(pb::MarkOfflineRequest {
                agent_id: id.into(),
            })
            .await
            .expect("offline");
    }
    // f comes back; e is deleted while OFFLINE.
    agents
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "f".into(),
        })
        .await
        .expect("heartbeat");
    DispatchServiceClient::new(app.channel.clone())
        .delete_agent(pb::DeleteAgentRequest {
            agent_id: "e".into(),
        })
        .await
        .expect("delete");
    agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "d".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            ..Default::default()
        })
        .await
        .expect("exhausted");
    // c moves from team y to team x; b takes a work slot.
    register(&app, "c", "x").await;
    app.start_work("b").await.expect("start work");

    let mut c = client(&app);
    let shares = |p: pb::GetHealingPolicyResponse| -> Vec<(String, u32, u32)> {
        p.shares
            .into_iter()
            .map(|s| (s.group, s.counted, s.unhealthy))
            .collect()
    };
    // Counted: a, b, c, f (d EXHAUSTED, e deleted); a OFFLINE. Team x: a,
    // b, c; team y is empty and team z holds only d: neither is shown.
    assert_eq!(
        shares(policy(&mut c).await),
        [("".to_owned(), 4, 1), ("x".to_owned(), 3, 1)]
    );
    // An active recovery makes b unhealthy; a's (OFFLINE already) counts once.
    let b = report(&mut c, "b", "tool call failed", &[]).await;
    plan(&mut c, b.id).await.expect("b plans");
    let a = report(&mut c, "a", "tool call failed", &[]).await;
    plan(&mut c, a.id).await.expect("a plans");
    assert_eq!(
        shares(policy(&mut c).await),
        [("".to_owned(), 4, 2), ("x".to_owned(), 3, 2)]
    );
    // d's limit lifts by an operator's resume: counted again, in team z.
    DispatchServiceClient::new(app.channel.clone())
        .resume_agent(pb::ResumeAgentRequest {
            agent_id: "d".into(),
            reason: "the limit lifted".into(),
        })
        .await
        .expect("resume");
    assert_eq!(
        shares(policy(&mut c).await),
        [
            ("".to_owned(), 5, 2),
            ("x".to_owned(), 3, 2),
            ("z".to_owned(), 1, 0)
        ]
    );
}

postgres_only! {
    /// The census's migration (20270108000001) counts the agents stored
    /// before it.
    #[tokio::test]
    async fn agents_stored_before_the_census_are_counted_on_postgres() {
        let db = TestDb::postgres();
        let pool = crate::helpers::postgres_migrated_before(&db, 20270108000001).await;
        sqlx::query(
            "INSERT INTO agents (agent_id, status, labels, registered_at, last_heartbeat_at,
                                 last_transition_at, revision)
             VALUES ('a', 'OFFLINE', '{\"team\": \"x\"}', now(), now(), now(), 0),
                    ('b', 'BUSY', '{\"team\": \"x\"}', now(), now(), now(), 0),
                    ('c', 'EXHAUSTED', '{\"team\": \"y\"}', now(), now(), now(), 0),
                    ('d', 'IDLE', '{}', now(), now(), now(), 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let mut args = test_args(&db.url);
        args.healing = braked(args.healing, |h| {
            h.healing_group_by = Some("team".into());
        });
        let app = TestApp::spawn_with(args).await;
        let shares: Vec<(String, u32, u32)> = policy(&mut client(&app))
            .await
            .shares
            .into_iter()
            .map(|s| (s.group, s.counted, s.unhealthy))
            .collect();
        assert_eq!(shares, [("".to_owned(), 3, 1), ("x".to_owned(), 2, 1)]);
        app.stop().await;
    }
}
