//! The sweeper: heartbeat timeouts, recoveries, start-up grace, and exactly-once
//! across replicas.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use pb::AgentStatus as S;
use pb::TransitionCause as C;

use crate::helpers::{TestApp, TestDb, eventually, status, test_args};

fn quick(db: &TestDb, heartbeat_timeout: Duration) -> fleetcare::config::ServeArgs {
    let mut args = test_args(&db.url);
    args.heartbeat_timeout = heartbeat_timeout;
    args.sweep_interval = Duration::from_millis(50);
    args
}

#[tokio::test]
async fn silent_agents_go_offline_and_heartbeating_ones_stay() {
    let db = TestDb::new();
    let app = TestApp::spawn_with(quick(&db, Duration::from_millis(1500))).await;
    app.register("silent").await;
    app.register("alive").await;
    app.start_work("silent").await.unwrap();

    let offline = eventually(Duration::from_secs(20), "silent agent offline", || async {
        // Keep the other one alive meanwhile.
        app.agents
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                agent_id: "alive".into(),
            })
            .await
            .unwrap();
        let a = app.get("silent").await;
        (a.status == status(S::Offline)).then_some(a)
    })
    .await;
    assert!(
        offline.last_transition_at.unwrap().seconds >= offline.last_heartbeat_at.unwrap().seconds
    );
    assert_eq!(app.get("alive").await.status, status(S::Idle));
    let last = app.history("silent").await.pop().unwrap();
    assert_eq!(
        (last.from_status, last.to_status, last.cause),
        (
            status(S::Busy),
            status(S::Offline),
            C::HeartbeatTimeout as i32
        )
    );

    // A heartbeat brings it back.
    let hb = app
        .agents
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "silent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.agent.unwrap().status, status(S::Idle));
}

#[tokio::test]
async fn exhausted_agents_recover_when_their_time_comes() {
    let db = TestDb::new();
    let app = TestApp::spawn_with(quick(&db, Duration::from_secs(120))).await;
    app.register("a").await;
    app.register("b").await;
    for (agent, retry_after) in [("a", "1"), ("b", "3600")] {
        app.agents
            .clone()
            .report_exhausted(pb::ReportExhaustedRequest {
                agent_id: agent.into(),
                reason: pb::ExhaustionReason::RateLimit as i32,
                headers: vec![pb::Header {
                    name: "Retry-After".into(),
                    value: retry_after.into(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let recovered = eventually(Duration::from_secs(20), "agent a recovered", || async {
        let a = app.get("a").await;
        (a.status == status(S::Idle)).then_some(a)
    })
    .await;
    assert!(recovered.recovery_at.is_none(), "recovery cleared");
    let last = app.history("a").await.pop().unwrap();
    assert_eq!(
        (last.to_status, last.cause),
        (status(S::Idle), C::Recovered as i32)
    );
    assert_eq!(app.get("b").await.status, status(S::Exhausted));
}

#[tokio::test]
async fn a_restart_gives_every_agent_one_timeout_of_grace() {
    let db = TestDb::new();
    let timeout = Duration::from_secs(4);
    let mut args = quick(&db, timeout);
    // Both servers on one manual clock: the test moves time, never sleeps it out.
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args.clone()).await;
    app.register("a").await;
    app.stop().await;

    // Nobody sweeps (or heartbeats successfully) while the service is down.
    clock.advance(chrono::Duration::milliseconds(4500));
    let app = TestApp::spawn_with(args).await;
    // Sweeps run within the grace (a timeout from start-up, on the server's
    // clock); none may mark the stale agent offline.
    clock.advance(chrono::Duration::milliseconds(3900));
    let sweeps = sweeper_runs(&app).await;
    eventually(Duration::from_secs(10), "three more sweeps", || async {
        (sweeper_runs(&app).await >= sweeps + 3).then_some(())
    })
    .await;
    assert_eq!(app.get("a").await.status, status(S::Idle), "still in grace");
    // Without a heartbeat it goes offline once the grace has passed.
    clock.advance(chrono::Duration::milliseconds(200));
    eventually(Duration::from_secs(20), "offline after grace", || async {
        (app.get("a").await.status == status(S::Offline)).then_some(())
    })
    .await;
}

/// How many sweeps the server has run (its `fleetcare_sweeper_runs_total`).
async fn sweeper_runs(app: &TestApp) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app
        .http_addr
        .expect("the test server has a metrics listener");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .find_map(|line| line.strip_prefix("fleetcare_sweeper_runs_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .expect("fleetcare_sweeper_runs_total in /metrics") as u64
}

postgres_only! {
    #[tokio::test]
    async fn two_replicas_sweeping_transition_each_agent_exactly_once() {
        let db = TestDb::new();
        let args = quick(&db, Duration::from_millis(1000));
        let one = TestApp::spawn_with(args.clone()).await;
        let two = TestApp::spawn_with(args).await;
        for i in 0..40 {
            one.register(&format!("agent-{i}")).await;
        }
        eventually(Duration::from_secs(30), "all offline", || async {
            let page = two
                .agents
                .clone()
                .list_agents(pb::ListAgentsRequest {
                    statuses: vec![status(S::Offline)],
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (page.agents.len() == 40).then_some(())
        })
        .await;
        // Give a racing replica a chance to (wrongly) record a second timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..40 {
            let history = one.history(&format!("agent-{i}")).await;
            let timeouts = history
                .iter()
                .filter(|t| t.cause == C::HeartbeatTimeout as i32)
                .count();
            assert_eq!(timeouts, 1, "agent-{i}: {history:?}");
        }
    }
}
