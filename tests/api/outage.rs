//! The database unreachable, through a TCP proxy the test cuts: calls fail
//! fast with UNAVAILABLE once the health probe has seen the outage, and a
//! server started before its database waits for it (NOT_SERVING meanwhile)
//! instead of exiting. Postgres only: the embedded store cannot be cut.

use std::time::{Duration, Instant};

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::agent_status_service_client::AgentStatusServiceClient;
use fleetcare::startup::Application;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{TcpProxy, TestApp, TestDb, eventually, test_args};

async fn health(channel: &Channel) -> Option<ServingStatus> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(response.status).ok()
}

async fn wait_for(channel: &Channel, want: ServingStatus) {
    eventually(
        Duration::from_secs(30),
        &format!("health {want:?}"),
        || async { (health(channel).await == Some(want)).then_some(()) },
    )
    .await;
}

fn get_agent(id: &str, deadline: Duration) -> tonic::Request<pb::GetAgentRequest> {
    let mut request = tonic::Request::new(pb::GetAgentRequest {
        agent_id: id.into(),
    });
    request.set_timeout(deadline);
    request
}

#[tokio::test]
async fn while_the_database_is_down_calls_fail_fast_unavailable_not_after_the_acquire_timeout() {
    let db = TestDb::new();
    let proxy = TcpProxy::to_postgres().await;
    let mut args = test_args(&db.url_via(&proxy));
    // The production default: a call that waited for it would miss a 2 s deadline.
    args.database.db_acquire_timeout = Duration::from_secs(5);
    let app = TestApp::spawn_with(args).await;
    app.register("a").await;

    proxy.cut().await;
    wait_for(&app.channel, ServingStatus::NotServing).await;
    for _ in 0..3 {
        let started = Instant::now();
        let err = app
            .agents
            .clone()
            .get_agent(get_agent("a", Duration::from_secs(2)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("database unreachable"),
            "{}",
            err.message()
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "failed fast, not after {:?}",
            started.elapsed()
        );
    }

    proxy.restore();
    wait_for(&app.channel, ServingStatus::Serving).await;
    let agent = eventually(Duration::from_secs(10), "agent readable", || async {
        app.agents
            .clone()
            .get_agent(get_agent("a", Duration::from_secs(5)))
            .await
            .ok()
    })
    .await;
    assert_eq!(agent.into_inner().agent.unwrap().agent_id, "a");
    app.stop().await;
}

#[tokio::test]
async fn a_server_started_before_its_database_waits_for_it_not_serving_meanwhile() {
    let db = TestDb::new();
    let proxy = TcpProxy::to_postgres().await;
    proxy.cut().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let app = Application::build(test_args(&db.url_via(&proxy)), listener, shutdown.clone())
        .await
        .expect("builds without its database");
    let server = tokio::spawn(app.run());
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut agents = AgentStatusServiceClient::new(channel.clone());

    // Up, answering, not serving: calls are UNAVAILABLE at once.
    wait_for(&channel, ServingStatus::NotServing).await;
    let started = Instant::now();
    let err = agents
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "early".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
    // It keeps waiting (several retries), and does not exit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!server.is_finished(), "the server waits for its database");
    assert_eq!(health(&channel).await, Some(ServingStatus::NotServing));

    proxy.restore();
    wait_for(&channel, ServingStatus::Serving).await;
    let registered = agents
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "late".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .expect("served once the database is there");
    assert_eq!(registered.into_inner().agent.unwrap().agent_id, "late");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran cleanly");
}

#[tokio::test]
async fn a_server_shut_down_while_waiting_for_its_database_stops_cleanly() {
    let db = TestDb::new();
    let proxy = TcpProxy::to_postgres().await;
    proxy.cut().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let addr = listener.local_addr().unwrap();
    let app = Application::build(test_args(&db.url_via(&proxy)), listener, shutdown.clone())
        .await
        .unwrap();
    let server = tokio::spawn(app.run());
    // Shut down once it is up and waiting: answering, NOT_SERVING.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    wait_for(&channel, ServingStatus::NotServing).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran cleanly");
}
