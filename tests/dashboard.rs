//! The dashboard in a real browser: headless Chromium driven by
//! `tests/dashboard/drive.mjs` (playwright-core with the system browser)
//! against a real server on the embedded store. The Rust side makes the
//! changes over gRPC and checks what the page shows against the API; the
//! script only loads, clicks and waits for DOM conditions (with timeouts,
//! never sleeps). Screenshots go to `target/dashboard-screenshots/`.
//!
//! Without Chromium (`/usr/bin/chromium`, or `FLEETCARE_TEST_CHROMIUM`) or
//! node, each test prints `the dashboard browser test was SKIPPED: <why>` and
//! passes; `FLEETCARE_REQUIRE_BROWSER=1` (CI) turns that into a failure.

#[path = "api/helpers.rs"]
mod helpers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, SystemTime};

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
use fleetcare::proto::v1::session_pipeline_service_client::SessionPipelineServiceClient;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use helpers::{TestApp, TestDb, test_args};

/// The page must show a transition within this long of the call committing it.
const LIVE: Duration = Duration::from_secs(1);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Why the browser tests cannot run here, if they cannot.
fn missing_browser() -> Option<String> {
    let chromium = std::env::var("FLEETCARE_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!(
            "no Chromium at {chromium} (apt-get install chromium, or set FLEETCARE_TEST_CHROMIUM)"
        ));
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("node is not installed".into()),
    }
}

/// True when the test should go on; prints the loud skip line otherwise.
fn browser_available() -> bool {
    let Some(why) = missing_browser() else {
        return true;
    };
    if std::env::var("FLEETCARE_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!("FLEETCARE_REQUIRE_BROWSER=1 but the browser test cannot run: {why}");
    }
    // Past the test harness's capture, once per binary.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\nfleetcare: the dashboard browser test was SKIPPED: {why}\n"
        );
    });
    false
}

/// One browser test at a time: each runs Chromium, and the 1 s live-update
/// bound should not measure other tests' Chromiums on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `npm ci` of the pinned playwright-core, once per test binary.
fn setup() {
    static DONE: StdMutex<bool> = StdMutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let status = std::process::Command::new(repo().join("tests/dashboard/setup.sh"))
        .status()
        .expect("run tests/dashboard/setup.sh");
    assert!(status.success(), "tests/dashboard/setup.sh failed");
    *done = true;
}

