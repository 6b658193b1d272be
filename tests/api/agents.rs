//! Agent lifecycle through the API: every allowed transition, every refusal.

use fleetcare::proto::v1 as pb;
use pb::AgentStatus as S;
use pb::TransitionCause as C;
use tonic::Code;

use crate::helpers::{TestApp, TestDb, status};

#[tokio::test]
async fn registration_creates_an_idle_agent_once() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    let first = client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "agent-1".into(),
            labels: [("team".to_string(), "infra".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let agent = first.agent.unwrap();
    assert_eq!(agent.status, status(S::Idle));
    assert_eq!(agent.labels.get("team").map(String::as_str), Some("infra"));
    assert!(agent.revision > 0);

    let again = client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "agent-1".into(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    let agent2 = again.agent.unwrap();
    assert_eq!(
        agent2.revision, agent.revision,
        "re-registration is no transition"
    );
    assert_eq!(agent2.labels.get("team").map(String::as_str), Some("ml"));
    assert!(agent2.last_heartbeat_at.unwrap().seconds >= agent.last_heartbeat_at.unwrap().seconds);

    let history = app.history("agent-1").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].cause, C::Registered as i32);
    assert_eq!(history[0].from_status, status(S::Unspecified));
    assert_eq!(history[0].to_status, status(S::Idle));
}

#[tokio::test]
async fn every_allowed_transition_is_recorded_with_its_cause() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    app.register("a").await;

    let t = app.start_work("a").await.unwrap().transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Idle), status(S::Busy), C::WorkStarted as i32)
    );
    let t = app.finish_work("a").await.unwrap().transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Busy), status(S::Idle), C::WorkFinished as i32)
    );

    let on_call = client
        .start_work(pb::StartWorkRequest {
            agent_id: "a".into(),
            slot_type: pb::SlotType::OnCall as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_call.agent.unwrap().status, status(S::OnCall));
    let t = app.finish_work("a").await.unwrap().transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status),
        (status(S::OnCall), status(S::Idle))
    );

    let ex = client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "rate limited, reset in 12 mins".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let t = ex.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Idle), status(S::Exhausted), C::Exhausted as i32)
    );
    assert_eq!(t.exhaustion_reason, pb::ExhaustionReason::RateLimit as i32);
    assert!(t.recovery_at.is_some());

    let off = client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = off.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (
            status(S::Exhausted),
            status(S::Offline),
            C::MarkedOffline as i32
        )
    );
    // Offline after exhaustion keeps the recovery time: a heartbeat brings it back EXHAUSTED.
    let hb = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = hb.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (
            status(S::Offline),
            status(S::Exhausted),
            C::HeartbeatResumed as i32
        )
    );

    // Marked offline again from EXHAUSTED; an explicit past recovery clears on the next heartbeat.
    client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap();
    let again = client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.transition.is_none(),
        "marking an OFFLINE agent offline records nothing"
    );

    app.register("b").await;
    client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "b".into(),
        })
        .await
        .unwrap();
    let hb = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = hb.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (
            status(S::Offline),
            status(S::Idle),
            C::HeartbeatResumed as i32
        )
    );
    let hb = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        hb.transition.is_none(),
        "a heartbeat of an online agent records no transition"
    );

    // Revisions are strictly increasing and gap-free across agents.
    let all = app.history("").await;
    let revisions: Vec<i64> = all.iter().map(|t| t.revision).collect();
    let expected: Vec<i64> = (1..=revisions.len() as i64).collect();
    assert_eq!(revisions, expected);
}

