//! The dashboard's JSON + SSE API on the HTTP listener (`/api/v1/...`), over
//! plain HTTP against a real server: the same answers as the gRPC calls it
//! wraps, the transition stream with its ids and resumption, the error
//! mapping, the refusal of state-changing requests without the custom header,
//! tokens with an auth file, and the page's assets.

use std::net::SocketAddr;
use std::time::Duration;

use fleetcare::domain::auth::{Role, caller_entry, token_digest};
use fleetcare::proto::v1 as pb;
use fleetcare::views::AgentView;
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
