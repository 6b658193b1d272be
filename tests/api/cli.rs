//! The operator CLI: the built `fleetcare` binary, run as a process against a
//! live server, its output (tables and `--json`) and its exit codes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fleetcare::cli::exit;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
use serde_json::{Value, json};

use crate::helpers::{TcpProxy, TestApp, TestDb, test_args};
use crate::pipeline::SessionRoot;
use crate::usage_corpus::copy_corpus;

const BIN: &str = env!("CARGO_BIN_EXE_fleetcare");

/// Runs `fleetcare ARGS --server ADDR` to completion, off the async runtime.
async fn fleetcare(server: SocketAddr, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .args(["--server", &server.to_string()])
        .env_remove("FLEETCARE_SERVER");
    tokio::task::spawn_blocking(move || command.output().expect("run fleetcare"))
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "fleetcare failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("stdout is one JSON document")
}

/// The one line a failed command writes on stderr, and its exit code.
fn failure(output: &Output) -> (String, i32) {
    assert!(
        output.stdout.is_empty(),
        "a failure prints nothing on stdout"
    );
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    (stderr.trim_end().to_string(), output.status.code().unwrap())
}

#[tokio::test]
async fn agents_list_and_get_print_tables_and_json() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut agents = app.agents.clone();
    for (id, team) in [("cli-a", "red"), ("cli-b", "blue"), ("cli-c", "red")] {
        agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: [("team".to_string(), team.to_string())].into(),
                quota_pools: vec![format!("acct/{team}")],
            })
            .await
            .unwrap();
    }
    app.start_work("cli-b").await.unwrap();

    let list = json(&fleetcare(app.addr, &["agents", "list", "--json"]).await);
    let statuses: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [("cli-a", "IDLE"), ("cli-b", "BUSY"), ("cli-c", "IDLE")]
    );

    let busy = json(&fleetcare(app.addr, &["agents", "list", "--status", "busy", "--json"]).await);
    assert_eq!(busy.as_array().unwrap().len(), 1);
    assert_eq!(busy[0]["agent_id"], "cli-b");
    let red = json(
        &fleetcare(
            app.addr,
            &["agents", "list", "--label", "team=red", "--json"],
        )
        .await,
    );
    let red_ids: Vec<&str> = red
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(red_ids, ["cli-a", "cli-c"]);

    let table = stdout(&fleetcare(app.addr, &["agents", "list"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("AGENT  STATUS"), "{table}");
    assert!(
        lines[2].starts_with("cli-b  BUSY") && lines[2].ends_with("team=blue"),
        "{table}"
    );

    let one = json(&fleetcare(app.addr, &["agents", "get", "cli-b", "--json"]).await);
    assert_eq!(one["status"], "BUSY");
    assert_eq!(one["labels"]["team"], "blue");
    assert!(one["last_heartbeat_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(one["quota_pools"], serde_json::json!(["acct/blue"]));
    let details = stdout(&fleetcare(app.addr, &["agents", "get", "cli-b"]).await);
    assert!(details.contains("status:           BUSY\n"), "{details}");
    assert!(
        details.contains("quota pool:       acct/blue\n"),
        "{details}"
    );

    // FLEETCARE_SERVER stands in for --server.
    let mut command = Command::new(BIN);
    command
        .args(["agents", "get", "cli-a", "--json"])
        .env("FLEETCARE_SERVER", app.addr.to_string());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(json(&output)["agent_id"], "cli-a");

    app.stop().await;
}

#[tokio::test]
async fn agents_resume_returns_an_exhausted_agent_to_idle_and_refuses_otherwise() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["cli-r1", "cli-r2", "cli-idle"] {
        app.register(id).await;
    }
    crate::dispatch::exhaust(&app, "cli-r1").await;
    crate::dispatch::exhaust(&app, "cli-r2").await;

    let line = stdout(
        &fleetcare(
            app.addr,
            &["agents", "resume", "cli-r1", "--reason", "limit raised"],
        )
        .await,
    );
    assert!(
        line.trim_end()
            .ends_with("cli-r1  EXHAUSTED -> IDLE  RESUMED  by anonymous"),
        "{line}"
    );
    assert_eq!(app.get("cli-r1").await.status, pb::AgentStatus::Idle as i32);

    let t = json(&fleetcare(app.addr, &["agents", "resume", "cli-r2", "--json"]).await);
    assert_eq!(t["agent_id"], "cli-r2");
    assert_eq!(t["from"], "EXHAUSTED");
    assert_eq!(t["to"], "IDLE");
    assert_eq!(t["cause"], "RESUMED");

    let (line, code) = failure(&fleetcare(app.addr, &["agents", "resume", "cli-idle"]).await);
    assert!(line.starts_with("fleetcare: refused: "), "{line}");
    assert!(line.contains("agent is IDLE, must be EXHAUSTED"), "{line}");
    assert_eq!(code, i32::from(exit::REFUSED));
    let (line, code) = failure(&fleetcare(app.addr, &["agents", "resume", "ghost"]).await);
    assert!(line.contains("ghost"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));
    app.stop().await;
}

#[tokio::test]
async fn agents_cordon_and_uncordon_and_list_and_get_show_it() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("cli-c1").await;
    app.register("cli-c2").await;
    app.start_work("cli-c1").await.unwrap();

    let line = stdout(
        &fleetcare(
            app.addr,
            &["agents", "cordon", "cli-c1", "--reason", "disk failing"],
        )
        .await,
    );
    assert!(
        line.trim_end()
            .ends_with("cli-c1  BUSY -> BUSY  CORDONED  by anonymous"),
        "{line}"
    );
    let again = stdout(&fleetcare(app.addr, &["agents", "cordon", "cli-c1"]).await);
    assert_eq!(again, "cli-c1 is cordoned already\n");

    let one = json(&fleetcare(app.addr, &["agents", "get", "cli-c1", "--json"]).await);
    assert_eq!(one["status"], "BUSY");
    assert_eq!(one["schedulable"], false);
    assert_eq!(one["cordon_reason"], "disk failing");
    let details = stdout(&fleetcare(app.addr, &["agents", "get", "cli-c1"]).await);
    assert!(details.contains("schedulable:      no\n"), "{details}");
    assert!(
        details.contains("cordon reason:    disk failing\n"),
        "{details}"
    );

    let table = stdout(&fleetcare(app.addr, &["agents", "list"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("SCHEDULABLE"), "{table}");
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(words(lines[1])[0], "cli-c1", "{table}");
    assert!(words(lines[1]).contains(&"no".to_string()), "{table}");
    assert!(words(lines[2]).contains(&"yes".to_string()), "{table}");

    let agent = json(&fleetcare(app.addr, &["agents", "uncordon", "cli-c1", "--json"]).await);
    assert_eq!(agent["schedulable"], true);
    assert!(agent.get("cordon_reason").is_none(), "{agent}");
    let again = stdout(&fleetcare(app.addr, &["agents", "uncordon", "cli-c1"]).await);
    assert_eq!(again, "cli-c1 is schedulable already\n");

    let (line, code) = failure(&fleetcare(app.addr, &["agents", "cordon", "ghost"]).await);
    assert!(line.contains("ghost"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));
    app.stop().await;
}

fn claim_request(labels: &[(&str, &str)], slot: pb::SlotType) -> pb::ClaimAgentRequest {
    pb::ClaimAgentRequest {
        selector: Some(pb::LabelSelector {
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        }),
        slot_type: slot as i32,
        lease_duration: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        wait_timeout: None,
        request_id: String::new(),
    }
}

/// `message` with `token` as its bearer token.
fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn agents_delete_prints_the_deleted_transition_and_refuses_a_claimed_agent() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.agents
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "cli-d1".into(),
            labels: [("pool".to_string(), "x".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap();
    app.register("cli-d2").await;
    let claim = crate::dispatch::client(&app)
        .claim_agent(claim_request(&[("pool", "x")], pb::SlotType::Work))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(claim.agent_id, "cli-d1");

    // `agents get` shows the claim.
    let one = json(&fleetcare(app.addr, &["agents", "get", "cli-d1", "--json"]).await);
    assert_eq!(one["claim"]["holder"], "anonymous");
    assert_eq!(one["claim"]["fencing_token"], claim.fencing_token);
    assert_eq!(one["claim"]["slot_type"], "WORK");
    let details = stdout(&fleetcare(app.addr, &["agents", "get", "cli-d1"]).await);
    assert!(
        details.contains("claimed by:       anonymous\n"),
        "{details}"
    );
    assert!(
        details.contains(&format!("fencing token:    {}\n", claim.fencing_token)),
        "{details}"
    );

    // Claimed: refused with the server's message, and nothing deleted.
    let (line, code) = failure(&fleetcare(app.addr, &["agents", "delete", "cli-d1"]).await);
    assert!(line.starts_with("fleetcare: refused: "), "{line}");
    assert!(line.contains("release the claim first"), "{line}");
    assert_eq!(code, i32::from(exit::REFUSED));
    assert_eq!(app.get("cli-d1").await.status, pb::AgentStatus::Busy as i32);

    crate::dispatch::client(&app)
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: claim.claim_id.clone(),
            fencing_token: claim.fencing_token,
        })
        .await
        .unwrap();
    let line = stdout(&fleetcare(app.addr, &["agents", "delete", "cli-d1"]).await);
    let last = app.history("cli-d1").await.pop().unwrap();
    assert_eq!(last.cause, pb::TransitionCause::Deleted as i32);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], last.revision.to_string(), "{line}");
    assert!(
        line.trim_end()
            .ends_with("cli-d1  IDLE -> IDLE  DELETED  by anonymous"),
        "{line}"
    );
    let (line, code) = failure(&fleetcare(app.addr, &["agents", "get", "cli-d1"]).await);
    assert!(line.starts_with("fleetcare: not found: "), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));

    let t = json(&fleetcare(app.addr, &["agents", "delete", "cli-d2", "--json"]).await);
    let last = app.history("cli-d2").await.pop().unwrap();
    assert_eq!(t["revision"], last.revision);
    assert_eq!(t["agent_id"], "cli-d2");
    assert_eq!(t["cause"], "DELETED");
    assert_eq!((&t["from"], &t["to"]), (&json!("IDLE"), &json!("IDLE")));
    let list = json(&fleetcare(app.addr, &["agents", "list", "--json"]).await);
    assert_eq!(list, json!([]));

    let (line, code) = failure(&fleetcare(app.addr, &["agents", "delete", "cli-d2"]).await);
    assert!(line.contains("cli-d2"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));
    app.stop().await;
}