#[tokio::test]
async fn refused_transitions_are_failed_precondition_naming_the_status() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    app.register("a").await;

    let err = app.finish_work("a").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("IDLE"), "{}", err.message());

    app.start_work("a").await.unwrap();
    let err = app.start_work("a").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("BUSY"), "{}", err.message());

    client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap();
    for err in [
        app.start_work("a").await.unwrap_err(),
        app.finish_work("a").await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("OFFLINE"), "{}", err.message());
    }
    client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: pb::ExhaustionReason::Billing as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = app.start_work("a").await.unwrap_err();
    assert!(err.message().contains("EXHAUSTED"), "{}", err.message());

    // The refusals left nothing behind: registered, started, offline, exhausted.
    assert_eq!(app.history("a").await.len(), 4);
    assert_eq!(app.get("a").await.status, status(S::Exhausted));
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_unknown_agents_not_found() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    app.register("a").await;

    for bad in ["", "has space", "x/y", &"a".repeat(129)] {
        let err = client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: bad.into(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert!(err.message().contains("agent_id"), "{}", err.message());
    }
    let err = client
        .start_work(pb::StartWorkRequest {
            agent_id: "a".into(),
            slot_type: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("slot_type"));
    let err = client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let too_many = (0..65)
        .map(|i| pb::Header {
            name: format!("h{i}"),
            value: "1".into(),
        })
        .collect();
    let err = client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: 1,
            headers: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: 1,
            headers: vec![pb::Header {
                name: "x".into(),
                value: "v".repeat(9000),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: 1,
            message: "m".repeat(64 * 1024 + 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "b".into(),
            labels: [("bad key".to_string(), "v".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .list_agents(pb::ListAgentsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    for err in [
        client
            .get_agent(pb::GetAgentRequest {
                agent_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
        client
            .heartbeat(pb::HeartbeatRequest {
                agent_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
        app.start_work("ghost").await.unwrap_err(),
        client
            .mark_offline(pb::MarkOfflineRequest {
                agent_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("ghost"), "{}", err.message());
    }
    // The error carries a machine-readable reason.
    let err = app.start_work("ghost").await.unwrap_err();
    use tonic_types::StatusExt;
    assert_eq!(err.get_details_error_info().unwrap().reason, "NOT_FOUND");

    // None of it disturbed the stored agent.
    let a = app.get("a").await;
    assert_eq!(a.status, status(S::Idle));
    assert_eq!(app.history("a").await.len(), 1);
}

#[tokio::test]
async fn list_agents_pages_and_filters() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    for i in 0..25 {
        let team = if i % 2 == 0 { "even" } else { "odd" };
        client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: format!("agent-{i:02}"),
                labels: [("team".to_string(), team.to_string())].into(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
    }
    for i in [1, 2, 3] {
        app.start_work(&format!("agent-{i:02}")).await.unwrap();
    }

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_agents(pb::ListAgentsRequest {
                page_size: 10,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.agents.len() <= 10);
        seen.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("agent-{i:02}")).collect();
    assert_eq!(seen, expected);

    let busy = client
        .list_agents(pb::ListAgentsRequest {
            statuses: vec![status(S::Busy)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = busy.agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["agent-01", "agent-02", "agent-03"]);

    let odd_busy = client
        .list_agents(pb::ListAgentsRequest {
            statuses: vec![status(S::Busy)],
            labels: [("team".to_string(), "odd".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = odd_busy
        .agents
        .iter()
        .map(|a| a.agent_id.as_str())
        .collect();
    assert_eq!(ids, ["agent-01", "agent-03"]);
}

#[tokio::test]
async fn concurrent_start_work_on_one_idle_agent_has_exactly_one_winner() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for round in 0..5 {
        let id = format!("contended-{round}");
        app.register(&id).await;
        let calls = (0..16).map(|_| {
            let app_client = app.agents.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut c = app_client;
                c.start_work(pb::StartWorkRequest {
                    agent_id: id,
                    slot_type: pb::SlotType::Work as i32,
                })
                .await
            })
        });
        let results = futures::future::join_all(calls).await;
        let wins = results
            .iter()
            .filter(|r| r.as_ref().unwrap().is_ok())
            .count();
        assert_eq!(wins, 1, "round {round}");
        for r in results {
            if let Err(status) = r.unwrap() {
                assert_eq!(status.code(), Code::FailedPrecondition);
            }
        }
        assert_eq!(app.history(&id).await.len(), 2, "registered + one start");
    }
}

#[tokio::test]
async fn quota_pools_are_registered_shown_replaced_and_checked() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = app.agents.clone();
    let register = |pools: &[&str]| pb::RegisterAgentRequest {
        agent_id: "pooled".into(),
        labels: Default::default(),
        quota_pools: pools.iter().map(|p| p.to_string()).collect(),
    };
    let pools = |agent: pb::Agent| agent.quota_pools;

    let made = client
        .register_agent(register(&["anthropic/acct-42", "anthropic/acct-42/opus"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pools(made.agent.unwrap()),
        ["anthropic/acct-42", "anthropic/acct-42/opus"]
    );
    let read = || app.get("pooled");
    let stored = read().await;
    assert_eq!(
        pools(stored.clone()),
        ["anthropic/acct-42", "anthropic/acct-42/opus"]
    );

    // Re-registering replaces them (no transition), an empty list leaves all.
    let again = client
        .register_agent(register(&["openai:org-7/gpt-4o"]))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    let replaced = read().await;
    assert_eq!(replaced.revision, stored.revision, "no transition");
    assert_eq!(pools(replaced), ["openai:org-7/gpt-4o"]);
    client.register_agent(register(&[])).await.unwrap();
    assert!(pools(read().await).is_empty());

    // Malformed lists are refused naming the entry, and change nothing.
    client
        .register_agent(register(&["anthropic/acct-42"]))
        .await
        .unwrap();
    let before = read().await;
    let long = "p".repeat(129);
    let seventeen: Vec<String> = (0..17).map(|i| format!("pool-{i}")).collect();
    let seventeen: Vec<&str> = seventeen.iter().map(String::as_str).collect();
    for (pools, field) in [
        (vec!["ok", "has space"], "quota_pools[1]"),
        (vec![""], "quota_pools[0]"),
        (vec![long.as_str()], "quota_pools[0]"),
        (vec!["a", "b", "a"], "quota_pools[2]"),
        (seventeen, "quota_pools"),
    ] {
        let refused = client.register_agent(register(&pools)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{pools:?}");
        assert!(
            refused.message().starts_with(field),
            "{pools:?}: {}",
            refused.message()
        );
    }
    assert_eq!(read().await, before);
    app.stop().await;
}