/// The node driver: one JSON command per line in, one reply per line out.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn launch() -> Browser {
        setup();
        let mut child = Command::new("node")
            .arg(repo().join("tests/dashboard/drive.mjs"))
            .current_dir(repo().join("tests/dashboard"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut browser = Browser {
            child,
            stdin,
            lines,
        };
        let ready = browser.read().await;
        assert_eq!(ready["ready"], true, "{ready}");
        browser
    }

    async fn read(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the driver answers within 60 s")
            .expect("read the driver")
            .expect("the driver is running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    async fn write(&mut self, command: &Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Sends `command` and returns its reply, which must be ok.
    async fn send(&mut self, command: Value) -> Value {
        self.write(&command).await;
        let reply = self.read().await;
        assert_eq!(reply["ok"], true, "{command}: {reply}");
        reply
    }

    async fn open(&mut self, url: &str) {
        self.send(json!({"cmd": "open", "url": url})).await;
    }

    async fn wait(&mut self, selector: &str) {
        self.send(json!({"cmd": "wait", "selector": selector, "timeout_ms": 10000}))
            .await;
    }

    async fn goto(&mut self, route: &str) {
        self.send(json!({"cmd": "goto", "route": route})).await;
    }

    async fn screenshot(&mut self, name: &str) {
        self.screenshot_with(name, json!({})).await;
    }

    /// A screenshot with options: `{"full": false}` (the viewport only) or
    /// `{"selector": ...}` (one element).
    async fn screenshot_with(&mut self, name: &str, options: Value) {
        let path = screenshots().join(format!("{name}.png"));
        let mut command = json!({"cmd": "screenshot", "path": path});
        for (k, v) in options.as_object().unwrap() {
            command[k] = v.clone();
        }
        self.send(command).await;
        assert!(path.exists(), "{} written", path.display());
    }

    /// The fleet table's rows: (agent id, status, sorted labels).
    async fn rows(&mut self) -> Vec<(String, String, Vec<String>)> {
        let reply = self.send(json!({"cmd": "rows"})).await;
        reply["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut labels: Vec<String> = r["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_owned())
                    .collect();
                labels.sort();
                (
                    r["agent_id"].as_str().unwrap().to_owned(),
                    r["status"].as_str().unwrap().to_owned(),
                    labels,
                )
            })
            .collect()
    }

    /// Arms a wait for `selector`, runs `change` once the page is watching,
    /// and returns how long the page took to show it after `change` was made.
    async fn shows_within<F, Fut>(&mut self, selector: &str, change: F) -> Duration
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let command = json!({"cmd": "wait", "selector": selector, "timeout_ms": 5000, "arm": true});
        self.write(&command).await;
        let armed = self.read().await;
        assert_eq!(armed["armed"], true, "{armed}");
        let start = std::time::Instant::now();
        change().await;
        let made = start.elapsed();
        let reply = self.read().await;
        assert_eq!(reply["ok"], true, "{selector}: {reply}");
        // From arming to the DOM change, less the time the call itself took.
        let shown = Duration::from_millis(reply["elapsed_ms"].as_u64().unwrap());
        shown.saturating_sub(made)
    }

    /// The page's script errors (uncaught exceptions, console errors).
    async fn assert_no_errors(&mut self) {
        let reply = self.send(json!({"cmd": "errors"})).await;
        assert_eq!(reply["errors"], json!([]), "the page logged errors");
    }

    async fn close(mut self) {
        self.send(json!({"cmd": "close"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// What `ListAgents` says, as the page shows it.
async fn listed(app: &TestApp) -> Vec<(String, String, Vec<String>)> {
    let agents = app
        .agents
        .clone()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    agents
        .iter()
        .map(|a| {
            let mut labels: Vec<String> =
                a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            (
                a.agent_id.clone(),
                fleetcare::views::agent_status(a.status),
                labels,
            )
        })
        .collect()
}

async fn register(app: &TestApp, agent_id: &str, labels: &[(&str, &str)]) {
    app.agents
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            quota_pools: Vec::new(),
            agent_id: agent_id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
        .expect("register");
}

async fn exhaust(app: &TestApp, agent_id: &str, message: &str) {
    app.agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: agent_id.into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: message.into(),
            ..Default::default()
        })
        .await
        .expect("report exhausted");
}

/// A directory of session transcripts, removed at the end.
struct Sessions(PathBuf);

impl Sessions {
    fn new() -> Sessions {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-dash-sessions-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Sessions(dir)
    }

    /// A session file, an hour old (clear of the pipeline's racy window).
    fn write(&self, rel: &str, content: &str) {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    /// Usage on the last few days by two users and two models, and one broken file.
    fn corpus(&self) {
        let today = chrono::Utc::now().date_naive();
        let mut n = 0;
        for (user, model, days_ago, tokens) in [
            ("alice", "claude-sonnet-4", 3, 1200),
            ("alice", "claude-opus-4", 2, 3400),
            ("bob", "claude-sonnet-4", 2, 800),
            ("bob", "claude-opus-4", 1, 2600),
            ("alice", "claude-sonnet-4", 0, 1900),
        ] {
            n += 1;
            let day = today - chrono::Duration::days(days_ago);
            let line = format!(
                r#"{{"type":"assistant","sessionId":"s{n}","timestamp":"{day}T10:00:00Z","requestId":"req_{n}","message":{{"id":"msg_{n}","model":"{model}","role":"assistant","content":[{{"type":"text","text":"ok"}}],"usage":{{"input_tokens":{tokens},"output_tokens":{},"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}}}}}"#,
                tokens / 4
            );
            self.write(&format!("{user}/s{n}.jsonl"), &(line + "\n"));
        }
        // Too large to read (content never fails a session): a sparse file,
        // no disk used.
        self.write("bob/broken.jsonl", "{\"type\":\"assistant\"}\n");
        let path = self.0.join("bob/broken.jsonl");
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_len(fleetcare::runtime::pipeline::MAX_FILE_BYTES + 1)
            .unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn spawn(db: &TestDb, sessions: &Sessions) -> TestApp {
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = sessions.0.clone();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    args.pipeline.max_attempts = 1;
    TestApp::spawn_with(args).await
}

fn page_url(app: &TestApp) -> String {
    format!("http://{}/", app.http_addr.expect("an HTTP listener"))
}

/// Two errors reported, each planned, one recovered: something for the healing page.
async fn some_healing(app: &TestApp, agent_id: &str) -> pb::GetHealingStatisticsResponse {
    let mut healing = HealingServiceClient::new(app.channel.clone());
    for (i, message) in [
        "429 Too Many Requests: rate limit exceeded",
        "connection timed out after 30s",
    ]
    .into_iter()
    .enumerate()
    {
        let event = healing
            .report_error(pb::ReportErrorRequest {
                agent_id: agent_id.into(),
                message: message.into(),
                ..Default::default()
            })
            .await
            .expect("report error")
            .into_inner()
            .event
            .unwrap();
        let action = healing
            .plan_recovery(pb::PlanRecoveryRequest {
                error_event_id: event.id,
            })
            .await
            .expect("plan recovery")
            .into_inner()
            .action
            .unwrap();
        healing
            .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
                action_id: action.id,
                success: i == 0,
                duration: Some(prost_types::Duration {
                    seconds: 40,
                    nanos: 0,
                }),
                details: String::new(),
            })
            .await
            .expect("report outcome");
    }
    healing
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn run_usage(app: &TestApp) -> pb::RunStats {
    SessionPipelineServiceClient::new(app.channel.clone())
        .run_processor(pb::RunProcessorRequest {
            name: "usage".into(),
        })
        .await
        .expect("run usage")
        .into_inner()
        .stats
        .unwrap()
}

#[tokio::test]
async fn the_fleet_page_shows_list_agents_and_follows_transitions_live() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let sessions = Sessions::new();
    sessions.corpus();
    let app = spawn(&db, &sessions).await;
    register(&app, "agent-eu-1", &[("team", "infra"), ("zone", "eu")]).await;
    register(&app, "agent-eu-2", &[("team", "infra"), ("zone", "eu")]).await;
    register(&app, "agent-us-1", &[("team", "web"), ("zone", "us")]).await;
    register(&app, "agent-us-2", &[("team", "web")]).await;
    app.start_work("agent-us-1").await.unwrap();
    exhaust(
        &app,
        "agent-us-2",
        "You've hit your limit · resets 7pm (UTC)",
    )
    .await;
    let stats = run_usage(&app).await;
    assert_eq!((stats.processed, stats.dead), (5, 1));
    let healing = some_healing(&app, "agent-eu-2").await;
    assert_eq!(healing.total_errors, 2);

    let mut browser = Browser::launch().await;
    browser.open(&page_url(&app)).await;
    browser.wait("#conn-state[data-state=live]").await;
    assert_eq!(browser.rows().await, listed(&app).await);
    // The exhausted agent shows its recovery time and hint; the counts add up.
    let recovery = browser
        .send(json!({"cmd": "text", "selector": "tr[data-agent-id=agent-us-2] td:nth-child(5)"}))
        .await;
    let recovery = recovery["text"].as_str().unwrap();
    assert!(recovery.starts_with("in "), "{recovery}");
    assert!(recovery.contains("7pm"), "the hint: {recovery}");
    let idle = browser
        .send(json!({"cmd": "text", "selector": "[data-count=IDLE] .n"}))
        .await;
    assert_eq!(idle["text"], "2");
    browser.screenshot("fleet").await;

    // A transition made over gRPC shows without a reload.
    let took = browser
        .shows_within("tr[data-agent-id=agent-eu-1][data-status=BUSY]", || async {
            app.start_work("agent-eu-1").await.unwrap();
        })
        .await;
    assert!(took < LIVE, "the row changed {took:?} after the call");
    eprintln!("the fleet row changed {took:?} after StartWork returned");
    let busy = browser
        .send(json!({"cmd": "text", "selector": "[data-count=BUSY] .n"}))
        .await;
    assert_eq!(busy["text"], "2");
    assert_eq!(browser.rows().await, listed(&app).await);
    // A new agent appears, with its labels.
    browser
        .shows_within("tr[data-agent-id=agent-new]", || async {
            register(&app, "agent-new", &[("team", "infra")]).await;
        })
        .await;
    browser
        .wait("tr[data-agent-id=agent-new] .label:text-is('team=infra')")
        .await;

    // The filter: label and status.
    browser
        .send(json!({"cmd": "fill", "selector": "#filter-label", "value": "team=infra"}))
        .await;
    let shown: Vec<String> = browser.rows().await.into_iter().map(|r| r.0).collect();
    assert_eq!(shown, ["agent-eu-1", "agent-eu-2", "agent-new"]);
    browser
        .send(json!({"cmd": "fill", "selector": "#filter-label", "value": ""}))
        .await;

    // The feed shows the transitions, the next one live.
    browser.goto("feed").await;
    let finished = app
        .finish_work("agent-eu-1")
        .await
        .unwrap()
        .transition
        .unwrap();
    browser
        .wait(&format!("li[data-revision='{}']", finished.revision))
        .await;
    let took = browser
        .shows_within("li[data-agent-id=agent-us-1]:first-child", || async {
            app.finish_work("agent-us-1").await.unwrap();
        })
        .await;
    assert!(took < LIVE, "the feed showed it {took:?} after the call");
    eprintln!("the feed showed a transition {took:?} after FinishWork returned");
    // A registration reads "new → IDLE".
    let registered = browser
        .send(json!({"cmd": "text", "selector": "li[data-agent-id=agent-new] span:nth-child(4)"}))
        .await;
    assert_eq!(registered["text"], "new → IDLE");
    browser.screenshot("feed").await;

    browser.goto("healing").await;
    browser.wait("h2:text-is('Errors by type')").await;
    let types = browser
        .send(json!({"cmd": "count", "selector": "h2:text-is('Errors by type') + table tbody tr"}))
        .await;
    assert_eq!(types["count"], healing.errors_by_type.len());
    let patterns = browser
        .send(json!({"cmd": "count", "selector": "h2:text-is('Learned success rates') + table tbody tr"}))
        .await;
    assert_eq!(patterns["count"], healing.patterns.len());
    assert!(
        !healing.patterns.is_empty(),
        "the outcomes taught the planner"
    );
    browser.screenshot("healing").await;

    browser.goto("usage").await;
    browser
        .wait("#usage-chart rect[data-key='claude-opus-4']")
        .await;
    let bars = browser
        .send(json!({"cmd": "count", "selector": "#usage-chart rect"}))
        .await;
    assert_eq!(bars["count"], 5, "one bar part per day and model");
    browser.screenshot("usage").await;

    browser.goto("pipeline").await;
    browser
        .wait("tr[data-session='bob/broken.jsonl'][data-status=DEAD]")
        .await;
    // The runs made over gRPC are listed, newest first, with who started them.
    browser
        .wait("h2:text-is('Recent runs') + table tbody tr[data-run][data-trigger=CALL]")
        .await;
    browser.screenshot("pipeline").await;

    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_large_fleet_shows_a_page_at_a_time_with_counts_of_all_and_stays_live() {
    if !browser_available() {
        return;
    }
    use futures::StreamExt;
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db).await;
    const N: usize = 1200;
    let id = |i: usize| format!("big-{i:04}");
    futures::stream::iter(0..N)
        .map(|i| {
            let app = &app;
            let agent_id = id(i);
            async move {
                let team = if i.is_multiple_of(3) { "infra" } else { "web" };
                register(app, &agent_id, &[("team", team)]).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    app.start_work(&id(1199)).await.unwrap();

    let mut browser = Browser::launch().await;
    browser.open(&page_url(&app)).await;
    browser.wait("#conn-state[data-state=live]").await;
    // Only the first page is in the table; the counts are of the whole fleet.
    let rows = browser.rows().await;
    let first: Vec<String> = (0..200).map(id).collect();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), first);
    let text = |reply: Value| reply["text"].as_str().unwrap().to_owned();
    let count = |name: &str| json!({"cmd": "text", "selector": format!("[data-count={name}] .n")});
    assert_eq!(text(browser.send(count("ALL")).await), "1,200");
    assert_eq!(text(browser.send(count("IDLE")).await), "1,199");
    assert_eq!(text(browser.send(count("BUSY")).await), "1");
    let shown = json!({"cmd": "text", "selector": "#shown"});
    assert_eq!(
        text(browser.send(shown.clone()).await),
        "200 of 1,200 shown"
    );
    browser
        .screenshot_with("fleet-large", json!({"full": false}))
        .await;
    browser
        .screenshot_with("fleet-large-more", json!({"selector": ".more"}))
        .await;

    // Load more adds the next page.
    browser
        .send(json!({"cmd": "click", "selector": "#load-more"}))
        .await;
    let rows = browser.rows().await;
    let two: Vec<String> = (0..400).map(id).collect();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), two);
    assert_eq!(
        text(browser.send(shown.clone()).await),
        "400 of 1,200 shown"
    );

    // A transition of a visible row shows within a second; the counts move.
    let took = browser
        .shows_within("tr[data-agent-id=big-0300][data-status=BUSY]", || async {
            app.start_work(&id(300)).await.unwrap();
        })
        .await;
    assert!(took < LIVE, "the row changed {took:?} after the call");
    eprintln!("with {N} agents, a loaded row changed {took:?} after StartWork returned");
    browser.wait("[data-count=BUSY] .n:text-is('2')").await;
    assert_eq!(text(browser.send(count("IDLE")).await), "1,198");
    // An agent not loaded moves the counts only; a new one counts up.
    app.start_work(&id(1000)).await.unwrap();
    browser.wait("[data-count=BUSY] .n:text-is('3')").await;
    register(&app, "big-9999", &[]).await;
    browser.wait("[data-count=ALL] .n:text-is('1,201')").await;
    let loaded = browser
        .send(json!({"cmd": "count", "selector": "#fleet-table tr[data-agent-id]"}))
        .await;
    assert_eq!(
        loaded["count"], 400,
        "agents beyond the loaded pages are not forced in"
    );

    // The filter is the server's: the first page of what matches.
    browser
        .send(json!({"cmd": "fill", "selector": "#filter-label", "value": "team=infra"}))
        .await;
    let rows = browser.rows().await;
    let infra: Vec<String> = (0..N).step_by(3).take(200).map(id).collect();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), infra);
    assert_eq!(text(browser.send(shown.clone()).await), "200 shown");
    browser
        .send(json!({"cmd": "fill", "selector": "#filter-label", "value": ""}))
        .await;
    browser
        .send(json!({"cmd": "select", "selector": "#filter-status", "value": "BUSY"}))
        .await;
    let rows = browser.rows().await;
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["big-0300", "big-1000", "big-1199"]
    );
    assert_eq!(text(browser.send(shown).await), "3 of 3 shown");
    browser.screenshot("fleet-filtered").await;
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_retry_button_requeues_a_dead_session() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let sessions = Sessions::new();
    sessions.corpus();
    let app = spawn(&db, &sessions).await;
    assert_eq!(run_usage(&app).await.dead, 1);

    let mut browser = Browser::launch().await;
    browser.open(&format!("{}#/pipeline", page_url(&app))).await;
    browser
        .wait("tr[data-session='bob/broken.jsonl'][data-status=DEAD]")
        .await;
    browser
        .send(json!({"cmd": "click", "selector": "button.retry[data-session='bob/broken.jsonl']"}))
        .await;
    browser
        .wait("tr[data-session='bob/broken.jsonl'][data-status=FAILED]")
        .await;
    let states = SessionPipelineServiceClient::new(app.channel.clone())
        .list_session_states(pb::ListSessionStatesRequest {
            processor: "usage".into(),
            status: pb::SessionStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .states;
    assert_eq!(states.len(), 1);
    assert_eq!(
        (states[0].session.as_str(), states[0].attempts),
        ("bob/broken.jsonl", 0)
    );
    browser.screenshot("pipeline-retried").await;
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

/// A reverse proxy serving the server under `prefix` (`/fleetcare/x` is
/// forwarded as `/x`): every request must be under the prefix (the page uses
/// relative URLs); any other is answered 404 and recorded.
struct PrefixProxy {
    addr: SocketAddr,
    outside: Arc<StdMutex<Vec<String>>>,
}

impl PrefixProxy {
    async fn start(upstream: SocketAddr, prefix: &'static str) -> PrefixProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outside = Arc::new(StdMutex::new(Vec::new()));
        let seen = outside.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(proxy_one(client, upstream, prefix, seen.clone()));
            }
        });
        PrefixProxy { addr, outside }
    }
}

