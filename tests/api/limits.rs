//! Limits that hold under abuse, and the server's clock only: a client's
//! clock never reaches stored state, every bound is answered with its code,
//! arbitrary bytes never make the server answer INTERNAL, and silent sockets
//! beyond the descriptor limit never lock new clients out.

use std::time::Duration;

use chrono::Utc;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::agent_status_service_client::AgentStatusServiceClient;
use fleetcare::proto::v1::post_healing_service_client::PostHealingServiceClient;
use proptest::prelude::*;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::helpers::{ServerProcess, TestApp, TestDb, eventually, test_args};

fn ts(at: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    }
}

fn stagnating_points(now: chrono::DateTime<Utc>) -> Vec<pb::MetricPoint> {
    [(30, 0), (20, 1), (10, 2)]
        .into_iter()
        .map(|(mins, k)| pb::MetricPoint {
            observed_at: Some(ts(now - chrono::Duration::minutes(mins))),
            impressions: 1000 * k,
            engagements: 5 * k,
        })
        .collect()
}

async fn actions_of(c: &mut PostHealingServiceClient<Channel>, post: &str) -> usize {
    c.list_actions(pb::ListActionsRequest {
        post_id: post.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .actions
    .len()
}

#[tokio::test]
async fn evaluate_post_refuses_a_client_clock_with_a_claim_and_a_dry_run_writes_nothing() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut c = PostHealingServiceClient::new(app.channel.clone());
    let now = Utc::now();
    // A far-future clock would let a caller skip every cooldown: refused.
    for claimed_now in [now, now + chrono::Duration::days(1)] {
        let err = c
            .evaluate_post(pb::EvaluatePostRequest {
                post_id: "p".into(),
                points: stagnating_points(claimed_now),
                now: Some(ts(claimed_now)),
                claim: true,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("now"), "{}", err.message());
    }
    assert_eq!(actions_of(&mut c, "p").await, 0, "a refusal stores nothing");

    // Without a claim, `now` is a dry run: a verdict, nothing written.
    let dry = c
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: "p".into(),
            points: stagnating_points(now),
            now: Some(ts(now)),
            claim: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dry.eligible && !dry.claimed, "{dry:?}");
    assert_eq!(actions_of(&mut c, "p").await, 0, "a dry run writes nothing");

    // A claim at the server's own time works as before.
    let claimed = c
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: "p".into(),
            points: stagnating_points(Utc::now()),
            now: None,
            claim: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.claimed, "{claimed:?}");
    assert_eq!(actions_of(&mut c, "p").await, 1);
}

