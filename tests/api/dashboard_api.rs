//! The dashboard's JSON + SSE API on the HTTP listener (`/api/v1/...`), over
//! plain HTTP against a real server: the same answers as the gRPC calls it
//! wraps, the transition stream with its ids and resumption, the error
//! mapping, the refusal of state-changing requests without the custom header,
//! tokens with an auth file, and the page's assets.

use std::net::SocketAddr;
use std::time::Duration;

use fleetcare::domain::auth::{Role, caller_entry, token_digest};
use fleetcare::proto::v1 as pb;
use fleetcare::views::{AgentView, ClaimView};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, TestDb, test_args};

const WAIT: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One HTTP/1.0 request (the server closes the connection after the reply).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("a reply in time")
        .unwrap();
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    Reply {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], "").await
}

fn http(app: &TestApp) -> SocketAddr {
    app.http_addr.expect("the test server has an HTTP listener")
}

/// An open `transitions/stream`: its events as (event, id, data).
struct Sse {
    lines: tokio::io::Lines<BufReader<TcpStream>>,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let status = lines.next_line().await.unwrap().expect("a status line");
        assert!(status.contains(" 200 "), "{status}");
        let mut content_type = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.is_empty() {
                break;
            }
            if line.to_ascii_lowercase().starts_with("content-type:") {
                content_type = line;
            }
        }
        assert!(content_type.contains("text/event-stream"), "{content_type}");
        Sse { lines }
    }

    /// The next event (keep-alive comments skipped).
    async fn next(&mut self) -> (String, Option<i64>, Value) {
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .expect("an event in time")
                .unwrap()
                .expect("the stream stays open");
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                return (event, id, serde_json::from_str(&data).unwrap());
            }
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().parse().expect("a numeric id"));
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }

    /// The next event of kind `kind`, skipping progress events.
    async fn next_of(&mut self, kind: &str) -> (Option<i64>, Value) {
        loop {
            let (event, id, data) = self.next().await;
            if event == "progress" {
                continue;
            }
            assert_eq!(event, kind, "{data}");
            return (id, data);
        }
    }
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

async fn list_agents(app: &TestApp, request: pb::ListAgentsRequest) -> Value {
    let agents = app
        .agents
        .clone()
        .list_agents(request)
        .await
        .unwrap()
        .into_inner()
        .agents;
    serde_json::to_value(agents.iter().map(AgentView::from).collect::<Vec<_>>()).unwrap()
}

#[tokio::test]
async fn the_agents_json_is_list_agents_as_the_views_print_it() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "dash-a", &[("team", "infra")]).await;
    register(&app, "dash-b", &[("team", "web"), ("zone", "eu")]).await;
    register(&app, "dash-c", &[]).await;
    app.start_work("dash-b").await.unwrap();

    let all = get(http(&app), "/api/v1/agents").await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(
        all.header("content-type").as_deref(),
        Some("application/json")
    );
    let all = all.json();
    assert_eq!(
        all["agents"],
        list_agents(&app, pb::ListAgentsRequest::default()).await
    );
    assert_eq!(all["next_page_token"], "", "one page holds them all");
    assert_eq!(all["agents"].as_array().unwrap().len(), 3);
    assert_eq!(all["agents"][1]["status"], "BUSY");
    assert_eq!(
        all["agents"][1]["labels"],
        json!({"team": "web", "zone": "eu"})
    );

    let busy = get(http(&app), "/api/v1/agents?status=busy").await.json();
    let ids: Vec<&str> = busy["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dash-b"]);
    let infra = get(http(&app), "/api/v1/agents?label=team%3Dinfra")
        .await
        .json();
    assert_eq!(infra["agents"][0]["agent_id"], "dash-a");
    assert_eq!(infra["agents"].as_array().unwrap().len(), 1);

    let one = get(http(&app), "/api/v1/agents/dash-b").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json(), all["agents"][1]);
}

/// Agent `i` of the paging fleet: team `a` or `b` by parity, BUSY when `i`
/// is a multiple of 5.
fn fleet_agent(i: usize) -> (String, &'static str, bool) {
    (
        format!("fleet-{i:05}"),
        if i.is_multiple_of(2) { "a" } else { "b" },
        i.is_multiple_of(5),
    )
}

