//! Health, reflection and graceful shutdown.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{TestApp, TestDb};

postgres_only! {
    use crate::helpers::{TcpProxy, eventually, test_args};
}

const SERVICES: [&str; 6] = [
    "",
    "fleetcare.v1.AgentStatusService",
    "fleetcare.v1.HealingService",
    "fleetcare.v1.PostHealingService",
    "fleetcare.v1.SessionPipelineService",
    "fleetcare.v1.DispatchService",
];

postgres_only! {
    async fn health_of(app: &TestApp, service: &str) -> Option<ServingStatus> {
        let mut client = HealthClient::new(app.channel.clone());
        let response = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?
            .into_inner();
        ServingStatus::try_from(response.status).ok()
    }
}

postgres_only! {
    async fn wait_for_health(app: &TestApp, want: ServingStatus) {
        for service in SERVICES {
            eventually(
                Duration::from_secs(30),
                &format!("{service:?} {want:?}"),
                || async { (health_of(app, service).await == Some(want)).then_some(()) },
            )
            .await;
        }
    }
}

postgres_only! {
    #[tokio::test]
    async fn health_follows_the_database() {
        let db = TestDb::new();
        let proxy = TcpProxy::to_postgres().await;
        let mut args = test_args(&db.url_via(&proxy));
        args.database.db_acquire_timeout = Duration::from_millis(500);
        let app = TestApp::spawn_with(args).await;
        wait_for_health(&app, ServingStatus::Serving).await;
        app.register("a").await;

        // The database goes away: health says so, and calls fail UNAVAILABLE.
        proxy.cut().await;
        wait_for_health(&app, ServingStatus::NotServing).await;
        let err = app
            .agents
            .clone()
            .get_agent(pb::GetAgentRequest {
                agent_id: "a".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            !err.message().to_lowercase().contains("select"),
            "no SQL leaks: {}",
            err.message()
        );

        // It comes back: so does the service, with nothing lost.
        proxy.restore();
        wait_for_health(&app, ServingStatus::Serving).await;
        let agent = eventually(Duration::from_secs(10), "agent readable", || async {
            app.agents
                .clone()
                .get_agent(pb::GetAgentRequest {
                    agent_id: "a".into(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().agent)
        })
        .await;
        assert_eq!(agent.agent_id, "a");
    }
}

#[tokio::test]
async fn health_watch_streams_status() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut client = HealthClient::new(app.channel.clone());
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "fleetcare.v1.AgentStatusService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let msg = stream.message().await.unwrap().expect("health stream open");
            if msg.status == ServingStatus::Serving as i32 {
                return msg.status;
            }
        }
    })
    .await
    .expect("SERVING on the health watch");
    assert_eq!(status, ServingStatus::Serving as i32);
    let unknown = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn reflected_services_v1(app: &TestApp) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    match response.message_response.unwrap() {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected {other:?}"),
    }
}

async fn reflected_services_v1alpha(app: &TestApp) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    match response.message_response.unwrap() {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_every_service_on_v1_and_v1alpha() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for services in [
        reflected_services_v1(&app).await,
        reflected_services_v1alpha(&app).await,
    ] {
        for expected in SERVICES
            .iter()
            .skip(1)
            .copied()
            .chain(["grpc.health.v1.Health"])
        {
            assert!(
                services.iter().any(|s| s == expected),
                "{expected} missing from {services:?}"
            );
        }
    }
}

#[tokio::test]
async fn graceful_shutdown_ends_watch_streams_cleanly() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    let mut stream = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let shutdown = app.shutdown.clone();
    let stopping = tokio::spawn(app.stop());
    let _ = shutdown;
    // The open stream ends with OK rather than holding the server up.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn the_server_stops_serving_new_calls_after_shutdown() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    let mut client = app.agents.clone();
    app.stop().await;
    let err = client
        .get_agent(pb::GetAgentRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // What was stored survives a restart on the same database.
    let again = TestApp::spawn(&db).await;
    assert_eq!(again.get("a").await.agent_id, "a");
}

postgres_only! {
    #[tokio::test]
    async fn the_postgres_pool_plans_every_query_for_its_parameters() {
        // A generic plan made while the tables were small would scan every
        // agent from then on (docs/operations.md, Stores).
        let db = TestDb::new();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let database = test_args(&db.url).database.store_options().unwrap();
        let store = fleetcare::storage::postgres::PgStore::connect(&database, shutdown.clone())
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(mode, "force_custom_plan");
        shutdown.cancel();
    }
}
