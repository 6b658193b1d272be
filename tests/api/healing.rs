//! HealingService through the API: classification, recurrence, plans behind the
//! safety gate, one active recovery per agent, leases, learning, restarts.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::helpers::{TestApp, TestDb, test_args};

pub(crate) fn client(app: &TestApp) -> HealingServiceClient<tonic::transport::Channel> {
    HealingServiceClient::new(app.channel.clone())
}

pub(crate) async fn report(
    c: &mut HealingServiceClient<tonic::transport::Channel>,
    agent: &str,
    message: &str,
    context: &[(&str, &str)],
) -> pb::ErrorEvent {
    c.report_error(pb::ReportErrorRequest {
        agent_id: agent.into(),
        message: message.into(),
        context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        error_type_hint: 0,
    })
    .await
    .expect("report error")
    .into_inner()
    .event
    .unwrap()
}

pub(crate) async fn plan(
    c: &mut HealingServiceClient<tonic::transport::Channel>,
    event: i64,
) -> Result<pb::RecoveryAction, tonic::Status> {
    c.plan_recovery(pb::PlanRecoveryRequest {
        error_event_id: event,
    })
    .await
    .map(|r| r.into_inner().action.unwrap())
}

pub(crate) async fn outcome(
    c: &mut HealingServiceClient<tonic::transport::Channel>,
    action: i64,
    success: bool,
    secs: i64,
) -> pb::RecoveryAction {
    c.report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
        action_id: action,
        success,
        duration: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
        details: "done".into(),
    })
    .await
    .expect("outcome")
    .into_inner()
    .action
    .unwrap()
}

#[tokio::test]
async fn errors_are_classified_scored_and_marked_recurring() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);

    let e = report(&mut c, "a", "Network timeout while calling the API", &[]).await;
    assert_eq!(e.error_type, pb::ErrorType::CommunicationError as i32);
    assert!((e.severity - 0.3).abs() < 1e-9);
    assert!(!e.critical && !e.recurring);

    // Keyword order: "limit" (resource) wins over "timeout" (communication).
    let e = report(&mut c, "a", "rate limit hit after timeout", &[]).await;
    assert_eq!(e.error_type, pb::ErrorType::ResourceExhaustion as i32);

    // Severity multipliers: 0.9 x 1.5 capped at 1; critical.
    let e = report(
        &mut c,
        "a",
        "safety violation",
        &[("critical_operation", "true")],
    )
    .await;
    assert_eq!(e.error_type, pb::ErrorType::SafetyViolation as i32);
    assert!((e.severity - 1.0).abs() < 1e-9);
    assert!(e.critical);
    let e = report(&mut c, "a", "execution failed", &[("retry_count", "5")]).await;
    assert!((e.severity - 0.6).abs() < 1e-9, "{}", e.severity);

    // A hint wins over the message.
    let hinted = c
        .report_error(pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "network down".into(),
            context: Default::default(),
            error_type_hint: pb::ErrorType::DependencyFailure as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(hinted.error_type, pb::ErrorType::DependencyFailure as i32);

    // The third execution failure of agent b within the hour is recurring; agent a's don't count.
    let first = report(&mut c, "b", "step failed", &[]).await;
    let second = report(&mut c, "b", "step failed again", &[]).await;
    let third = report(&mut c, "b", "failed once more", &[]).await;
    assert!(!first.recurring && !second.recurring);
    assert!(third.recurring);
    let other = report(&mut c, "b", "network flake", &[]).await;
    assert!(!other.recurring, "another type does not count");

    for bad in [
        pb::ReportErrorRequest {
            agent_id: "bad id".into(),
            message: "x".into(),
            ..Default::default()
        },
        pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "".into(),
            ..Default::default()
        },
        pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "m".repeat(64 * 1024 + 1),
            ..Default::default()
        },
        pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "x".into(),
            error_type_hint: 77,
            ..Default::default()
        },
        pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "x".into(),
            context: (0..65)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            ..Default::default()
        },
    ] {
        let err = c.report_error(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}

#[tokio::test]
async fn one_active_recovery_per_agent_until_its_outcome() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let e1 = report(&mut c, "a", "tool execution failed", &[]).await;
    let action = plan(&mut c, e1.id).await.unwrap();
    assert_eq!(
        action.strategy,
        pb::RecoveryStrategy::Retry as i32,
        "heuristic for execution failures"
    );
    assert_eq!(action.status, pb::RecoveryStatus::Active as i32);
    assert_eq!(
        action.parameters.get("max_attempts").map(String::as_str),
        Some("3")
    );
    assert!(!action.escalated);

    let e2 = report(&mut c, "a", "tool execution failed", &[]).await;
    let err = plan(&mut c, e2.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&format!("action {}", action.id)),
        "{}",
        err.message()
    );

    // Another agent is not blocked.
    let eb = report(&mut c, "b", "tool execution failed", &[]).await;
    plan(&mut c, eb.id).await.unwrap();

    let done = outcome(&mut c, action.id, true, 12).await;
    assert_eq!(done.status, pb::RecoveryStatus::Succeeded as i32);
    assert_eq!(done.duration.unwrap().seconds, 12);
    let again = c
        .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
            action_id: action.id,
            success: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let missing = c
        .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
            action_id: 999_999,
            success: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        plan(&mut c, 424_242).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        plan(&mut c, 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Freed: the next plan for agent a works.
    plan(&mut c, e2.id).await.unwrap();

    let stats = c
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.total_errors, 3);
    assert_eq!(stats.errors_last_hour, 3);
    assert_eq!(stats.active_recoveries, 2);
    assert_eq!(stats.patterns.len(), 1);
    let p = &stats.patterns[0];
    assert_eq!(
        (p.strategy, p.successes, p.failures, p.use_count),
        (pb::RecoveryStrategy::Retry as i32, 1, 0, 1)
    );
    assert_eq!(p.mean_recovery_time.unwrap().seconds, 12);
    assert!((stats.overall_success_rate - 1.0).abs() < 1e-9);
    let by_type = &stats.errors_by_type;
    assert_eq!(by_type.len(), 1);
    assert_eq!(
        (by_type[0].error_type, by_type[0].count),
        (pb::ErrorType::ExecutionFailure as i32, 3)
    );
}

