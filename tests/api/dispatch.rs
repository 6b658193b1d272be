//! DispatchService through the generated client: `ResumeAgent` returns an
//! EXHAUSTED agent to IDLE (cause RESUMED, on the watch and in the response)
//! and refuses every other status, an unknown agent and a malformed id.
//! `CordonAgent` / `UncordonAgent` keep the status and work, show on the
//! agent and the watch (from == to), and are idempotent.
//! Who may call them is tested in `auth.rs`, the CLI command in `cli.rs`.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
use pb::AgentStatus as S;
use pb::TransitionCause as C;
use pb::watch_transitions_response::Event;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, reason, status};

const WAIT: Duration = Duration::from_secs(10);

pub fn client(app: &TestApp) -> DispatchServiceClient<Channel> {
    DispatchServiceClient::new(app.channel.clone())
}

fn resume(agent_id: &str, why: &str) -> pb::ResumeAgentRequest {
    pb::ResumeAgentRequest {
        agent_id: agent_id.into(),
        reason: why.into(),
    }
}

/// Parks `agent_id` for a day.
pub async fn exhaust(app: &TestApp, agent_id: &str) -> pb::Agent {
    app.agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: agent_id.into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: Some(fleetcare::proto::timestamp(
                chrono::Utc::now() + chrono::Duration::days(1),
            )),
            ..Default::default()
        })
        .await
        .expect("report exhausted")
        .into_inner()
        .agent
        .unwrap()
}

/// The next transition on a watch (progress messages skipped), within the wait.
pub async fn next_transition(
    stream: &mut tonic::Streaming<pb::WatchTransitionsResponse>,
) -> pb::Transition {
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event within the wait")
            .expect("stream ok")
            .expect("stream still open")
            .event;
        if let Some(Event::Transition(t)) = event {
            return t;
        }
    }
}

#[tokio::test]
async fn resume_returns_an_exhausted_agent_to_idle_with_cause_resumed() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("r-1").await;
    let parked = exhaust(&app, "r-1").await;
    assert_eq!(parked.status, status(S::Exhausted));
    assert!(parked.recovery_at.is_some());

    let mut watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            since_revision: parked.revision,
            agent_ids: vec!["r-1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let response = client(&app)
        .resume_agent(resume("r-1", "provider raised our limit"))
        .await
        .unwrap()
        .into_inner();
    let agent = response.agent.unwrap();
    let t = response.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Exhausted), status(S::Idle), C::Resumed as i32)
    );
    assert_eq!(t.actor, "anonymous");
    assert_eq!(t.revision, agent.revision);
    assert_eq!(agent.status, status(S::Idle));
    // The exhaustion is forgotten.
    assert_eq!(agent.exhaustion_reason, 0);
    assert_eq!(agent.recovery_at, None);
    assert_eq!(agent.recovery_hint, "");

    let seen = next_transition(&mut watch).await;
    assert_eq!(seen, t);
    let stored = app.get("r-1").await;
    assert_eq!(stored.status, status(S::Idle));
    assert_eq!(stored.recovery_at, None);
    assert_eq!(app.history("r-1").await.last(), Some(&t));
    // Idle again: it can take work.
    app.start_work("r-1").await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn resume_refuses_every_other_status_naming_it_and_changes_nothing() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["idle", "busy", "off"] {
        app.register(id).await;
    }
    app.start_work("busy").await.unwrap();
    app.agents
        .clone()
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "off".into(),
        })
        .await
        .unwrap();
    for (id, current) in [("idle", "IDLE"), ("busy", "BUSY"), ("off", "OFFLINE")] {
        let before = app.get(id).await;
        let history = app.history(id).await;
        let refused = client(&app)
            .resume_agent(resume(id, ""))
            .await
            .expect_err("must be refused");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(reason(&refused), "TRANSITION_REFUSED");
        assert!(
            refused.message().contains(&format!(
                "cannot resume: agent is {current}, must be EXHAUSTED"
            )),
            "{:?}",
            refused.message()
        );
        assert_eq!(app.get(id).await, before);
        assert_eq!(app.history(id).await, history);
    }
    app.stop().await;
}

#[tokio::test]
async fn resume_of_an_unknown_or_malformed_agent_is_refused() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let missing = client(&app)
        .resume_agent(resume("ghost", ""))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("ghost"), "{missing:?}");

    for bad in ["", "no spaces allowed", &"x".repeat(129)] {
        let invalid = client(&app)
            .resume_agent(resume(bad, ""))
            .await
            .unwrap_err();
        assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
        assert!(invalid.message().contains("agent_id"), "{invalid:?}");
    }

    app.register("long").await;
    exhaust(&app, "long").await;
    let too_long = client(&app)
        .resume_agent(resume("long", &"y".repeat(1025)))
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument, "{too_long:?}");
    assert!(too_long.message().contains("reason"), "{too_long:?}");
    assert_eq!(app.get("long").await.status, status(S::Exhausted));
    app.stop().await;
}

// ---- cordons

fn cordon(agent_id: &str, why: &str) -> pb::CordonAgentRequest {
    pb::CordonAgentRequest {
        agent_id: agent_id.into(),
        reason: why.into(),
    }
}

fn uncordon(agent_id: &str) -> pb::UncordonAgentRequest {
    pb::UncordonAgentRequest {
        agent_id: agent_id.into(),
    }
}