/// Registers `n` agents (some busy) a few dozen calls at a time.
async fn register_fleet(app: &TestApp, n: usize) {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| async move {
            let (id, team, busy) = fleet_agent(i);
            register(app, &id, &[("team", team)]).await;
            if busy {
                app.start_work(&id).await.expect("start work");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// Every page of `api/v1/agents` for `filter` (`status=...&label=...`):
/// the ids in order and each page's size.
async fn every_page(addr: SocketAddr, filter: &str) -> (Vec<String>, Vec<usize>) {
    let (mut ids, mut sizes) = (Vec::new(), Vec::new());
    let mut token = String::new();
    loop {
        let path = format!("/api/v1/agents?{filter}&page_token={token}");
        let reply = get(addr, &path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let page = reply.json();
        let agents = page["agents"].as_array().unwrap();
        sizes.push(agents.len());
        ids.extend(
            agents
                .iter()
                .map(|a| a["agent_id"].as_str().unwrap().to_owned()),
        );
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            return (ids, sizes);
        }
        assert!(sizes.len() < 100, "the pages end");
    }
}

/// Every agent `ListAgents` returns for these filters, over gRPC.
async fn listed_ids(
    app: &TestApp,
    statuses: &[pb::AgentStatus],
    team: Option<&str>,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .agents
            .clone()
            .list_agents(pb::ListAgentsRequest {
                page_size: 1000,
                page_token,
                statuses: statuses.iter().map(|s| *s as i32).collect(),
                labels: team
                    .map(|t| [("team".to_owned(), t.to_owned())].into())
                    .unwrap_or_default(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn the_agents_come_a_page_at_a_time_filtered_by_the_server_and_the_counts_add_up() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let addr = http(&app);
    const N: usize = 2500;
    register_fleet(&app, N).await;
    let expected: Vec<String> = (0..N).map(|i| fleet_agent(i).0).collect();

    // Pages of 200 by default, every agent exactly once, in id order.
    let (ids, sizes) = every_page(addr, "").await;
    assert_eq!(ids, expected);
    assert_eq!(sizes.len(), 13);
    assert!(sizes[..12].iter().all(|&n| n == 200), "{sizes:?}");
    assert_eq!(sizes[12], 100);
    assert_eq!(ids, listed_ids(&app, &[], None).await);

    // The filters are the server's: only matching agents travel.
    let (busy, sizes) = every_page(addr, "status=BUSY").await;
    assert_eq!(busy.len(), N / 5);
    assert_eq!(sizes, [200, 200, 100]);
    assert_eq!(busy, listed_ids(&app, &[pb::AgentStatus::Busy], None).await);
    let (team_b_idle, _) = every_page(addr, "status=IDLE&label=team%3Db").await;
    let want: Vec<String> = (0..N)
        .map(fleet_agent)
        .filter(|(_, team, busy)| *team == "b" && !busy)
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(team_b_idle, want);
    assert_eq!(
        team_b_idle,
        listed_ids(&app, &[pb::AgentStatus::Idle], Some("b")).await
    );
    // page_size: as asked, up to ListAgents' 1000.
    let small = get(addr, "/api/v1/agents?page_size=7").await.json();
    assert_eq!(small["agents"].as_array().unwrap().len(), 7);
    let big = get(addr, "/api/v1/agents?page_size=5000").await.json();
    assert_eq!(big["agents"].as_array().unwrap().len(), 1000);
    let negative = get(addr, "/api/v1/agents?page_size=-1").await;
    assert_eq!(negative.status, 400, "{}", negative.body);
    assert_eq!(negative.json()["code"], "INVALID_ARGUMENT");

    // The counts: ListAgents' totals per status, and the revision they hold.
    let counts = get(addr, "/api/v1/fleet/counts").await;
    assert_eq!(counts.status, 200, "{}", counts.body);
    let counts = counts.json();
    assert_eq!(counts["total"], N);
    for (status, name) in [
        (pb::AgentStatus::Idle, "IDLE"),
        (pb::AgentStatus::Busy, "BUSY"),
        (pb::AgentStatus::OnCall, "ON_CALL"),
        (pb::AgentStatus::Exhausted, "EXHAUSTED"),
        (pb::AgentStatus::Offline, "OFFLINE"),
    ] {
        assert_eq!(
            counts["counts"][name],
            listed_ids(&app, &[status], None).await.len(),
            "{name}"
        );
    }
    let head = app
        .agents
        .clone()
        .list_transitions(pb::ListTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .head_revision;
    assert_eq!(counts["revision"], head);
    assert_eq!(head, (N + N / 5) as i64, "a registration and a start each");
    // A transition after that revision is not in them; the next read has it.
    app.finish_work("fleet-00000").await.unwrap();
    let later = get(addr, "/api/v1/fleet/counts").await.json();
    assert_eq!(later["revision"], head + 1);
    assert_eq!(later["counts"]["BUSY"], N / 5 - 1);
    assert_eq!(later["counts"]["IDLE"], N - N / 5 + 1);
}

#[tokio::test]
async fn a_registration_comes_from_new_in_the_api() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "newcomer", &[]).await;
    app.start_work("newcomer").await.unwrap();
    let page = get(http(&app), "/api/v1/transitions").await.json();
    let moves: Vec<(&str, &str)> = page["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["from"].as_str().unwrap(), t["to"].as_str().unwrap()))
        .collect();
    assert_eq!(moves, [("NEW", "IDLE"), ("IDLE", "BUSY")]);
}

#[tokio::test]
async fn the_transition_stream_delivers_transitions_with_their_revisions_and_resumes_after_last_event_id()
 {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "sse-a", &[("team", "infra")]).await;
    register(&app, "sse-b", &[]).await;

    let mut stream = Sse::open(http(&app), "/api/v1/transitions/stream?snapshot=1", &[]).await;
    let (_, first) = stream.next_of("agent").await;
    let (_, second) = stream.next_of("agent").await;
    let mut snapshot = vec![first, second];
    snapshot.sort_by_key(|a| a["agent_id"].as_str().unwrap().to_owned());
    assert_eq!(
        Value::from(snapshot),
        list_agents(&app, pb::ListAgentsRequest::default()).await
    );
    let (id, done) = stream.next_of("snapshot").await;
    let snapshot_revision = done["revision"].as_i64().unwrap();
    assert_eq!(id, Some(snapshot_revision));
    assert_eq!(done["agent_count"], 2);

    let started = app.start_work("sse-a").await.unwrap().transition.unwrap();
    let (id, transition) = stream.next_of("transition").await;
    assert_eq!(id, Some(started.revision));
    assert_eq!(started.revision, snapshot_revision + 1);
    assert_eq!(transition["agent_id"], "sse-a");
    assert_eq!(
        (&transition["from"], &transition["to"]),
        (&json!("IDLE"), &json!("BUSY"))
    );
    assert_eq!(transition["cause"], "WORK_STARTED");
    let finished = app.finish_work("sse-a").await.unwrap().transition.unwrap();
    let (id, _) = stream.next_of("transition").await;
    assert_eq!(id, Some(finished.revision));

    // A reconnect with Last-Event-ID gets what came after it, from history,
    // and no snapshot even if the URL asks for one (as an EventSource resends it).
    let last = snapshot_revision.to_string();
    let mut resumed = Sse::open(
        http(&app),
        "/api/v1/transitions/stream?snapshot=1",
        &[("Last-Event-ID", &last)],
    )
    .await;
    let (id, _) = resumed.next_of("transition").await;
    assert_eq!(id, Some(started.revision));
    let (id, _) = resumed.next_of("transition").await;
    assert_eq!(id, Some(finished.revision));
    // ?after= does the same; filters narrow it.
    let mut after = Sse::open(
        http(&app),
        &format!(
            "/api/v1/transitions/stream?after={}&agent=sse-a",
            started.revision
        ),
        &[],
    )
    .await;
    let (id, t) = after.next_of("transition").await;
    assert_eq!((id, &t["to"]), (Some(finished.revision), &json!("IDLE")));

    // A revision the server has not reached is OUT_OF_RANGE before the stream starts.
    let future = get(
        http(&app),
        &format!(
            "/api/v1/transitions/stream?after={}",
            finished.revision + 1000
        ),
    )
    .await;
    assert_eq!(future.status, 400, "{}", future.body);
    assert_eq!(future.json()["code"], "OUT_OF_RANGE");
    assert_eq!(future.json()["reason"], "REVISION_OUT_OF_RANGE");
}

#[tokio::test]
async fn errors_map_to_http_statuses_with_the_grpc_code_and_reason() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let cases: &[(&str, u16, &str, &str)] = &[
        ("/api/v1/agents/nobody", 404, "NOT_FOUND", "NOT_FOUND"),
        (
            "/api/v1/agents?status=SLEEPY",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents?label=novalue",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/usage?group_by=week",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/usage?since=yesterday",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/transitions?page_size=-5",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/sessions?processor=nope",
            404,
            "NOT_FOUND",
            "NOT_FOUND",
        ),
        (
            "/api/v1/sessions?processor=usage&status=lost",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        ("/api/v1/runs?processor=nope", 404, "NOT_FOUND", "NOT_FOUND"),
        (
            "/api/v1/runs?page_size=-1",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/runs?page_size=many",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/runs?page_token=garbage",
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        ("/api/v1/no-such-thing", 404, "NOT_FOUND", "NOT_FOUND"),
    ];
    for (path, status, code, reason) in cases {
        let reply = get(http(&app), path).await;
        assert_eq!(reply.status, *status, "{path}: {}", reply.body);
        let body = reply.json();
        assert_eq!(body["code"], *code, "{path}: {body}");
        assert_eq!(body["reason"], *reason, "{path}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{path}");
    }
    let retry = |body: &'static str| {
        request(
            http(&app),
            "POST",
            "/api/v1/sessions/retry",
            &[
                ("Content-Type", "application/json"),
                ("X-Fleetcare-Request", "1"),
            ],
            body,
        )
    };
    let missing = retry(r#"{"processor":"usage","session":"alice/nope.jsonl"}"#).await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    let bad_path = retry(r#"{"processor":"usage","session":"../etc/passwd"}"#).await;
    assert_eq!(bad_path.status, 400, "{}", bad_path.body);
    assert_eq!(bad_path.json()["code"], "INVALID_ARGUMENT");
    let not_json = retry("processor=usage").await;
    assert_eq!(not_json.status, 400, "{}", not_json.body);
    // The other readers answer 200 on an empty server.
    for path in [
        "/api/v1/healing",
        "/api/v1/usage?group_by=model",
        "/api/v1/processors",
        "/api/v1/runs",
    ] {
        let reply = get(http(&app), path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    assert_eq!(
        get(http(&app), "/api/v1/processors").await.json()["processors"][0]["name"],
        "usage"
    );
}

#[tokio::test]
async fn the_runs_json_is_list_runs_as_the_views_print_it_a_page_at_a_time() {
    let db = TestDb::new();
    let root = crate::pipeline::SessionRoot::new();
    root.write(
        "alice/s1.jsonl",
        &crate::pipeline::assistant("m1", "r1", "m", "2026-03-14T10:00:00Z", [1, 2, 3, 4]),
    );
    crate::runs::write_oversized(&root, "bob/broken.jsonl");
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.path.clone();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    args.pipeline.pipeline_retry_base = Duration::ZERO;
    let app = TestApp::spawn_with(args).await;
    let first = crate::pipeline::run(&app, "usage").await.unwrap();
    crate::pipeline::run(&app, "errors").await.unwrap();
    let grpc = crate::pipeline::client(&app)
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.runs.len(), 2);

    let page = get(http(&app), "/api/v1/runs?page_size=1").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let page = page.json();
    let token = page["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty());
    let newest = &page["runs"][0];
    assert_eq!(
        *newest,
        serde_json::to_value(fleetcare::views::RunView::from(&grpc.runs[0])).unwrap()
    );
    assert_eq!(newest["processor"], "errors");
    assert_eq!(newest["trigger"], "CALL");
    assert_eq!(newest["actor"], "anonymous");
    assert!(newest["duration_ms"].as_i64().unwrap() >= 0, "{newest}");

    let next = get(
        http(&app),
        &format!("/api/v1/runs?page_size=1&page_token={token}"),
    )
    .await
    .json();
    assert_eq!(next["next_page_token"], "");
    let older = &next["runs"][0];
    assert_eq!(older["processor"], "usage");
    assert_eq!(older["id"], grpc.runs[1].id);
    assert_eq!(older["stats"]["failed"], 1);
    assert_eq!(older["stats"]["processed"], first.processed);
    assert_eq!(older["stats"]["errors"][0]["session"], "bob/broken.jsonl");
    assert!(
        older["stats"]["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("more than"),
        "{older}"
    );
    let filtered = get(http(&app), "/api/v1/runs?processor=usage").await.json();
    assert_eq!(filtered["runs"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["runs"][0]["processor"], "usage");
    app.stop().await;
}

#[tokio::test]
async fn a_state_changing_request_without_json_and_the_custom_header_is_refused() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let body = r#"{"processor":"usage","session":"alice/nope.jsonl"}"#;
    for headers in [
        &[][..],
        &[("Content-Type", "application/json")][..],
        // What a cross-site form can send, with the header or not.
        &[("Content-Type", "application/x-www-form-urlencoded")][..],
        &[("Content-Type", "text/plain"), ("X-Fleetcare-Request", "1")][..],
        &[
            ("Content-Type", "application/json"),
            ("X-Fleetcare-Request", "yes"),
        ][..],
    ] {
        let reply = request(http(&app), "POST", "/api/v1/sessions/retry", headers, body).await;
        assert_eq!(reply.status, 403, "{headers:?}: {}", reply.body);
        assert_eq!(reply.json()["reason"], "REQUEST_HEADER_REQUIRED");
        assert_eq!(reply.header("access-control-allow-origin"), None);
    }
    let through = request(
        http(&app),
        "POST",
        "/api/v1/sessions/retry",
        &[
            ("Content-Type", "application/json"),
            ("X-Fleetcare-Request", "1"),
            ("Origin", "https://evil.example"),
        ],
        body,
    )
    .await;
    // Past the check, the call itself answers (no such session), with no CORS grant.
    assert_eq!(through.status, 404, "{}", through.body);
    assert_eq!(through.header("access-control-allow-origin"), None);
    let get_retry = get(http(&app), "/api/v1/sessions/retry").await;
    assert_eq!(get_retry.status, 405);
}

#[tokio::test]
async fn with_an_auth_file_the_api_needs_a_token_and_applies_the_callers_role() {
    let db = TestDb::new();
    let dir =
        std::env::temp_dir().join(format!("fleetcare-dash-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("callers.toml");
    let entries = [
        caller_entry("alice", Role::Operator, &token_digest("alice-token"), &[]),
        caller_entry("carol", Role::Reader, &token_digest("carol-token"), &[]),
        caller_entry(
            "bot",
            Role::Agent,
            &token_digest("bot-token"),
            &["bot-*".to_owned()],
        ),
    ]
    .join("\n");
    std::fs::write(&file, entries).unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    let app = TestApp::spawn_with(args).await;
    let addr = http(&app);

    for headers in [
        &[][..],
        &[("Authorization", "Bearer wrong")][..],
        &[("Authorization", "Basic YWxpY2U6eA==")][..],
    ] {
        let reply = request(addr, "GET", "/api/v1/agents", headers, "").await;
        assert_eq!(reply.status, 401, "{headers:?}: {}", reply.body);
        assert_eq!(reply.json()["code"], "UNAUTHENTICATED");
        let stream = request(addr, "GET", "/api/v1/transitions/stream", headers, "").await;
        assert_eq!(stream.status, 401, "{headers:?}");
    }
    let carol = [("Authorization", "Bearer carol-token")];
    let reply = request(addr, "GET", "/api/v1/agents", &carol, "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The counts are ListAgents' read: a token is needed, a reader may.
    let anonymous = get(addr, "/api/v1/fleet/counts").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let counts = request(addr, "GET", "/api/v1/fleet/counts", &carol, "").await;
    assert_eq!(counts.status, 200, "{}", counts.body);
    assert_eq!(counts.json()["total"], 0);
    // An agent caller may read neither the fleet's agents nor its counts.
    let bot = [("Authorization", "Bearer bot-token")];
    for path in ["/api/v1/agents", "/api/v1/fleet/counts"] {
        let reply = request(addr, "GET", path, &bot, "").await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        assert_eq!(reply.json()["reason"], "PERMISSION_DENIED", "{path}");
    }
    let mut stream = Sse::open(addr, "/api/v1/transitions/stream?snapshot=1", &carol).await;
    stream.next_of("snapshot").await;
    // A reader may not retry sessions: the gRPC refusal, as 403.
    let write = [
        ("Authorization", "Bearer carol-token"),
        ("Content-Type", "application/json"),
        ("X-Fleetcare-Request", "1"),
    ];
    let body = r#"{"processor":"usage","session":"alice/nope.jsonl"}"#;
    let denied = request(addr, "POST", "/api/v1/sessions/retry", &write, body).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.json()["reason"], "PERMISSION_DENIED");
    assert!(
        denied.json()["message"]
            .as_str()
            .unwrap()
            .contains("RetrySession")
    );
    let alice = [
        ("Authorization", "Bearer alice-token"),
        ("Content-Type", "application/json"),
        ("X-Fleetcare-Request", "1"),
    ];
    let allowed = request(addr, "POST", "/api/v1/sessions/retry", &alice, body).await;
    assert_eq!(allowed.status, 404, "{}", allowed.body);

    // The page itself needs no token (it asks for one).
    let page = get(addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("token-form"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_types_and_etags() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let addr = http(&app);
    let index = get(addr, "/").await;
    assert_eq!(index.status, 200);
    assert_eq!(
        index.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(
        index.body.contains("<script src=\"app.js\""),
        "relative URLs"
    );
    assert!(
        index
            .header("content-security-policy")
            .unwrap()
            .contains("script-src 'self'")
    );
    let same = get(addr, "/index.html").await;
    assert_eq!(same.body, index.body);
    let etag = index.header("etag").expect("an etag");
    let fresh = request(addr, "GET", "/", &[("If-None-Match", &etag)], "").await;
    assert_eq!(fresh.status, 304);
    assert!(fresh.body.is_empty());
    let stale = request(addr, "GET", "/", &[("If-None-Match", "\"old\"")], "").await;
    assert_eq!(stale.status, 200);
    for (path, kind) in [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some(kind),
            "{path}"
        );
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-cache"));
    }
    // Every URL in the page's script is relative (it works behind a prefix).
    let script = get(addr, "/app.js").await.body;
    assert!(!script.contains("\"/api"), "no absolute API paths");
    assert!(!script.contains("fetch(\"/"), "no absolute fetches");
    // /metrics is still there.
    assert_eq!(get(addr, "/metrics").await.status, 200);
}

#[tokio::test]
async fn on_a_non_loopback_http_listener_without_an_auth_file_the_api_is_off() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.http_listen = fleetcare::config::HttpListen::at("0.0.0.0:0".parse().unwrap());
    let app = TestApp::spawn_with(args).await;
    let port = http(&app).port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for path in ["/api/v1/agents", "/api/v1/transitions/stream"] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        assert_eq!(reply.json()["reason"], "API_OFF");
        assert!(
            reply.json()["message"]
                .as_str()
                .unwrap()
                .contains("--auth-file")
        );
    }
    // Metrics and the page stay (they hold no agent data).
    assert_eq!(get(addr, "/metrics").await.status, 200);
    assert_eq!(get(addr, "/").await.status, 200);
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

fn claims_json(claims: &[pb::Claim]) -> Value {
    serde_json::to_value(claims.iter().map(ClaimView::from).collect::<Vec<_>>()).unwrap()
}

/// The headers every state-changing request needs.
const WRITE: [(&str, &str); 2] = [
    ("Content-Type", "application/json"),
    ("X-Fleetcare-Request", "1"),
];

async fn post(app: &TestApp, path: &str, body: &str) -> Reply {
    request(http(app), "POST", path, &WRITE, body).await
}

async fn grpc_agent(app: &TestApp, agent_id: &str) -> pb::Agent {
    app.get(agent_id).await
}

#[tokio::test]
async fn the_claims_json_is_list_claims_a_page_at_a_time_and_agents_carry_their_claim() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "claim-a", &[("pool", "x")]).await;
    register(&app, "claim-b", &[("pool", "x")]).await;
    register(&app, "claim-c", &[]).await;
    let mut dispatch = crate::dispatch::client(&app);
    let work = dispatch
        .claim_agent(claim_request(&[("pool", "x")], pb::SlotType::Work))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    let on_call = dispatch
        .claim_agent(claim_request(&[("pool", "x")], pb::SlotType::OnCall))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (work.agent_id.as_str(), on_call.agent_id.as_str()),
        ("claim-a", "claim-b")
    );
    let listed = dispatch
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .claims;
    assert_eq!(listed.len(), 2);

    let all = get(http(&app), "/api/v1/claims").await;
    assert_eq!(all.status, 200, "{}", all.body);
    let all = all.json();
    assert_eq!(all["claims"], claims_json(&listed));
    assert_eq!(all["next_page_token"], "");
    let first = &all["claims"][0];
    assert_eq!(first["agent_id"], "claim-a");
    assert_eq!(first["holder"], "anonymous");
    assert_eq!(first["fencing_token"], work.fencing_token);
    assert_eq!(first["slot_type"], "WORK");
    assert_eq!(
        first["lease_expires_at"].as_str(),
        fleetcare::views::time(work.lease_expires_at.as_ref()).as_deref()
    );
    assert_eq!(all["claims"][1]["slot_type"], "ON_CALL");

    // A page at a time.
    let page = get(http(&app), "/api/v1/claims?page_size=1").await.json();
    assert_eq!(page["claims"], claims_json(&listed[..1]));
    let token = page["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty());
    let next = get(
        http(&app),
        &format!("/api/v1/claims?page_size=1&page_token={token}"),
    )
    .await
    .json();
    assert_eq!(next["claims"], claims_json(&listed[1..]));
    assert_eq!(next["next_page_token"], "");
    // By holder.
    let mine = get(http(&app), "/api/v1/claims?holder=anonymous")
        .await
        .json();
    assert_eq!(mine["claims"].as_array().unwrap().len(), 2);
    let nobody = get(http(&app), "/api/v1/claims?holder=nobody").await.json();
    assert_eq!(nobody["claims"], json!([]));
    for path in [
        "/api/v1/claims?page_size=-1",
        "/api/v1/claims?page_size=many",
        "/api/v1/claims?page_token=garbage",
    ] {
        let reply = get(http(&app), path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        assert_eq!(reply.json()["code"], "INVALID_ARGUMENT", "{path}");
    }

    // The agent JSON carries the claim, schedulable and (absent) cordon reason.
    let agent = get(http(&app), "/api/v1/agents/claim-a").await.json();
    assert_eq!(agent["claim"], claims_json(&listed[..1])[0]);
    assert_eq!(agent["status"], "BUSY");
    assert_eq!(agent["schedulable"], true);
    assert!(agent.get("cordon_reason").is_none(), "{agent}");
    let agents = get(http(&app), "/api/v1/agents").await.json();
    assert_eq!(agents["agents"][1]["claim"]["claim_id"], on_call.claim_id);
    assert!(agents["agents"][2].get("claim").is_none(), "{agents}");

    // Released: gone from the list and from the agent.
    dispatch
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: work.claim_id.clone(),
            fencing_token: work.fencing_token,
        })
        .await
        .unwrap();
    let after = get(http(&app), "/api/v1/claims").await.json();
    assert_eq!(after["claims"], claims_json(&listed[1..]));
    let agent = get(http(&app), "/api/v1/agents/claim-a").await.json();
    assert!(agent.get("claim").is_none(), "{agent}");
    app.stop().await;
}

#[tokio::test]
async fn cordon_and_uncordon_are_posts_answering_the_agent_and_the_transition() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "cord-1", &[]).await;
    register(&app, "cord-2", &[]).await;
    app.start_work("cord-1").await.unwrap();

    let cordoned = post(
        &app,
        "/api/v1/agents/cord-1/cordon",
        r#"{"reason": "disk failing"}"#,
    )
    .await;
    assert_eq!(cordoned.status, 200, "{}", cordoned.body);
    let cordoned = cordoned.json();
    let grpc = grpc_agent(&app, "cord-1").await;
    assert!(!grpc.schedulable);
    assert_eq!(grpc.cordon_reason, "disk failing");
    assert_eq!(grpc.status, pb::AgentStatus::Busy as i32, "work kept");
    assert_eq!(
        cordoned["agent"],
        serde_json::to_value(AgentView::from(&grpc)).unwrap()
    );
    assert_eq!(cordoned["agent"]["schedulable"], false);
    assert_eq!(cordoned["agent"]["cordon_reason"], "disk failing");
    let t = &cordoned["transition"];
    assert_eq!(t["cause"], "CORDONED");
    assert_eq!((&t["from"], &t["to"]), (&json!("BUSY"), &json!("BUSY")));
    assert_eq!(t["actor"], "anonymous");
    assert_eq!(t["revision"], grpc.revision);
    let shown = get(http(&app), "/api/v1/agents/cord-1").await.json();
    assert_eq!(
        (&shown["schedulable"], &shown["cordon_reason"]),
        (&json!(false), &json!("disk failing"))
    );

    // Again: the agent as it is, its first reason kept, no transition.
    let again = post(
        &app,
        "/api/v1/agents/cord-1/cordon",
        r#"{"reason": "other"}"#,
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let again = again.json();
    assert!(again.get("transition").is_none(), "{again}");
    assert_eq!(again["agent"]["cordon_reason"], "disk failing");

    // Uncordon: an empty body will do.
    let back = post(&app, "/api/v1/agents/cord-1/uncordon", "").await;
    assert_eq!(back.status, 200, "{}", back.body);
    let back = back.json();
    assert_eq!(back["agent"]["schedulable"], true);
    assert!(back["agent"].get("cordon_reason").is_none(), "{back}");
    assert_eq!(back["transition"]["cause"], "UNCORDONED");
    assert!(grpc_agent(&app, "cord-1").await.schedulable);
    let again = post(&app, "/api/v1/agents/cord-1/uncordon", "{}").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.json().get("transition").is_none(), "{}", again.body);
    // No reason: cordoned with an empty one.
    let bare = post(&app, "/api/v1/agents/cord-2/cordon", "{}").await;
    assert_eq!(bare.status, 200, "{}", bare.body);
    assert_eq!(bare.json()["agent"]["cordon_reason"], "");
    assert!(!grpc_agent(&app, "cord-2").await.schedulable);

    // Refusals: the gRPC ones, and bodies that are not the one expected.
    let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(1025));
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/api/v1/agents/ghost/cordon", "{}", 404, "NOT_FOUND"),
        ("/api/v1/agents/ghost/uncordon", "", 404, "NOT_FOUND"),
        (
            "/api/v1/agents/bad%20id/cordon",
            "{}",
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents/cord-1/cordon",
            "reason=x",
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents/cord-1/cordon",
            r#"{"reason": 5}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents/cord-1/cordon",
            r#"{"why": "x"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents/cord-1/cordon",
            &long,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "/api/v1/agents/cord-2/uncordon",
            r#"{"reason": "x"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (path, body, status, code) in cases {
        let reply = post(&app, path, body).await;
        assert_eq!(reply.status, *status, "{path} {body}: {}", reply.body);
        let json = reply.json();
        assert_eq!(json["code"], *code, "{path} {body}: {json}");
        assert!(!json["message"].as_str().unwrap().is_empty());
    }
    let ghost = post(&app, "/api/v1/agents/ghost/cordon", "{}").await.json();
    assert!(
        ghost["message"].as_str().unwrap().contains("ghost"),
        "{ghost}"
    );
    assert!(
        grpc_agent(&app, "cord-1").await.schedulable,
        "a refused body cordons nothing"
    );
    assert!(
        !grpc_agent(&app, "cord-2").await.schedulable,
        "a refused body uncordons nothing"
    );
    // Without the custom header, or as a GET: refused before any call.
    let bare = request(
        http(&app),
        "POST",
        "/api/v1/agents/cord-1/cordon",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(bare.status, 403, "{}", bare.body);
    assert_eq!(bare.json()["reason"], "REQUEST_HEADER_REQUIRED");
    assert!(grpc_agent(&app, "cord-1").await.schedulable);
    assert_eq!(
        get(http(&app), "/api/v1/agents/cord-1/cordon").await.status,
        405
    );

    // Timed as the DispatchService's calls, over HTTP.
    let m = crate::metrics::scrape(&app).await;
    let calls = |method: &str, code: &str| {
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("service", "fleetcare.v1.DispatchService"),
                ("method", method),
                ("code", code),
                ("transport", "http"),
            ],
        )
    };
    assert_eq!(calls("CordonAgent", "OK"), 3.0);
    assert_eq!(calls("UncordonAgent", "OK"), 2.0);
    assert_eq!(calls("CordonAgent", "NOT_FOUND"), 2.0);
    app.stop().await;
}

#[tokio::test]
async fn with_an_auth_file_a_reader_lists_claims_but_may_not_cordon() {
    let db = TestDb::new();
    let dir = std::env::temp_dir().join(format!(
        "fleetcare-dash-cordon-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("callers.toml");
    let entries = [
        caller_entry("ops", Role::Operator, &token_digest("ops-token"), &[]),
        caller_entry("sched", Role::Scheduler, &token_digest("sched-token"), &[]),
        caller_entry("viewer", Role::Reader, &token_digest("viewer-token"), &[]),
        caller_entry(
            "bot",
            Role::Agent,
            &token_digest("bot-token"),
            &["guarded-*".to_owned()],
        ),
    ]
    .join("\n");
    std::fs::write(&file, entries).unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    let app = TestApp::spawn_with(args).await;
    let addr = http(&app);
    let mut register = tonic::Request::new(pb::RegisterAgentRequest {
        agent_id: "guarded-1".into(),
        labels: Default::default(),
        quota_pools: Vec::new(),
    });
    register
        .metadata_mut()
        .insert("authorization", "Bearer ops-token".parse().unwrap());
    app.agents.clone().register_agent(register).await.unwrap();
    let as_ = |bearer: &'static str| {
        [
            ("Authorization", bearer),
            ("Content-Type", "application/json"),
            ("X-Fleetcare-Request", "1"),
        ]
    };
    let cordon = r#"{"reason": "maintenance"}"#;

    // A reader: 403 with the gRPC refusal's message, nothing changed.
    for (path, body, rpc) in [
        ("/api/v1/agents/guarded-1/cordon", cordon, "CordonAgent"),
        ("/api/v1/agents/guarded-1/uncordon", "", "UncordonAgent"),
    ] {
        let denied = request(addr, "POST", path, &as_("Bearer viewer-token"), body).await;
        assert_eq!(denied.status, 403, "{path}: {}", denied.body);
        let body = denied.json();
        assert_eq!(body["code"], "PERMISSION_DENIED");
        assert_eq!(body["reason"], "PERMISSION_DENIED");
        assert_eq!(
            body["message"],
            format!("viewer (reader) may not call {rpc}"),
            "{body}"
        );
    }
    // No token: 401; an agent caller, even on its own agent: 403.
    let anonymous = request(
        addr,
        "POST",
        "/api/v1/agents/guarded-1/cordon",
        &WRITE,
        cordon,
    )
    .await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let bot = request(
        addr,
        "POST",
        "/api/v1/agents/guarded-1/cordon",
        &as_("Bearer bot-token"),
        cordon,
    )
    .await;
    assert_eq!(bot.status, 403, "{}", bot.body);
    let mut get_agent = tonic::Request::new(pb::GetAgentRequest {
        agent_id: "guarded-1".into(),
    });
    get_agent
        .metadata_mut()
        .insert("authorization", "Bearer ops-token".parse().unwrap());
    let agent = app
        .agents
        .clone()
        .get_agent(get_agent)
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert!(agent.schedulable, "the refusals changed nothing");

    // A scheduler cordons, an operator uncordons: each the transition's actor.
    let by_sched = request(
        addr,
        "POST",
        "/api/v1/agents/guarded-1/cordon",
        &as_("Bearer sched-token"),
        cordon,
    )
    .await;
    assert_eq!(by_sched.status, 200, "{}", by_sched.body);
    assert_eq!(by_sched.json()["transition"]["actor"], "sched");
    let by_ops = request(
        addr,
        "POST",
        "/api/v1/agents/guarded-1/uncordon",
        &as_("Bearer ops-token"),
        "",
    )
    .await;
    assert_eq!(by_ops.status, 200, "{}", by_ops.body);
    assert_eq!(by_ops.json()["transition"]["actor"], "ops");

    // ListClaims: readers may, agent callers may not.
    let listed = request(
        addr,
        "GET",
        "/api/v1/claims",
        &as_("Bearer viewer-token")[..1],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["claims"], json!([]));
    let bot = request(
        addr,
        "GET",
        "/api/v1/claims",
        &as_("Bearer bot-token")[..1],
        "",
    )
    .await;
    assert_eq!(bot.status, 403, "{}", bot.body);
    assert_eq!(get(addr, "/api/v1/claims").await.status, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pools_are_listed_shown_parked_and_released_as_quota_service_answers() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["hp-1", "hp-2"] {
        app.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: Default::default(),
                quota_pools: vec!["anthropic/acct-9".into()],
            })
            .await
            .unwrap();
    }
    let listed = get(http(&app), "/api/v1/pools").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let listed = listed.json();
    assert_eq!(listed["pools"][0]["name"], "anthropic/acct-9");
    assert_eq!(listed["pools"][0]["phase"], "OPEN");
    assert_eq!(listed["pools"][0]["members"]["IDLE"], 2);

    let until = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let parked = post(
        &app,
        "/api/v1/pools/park",
        &json!({"pool": "anthropic/acct-9", "until": until, "window": "weekly", "reason": "quota review"})
            .to_string(),
    )
    .await;
    assert_eq!(parked.status, 200, "{}", parked.body);
    let parked = parked.json();
    assert_eq!(parked["members_parked"], 2);
    assert_eq!(parked["pool"]["phase"], "PARKED");
    assert_eq!(parked["pool"]["windows"][0]["window"], "WEEKLY");
    assert_eq!(
        grpc_agent(&app, "hp-1").await.held_by_pools,
        ["anthropic/acct-9"]
    );
    let shown = get(http(&app), "/api/v1/pool?name=anthropic%2Facct-9").await;
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert_eq!(shown.json()["held_agent_ids"], json!(["hp-1", "hp-2"]));
    let only_parked = get(http(&app), "/api/v1/pools?parked=1").await.json();
    assert_eq!(only_parked["pools"].as_array().unwrap().len(), 1);

    let bad_window = post(
        &app,
        "/api/v1/pools/park",
        &json!({"pool": "anthropic/acct-9", "until": until, "window": "fortnightly"}).to_string(),
    )
    .await;
    assert_eq!(bad_window.status, 400, "{}", bad_window.body);
    assert!(
        bad_window.body.contains("fortnightly"),
        "{}",
        bad_window.body
    );
    let unknown = get(http(&app), "/api/v1/pool?name=nobody").await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);

    let released = post(
        &app,
        "/api/v1/pools/release",
        &json!({"pool": "anthropic/acct-9", "reason": "done"}).to_string(),
    )
    .await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(released.json()["phase"], "RELEASING");
}

#[tokio::test]
async fn healing_is_paused_shown_braked_and_resumed_over_http_with_its_decisions() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let addr = http(&app);
    register(&app, "heal-1", &[]).await;
    register(&app, "heal-2", &[]).await;

    // The policy in force (the test servers' brakes are out of reach) and
    // the fleet's share, first.
    let policy = get(addr, "/api/v1/healing/policy").await;
    assert_eq!(policy.status, 200, "{}", policy.body);
    let policy = policy.json();
    assert_eq!(policy["pauses"], json!([]));
    assert_eq!(policy["open_breakers"], json!([]));
    assert_eq!(policy["spent_budgets"], json!([]));
    assert_eq!(policy["policy"]["max_unhealthy_percent"], 100);
    assert_eq!(policy["policy"]["dry_run"], false);
    assert_eq!(
        (
            &policy["shares"][0]["group"],
            &policy["shares"][0]["counted"],
            &policy["shares"][0]["unhealthy"],
        ),
        (&json!(""), &json!(2), &json!(0))
    );
    assert!(policy["as_of"].is_string(), "{policy}");

    // A pause through POST: answered, and in force in the policy.
    let paused = post(
        &app,
        "/api/v1/healing/pause",
        &json!({"group": "", "reason": "incident 42: bad config"}).to_string(),
    )
    .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    let pause = paused.json();
    assert_eq!(pause["group"], "");
    assert_eq!(pause["reason"], "incident 42: bad config");
    assert_eq!(pause["paused_by"], "anonymous");
    assert!(pause["paused_at"].is_string(), "{pause}");
    let policy = get(addr, "/api/v1/healing/policy").await.json();
    assert_eq!(policy["pauses"], json!([pause]));

    // It brakes a PlanRecovery, and the decision is listed with its reason.
    let mut healing = crate::healing::client(&app);
    let event = crate::healing::report(&mut healing, "heal-1", "tool call failed", &[]).await;
    let status = crate::healing::plan(&mut healing, event.id)
        .await
        .expect_err("paused");
    assert_eq!(crate::helpers::reason(&status), "HEALING_PAUSED");
    let listed = get(addr, "/api/v1/healing/decisions").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let listed = listed.json();
    let decisions = listed["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1, "{listed}");
    let braked = &decisions[0];
    assert_eq!(braked["verdict"], "BRAKED");
    assert_eq!(braked["reason"], "HEALING_PAUSED");
    assert_eq!(braked["agent_id"], "heal-1");
    assert_eq!(braked["error_event_id"], event.id);
    assert!(
        braked["message"]
            .as_str()
            .unwrap()
            .contains("incident 42: bad config"),
        "{braked}"
    );
    assert_eq!(braked.get("recovery_action_id"), None, "{braked}");
    assert_eq!(listed["next_page_token"], "");
    // The same as ListHealingDecisions, as the views print it.
    let grpc = healing
        .list_healing_decisions(pb::ListHealingDecisionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(
        listed["decisions"],
        serde_json::to_value(
            grpc.iter()
                .map(fleetcare::views::HealingDecisionView::from)
                .collect::<Vec<_>>()
        )
        .unwrap()
    );
    // Filters: verdict (with or without its prefix, any case) and agent.
    for (path, n) in [
        ("/api/v1/healing/decisions?verdict=braked", 1),
        (
            "/api/v1/healing/decisions?verdict=HEALING_VERDICT_BRAKED",
            1,
        ),
        ("/api/v1/healing/decisions?verdict=planned", 0),
        ("/api/v1/healing/decisions?agent_id=heal-1", 1),
        ("/api/v1/healing/decisions?agent_id=heal-2", 0),
        ("/api/v1/healing/decisions?verdict=&agent_id=&limit=", 1),
    ] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(
            reply.json()["decisions"].as_array().unwrap().len(),
            n,
            "{path}"
        );
    }
    // Bad input: 400 with the gRPC code and a message naming the field.
    for (path, names) in [
        ("/api/v1/healing/decisions?verdict=stopped", "verdict"),
        ("/api/v1/healing/decisions?verdict=unspecified", "verdict"),
        ("/api/v1/healing/decisions?limit=many", "limit"),
        ("/api/v1/healing/decisions?limit=-1", "page_size"),
        (
            "/api/v1/healing/decisions?agent_id=no%20such%20id",
            "agent_id",
        ),
        ("/api/v1/healing/decisions?page_token=garbage", "token"),
        (
            "/api/v1/healing/decisions?error_event_id=x",
            "error_event_id",
        ),
    ] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        let body = reply.json();
        assert_eq!(body["code"], "INVALID_ARGUMENT", "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(names),
            "{path}: {body}"
        );
    }
    for (body, status, code) in [
        // A pause needs a reason.
        (r#"{"reason": "  "}"#, 400, "INVALID_ARGUMENT"),
        ("", 400, "INVALID_ARGUMENT"),
        (
            r#"{"reason": "x", "until": "soon"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        ("reason=x", 400, "INVALID_ARGUMENT"),
        // Without the policy's group_by, a group names nothing.
        (
            r#"{"group": "red", "reason": "x"}"#,
            409,
            "FAILED_PRECONDITION",
        ),
    ] {
        let reply = post(&app, "/api/v1/healing/pause", body).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        assert_eq!(reply.json()["code"], code, "{body}");
    }
    // Without the custom header, or as a GET: refused before any call.
    let bare = request(
        addr,
        "POST",
        "/api/v1/healing/resume",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(bare.status, 403, "{}", bare.body);
    assert_eq!(bare.json()["reason"], "REQUEST_HEADER_REQUIRED");
    assert_eq!(get(addr, "/api/v1/healing/pause").await.status, 405);
    assert_eq!(
        get(addr, "/api/v1/healing/policy").await.json()["pauses"],
        json!([pause]),
        "the refusals changed nothing"
    );

    // Resume lifts it: the plan goes through, the decisions newest first.
    let resumed = post(&app, "/api/v1/healing/resume", r#"{"group": ""}"#).await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_eq!(resumed.json(), json!({"resumed": true}));
    assert_eq!(
        get(addr, "/api/v1/healing/policy").await.json()["pauses"],
        json!([])
    );
    let action = crate::healing::plan(&mut healing, event.id)
        .await
        .expect("resumed");
    let page = get(addr, "/api/v1/healing/decisions?limit=1").await.json();
    assert_eq!(page["decisions"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["decisions"][0]["verdict"], "PLANNED");
    assert_eq!(page["decisions"][0]["recovery_action_id"], action.id);
    let token = page["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty(), "{page}");
    let next = get(
        addr,
        &format!("/api/v1/healing/decisions?limit=1&page_token={token}"),
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.json()["decisions"][0]["id"], braked["id"]);
    // An empty body resumes the fleet too; nothing was paused.
    let again = post(&app, "/api/v1/healing/resume", "").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json(), json!({"resumed": false}));

    // Timed as the HealingService's calls, over HTTP.
    let m = crate::metrics::scrape(&app).await;
    let calls = |method: &str, code: &str| {
        m.value(
            "fleetcare_rpc_duration_seconds_count",
            &[
                ("service", "fleetcare.v1.HealingService"),
                ("method", method),
                ("code", code),
                ("transport", "http"),
            ],
        )
    };
    assert_eq!(calls("PauseHealing", "OK"), 1.0);
    assert_eq!(calls("ResumeHealing", "OK"), 2.0);
    assert_eq!(calls("PauseHealing", "FAILED_PRECONDITION"), 1.0);
    assert!(calls("GetHealingPolicy", "OK") >= 4.0);
    app.stop().await;
}

#[tokio::test]
async fn with_an_auth_file_only_an_operator_pauses_or_resumes_healing() {
    let db = TestDb::new();
    let dir = std::env::temp_dir().join(format!(
        "fleetcare-dash-pause-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("callers.toml");
    let entries = [
        caller_entry("ops", Role::Operator, &token_digest("ops-token"), &[]),
        caller_entry("sched", Role::Scheduler, &token_digest("sched-token"), &[]),
        caller_entry("viewer", Role::Reader, &token_digest("viewer-token"), &[]),
        caller_entry(
            "bot",
            Role::Agent,
            &token_digest("bot-token"),
            &["guarded-*".to_owned()],
        ),
    ]
    .join("\n");
    std::fs::write(&file, entries).unwrap();
    let mut args = test_args(&db.url);
    args.auth_file = Some(file);
    let app = TestApp::spawn_with(args).await;
    let addr = http(&app);
    let as_ = |bearer: &'static str| {
        [
            ("Authorization", bearer),
            ("Content-Type", "application/json"),
            ("X-Fleetcare-Request", "1"),
        ]
    };
    let pause = r#"{"reason": "maintenance window"}"#;

    // A reader and a scheduler read the brakes but may not pause or resume:
    // 403 with the gRPC refusal's message, nothing changed.
    for (caller, bearer) in [
        ("viewer (reader)", "Bearer viewer-token"),
        ("sched (scheduler)", "Bearer sched-token"),
    ] {
        let read = request(addr, "GET", "/api/v1/healing/policy", &as_(bearer)[..1], "").await;
        assert_eq!(read.status, 200, "{caller}: {}", read.body);
        let decisions = request(
            addr,
            "GET",
            "/api/v1/healing/decisions",
            &as_(bearer)[..1],
            "",
        )
        .await;
        assert_eq!(decisions.status, 200, "{caller}: {}", decisions.body);
        for (path, body, rpc) in [
            ("/api/v1/healing/pause", pause, "PauseHealing"),
            ("/api/v1/healing/resume", "{}", "ResumeHealing"),
        ] {
            let denied = request(addr, "POST", path, &as_(bearer), body).await;
            assert_eq!(denied.status, 403, "{caller} {path}: {}", denied.body);
            let body = denied.json();
            assert_eq!(body["code"], "PERMISSION_DENIED");
            assert_eq!(body["reason"], "PERMISSION_DENIED");
            assert_eq!(
                body["message"],
                format!("{caller} may not call {rpc}"),
                "{body}"
            );
        }
    }
    // No token: 401; an agent caller: 403, and it may not read the policy.
    let anonymous = request(addr, "POST", "/api/v1/healing/pause", &WRITE, pause).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let bot = request(
        addr,
        "POST",
        "/api/v1/healing/pause",
        &as_("Bearer bot-token"),
        pause,
    )
    .await;
    assert_eq!(bot.status, 403, "{}", bot.body);
    let bot = request(
        addr,
        "GET",
        "/api/v1/healing/policy",
        &as_("Bearer bot-token")[..1],
        "",
    )
    .await;
    assert_eq!(bot.status, 403, "{}", bot.body);
    let viewer = [("Authorization", "Bearer viewer-token")];
    let policy = request(addr, "GET", "/api/v1/healing/policy", &viewer, "").await;
    assert_eq!(
        policy.json()["pauses"],
        json!([]),
        "the refusals paused nothing"
    );

    // An operator pauses (the pause names it) and resumes.
    let paused = request(
        addr,
        "POST",
        "/api/v1/healing/pause",
        &as_("Bearer ops-token"),
        pause,
    )
    .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["paused_by"], "ops");
    let policy = request(addr, "GET", "/api/v1/healing/policy", &viewer, "").await;
    assert_eq!(policy.json()["pauses"][0]["paused_by"], "ops");
    let resumed = request(
        addr,
        "POST",
        "/api/v1/healing/resume",
        &as_("Bearer ops-token"),
        "{}",
    )
    .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_eq!(resumed.json()["resumed"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