#[tokio::test]
async fn recovery_at_beyond_the_parsers_one_year_horizon_is_refused() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    let year_9999 = prost_types::Timestamp {
        seconds: 253_402_300_000,
        nanos: 0,
    };
    let in_367_days = ts(Utc::now() + chrono::Duration::days(367));
    for far in [year_9999, in_367_days] {
        let err = app
            .agents
            .clone()
            .report_exhausted(pb::ReportExhaustedRequest {
                agent_id: "a".into(),
                reason: pb::ExhaustionReason::RateLimit as i32,
                recovery_at: Some(far),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("recovery_at") && err.message().contains("366 days"),
            "names the bound: {}",
            err.message()
        );
        let err = app
            .agents
            .clone()
            .explain_recovery(pb::ExplainRecoveryRequest {
                recovery_at: Some(far),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(
        app.get("a").await.status,
        pb::AgentStatus::Idle as i32,
        "nothing stored"
    );
    // Within the horizon it is used as is.
    let soon = Utc::now() + chrono::Duration::days(30);
    let parked = app
        .agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: Some(ts(soon)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        parked.agent.unwrap().recovery_at.unwrap().seconds,
        soon.timestamp()
    );
}

#[tokio::test]
async fn a_page_size_of_a_billion_is_clamped_to_the_documented_maximum() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    let page = app
        .agents
        .clone()
        .list_agents(pb::ListAgentsRequest {
            page_size: 1_000_000_000,
            ..Default::default()
        })
        .await
        .expect("clamped, not refused")
        .into_inner();
    assert_eq!(page.agents.len(), 1);
}

#[tokio::test]
async fn watch_streams_beyond_the_per_caller_cap_are_resource_exhausted_until_one_ends() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.limits.max_watches_per_caller = 2;
    let app = TestApp::spawn_with(args).await;
    let watch = || {
        let mut client = app.agents.clone();
        async move {
            client
                .watch_transitions(pb::WatchTransitionsRequest::default())
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = watch().await.expect("first watch");
    let _second = watch().await.expect("second watch");
    let err = watch().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-watches-per-caller"),
        "{}",
        err.message()
    );
    // Other calls are not affected.
    app.register("a").await;
    // A stream that ends gives its slot back.
    drop(first);
    eventually(Duration::from_secs(10), "a freed watch slot", || async {
        watch().await.ok()
    })
    .await;
}

/// A codec that sends and receives raw bytes: the body of a call, whatever it is.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Every RPC the server offers, from the descriptor set reflection serves:
/// its path, and whether it streams its response.
fn every_rpc() -> Vec<(String, bool)> {
    let fds = prost_types::FileDescriptorSet::decode(fleetcare::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut rpcs = vec![("/grpc.health.v1.Health/Check".to_owned(), false)];
    for file in &fds.file {
        for service in &file.service {
            for method in &service.method {
                rpcs.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    assert!(rpcs.len() > 20, "{rpcs:?}");
    rpcs
}

/// Sends `body` as the request of `path`; Ok when the call was answered
/// OK (a streaming call: its first message or a quiet moment).
async fn raw_call(
    channel: Channel,
    path: &str,
    streaming: bool,
    body: Vec<u8>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).unwrap();
    let request = tonic::Request::new(body);
    if streaming {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
            Ok(message) => message.map(|_| ()),
            Err(_) => Ok(()),
        }
    } else {
        grpc.unary(request, path, RawCodec).await.map(|_| ())
    }
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_and_an_over_limit_message_resource_exhausted() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    // Field 1, length-delimited, claims 5 bytes and has 1: not protobuf.
    let truncated = vec![0x0a, 0x05, 0x01];
    for (path, streaming) in every_rpc() {
        let err = raw_call(app.channel.clone(), &path, streaming, truncated.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
        assert!(
            err.message().contains("not valid protobuf"),
            "{path}: {}",
            err.message()
        );
    }
    let over = vec![0u8; 4 * 1024 * 1024 + 1];
    let err = raw_call(
        app.channel.clone(),
        "/fleetcare.v1.AgentStatusService/RegisterAgent",
        false,
        over,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-message-size"),
        "{}",
        err.message()
    );
    // The connection and the server are fine afterwards.
    app.register("after").await;
}

#[test]
fn arbitrary_bytes_to_every_rpc_never_answer_internal_nor_stop_the_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = TestDb::new();
    let app = rt.block_on(TestApp::spawn(&db));
    let rpcs = every_rpc();
    let config = proptest::test_runner::Config {
        cases: 24,
        failure_persistence: None,
        ..Default::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let bodies = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 64..2048),
    ];
    let result = runner.run(&bodies, |body| {
        rt.block_on(async {
            for (path, streaming) in &rpcs {
                let call = raw_call(app.channel.clone(), path, *streaming, body.clone());
                let answered = tokio::time::timeout(Duration::from_secs(10), call)
                    .await
                    .map_err(|_| TestCaseError::fail(format!("{path}: no answer in 10 s")))?;
                if let Err(status) = answered {
                    prop_assert!(
                        !matches!(status.code(), Code::Internal | Code::Unknown),
                        "{path} answered {:?}: {}",
                        status.code(),
                        status.message()
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // Still serving.
    rt.block_on(async {
        app.register("still-here").await;
        app.stop().await;
    });
}

/// Whether util-linux's prlimit is installed (it runs the server under a limit).
fn prlimit_installed() -> bool {
    std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The (soft, hard) descriptor limit of a running process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test]
async fn the_server_raises_its_soft_descriptor_limit_to_the_hard_one() {
    if !prlimit_installed() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let db = TestDb::new();
    let server = ServerProcess::start_under(
        &["prlimit", "--nofile=1024:4096", "--"],
        &["--database-url", &db.url],
    )
    .await;
    assert_eq!(open_files_limit(server.pid()), (4096, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_beyond_the_descriptor_limit_do_not_lock_new_clients_out() {
    const SILENT: usize = 1100;
    if !prlimit_installed() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    // This process holds the silent sockets: it needs more than 1,024 itself.
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(
        soft as usize > SILENT + 200,
        "the test needs {} descriptors, has {soft}",
        SILENT + 200
    );
    let db = TestDb::new();
    // Soft and hard 1,024: raising cannot help, the cap and the timeout must.
    let server = ServerProcess::start_under(
        &["prlimit", "--nofile=1024:1024", "--"],
        &[
            "--database-url",
            &db.url,
            "--max-connections",
            "900",
            "--handshake-timeout",
            "1s",
            "--db-max-connections",
            "4",
        ],
    )
    .await;
    assert_eq!(open_files_limit(server.pid()), (1024, 1024));

    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // A fresh client is served: health says SERVING and a registration works.
    let addr = server.addr;
    eventually(Duration::from_secs(30), "a fresh client served", || async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .ok()?
            .into_inner()
            .status;
        if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            return None;
        }
        AgentStatusServiceClient::new(channel)
            .register_agent(pb::RegisterAgentRequest {
                agent_id: "fresh".into(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .ok()
    })
    .await;
    // The silent sockets were closed by the server (at once beyond the cap,
    // after the handshake timeout within it).
    use tokio::io::AsyncReadExt;
    for socket in silent.iter_mut().step_by(100) {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            // hyper greets with its SETTINGS frame before the deadline closes it.
            Ok(Ok(_)) => {
                let rest = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                assert!(rest.is_ok(), "a silent socket stayed open");
            }
            Err(_) => panic!("a silent socket stayed open"),
        }
    }
}

#[tokio::test]
async fn explain_recovery_names_the_window_stated_or_inferred_and_refuses_an_unknown_one() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut agents = app.agents.clone();
    let explain = |window: i32| pb::ExplainRecoveryRequest {
        message: "You've hit your weekly limit · resets 3am (Europe/London)".into(),
        window,
        ..Default::default()
    };
    let inferred = agents
        .explain_recovery(explain(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inferred.window, pb::QuotaWindow::Weekly as i32);
    assert!(
        inferred.window_evidence.contains("weekly limit"),
        "{}",
        inferred.window_evidence
    );
    // What the caller states wins over the wording.
    let stated = agents
        .explain_recovery(explain(pb::QuotaWindow::Tokens as i32))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stated.window, pb::QuotaWindow::Tokens as i32);
    assert_eq!(stated.window_evidence, "stated by the caller");
    assert_eq!(
        stated.recovery_at, inferred.recovery_at,
        "the deadline is the report's"
    );
    let refused = agents.explain_recovery(explain(99)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("window "),
        "{}",
        refused.message()
    );
    app.stop().await;
}