async fn listed(app: &TestApp, agent_id: &str) -> pb::Agent {
    app.agents
        .clone()
        .list_agents(pb::ListAgentsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == agent_id)
        .expect("listed")
}

#[tokio::test]
async fn cordon_keeps_a_busy_agents_status_and_work_and_shows_on_the_watch() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let registered = app.register("c-1").await;
    assert!(registered.schedulable);
    assert_eq!(registered.cordon_reason, "");
    app.start_work("c-1").await.unwrap();
    let busy = app.get("c-1").await;

    let mut watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            since_revision: busy.revision,
            agent_ids: vec!["c-1".into()],
            statuses: vec![status(S::Busy)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let response = client(&app)
        .cordon_agent(cordon("c-1", "disk failing"))
        .await
        .unwrap()
        .into_inner();
    let agent = response.agent.unwrap();
    let t = response.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Busy), status(S::Busy), C::Cordoned as i32)
    );
    assert_eq!(t.actor, "anonymous");
    assert_eq!(t.revision, agent.revision);
    assert_eq!(agent.status, status(S::Busy));
    assert!(!agent.schedulable);
    assert_eq!(agent.cordon_reason, "disk failing");
    // The time of the last status change stays.
    assert_eq!(agent.last_transition_at, busy.last_transition_at);

    assert_eq!(next_transition(&mut watch).await, t);
    for shown in [app.get("c-1").await, listed(&app, "c-1").await] {
        assert_eq!(shown, agent);
    }
    assert_eq!(app.history("c-1").await.last(), Some(&t));

    // Cordoned again: the agent as it is, the first reason kept, no transition.
    let again = client(&app)
        .cordon_agent(cordon("c-1", "another reason"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.transition, None);
    assert_eq!(again.agent.unwrap(), agent);
    assert_eq!(app.history("c-1").await.last(), Some(&t));

    // Its work goes on: a cordoned agent finishes and stays cordoned.
    app.finish_work("c-1").await.unwrap();
    let idle = app.get("c-1").await;
    assert_eq!(idle.status, status(S::Idle));
    assert!(!idle.schedulable);
    assert_eq!(idle.cordon_reason, "disk failing");
    let finished = next_transition(&mut watch).await;
    assert_eq!(finished.cause, C::WorkFinished as i32);

    let back = client(&app)
        .uncordon_agent(uncordon("c-1"))
        .await
        .unwrap()
        .into_inner();
    let agent = back.agent.unwrap();
    let t = back.transition.unwrap();
    assert_eq!(
        (t.from_status, t.to_status, t.cause),
        (status(S::Idle), status(S::Idle), C::Uncordoned as i32)
    );
    assert!(agent.schedulable);
    assert_eq!(agent.cordon_reason, "");
    assert_eq!(app.get("c-1").await, agent);
    // Uncordoned again: nothing.
    let again = client(&app)
        .uncordon_agent(uncordon("c-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.transition, None);
    assert_eq!(again.agent.unwrap(), agent);
    assert_eq!(app.history("c-1").await.last(), Some(&t));
    app.stop().await;
}

#[tokio::test]
async fn cordon_of_an_unknown_or_malformed_agent_or_a_long_reason_is_refused() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let missing = client(&app)
        .cordon_agent(cordon("ghost", ""))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("ghost"), "{missing:?}");
    let missing = client(&app)
        .uncordon_agent(uncordon("ghost"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    for bad in ["", "no spaces allowed", &"x".repeat(129)] {
        let invalid = client(&app)
            .cordon_agent(cordon(bad, ""))
            .await
            .unwrap_err();
        assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
        assert!(invalid.message().contains("agent_id"), "{invalid:?}");
        let invalid = client(&app)
            .uncordon_agent(uncordon(bad))
            .await
            .unwrap_err();
        assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    }

    app.register("long").await;
    let too_long = client(&app)
        .cordon_agent(cordon("long", &"y".repeat(1025)))
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument, "{too_long:?}");
    assert!(too_long.message().contains("reason"), "{too_long:?}");
    assert!(app.get("long").await.schedulable);
    // 1024 bytes is allowed, and an empty reason too.
    let at_most = client(&app)
        .cordon_agent(cordon("long", &"y".repeat(1024)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(at_most.agent.unwrap().cordon_reason.len(), 1024);
    app.register("empty").await;
    let empty = client(&app)
        .cordon_agent(cordon("empty", ""))
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert!(!empty.schedulable);
    assert_eq!(empty.cordon_reason, "");
    app.stop().await;
}

postgres_only! {
    /// The cordon column's migration (20270102000001): agents stored before
    /// it are schedulable, and can be cordoned.
    #[tokio::test]
    async fn agents_stored_before_cordons_are_schedulable_on_postgres() {
        let db = TestDb::postgres();
        let pool = crate::helpers::postgres_migrated_before(&db, 20270102000001).await;
        sqlx::query(
            "INSERT INTO agents (agent_id, status, registered_at, last_heartbeat_at,
                                 last_transition_at, revision)
             VALUES ('old', 'BUSY', now(), now(), now(), 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let app = TestApp::spawn(&db).await;
        let old = app.get("old").await;
        assert!(old.schedulable);
        assert_eq!(old.cordon_reason, "");
        let cordoned = client(&app)
            .cordon_agent(cordon("old", "migrated"))
            .await
            .unwrap()
            .into_inner()
            .agent
            .unwrap();
        assert_eq!((cordoned.status, cordoned.schedulable), (status(S::Busy), false));
        app.stop().await;
    }
}