/// One request: the path rewritten, `Connection: close` (so each request
/// comes on a connection of its own and is rewritten), then bytes both ways
/// (a stream included).
async fn proxy_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    prefix: &str,
    outside: Arc<StdMutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, ' ');
    let (method, path, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let Some(rest) = path.strip_prefix(prefix) else {
        outside.lock().unwrap().push(path.to_owned());
        let _ = client
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let mut forwarded = format!("{method} /{rest} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if server.write_all(forwarded.as_bytes()).await.is_err()
        || server.write_all(&buf[end..]).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[tokio::test]
async fn behind_a_prefix_stripping_proxy_the_page_works_and_stays_live() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db).await;
    register(&app, "proxied-1", &[("team", "infra")]).await;
    register(&app, "proxied-2", &[]).await;
    let proxy = PrefixProxy::start(app.http_addr.unwrap(), "/fleetcare/").await;

    let mut browser = Browser::launch().await;
    browser
        .open(&format!("http://{}/fleetcare/", proxy.addr))
        .await;
    browser.wait("#conn-state[data-state=live]").await;
    assert_eq!(browser.rows().await, listed(&app).await);
    let took = browser
        .shows_within("tr[data-agent-id=proxied-2][data-status=BUSY]", || async {
            app.start_work("proxied-2").await.unwrap();
        })
        .await;
    assert!(
        took < LIVE,
        "through the proxy the row changed {took:?} after the call"
    );
    browser.goto("healing").await;
    browser.wait("h2:text-is('Errors by type')").await;
    browser.screenshot("behind-proxy").await;
    browser.assert_no_errors().await;
    browser.close().await;
    assert_eq!(
        *proxy.outside.lock().unwrap(),
        Vec::<String>::new(),
        "requests outside the prefix"
    );
    app.stop().await;
}

#[tokio::test]
async fn with_an_auth_file_the_page_asks_for_a_token_then_shows_the_agents() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    use fleetcare::domain::auth::{Role, caller_entry, token_digest};
    let db = TestDb::sqlite();
    let dir = Sessions::new();
    let file = dir.0.join("callers.toml");
    // ops, a reader, uses the page; setup, an operator, registers the agent.
    std::fs::write(
        &file,
        [
            caller_entry("ops", Role::Reader, &token_digest("dash-token"), &[]),
            caller_entry("setup", Role::Operator, &token_digest("setup-token"), &[]),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    let app = TestApp::spawn_with(args).await;
    let mut request = tonic::Request::new(pb::RegisterAgentRequest {
        agent_id: "secured-1".into(),
        labels: [("team".to_string(), "infra".to_string())].into(),
        quota_pools: Vec::new(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer setup-token".parse().unwrap());
    app.agents.clone().register_agent(request).await.unwrap();

    let mut browser = Browser::launch().await;
    browser.open(&page_url(&app)).await;
    browser.wait("#token-form:not([hidden])").await;
    browser.screenshot("token").await;
    browser
        .send(json!({"cmd": "fill", "selector": "#token-input", "value": "dash-token"}))
        .await;
    browser
        .send(json!({"cmd": "click", "selector": "#token-form button"}))
        .await;
    browser.wait("#conn-state[data-state=live]").await;
    browser.wait("#token-form[hidden]").await;
    let rows = browser.rows().await;
    assert_eq!(
        rows,
        [(
            "secured-1".to_string(),
            "IDLE".to_string(),
            vec!["team=infra".to_string()]
        )]
    );
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn while_the_server_restarts_the_page_shows_reconnecting_then_resumes() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let args = || {
        let mut args = test_args(&db.url);
        args.http_listen = fleetcare::config::HttpListen::at(http);
        args
    };
    let app = TestApp::spawn_with(args()).await;
    register(&app, "restart-1", &[]).await;
    register(&app, "restart-2", &[]).await;

    let mut browser = Browser::launch().await;
    browser.open(&format!("http://{http}/#/feed")).await;
    browser.wait("#conn-state[data-state=live]").await;
    app.stop().await;
    browser.wait("#conn-state[data-state=reconnecting]").await;
    // The feed says so, and from where it will resume (the two registrations).
    browser
        .send(json!({"cmd": "wait", "selector": ".reconnect-banner:has-text('resumes after #2')", "state": "visible"}))
        .await;
    browser.screenshot("reconnecting").await;

    // The same store and HTTP port: the page resumes after the last revision
    // it saw, and misses nothing committed meanwhile.
    let app = TestApp::spawn_with(args()).await;
    let started = app
        .start_work("restart-1")
        .await
        .unwrap()
        .transition
        .unwrap();
    browser.wait("#conn-state[data-state=live]").await;
    browser
        .wait(&format!("li[data-revision='{}']", started.revision))
        .await;
    browser
        .send(json!({"cmd": "wait", "selector": ".reconnect-banner", "state": "hidden"}))
        .await;
    browser.goto("fleet").await;
    browser
        .wait("tr[data-agent-id=restart-1][data-status=BUSY]")
        .await;
    assert_eq!(browser.rows().await, listed(&app).await);
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_server_on_another_store_behind_the_same_address_makes_the_page_reload_its_counts_and_agents()
 {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let args = |db: &TestDb| {
        let mut args = test_args(&db.url);
        args.http_listen = fleetcare::config::HttpListen::at(http);
        args
    };
    let first = TestDb::sqlite();
    let app = TestApp::spawn_with(args(&first)).await;
    for id in ["old-1", "old-2", "old-3"] {
        register(&app, id, &[]).await;
    }
    let mut browser = Browser::launch().await;
    browser.open(&format!("http://{http}/")).await;
    browser.wait("tr[data-agent-id=old-3]").await;
    app.stop().await;
    browser.wait("#conn-state[data-state=reconnecting]").await;

    // A fresh store: its head (1) is behind the page's last revision (3), so
    // resuming is OUT_OF_RANGE and the page reloads its counts and first page.
    let second = TestDb::sqlite();
    let app = TestApp::spawn_with(args(&second)).await;
    register(&app, "new-1", &[]).await;
    browser.wait("tr[data-agent-id=new-1]").await;
    browser.wait("#conn-state[data-state=live]").await;
    assert_eq!(browser.rows().await, listed(&app).await);
    browser.close().await;
    app.stop().await;
}

/// `message` with `token` as its bearer token.
fn as_<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn claim_request(labels: &[(&str, &str)], slot: pb::SlotType, lease: i64) -> pb::ClaimAgentRequest {
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
            seconds: lease,
            nanos: 0,
        }),
        wait_timeout: None,
        request_id: String::new(),
    }
}

/// A lease's expiry as the page writes it: the local wall clock.
/// The local date of `ts`, as the page writes it before a time of another day.
fn wall_date(ts: Option<&prost_types::Timestamp>) -> String {
    let at = fleetcare::proto::from_timestamp(*ts.expect("a lease")).expect("a valid time");
    at.with_timezone(&chrono::Local)
        .format("%Y-%m-%d")
        .to_string()
}

fn wall_clock(ts: Option<&prost_types::Timestamp>) -> String {
    let at = fleetcare::proto::from_timestamp(*ts.expect("a lease")).expect("a valid time");
    at.with_timezone(&chrono::Local)
        .format("%H:%M:%S")
        .to_string()
}

#[tokio::test]
async fn claims_cordons_and_deletions_show_live_and_the_cordon_buttons_cordon_and_uncordon() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    use fleetcare::domain::auth::{Role, caller_entry, token_digest};
    use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
    let db = TestDb::sqlite();
    let dir = Sessions::new();
    let file = dir.0.join("callers.toml");
    // sched-a claims; ops, an operator, uses the page and deletes.
    std::fs::write(
        &file,
        [
            caller_entry(
                "sched-a",
                Role::Scheduler,
                &token_digest("sched-token"),
                &[],
            ),
            caller_entry("ops", Role::Operator, &token_digest("ops-token"), &[]),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    args.offline_agent_retention = Duration::from_secs(3600);
    let hand = helpers::manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    let mut agents = app.agents.clone();
    let mut dispatch = DispatchServiceClient::new(app.channel.clone());
    for (id, labels) in [
        ("disp-a", vec![("pool".to_string(), "gpu".to_string())]),
        ("disp-b", vec![]),
        ("disp-c", vec![]),
        ("disp-d", vec![]),
    ] {
        let message = pb::RegisterAgentRequest {
            agent_id: id.into(),
            labels: labels.into_iter().collect(),
            quota_pools: Vec::new(),
        };
        agents
            .register_agent(as_("ops-token", message))
            .await
            .unwrap();
    }
    let gpu = dispatch
        .claim_agent(as_(
            "sched-token",
            claim_request(&[("pool", "gpu")], pb::SlotType::Work, 300),
        ))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(gpu.agent_id, "disp-a");
    let get = |id: &str| {
        let mut agents = app.agents.clone();
        let message = pb::GetAgentRequest {
            agent_id: id.into(),
        };
        async move {
            agents
                .get_agent(as_("ops-token", message))
                .await
                .unwrap()
                .into_inner()
                .agent
                .unwrap()
        }
    };

    let mut browser = Browser::launch().await;
    browser.open(&page_url(&app)).await;
    browser.wait("#token-form:not([hidden])").await;
    browser
        .send(json!({"cmd": "fill", "selector": "#token-input", "value": "ops-token"}))
        .await;
    browser
        .send(json!({"cmd": "click", "selector": "#token-form button"}))
        .await;
    browser.wait("#conn-state[data-state=live]").await;
    let text = |selector: &str| json!({"cmd": "text", "selector": selector});
    let text_of = |reply: Value| reply["text"].as_str().unwrap().to_owned();

    // A claimed agent shows its holder, its lease's end and its token.
    browser
        .wait("tr[data-agent-id=disp-a][data-holder=sched-a]")
        .await;
    let claim = text_of(
        browser
            .send(text("tr[data-agent-id=disp-a] td.claim"))
            .await,
    );
    // The page adds the date when the lease ends on another day than the
    // page's today (a test run across midnight): either form.
    let until = wall_clock(gpu.lease_expires_at.as_ref());
    let dated = wall_date(gpu.lease_expires_at.as_ref());
    assert!(
        claim.starts_with(&format!("claimed by sched-a until {until}"))
            || claim.starts_with(&format!("claimed by sched-a until {dated} {until}")),
        "{claim}"
    );
    assert!(
        claim.contains(&format!("token {} · WORK", gpu.fencing_token)),
        "{claim}"
    );
    // A claim made now shows live, its lease read with the agent.
    let mut on_call = None;
    let took = browser
        .shows_within(
            "tr[data-agent-id=disp-b][data-holder=sched-a] td.claim:has-text(' until ')",
            || async {
                let response = dispatch
                    .claim_agent(as_(
                        "sched-token",
                        claim_request(&[], pb::SlotType::OnCall, 300),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                on_call = response.claim;
            },
        )
        .await;
    assert!(took < LIVE, "the claim showed {took:?} after the call");
    let on_call = on_call.unwrap();
    assert_eq!(on_call.agent_id, "disp-b");
    let claim = text_of(
        browser
            .send(text("tr[data-agent-id=disp-b] td.claim"))
            .await,
    );
    assert!(
        claim.contains(&wall_clock(on_call.lease_expires_at.as_ref())),
        "{claim}"
    );
    assert!(claim.contains("ON_CALL"), "{claim}");
    browser
        .wait("tr[data-agent-id=disp-b][data-status=ON_CALL]")
        .await;

    // The claims page lists them; a release takes one off, live.
    browser.goto("claims").await;
    browser
        .wait("#claims-table tr[data-agent-id=disp-b][data-holder=sched-a]")
        .await;
    let listed = browser
        .send(json!({"cmd": "count", "selector": "#claims-table tr[data-claim-id]"}))
        .await;
    assert_eq!(listed["count"], 2);
    let token = text_of(
        browser
            .send(text(&format!(
                "#claims-table tr[data-claim-id='{}'] td:nth-child(3)",
                gpu.claim_id
            )))
            .await,
    );
    assert_eq!(token, gpu.fencing_token.to_string());
    let lease = text_of(
        browser
            .send(text(&format!(
                "#claims-table tr[data-claim-id='{}'] td.lease",
                gpu.claim_id
            )))
            .await,
    );
    assert!(lease.starts_with(&until), "{lease}");
    browser.screenshot("claims").await;
    dispatch
        .release_claim(as_(
            "sched-token",
            pb::ReleaseClaimRequest {
                claim_id: on_call.claim_id.clone(),
                fencing_token: on_call.fencing_token,
            },
        ))
        .await
        .unwrap();
    browser
        .send(json!({"cmd": "wait", "selector": "#claims-table tr[data-agent-id=disp-b]", "state": "detached"}))
        .await;
    let listed = browser
        .send(json!({"cmd": "count", "selector": "#claims-table tr[data-claim-id]"}))
        .await;
    assert_eq!(listed["count"], 1);

    browser.goto("fleet").await;
    browser
        .wait("tr[data-agent-id=disp-b][data-status=IDLE]:not([data-holder])")
        .await;

    // Cordon: the button asks for a reason, then cordons the agent.
    browser
        .send(json!({"cmd": "click", "selector": "button.cordon[data-agent-id=disp-c]"}))
        .await;
    browser
        .send(json!({"cmd": "fill", "selector": "input.cordon-reason[data-agent-id=disp-c]", "value": "disk failing"}))
        .await;
    browser
        .send(json!({"cmd": "click", "selector": "button.cordon-confirm[data-agent-id=disp-c]"}))
        .await;
    browser
        .wait("tr[data-agent-id=disp-c][data-cordoned] .cordoned:text-is('cordoned: disk failing')")
        .await;
    let cordoned = get("disp-c").await;
    assert!(!cordoned.schedulable);
    assert_eq!(cordoned.cordon_reason, "disk failing");
    assert_eq!(cordoned.status, pb::AgentStatus::Idle as i32);
    let history = agents
        .list_transitions(as_(
            "ops-token",
            pb::ListTransitionsRequest {
                agent_id: "disp-c".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .transitions;
    let last = history.last().expect("disp-c's transitions");
    assert_eq!(
        (last.cause, last.actor.as_str()),
        (pb::TransitionCause::Cordoned as i32, "ops")
    );
    browser.screenshot("fleet-claims-cordons").await;
    // Uncordon reverses it.
    browser
        .send(json!({"cmd": "click", "selector": "button.uncordon[data-agent-id=disp-c]"}))
        .await;
    browser
        .wait("tr[data-agent-id=disp-c]:not([data-cordoned]) button.cordon")
        .await;
    let uncordoned = get("disp-c").await;
    assert!(uncordoned.schedulable);
    assert_eq!(uncordoned.cordon_reason, "");
    // A cordon made elsewhere shows live, with its reason.
    let took = browser
        .shows_within(
            "tr[data-agent-id=disp-d][data-cordoned] .cordoned:text-is('cordoned: maintenance')",
            || async {
                dispatch
                    .clone()
                    .cordon_agent(as_(
                        "sched-token",
                        pb::CordonAgentRequest {
                            agent_id: "disp-d".into(),
                            reason: "maintenance".into(),
                        },
                    ))
                    .await
                    .unwrap();
            },
        )
        .await;
    assert!(took < LIVE, "the cordon showed {took:?} after the call");

    // A lease not renewed expires: the claim goes from the row. (The clock
    // stands still, so the idle agents went idle at the same instant; ties
    // go by agent id.)
    let short = dispatch
        .claim_agent(as_(
            "sched-token",
            claim_request(&[], pb::SlotType::Work, 5),
        ))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(short.agent_id, "disp-b");
    browser
        .wait("tr[data-agent-id=disp-b][data-holder=sched-a]")
        .await;
    hand.advance(chrono::Duration::seconds(6));
    browser
        .wait("tr[data-agent-id=disp-b][data-status=IDLE]:not([data-holder])")
        .await;

    // A deleted agent leaves the table and the counts.
    dispatch
        .release_claim(as_(
            "sched-token",
            pb::ReleaseClaimRequest {
                claim_id: gpu.claim_id.clone(),
                fencing_token: gpu.fencing_token,
            },
        ))
        .await
        .unwrap();
    browser
        .wait("tr[data-agent-id=disp-a]:not([data-holder])")
        .await;
    dispatch
        .delete_agent(as_(
            "ops-token",
            pb::DeleteAgentRequest {
                agent_id: "disp-a".into(),
            },
        ))
        .await
        .unwrap();
    browser
        .send(json!({"cmd": "wait", "selector": "tr[data-agent-id=disp-a]", "state": "detached"}))
        .await;
    browser.wait("[data-count=ALL] .n:text-is('3')").await;
    assert_eq!(
        browser
            .rows()
            .await
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        ["disp-b", "disp-c", "disp-d"]
    );
    // So does one the sweeper expires after --offline-agent-retention offline
    // (the others, silent as long, are marked OFFLINE and stay).
    agents
        .mark_offline(as_(
            "ops-token",
            pb::MarkOfflineRequest {
                agent_id: "disp-d".into(),
            },
        ))
        .await
        .unwrap();
    browser
        .wait("tr[data-agent-id=disp-d][data-status=OFFLINE]")
        .await;
    hand.advance(chrono::Duration::minutes(61));
    browser
        .send(json!({"cmd": "wait", "selector": "tr[data-agent-id=disp-d]", "state": "detached"}))
        .await;
    browser
        .wait("tr[data-agent-id=disp-c][data-status=OFFLINE]")
        .await;
    browser.wait("[data-count=ALL] .n:text-is('2')").await;
    browser.wait("[data-count=OFFLINE] .n:text-is('2')").await;

    // The feed words each of them.
    browser.goto("feed").await;
    let said = |cause: &str, agent: &str| json!({"cmd": "text", "selector": format!("li[data-agent-id={agent}][data-cause={cause}]")});
    let deleted = text_of(browser.send(said("DELETED", "disp-a")).await);
    assert!(
        deleted.contains("IDLE → gone") && deleted.ends_with("deleted by ops"),
        "{deleted}"
    );
    let expired = text_of(browser.send(said("EXPIRED", "disp-d")).await);
    assert!(
        expired.contains("OFFLINE → gone")
            && expired.contains("expired (offline too long) by sweeper"),
        "{expired}"
    );
    let cordon = text_of(browser.send(said("CORDONED", "disp-c")).await);
    assert!(cordon.ends_with("IDLEcordoned by ops"), "{cordon}");
    let lapsed = text_of(browser.send(said("CLAIM_EXPIRED", "disp-b")).await);
    assert!(
        lapsed.contains("BUSY → IDLE") && lapsed.ends_with("claim lease expired by sweeper"),
        "{lapsed}"
    );
    let claimed = text_of(browser.send(said("CLAIMED", "disp-a")).await);
    assert!(claimed.ends_with("claimed by sched-a"), "{claimed}");
    browser.screenshot("feed-claims").await;
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_pools_page_shows_a_parked_pool_live_with_its_window_and_deadline() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    use fleetcare::proto::v1::quota_service_client::QuotaServiceClient;
    let db = TestDb::sqlite();
    let sessions = Sessions::new();
    let app = spawn(&db, &sessions).await;
    for id in ["pool-a", "pool-b"] {
        app.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: Default::default(),
                quota_pools: vec!["anthropic/acct-42".into()],
            })
            .await
            .unwrap();
    }
    let mut browser = Browser::launch().await;
    browser.open(&format!("{}#/pools", page_url(&app))).await;
    browser
        .wait("#pools-table tr[data-pool='anthropic/acct-42'][data-phase=OPEN]")
        .await;

    // A member's limit report parks the pool: the page follows the transitions.
    app.agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "pool-a".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: Some(fleetcare::proto::timestamp(
                chrono::Utc::now() + chrono::Duration::hours(5),
            )),
            window: pb::QuotaWindow::FiveHour as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    browser
        .wait("#pools-table tr[data-pool='anthropic/acct-42'][data-phase=PARKED]")
        .await;
    let pool = QuotaServiceClient::new(app.channel.clone())
        .get_quota_pool(pb::GetQuotaPoolRequest {
            pool: "anthropic/acct-42".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!(pool.held, 2);
    browser.screenshot("pools-parked").await;
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_healing_page_shows_the_brakes_and_its_buttons_pause_and_resume_the_fleet() {
    if !browser_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite();
    let mut args = test_args(&db.url);
    // Groups by team, each allowed half its agents unhealthy.
    args.healing.healing_group_by = Some("team".into());
    args.healing.healing_max_unhealthy = 50;
    args.healing.healing_min_unhealthy = 0;
    let app = TestApp::spawn_with(args).await;
    for (id, team) in [
        ("red-1", "red"),
        ("red-2", "red"),
        ("blue-1", "blue"),
        ("blue-2", "blue"),
    ] {
        register(&app, id, &[("team", team)]).await;
    }
    let mut healing = HealingServiceClient::new(app.channel.clone());
    let reporter = healing.clone();
    let report = |agent: &'static str| {
        let mut reporter = reporter.clone();
        async move {
            reporter
                .report_error(pb::ReportErrorRequest {
                    agent_id: agent.into(),
                    message: "tool call failed: connection reset".into(),
                    ..Default::default()
                })
                .await
                .expect("report error")
                .into_inner()
                .event
                .unwrap()
        }
    };
    // One red agent under remediation: team red is at its share (1 of 2).
    let red = report("red-1").await;
    healing
        .plan_recovery(pb::PlanRecoveryRequest {
            error_event_id: red.id,
        })
        .await
        .expect("red-1 plans");

    let mut browser = Browser::launch().await;
    browser.open(&format!("{}#/healing", page_url(&app))).await;
    browser
        .wait("#healing-pauses p:text-is('healing is not paused')")
        .await;
    // The fleet first, then each group; a group at its share stands out.
    let shares = browser
        .send(json!({"cmd": "count", "selector": "#healing-shares tr[data-group]"}))
        .await;
    assert_eq!(shares["count"], 3);
    browser
        .wait("#healing-shares tbody tr:first-child[data-group='']:not([data-full])")
        .await;
    browser
        .wait("#healing-shares tr[data-group=red][data-full].over")
        .await;
    browser
        .wait("#healing-shares tr[data-group=blue]:not([data-full])")
        .await;
    browser
        .wait("#healing-decisions tr[data-verdict=PLANNED][data-agent-id=red-1]")
        .await;

    // Pause needs a reason: said on the page, nothing sent.
    browser
        .send(json!({"cmd": "click", "selector": "#pause-healing"}))
        .await;
    browser.wait("#notice:not([hidden])").await;
    assert!(
        healing
            .get_healing_policy(pb::GetHealingPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .pauses
            .is_empty()
    );
    // The button pauses the fleet; the reason shows as text, never as markup.
    let reason = "deploy <b>42</b> & rollback";
    browser
        .send(json!({"cmd": "fill", "selector": "#pause-reason", "value": reason}))
        .await;
    browser
        .send(json!({"cmd": "click", "selector": "#pause-healing"}))
        .await;
    browser.wait("#healing-pauses tr[data-group='']").await;
    browser.wait("#fleet-paused").await;
    let policy = healing
        .get_healing_policy(pb::GetHealingPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.pauses.len(), 1);
    assert_eq!(
        (
            policy.pauses[0].group.as_str(),
            policy.pauses[0].reason.as_str()
        ),
        ("", reason)
    );
    let row = browser
        .send(json!({"cmd": "text", "selector": "#healing-pauses tr[data-group='']"}))
        .await;
    let row = row["text"].as_str().unwrap();
    assert!(
        row.starts_with(&format!("whole fleet{reason}anonymous")),
        "{row}"
    );
    let markup = browser
        .send(json!({"cmd": "count", "selector": "#healing-brakes b"}))
        .await;
    assert_eq!(markup["count"], 0, "a server string went in as HTML");

    // The pause brakes the next plan; the page shows the decision once it
    // reads again (here: opened again).
    let blue = report("blue-1").await;
    let status = healing
        .plan_recovery(pb::PlanRecoveryRequest {
            error_event_id: blue.id,
        })
        .await
        .expect_err("paused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    browser.goto("fleet").await;
    browser.goto("healing").await;
    let braked = "#healing-decisions tr[data-verdict=BRAKED][data-reason=HEALING_PAUSED][data-agent-id=blue-1]";
    browser.wait(braked).await;
    let message = browser
        .send(json!({"cmd": "text", "selector": format!("{braked} td:last-child")}))
        .await;
    assert!(
        message["text"].as_str().unwrap().contains(reason),
        "{message}"
    );
    // Newest first.
    browser
        .wait("#healing-decisions tbody tr:first-child[data-verdict=BRAKED]")
        .await;
    browser.screenshot("healing-brakes").await;

    // Resume lifts the pause.
    browser
        .send(json!({"cmd": "click", "selector": "button.resume-healing[data-group='']"}))
        .await;
    browser
        .wait("#healing-pauses p:text-is('healing is not paused')")
        .await;
    browser
        .send(json!({"cmd": "wait", "selector": "#fleet-paused", "state": "detached"}))
        .await;
    assert!(
        healing
            .get_healing_policy(pb::GetHealingPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .pauses
            .is_empty()
    );
    browser.assert_no_errors().await;
    browser.close().await;
    app.stop().await;
}