#[tokio::test]
async fn risky_plans_escalate_behind_the_safety_gate() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing.safety_limit = 0.3;
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    // Resource exhaustion's heuristic is RECONFIGURE, base risk 0.4 > 0.3.
    let e = report(&mut c, "a", "memory resource exhausted", &[]).await;
    let action = plan(&mut c, e.id).await.unwrap();
    assert_eq!(
        action.chosen_strategy,
        pb::RecoveryStrategy::Reconfigure as i32
    );
    assert_eq!(action.strategy, pb::RecoveryStrategy::Escalate as i32);
    assert!(action.escalated);
    assert_eq!(action.reason, "high_risk_recovery");
    assert!((action.risk_score - 0.4).abs() < 1e-9);
    assert_eq!(
        action.parameters.get("priority").map(String::as_str),
        Some("high")
    );

    // A critical unknown error is escalated by the heuristic itself.
    let e = report(
        &mut c,
        "b",
        "something odd",
        &[("critical_operation", "true"), ("retry_count", "9")],
    )
    .await;
    assert!(e.critical);
    let action = plan(&mut c, e.id).await.unwrap();
    assert_eq!(action.strategy, pb::RecoveryStrategy::Escalate as i32);
    assert!(action.escalated);
}

#[tokio::test]
async fn an_active_recovery_without_outcome_expires_and_frees_the_agent() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.healing.recovery_lease = Duration::from_millis(800);
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    let e1 = report(&mut c, "a", "execution failed", &[]).await;
    let first = plan(&mut c, e1.id).await.unwrap();
    let e2 = report(&mut c, "a", "execution failed", &[]).await;
    assert_eq!(
        plan(&mut c, e2.id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // Still active until the lease has run out on the store's clock.
    clock.advance(chrono::Duration::milliseconds(799));
    assert_eq!(
        plan(&mut c, e2.id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    clock.advance(chrono::Duration::milliseconds(2));
    let second = plan(&mut c, e2.id).await.unwrap();
    assert_ne!(second.id, first.id);
    let listed = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest {
            agent_id: "a".into(),
            status: pb::RecoveryStatus::Expired as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.actions.iter().map(|a| a.id).collect::<Vec<_>>(),
        [first.id]
    );
    // A late outcome of the expired recovery is still accepted and learned from.
    let late = outcome(&mut c, first.id, false, 30).await;
    assert_eq!(late.status, pb::RecoveryStatus::Failed as i32);
}

#[tokio::test]
async fn concurrent_plans_for_one_agent_yield_exactly_one() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let mut events = Vec::new();
    for _ in 0..32 {
        events.push(
            report(&mut c, "contended", "execution failed", &[])
                .await
                .id,
        );
    }
    let calls = events.into_iter().map(|id| {
        let mut c = client(&app);
        tokio::spawn(async move { plan(&mut c, id).await })
    });
    let results = futures::future::join_all(calls).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    assert_eq!(ok, 1);
    for r in results {
        if let Err(status) = r.unwrap() {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
}

/// The simulation through the API: for execution failures the heuristic
/// (RETRY) succeeds 20 % of the time and WAIT_AND_RETRY 90 %. After 50 reported
/// outcomes, at least 85 % of new plans pick WAIT_AND_RETRY.
#[tokio::test]
async fn the_planner_learns_which_strategy_works() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let mut world = rand::rngs::StdRng::seed_from_u64(2026);
    let context = [("component", "browser")];
    for round in 0..50 {
        let e = report(&mut c, "learner", "execution failed", &context).await;
        let action = plan(&mut c, e.id).await.unwrap();
        let p = if action.strategy == pb::RecoveryStrategy::WaitAndRetry as i32 {
            0.9
        } else {
            0.2
        };
        let success = world.random_bool(p);
        outcome(&mut c, action.id, success, 10 + round % 5).await;
    }
    let mut better = 0;
    let trials = 40;
    for i in 0..trials {
        // Fresh agents, no outcomes: what was learned stays fixed while we sample it.
        let e = report(&mut c, &format!("probe-{i}"), "execution failed", &context).await;
        if plan(&mut c, e.id).await.unwrap().strategy == pb::RecoveryStrategy::WaitAndRetry as i32 {
            better += 1;
        }
    }
    assert!(
        better * 100 >= trials * 85,
        "picked the better strategy {better} of {trials} times"
    );
    // A different context has learned nothing yet: the heuristic applies.
    let e = report(
        &mut c,
        "elsewhere",
        "execution failed",
        &[("component", "shell")],
    )
    .await;
    let fresh = plan(&mut c, e.id).await.unwrap();
    assert_eq!(fresh.context_signature, "component=shell");
}

#[tokio::test]
async fn history_patterns_and_active_recoveries_survive_a_restart() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let e = report(&mut c, "a", "execution failed", &[]).await;
    let done = plan(&mut c, e.id).await.unwrap();
    outcome(&mut c, done.id, true, 5).await;
    let e2 = report(&mut c, "a", "execution failed", &[]).await;
    let active = plan(&mut c, e2.id).await.unwrap();
    let before = c
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    app.stop().await;

    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let after = c
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    assert_eq!(after.active_recoveries, 1);
    let e3 = report(&mut c, "a", "execution failed", &[]).await;
    let err = plan(&mut c, e3.id).await.unwrap_err();
    assert!(
        err.message().contains(&format!("action {}", active.id)),
        "{}",
        err.message()
    );
    let events = c
        .list_error_events(pb::ListErrorEventsRequest {
            agent_id: "a".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [e3.id, e2.id],
        "newest first"
    );
    let rest = c
        .list_error_events(pb::ListErrorEventsRequest {
            agent_id: "a".into(),
            page_size: 2,
            page_token: events.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.iter().map(|e| e.id).collect::<Vec<_>>(), [e.id]);
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn refusals_carry_a_reason_clients_can_branch_on() {
    use tonic_types::StatusExt;
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let e1 = report(&mut c, "a", "tool execution failed", &[]).await;
    let active = plan(&mut c, e1.id).await.unwrap();
    let e2 = report(&mut c, "a", "tool execution failed", &[]).await;

    let busy = plan(&mut c, e2.id).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    let info = busy.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "RECOVERY_ALREADY_ACTIVE");
    assert_eq!(info.domain, "fleetcare.v1");
    assert_eq!(info.metadata["action_id"], active.id.to_string());
    assert_eq!(info.metadata["agent_id"], "a");
    assert!(
        busy.message().contains(&format!("action {}", active.id)),
        "{}",
        busy.message()
    );

    outcome(&mut c, active.id, true, 3).await;
    let twice = c
        .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
            action_id: active.id,
            success: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let info = twice.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "OUTCOME_ALREADY_RECORDED");
    assert_eq!(info.metadata["status"], "SUCCEEDED");
    assert!(
        twice
            .message()
            .contains("already has an outcome (SUCCEEDED)")
    );

    // Other refusals keep their generic reasons.
    let missing = plan(&mut c, 424_242).await.unwrap_err();
    assert_eq!(
        missing.get_details_error_info().unwrap().reason,
        "NOT_FOUND"
    );
}

#[tokio::test]
async fn unknown_enum_values_are_refused_naming_the_field_and_value() {
    use tonic_types::StatusExt;
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let hint = c
        .report_error(pb::ReportErrorRequest {
            agent_id: "a".into(),
            message: "tool execution failed".into(),
            error_type_hint: 77,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let by_type = c
        .list_error_events(pb::ListErrorEventsRequest {
            error_type: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let by_status = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest {
            status: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    for (status, needle) in [
        (hint, "error_type_hint 77"),
        (by_type, "error_type 99"),
        (by_status, "status 42"),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{}", status.message());
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "INVALID_ARGUMENT"
        );
    }
    // Nothing was stored by the refused report.
    let events = c
        .list_error_events(pb::ListErrorEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(events.events.is_empty());
}

#[tokio::test]
async fn recovery_action_pages_follow_their_tokens_to_the_end() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = client(&app);
    let mut planned = Vec::new();
    for agent in ["p1", "p2", "p3"] {
        let e = report(&mut c, agent, "tool execution failed", &[]).await;
        planned.push(plan(&mut c, e.id).await.unwrap().id);
    }
    planned.reverse();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_recovery_actions(pb::ListRecoveryActionsRequest {
                status: pb::RecoveryStatus::Active as i32,
                page_size: 2,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= 2);
        seen.extend(page.actions.iter().map(|a| a.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, planned, "newest first, each once");
    let foreign = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest {
            page_token: "after:p1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert!(foreign.message().contains("page_token"));
}

/// The ids of the recovery actions planned for `event`.
async fn actions_for(
    c: &mut HealingServiceClient<tonic::transport::Channel>,
    event: i64,
) -> Vec<i64> {
    c.list_recovery_actions(pb::ListRecoveryActionsRequest {
        error_event_id: event,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .actions
    .iter()
    .map(|a| a.id)
    .collect()
}

#[tokio::test]
async fn records_older_than_the_retention_are_pruned_and_actions_are_listed_by_event() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    let clock = crate::helpers::manual_clock(&mut args);
    // A short retention, so the pruner runs every sweep interval (a tenth
    // of the retention, at least that); time moves on the manual clock.
    args.healing.healing_retention = Duration::from_secs(1);
    let app = TestApp::spawn_with(args).await;
    let mut c = client(&app);
    let first = report(&mut c, "h-1", "tool call failed", &[]).await;
    let second = report(&mut c, "h-2", "tool call failed", &[]).await;
    let action = plan(&mut c, second.id).await.unwrap();
    outcome(&mut c, action.id, true, 3).await;

    assert_eq!(actions_for(&mut c, second.id).await, [action.id]);
    assert!(actions_for(&mut c, first.id).await.is_empty());
    let negative = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest {
            error_event_id: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert!(
        negative.message().contains("error_event_id"),
        "{negative:?}"
    );

    // Each event shows the recovery planned for it and how it ended.
    let events = c
        .list_error_events(pb::ListErrorEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let shown: Vec<(i64, i64, i32)> = events
        .iter()
        .map(|e| (e.id, e.recovery_action_id, e.recovery_status))
        .collect();
    assert_eq!(
        shown,
        [
            (second.id, action.id, pb::RecoveryStatus::Succeeded as i32),
            (first.id, 0, 0)
        ]
    );

    // Past the retention, both events and the ended action are pruned; the
    // planner's learning stays.
    let learned = c
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner()
        .patterns;
    assert_eq!(learned.len(), 1);
    clock.advance(chrono::Duration::seconds(2));
    crate::helpers::eventually(Duration::from_secs(10), "records pruned", || {
        let mut c = c.clone();
        async move {
            let events = c
                .list_error_events(pb::ListErrorEventsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .events;
            events.is_empty().then_some(())
        }
    })
    .await;
    let actions = c
        .list_recovery_actions(pb::ListRecoveryActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert!(actions.is_empty());
    let stats = c
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.patterns, learned, "what the planner learned is kept");
}
