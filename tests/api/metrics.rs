//! `/metrics` after real traffic: each server has its own registry, so the
//! values are exactly what this test did.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fleetcare::config::HttpListen;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, TestDb, eventually, test_args};

const WAIT: Duration = Duration::from_secs(20);

/// One sample of the text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A plain HTTP/1.0 GET: the status line, the headers, the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

/// The text exposition format's samples (the parser is deliberately small: the
/// label values fleetcare exports hold no quotes, commas or escapes).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            (name, labels, value)
        })
        .collect()
}

pub struct Scrape(Vec<Sample>);

impl Scrape {
    /// The sum over every series of `name` carrying these labels (0 if none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn names(&self) -> std::collections::BTreeSet<String> {
        self.0.iter().map(|(n, _, _)| n.clone()).collect()
    }
}

pub async fn scrape(app: &TestApp) -> Scrape {
    let addr = app
        .http_addr
        .expect("the test server has a metrics listener");
    let (status, headers, body) = get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "the text format ends with # EOF");
    Scrape(parse(&body))
}

const AGENT_SERVICE: &str = "fleetcare.v1.AgentStatusService";

#[tokio::test]
async fn metrics_move_with_real_traffic() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let before = scrape(&app).await;
    assert_eq!(before.value("fleetcare_agents", &[("status", "BUSY")]), 0.0);

    for id in ["m1", "m2", "m3"] {
        app.register(id).await;
    }
    app.start_work("m1").await.unwrap();
    app.start_work("m2").await.unwrap();
    app.finish_work("m2").await.unwrap();
    let missing = app.start_work("nobody").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    for id in ["m2", "m3"] {
        app.agents
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                agent_id: id.into(),
            })
            .await
            .unwrap();
    }

    let m = scrape(&app).await;
    assert_eq!(m.value("fleetcare_agents", &[("status", "BUSY")]), 1.0);
    assert_eq!(m.value("fleetcare_agents", &[("status", "IDLE")]), 2.0);
    assert_eq!(m.value("fleetcare_agents", &[("status", "OFFLINE")]), 0.0);
    let transitions = |cause, to| {
        m.value(
            "fleetcare_transitions_total",
            &[("cause", cause), ("to_status", to)],
        )
    };
    assert_eq!(transitions("REGISTERED", "IDLE"), 3.0);
    assert_eq!(transitions("WORK_STARTED", "BUSY"), 2.0);
    assert_eq!(transitions("WORK_FINISHED", "IDLE"), 1.0);
    assert_eq!(m.value("fleetcare_transitions_total", &[]), 6.0);
    let calls = |method, code| {
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("service", AGENT_SERVICE),
                ("method", method),
                ("code", code),
            ],
        )
    };
    assert_eq!(calls("RegisterAgent", "OK"), 3.0);
    assert_eq!(calls("StartWork", "OK"), 2.0);
    assert_eq!(calls("StartWork", "NOT_FOUND"), 1.0);
    assert_eq!(calls("Heartbeat", "OK"), 2.0);
    assert_eq!(m.value("fleetcare_heartbeats_received_total", &[]), 2.0);
    // Every committed call went through a batch; six transitions at least.
    assert!(m.value("fleetcare_commit_batch_size_sum", &[]) >= 6.0);
    assert!(m.value("fleetcare_commit_duration_seconds_count", &[]) >= 1.0);
    assert!(m.value("fleetcare_db_connections", &[]) >= 1.0);
    // Every pool's connections are timed where they are acquired.
    let pools: std::collections::BTreeSet<String> =
        m.0.iter()
            .filter(|(n, _, _)| n == "fleetcare_db_max_connections")
            .map(|(_, l, _)| l["pool"].clone())
            .collect();
    assert!(!pools.is_empty());
    for pool in &pools {
        let labels = [("pool", pool.as_str())];
        assert_eq!(
            m.value("fleetcare_db_acquire_timeouts_total", &labels),
            0.0,
            "{pool}"
        );
        assert!(
            m.0.iter().any(
                |(n, l, _)| n == "fleetcare_db_acquire_duration_seconds_count"
                    && l.get("pool") == Some(pool)
            ),
            "no acquire histogram for {pool}"
        );
    }
    let acquired = m.value("fleetcare_db_acquire_duration_seconds_count", &[]);
    assert!(acquired >= 1.0, "{acquired}");
    app.agents
        .clone()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
    let later = scrape(&app).await;
    assert!(
        later.value("fleetcare_db_acquire_duration_seconds_count", &[]) > acquired,
        "a ListAgents reads through a pool"
    );
    // No agent id ever becomes a label.
    for (_, labels, _) in &m.0 {
        assert!(
            labels
                .values()
                .all(|v| !["m1", "m2", "m3"].contains(&v.as_str())),
            "{labels:?}"
        );
    }

    // The flusher writes the two heartbeats acknowledged from memory.
    eventually(WAIT, "heartbeats flushed", || async {
        let m = scrape(&app).await;
        (m.value("fleetcare_heartbeats_flushed_total", &[]) == 2.0).then_some(())
    })
    .await;
    // The sweeper runs every 100 ms in the test settings.
    eventually(WAIT, "sweeper runs", || async {
        let m = scrape(&app).await;
        (m.value("fleetcare_sweeper_runs_total", &[]) >= 1.0).then_some(())
    })
    .await;

    // A watch stream counts while open.
    let mut stream = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    eventually(WAIT, "one watch stream open", || async {
        let m = scrape(&app).await;
        (m.value("fleetcare_watch_streams", &[("stream", "transitions")]) == 1.0).then_some(())
    })
    .await;
    app.register("m4").await;
    let _ = tokio::time::timeout(WAIT, stream.message()).await;
    let m = scrape(&app).await;
    assert!(m.value("fleetcare_watch_lag_revisions", &[]) >= 0.0);
    drop(stream);
    eventually(WAIT, "the watch stream closed", || async {
        let m = scrape(&app).await;
        (m.value("fleetcare_watch_streams", &[]) == 0.0).then_some(())
    })
    .await;

    // An error, its plan and its outcome.
    let mut healing = HealingServiceClient::new(app.channel.clone());
    let event = healing
        .report_error(pb::ReportErrorRequest {
            agent_id: "healer".into(),
            message: "Network timeout while calling the API".into(),
            context: Default::default(),
            error_type_hint: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let action = healing
        .plan_recovery(pb::PlanRecoveryRequest {
            error_event_id: event.id,
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    healing
        .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
            action_id: action.id,
            success: true,
            duration: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            details: "done".into(),
        })
        .await
        .unwrap();
    let m = scrape(&app).await;
    assert_eq!(m.value("fleetcare_healing_plans_total", &[]), 1.0);
    assert_eq!(
        m.value(
            "fleetcare_healing_outcomes_total",
            &[("result", "SUCCEEDED")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("service", "fleetcare.v1.HealingService"),
                ("method", "PlanRecovery"),
                ("code", "OK")
            ]
        ),
        1.0
    );
    app.stop().await;
}

/// `fleetcare_rpc_duration_seconds_count` of one method, over its codes or for one.
fn rpc_count(m: &Scrape, service: &str, method: &str, code: Option<&str>) -> f64 {
    let mut labels = vec![("service", service), ("method", method)];
    if let Some(code) = code {
        labels.push(("code", code));
    }
    m.value("fleetcare_rpc_duration_seconds_count", &labels)
}

const PIPELINE_SERVICE: &str = "fleetcare.v1.SessionPipelineService";

#[tokio::test]
async fn watch_streams_of_both_kinds_count_while_open_and_are_timed_to_their_final_code() {
    let db = TestDb::new();
    let root = crate::pipeline::SessionRoot::new();
    root.write(
        "alice/s1.jsonl",
        &crate::pipeline::assistant(
            "msg_1",
            "req_1",
            "claude-sonnet-4",
            "2026-03-14T10:00:00Z",
            [10, 20, 30, 40],
        ),
    );
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.path.clone();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    let app = TestApp::spawn_with(args).await;
    let streams = |m: &Scrape, stream| m.value("fleetcare_watch_streams", &[("stream", stream)]);
    let m = scrape(&app).await;
    assert_eq!(streams(&m, "transitions"), 0.0);
    assert_eq!(streams(&m, "run"), 0.0);

    // WatchTransitions: counted while open, timed only once it is over (not
    // at its response headers), and CANCELLED when the client drops it.
    let watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    eventually(WAIT, "one transitions stream open", || async {
        let m = scrape(&app).await;
        (streams(&m, "transitions") == 1.0).then_some(())
    })
    .await;
    let m = scrape(&app).await;
    assert_eq!(
        rpc_count(&m, AGENT_SERVICE, "WatchTransitions", None),
        0.0,
        "an open stream is not timed yet"
    );
    drop(watch);
    eventually(WAIT, "the dropped stream closed and timed", || async {
        let m = scrape(&app).await;
        (streams(&m, "transitions") == 0.0
            && rpc_count(&m, AGENT_SERVICE, "WatchTransitions", Some("CANCELLED")) == 1.0)
            .then_some(())
    })
    .await;

    // A stream refused before its first message: its code from the headers.
    let refused = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            since_revision: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange);
    let m = scrape(&app).await;
    assert_eq!(
        rpc_count(&m, AGENT_SERVICE, "WatchTransitions", Some("OUT_OF_RANGE")),
        1.0
    );
    assert_eq!(rpc_count(&m, AGENT_SERVICE, "WatchTransitions", None), 2.0);

    // WatchRun, waiting for the next run, dropped by its client.
    let mut pipeline = crate::pipeline::client(&app);
    let follow = pipeline
        .watch_run(pb::WatchRunRequest {
            name: "usage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    eventually(WAIT, "one run stream open", || async {
        let m = scrape(&app).await;
        (streams(&m, "run") == 1.0).then_some(())
    })
    .await;
    assert_eq!(streams(&scrape(&app).await, "transitions"), 0.0);
    drop(follow);
    eventually(WAIT, "the dropped run stream closed and timed", || async {
        let m = scrape(&app).await;
        (streams(&m, "run") == 0.0
            && rpc_count(&m, PIPELINE_SERVICE, "WatchRun", Some("CANCELLED")) == 1.0)
            .then_some(())
    })
    .await;

    // WatchRun followed to the end of a run: OK, from its trailers.
    let mut follow = pipeline
        .watch_run(pb::WatchRunRequest {
            name: "usage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let stats = crate::pipeline::run(&app, "usage").await.unwrap();
    assert_eq!(stats.processed, 1);
    let mut finished = false;
    while let Some(progress) = tokio::time::timeout(WAIT, follow.message())
        .await
        .expect("progress within the wait")
        .unwrap()
    {
        finished |= progress.finished;
    }
    assert!(finished, "the stream ended with the run");
    eventually(WAIT, "the finished run stream timed as OK", || async {
        let m = scrape(&app).await;
        (streams(&m, "run") == 0.0
            && rpc_count(&m, PIPELINE_SERVICE, "WatchRun", Some("OK")) == 1.0)
            .then_some(())
    })
    .await;
    let m = scrape(&app).await;
    assert_eq!(rpc_count(&m, PIPELINE_SERVICE, "WatchRun", None), 2.0);
    assert_eq!(
        m.value(
            "fleetcare_pipeline_runs_total",
            &[("processor", "usage"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "fleetcare_pipeline_sessions_total",
            &[("processor", "usage"), ("result", "processed")]
        ),
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("d1").await;
    let m = scrape(&app).await;
    let exported = m.names();
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/fleetcare.json"))
            .expect("the dashboard is JSON");
    let mut queried = Vec::new();
    let re = regex::Regex::new(r"fleetcare_[a-z_]+").unwrap();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            queried.extend(re.find_iter(expr).map(|m| m.as_str().to_owned()));
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    // A family without samples yet (no sweep, no pipeline run) still has its
    // # TYPE line: read those names too.
    let (_, _, body) = get(app.http_addr.unwrap(), "/metrics").await;
    let typed: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    for name in queried {
        let known = exported.contains(&name)
            || typed.iter().any(|t| {
                name == *t
                    || name.strip_prefix(t.as_str()).is_some_and(|suffix| {
                        ["_total", "_bucket", "_count", "_sum"].contains(&suffix)
                    })
            });
        assert!(known, "the dashboard queries {name}, which is not exported");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_empty_http_listen_serves_no_metrics() {
    let db = TestDb::new();
    let app = TestApp::spawn_with(fleetcare::config::ServeArgs {
        http_listen: HttpListen::off(),
        ..test_args(&db.url)
    })
    .await;
    assert_eq!(app.http_addr, None);
    app.register("x").await;
    app.stop().await;
}

#[tokio::test]
async fn without_an_http_listener_the_server_stops_without_waiting_out_its_grace() {
    let db = TestDb::new();
    let app = TestApp::spawn_with(fleetcare::config::ServeArgs {
        http_listen: HttpListen::off(),
        // Longer than `stop` waits (30 s): a shutdown that waits it out fails.
        shutdown_grace: std::time::Duration::from_secs(120),
        ..test_args(&db.url)
    })
    .await;
    app.register("x").await;
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "stopped in {:?}",
        started.elapsed()
    );
}

#[test]
fn the_flag_reads_an_address_or_nothing() {
    use fleetcare::config::parse_http_listen;
    assert_eq!(parse_http_listen("").unwrap(), HttpListen::off());
    assert_eq!(
        parse_http_listen("0.0.0.0:9100").unwrap(),
        HttpListen::at("0.0.0.0:9100".parse().unwrap())
    );
    assert!(parse_http_listen("nope").is_err());
}

#[tokio::test]
async fn dashboard_api_calls_count_in_the_rpc_metrics_as_http() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("dash-m1").await;
    let addr = app.http_addr.expect("an HTTP listener");
    let http_calls = |m: &Scrape, method: &str, code: &str| {
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("service", AGENT_SERVICE),
                ("method", method),
                ("code", code),
                ("transport", "http"),
            ],
        )
    };
    let before = scrape(&app).await;
    assert_eq!(http_calls(&before, "ListAgents", "OK"), 0.0);
    let grpc_before = rpc_count(&before, AGENT_SERVICE, "ListAgents", None);

    for path in [
        "/api/v1/agents",
        "/api/v1/agents",
        "/api/v1/fleet/counts",
        "/api/v1/agents/nobody",
    ] {
        let (status, _, _) = get(addr, path).await;
        assert!(
            status.contains(" 200 ") || status.contains(" 404 "),
            "{path}: {status}"
        );
    }
    let m = scrape(&app).await;
    assert_eq!(http_calls(&m, "ListAgents", "OK"), 2.0);
    assert_eq!(http_calls(&m, "CountAgents", "OK"), 1.0);
    assert_eq!(http_calls(&m, "GetAgent", "NOT_FOUND"), 1.0);
    // Only the dashboard called: the gRPC series did not move.
    assert_eq!(
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[("method", "ListAgents"), ("transport", "grpc")]
        ),
        0.0
    );
    assert_eq!(
        rpc_count(&m, AGENT_SERVICE, "ListAgents", None),
        grpc_before + 2.0
    );
    // A dashboard stream is timed to its end, like a gRPC one: CANCELLED
    // when its client goes away.
    let mut sse = TcpStream::connect(addr).await.unwrap();
    sse.write_all(
        format!("GET /api/v1/transitions/stream HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, sse.read_exact(&mut byte))
            .await
            .expect("the stream's headers in time")
            .unwrap();
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).contains(" 200 "));
    eventually(WAIT, "the dashboard stream open", || async {
        let m = scrape(&app).await;
        (m.value("fleetcare_watch_streams", &[("stream", "transitions")]) == 1.0).then_some(())
    })
    .await;
    let watch_calls = |m: &Scrape| {
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[("method", "WatchTransitions"), ("transport", "http")],
        )
    };
    assert_eq!(
        watch_calls(&scrape(&app).await),
        0.0,
        "not timed while open"
    );
    drop(sse);
    eventually(WAIT, "the dropped dashboard stream timed", || async {
        let m = scrape(&app).await;
        (http_calls(&m, "WatchTransitions", "CANCELLED") == 1.0).then_some(())
    })
    .await;
    assert_eq!(watch_calls(&scrape(&app).await), 1.0);

    // gRPC calls carry transport="grpc".
    assert_eq!(
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("method", "RegisterAgent"),
                ("code", "OK"),
                ("transport", "grpc")
            ]
        ),
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn pool_metrics_count_parked_pools_by_window_held_members_and_releases() {
    let db = TestDb::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.pool_canary_timeout = std::time::Duration::ZERO;
    args.pool_release_spread = std::time::Duration::ZERO;
    let clock = crate::helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    for id in ["qm-1", "qm-2"] {
        app.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: Default::default(),
                quota_pools: vec!["acct".into()],
            })
            .await
            .unwrap();
    }
    let m = scrape(&app).await;
    assert_eq!(
        m.value("fleetcare_quota_pools_parked", &[("window", "WEEKLY")]),
        0.0
    );
    assert_eq!(m.value("fleetcare_quota_pool_members_held", &[]), 0.0);
    app.agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "qm-1".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: Some(fleetcare::proto::timestamp(
                clock.now() + chrono::Duration::seconds(30),
            )),
            window: pb::QuotaWindow::Weekly as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = scrape(&app).await;
    assert_eq!(
        m.value("fleetcare_quota_pools_parked", &[("window", "WEEKLY")]),
        1.0
    );
    assert_eq!(
        m.value("fleetcare_quota_pools_parked", &[("window", "FIVE_HOUR")]),
        0.0
    );
    assert_eq!(m.value("fleetcare_quota_pool_members_held", &[]), 2.0);
    assert!(
        m.names().iter().all(|n| !n.contains("acct")),
        "no series per pool"
    );

    // The window lifts: the canary, then (no timeout, no spread) the other.
    clock.advance(chrono::Duration::seconds(31));
    crate::helpers::eventually(
        std::time::Duration::from_secs(10),
        "the canary released",
        || async {
            (scrape(&app)
                .await
                .value("fleetcare_quota_pool_releases_total", &[])
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    clock.advance(chrono::Duration::seconds(1));
    crate::helpers::eventually(
        std::time::Duration::from_secs(10),
        "both released",
        || async {
            let m = scrape(&app).await;
            (m.value("fleetcare_quota_pool_releases_total", &[]) == 2.0
                && m.value("fleetcare_quota_pool_members_held", &[]) == 0.0)
                .then_some(())
        },
    )
    .await;
    let m = scrape(&app).await;
    assert_eq!(
        m.value("fleetcare_quota_pools_parked", &[("window", "WEEKLY")]),
        0.0
    );
}