#[tokio::test]
async fn claims_list_prints_every_page_as_a_table_and_json_filtered_by_holder() {
    use fleetcare::domain::auth::{Role, caller_entry, token_digest};
    use futures::StreamExt;
    let db = TestDb::new();
    let dir = std::env::temp_dir().join(format!(
        "fleetcare-cli-claims-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("callers.toml");
    std::fs::write(
        &file,
        [
            caller_entry("sched-a", Role::Scheduler, &token_digest("a-token"), &[]),
            caller_entry("sched-b", Role::Scheduler, &token_digest("b-token"), &[]),
            caller_entry("viewer", Role::Reader, &token_digest("r-token"), &[]),
            caller_entry("ops", Role::Operator, &token_digest("o-token"), &[]),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    let app = TestApp::spawn_with(args).await;

    // More claims than the largest page: the list follows every page.
    const N: usize = 1001;
    let id = |i: usize| format!("cl-{i:04}");
    futures::stream::iter(0..=N)
        .map(|i| {
            let mut agents = app.agents.clone();
            async move {
                let labels = [("pool".to_string(), "main".to_string())].into();
                let message = pb::RegisterAgentRequest {
                    agent_id: id(i),
                    labels,
                    quota_pools: Vec::new(),
                };
                agents
                    .register_agent(with_token("o-token", message))
                    .await
                    .expect("register");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    futures::stream::iter(0..N)
        .map(|_| {
            let mut dispatch = crate::dispatch::client(&app);
            async move {
                let request = claim_request(&[("pool", "main")], pb::SlotType::Work);
                dispatch
                    .claim_agent(with_token("a-token", request))
                    .await
                    .expect("claim")
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let b = crate::dispatch::client(&app)
        .claim_agent(with_token(
            "b-token",
            claim_request(&[("pool", "main")], pb::SlotType::OnCall),
        ))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();

    let all = json(
        &fleetcare(
            app.addr,
            &["claims", "list", "--json", "--token", "r-token"],
        )
        .await,
    );
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), N + 1);
    let ids: Vec<&str> = all
        .iter()
        .map(|c| c["agent_id"].as_str().unwrap())
        .collect();
    let every: Vec<String> = (0..=N).map(id).collect();
    assert_eq!(ids, every, "every claimed agent once, in agent id order");
    let by_a = all.iter().filter(|c| c["holder"] == "sched-a").count();
    assert_eq!(by_a, N);
    let mine = all
        .iter()
        .find(|c| c["claim_id"] == b.claim_id.as_str())
        .expect("sched-b's claim is listed");
    assert_eq!(mine["holder"], "sched-b");
    assert_eq!(mine["fencing_token"], b.fencing_token);
    assert_eq!(mine["slot_type"], "ON_CALL");

    let table = stdout(
        &fleetcare(
            app.addr,
            &[
                "claims", "list", "--holder", "sched-b", "--token", "r-token",
            ],
        )
        .await,
    );
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert_eq!(
        lines[0],
        [
            "AGENT", "CLAIM", "HOLDER", "TOKEN", "SLOT", "LEASE", "EXPIRES"
        ]
    );
    let lease = fleetcare::views::time(b.lease_expires_at.as_ref()).unwrap();
    let token = b.fencing_token.to_string();
    assert_eq!(
        lines[1],
        [
            b.agent_id.as_str(),
            b.claim_id.as_str(),
            "sched-b",
            token.as_str(),
            "ON_CALL",
            lease.as_str()
        ]
    );
    let none = stdout(
        &fleetcare(
            app.addr,
            &["claims", "list", "--holder", "nobody", "--token", "r-token"],
        )
        .await,
    );
    assert_eq!(none.lines().count(), 1, "the header only: {none}");

    // Without a token the server refuses, in one line.
    let (line, code) = failure(&fleetcare(app.addr, &["claims", "list"]).await);
    assert!(line.starts_with("fleetcare: "), "{line}");
    assert_eq!(code, i32::from(exit::FAILURE));
    app.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn failures_are_one_line_with_an_exit_code_per_kind() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;

    let (line, code) = failure(&fleetcare(app.addr, &["agents", "get", "ghost"]).await);
    assert!(line.starts_with("fleetcare: not found: "), "{line}");
    assert!(line.contains("ghost"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));

    let (line, code) = failure(&fleetcare(app.addr, &["pipeline", "run", "nope"]).await);
    assert!(line.contains("nope"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));

    // A port nothing listens on: bind one, then free it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (line, code) = failure(&fleetcare(closed, &["agents", "list"]).await);
    assert!(
        line.starts_with(&format!("fleetcare: cannot reach the server at {closed}: ")),
        "{line}"
    );
    assert_eq!(code, i32::from(exit::UNREACHABLE));

    // A malformed flag is clap's usage error, before any call.
    let output = fleetcare(app.addr, &["usage", "--since", "yesterday"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected a date"));

    app.stop().await;
}

/// Reads the watch's stdout lines on a thread and hands them over a channel.
fn line_reader(stdout: std::process::ChildStdout) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
        .await
        .expect("a watch line within 30 s")
        .expect("watch still running");
    serde_json::from_str(&line).expect("one JSON object per line")
}

#[tokio::test]
async fn watch_prints_every_transition_once_across_a_dropped_connection() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let proxy = TcpProxy::start(app.addr).await;
    let first = app.register("w-1").await;

    let mut child = Command::new(BIN)
        .args(["watch", "--json", "--agent", "w-1", "--count", "6"])
        .args(["--since", &first.revision.to_string()])
        .args(["--server", &proxy.addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = line_reader(child.stdout.take().unwrap());

    app.start_work("w-1").await.unwrap();
    app.finish_work("w-1").await.unwrap();
    let before_cut = [next_line(&mut lines).await, next_line(&mut lines).await];

    // The connection drops; transitions go on while the watch cannot see them.
    proxy.cut().await;
    app.start_work("w-1").await.unwrap();
    app.finish_work("w-1").await.unwrap();
    proxy.restore();
    app.start_work("w-1").await.unwrap();
    app.finish_work("w-1").await.unwrap();

    let mut seen = before_cut.to_vec();
    for _ in 0..4 {
        seen.push(next_line(&mut lines).await);
    }
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "watch exits 0 after --count");

    let history = app.history("w-1").await;
    let expected: Vec<(i64, String)> = history[1..]
        .iter()
        .map(|t| {
            let to = pb::AgentStatus::try_from(t.to_status)
                .unwrap()
                .as_str_name();
            (
                t.revision,
                to.trim_start_matches("AGENT_STATUS_").to_string(),
            )
        })
        .collect();
    assert_eq!(expected.len(), 6);
    let got: Vec<(i64, String)> = seen
        .iter()
        .map(|v| {
            (
                v["revision"].as_i64().unwrap(),
                v["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected, "every transition once, in order");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("reconnected, resuming after revision"),
        "{stderr}"
    );

    app.stop().await;
}

#[tokio::test]
async fn pipeline_run_and_usage_report_the_fixture_corpus() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    copy_corpus(&root);
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.path.clone();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    let app = TestApp::spawn_with(args).await;

    let processors = json(&fleetcare(app.addr, &["pipeline", "list", "--json"]).await);
    let names: Vec<&str> = processors
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"usage") && names.contains(&"errors"),
        "{names:?}"
    );

    let stats = json(&fleetcare(app.addr, &["pipeline", "run", "usage", "--json"]).await);
    assert_eq!(
        (stats["scanned"].as_i64(), stats["processed"].as_i64()),
        (Some(5), Some(5))
    );
    // A second run finds nothing new, and says so in words.
    let summary = stdout(&fleetcare(app.addr, &["pipeline", "run", "usage"]).await);
    assert!(
        summary.starts_with("scanned 5, processed 0, skipped 5, failed 0"),
        "{summary}"
    );
    // Both runs are kept, newest first; --limit pages as needed.
    let runs = json(
        &fleetcare(
            app.addr,
            &["pipeline", "runs", "--processor", "usage", "--json"],
        )
        .await,
    );
    let runs = runs.as_array().unwrap();
    let processed: Vec<i64> = runs
        .iter()
        .map(|r| r["stats"]["processed"].as_i64().unwrap())
        .collect();
    assert_eq!(processed, [0, 5]);
    assert_eq!(runs[0]["trigger"], "CALL");
    assert_eq!(runs[0]["actor"], "anonymous");
    let newest = json(&fleetcare(app.addr, &["pipeline", "runs", "--limit", "1", "--json"]).await);
    assert_eq!(newest.as_array().unwrap().len(), 1);
    assert_eq!(newest[0]["id"], runs[0]["id"]);
    let table = stdout(&fleetcare(app.addr, &["pipeline", "runs"]).await);
    assert!(table.starts_with("ID  PROCESSOR"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    let (line, _) =
        failure(&fleetcare(app.addr, &["pipeline", "runs", "--processor", "nope"]).await);
    assert!(line.contains("nope"), "{line}");

    let by_user = json(&fleetcare(app.addr, &["usage", "--by", "user", "--json"]).await);
    let rows: Vec<(&str, i64, i64)> = by_user["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap(),
                r["total_tokens"].as_i64().unwrap(),
                r["messages"].as_i64().unwrap(),
            )
        })
        .collect();
    // The figures of tests/fixtures/EXPECTED.md.
    assert_eq!(rows, [("alice", 10492, 8), ("bob", 6864, 5)]);
    assert_eq!(by_user["totals"]["total_tokens"], 17356);

    let one_day = json(
        &fleetcare(
            app.addr,
            &[
                "usage",
                "--by",
                "day",
                "--since",
                "2026-03-15",
                "--until",
                "2026-03-16",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(one_day["rows"].as_array().unwrap().len(), 1);
    assert_eq!(one_day["rows"][0]["key"], "2026-03-15");
    assert_eq!(one_day["rows"][0]["total_tokens"], 6666);

    let table = stdout(&fleetcare(app.addr, &["usage", "--by", "model", "--user", "bob"]).await);
    assert!(table.starts_with("MODEL"), "{table}");
    assert!(
        table.lines().last().unwrap().starts_with("TOTAL"),
        "{table}"
    );
    assert!(
        table.contains(" 6864 "),
        "bob's total is in the table: {table}"
    );

    app.stop().await;
}

#[tokio::test]
async fn healing_stats_count_reported_errors() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut healing = HealingServiceClient::new(app.channel.clone());
    for message in [
        "rate limit exceeded",
        "connection timed out",
        "connection reset",
    ] {
        healing
            .report_error(pb::ReportErrorRequest {
                agent_id: "h-1".into(),
                message: message.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let stats = json(&fleetcare(app.addr, &["healing", "stats", "--json"]).await);
    assert_eq!(stats["total_errors"], 3);
    assert_eq!(stats["active_recoveries"], 0);
    let by_type: i64 = stats["errors_by_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_i64().unwrap())
        .sum();
    assert_eq!(by_type, 3);

    let text = stdout(&fleetcare(app.addr, &["healing", "stats"]).await);
    assert!(
        text.starts_with("errors: 3 (3 in the last hour)\n"),
        "{text}"
    );

    app.stop().await;
}

#[tokio::test]
async fn healing_policy_pause_resume_and_decisions() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let policy = json(&fleetcare(app.addr, &["healing", "policy", "--json"]).await);
    assert_eq!(policy["policy"]["max_unhealthy_percent"], 100);
    assert_eq!(policy["pauses"], serde_json::json!([]));
    assert_eq!(policy["shares"][0]["group"], "");

    let paused = stdout(
        &fleetcare(
            app.addr,
            &["healing", "pause", "--reason", "provider outage"],
        )
        .await,
    );
    assert_eq!(paused, "paused the fleet: provider outage\n");
    let text = stdout(&fleetcare(app.addr, &["healing", "policy"]).await);
    assert!(
        text.contains("PAUSED the fleet by anonymous at ") && text.contains(": provider outage\n"),
        "{text}"
    );
    // A plan asked for now is braked, and the decision is listed.
    let mut healing = HealingServiceClient::new(app.channel.clone());
    let event = healing
        .report_error(pb::ReportErrorRequest {
            agent_id: "h-1".into(),
            message: "connection reset".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let braked = healing
        .plan_recovery(pb::PlanRecoveryRequest {
            error_event_id: event.id,
        })
        .await
        .unwrap_err();
    assert_eq!(braked.code(), tonic::Code::FailedPrecondition);
    let decisions = json(
        &fleetcare(
            app.addr,
            &["healing", "decisions", "--agent", "h-1", "--json"],
        )
        .await,
    );
    assert_eq!(decisions[0]["verdict"], "BRAKED");
    assert_eq!(decisions[0]["reason"], "HEALING_PAUSED");
    let table = stdout(&fleetcare(app.addr, &["healing", "decisions"]).await);
    assert!(table.contains("HEALING_PAUSED"), "{table}");

    let resumed = stdout(&fleetcare(app.addr, &["healing", "resume"]).await);
    assert_eq!(resumed, "resumed the fleet\n");
    let again = json(&fleetcare(app.addr, &["healing", "resume", "--json"]).await);
    assert_eq!(again["resumed"], false);
    // Without group_by, a group names nothing: refused, one line.
    let (line, code) = failure(
        &fleetcare(
            app.addr,
            &["healing", "pause", "--reason", "r", "--group", "blue"],
        )
        .await,
    );
    assert!(line.contains("group_by"), "{line}");
    assert_eq!(code, i32::from(exit::REFUSED));
    app.stop().await;
}

#[tokio::test]
async fn explain_limit_prints_what_the_server_would_infer_without_touching_agents() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let before = app.register("cli-x").await;

    let text = stdout(
        &fleetcare(
            app.addr,
            &[
                "explain-limit",
                "--message",
                "You've hit your session limit · resets 12:50am (America/Los_Angeles)",
            ],
        )
        .await,
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[0].starts_with("recovery at: "), "{text}");
    assert_eq!(lines[1], "source:      MESSAGE");
    assert_eq!(
        lines[2],
        "hint:        resets 12:50am (America/Los_Angeles)"
    );
    assert_eq!(lines[3], "reason:      RATE_LIMIT");
    assert_eq!(
        lines[4],
        "window:      FIVE_HOUR (message: \"session limit\")"
    );

    let explained = json(
        &fleetcare(
            app.addr,
            &[
                "explain-limit",
                "--header",
                "retry-after=90",
                "--header",
                "x-ratelimit-reset-tokens=6s",
                "--message",
                "insufficient_quota",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(explained["recovery_source"], "RETRY_AFTER_HEADER");
    assert_eq!(explained["reason"], "BILLING");
    assert_eq!(explained["recovery_in_seconds"], 90);
    assert_eq!(
        explained["recovery_hint"],
        "billing: insufficient_quota; retry-after: 90"
    );
    assert_eq!(explained["window"], "BILLING");

    // A window stated wins over what the report says.
    let stated = json(
        &fleetcare(
            app.addr,
            &[
                "explain-limit",
                "--message",
                "5-hour limit reached ∙ resets 2am",
                "--window",
                "weekly",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(stated["window"], "WEEKLY", "{stated}");
    assert_eq!(stated["window_evidence"], "stated by the caller");

    let zoned = json(
        &fleetcare(
            app.addr,
            &[
                "explain-limit",
                "--message",
                "5-hour limit reached ∙ resets 2am",
                "--time-zone",
                "Asia/Colombo",
                "--json",
            ],
        )
        .await,
    );
    let secs = zoned["recovery_in_seconds"].as_i64().unwrap();
    assert!(secs > 0 && secs <= 86_400, "{zoned}");

    let (line, code) = failure(
        &fleetcare(
            app.addr,
            &[
                "explain-limit",
                "--message",
                "x",
                "--time-zone",
                "Mars/Olympus",
            ],
        )
        .await,
    );
    assert_eq!(code, i32::from(exit::REFUSED));
    assert!(line.contains("\"Mars/Olympus\""), "{line}");
    let (line, code) = failure(&fleetcare(app.addr, &["explain-limit", "--agent", "ghost"]).await);
    assert_eq!(code, i32::from(exit::NOT_FOUND));
    assert!(line.starts_with("fleetcare: not found:"), "{line}");

    let after = app.get("cli-x").await;
    assert_eq!(after.revision, before.revision);
    assert_eq!(after.status, pb::AgentStatus::Idle as i32);
}

#[tokio::test]
async fn pools_park_list_get_and_release_a_pool_and_refuse_an_unknown_one() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["k-1", "k-2"] {
        app.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: Default::default(),
                quota_pools: vec!["openai/org-7".into()],
            })
            .await
            .unwrap();
    }
    let until = (chrono::Utc::now() + chrono::Duration::hours(3))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let parked = stdout(
        &fleetcare(
            app.addr,
            &[
                "pools",
                "park",
                "openai/org-7",
                "--until",
                &until,
                "--window",
                "billing",
                "--reason",
                "card declined",
            ],
        )
        .await,
    );
    assert!(parked.contains("phase:        PARKED\n"), "{parked}");
    assert!(parked.contains("members parked: 2\n"), "{parked}");
    assert!(parked.contains("BILLING until"), "{parked}");
    assert!(parked.contains("card declined"), "{parked}");

    let listed = stdout(&fleetcare(app.addr, &["pools", "list"]).await);
    let row = listed.lines().nth(1).expect("one pool row");
    assert!(row.starts_with("openai/org-7  PARKED"), "{listed}");
    assert!(row.ends_with("EXHAUSTED=2"), "{listed}");
    let shown = json(&fleetcare(app.addr, &["pools", "get", "openai/org-7", "--json"]).await);
    assert_eq!(shown["phase"], "PARKED");
    assert_eq!(shown["held"], 2);
    assert_eq!(shown["held_agent_ids"], json!(["k-1", "k-2"]));
    assert_eq!(shown["windows"][0]["source"], "OPERATOR");
    let agent = stdout(&fleetcare(app.addr, &["agents", "get", "k-1"]).await);
    assert!(
        agent.contains("held by pool:     openai/org-7\n"),
        "{agent}"
    );

    let released = stdout(
        &fleetcare(
            app.addr,
            &["pools", "release", "openai/org-7", "--reason", "paid"],
        )
        .await,
    );
    assert!(released.contains("phase:        RELEASING\n"), "{released}");

    let (line, code) = failure(&fleetcare(app.addr, &["pools", "get", "nobody"]).await);
    assert!(line.starts_with("fleetcare: not found: "), "{line}");
    assert!(line.contains("nobody"), "{line}");
    assert_eq!(code, i32::from(exit::NOT_FOUND));
    let output = fleetcare(app.addr, &["pools", "park", "x", "--until", "soon"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "a usage error before any call"
    );
    app.stop().await;
}
