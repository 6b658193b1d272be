//! SessionPipelineService against a real session root on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fleetcare::config::ServeArgs;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::session_pipeline_service_client::SessionPipelineServiceClient;
use std::sync::Arc;

use fleetcare::processors::Registration;
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, eventually, reason, sqlite_backend, test_args};

/// A session root in the temp directory, removed when the test passes.
pub struct SessionRoot {
    pub path: PathBuf,
}

impl SessionRoot {
    pub fn new() -> SessionRoot {
        let path = std::env::temp_dir().join(format!(
            "fleetcare-sessions-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        SessionRoot { path }
    }

    /// Writes a session file with an mtime an hour ago (well clear of the racy window).
    pub fn write(&self, rel: &str, content: &str) {
        let path = self.path.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        self.set_mtime(rel, Duration::from_secs(3600));
    }

    pub fn set_mtime(&self, rel: &str, ago: Duration) {
        let file = std::fs::File::options()
            .write(true)
            .open(self.path.join(rel))
            .unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }
}

impl Drop for SessionRoot {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One assistant line with usage.
pub fn assistant(msg: &str, req: &str, model: &str, ts: &str, tokens: [u64; 4]) -> String {
    let [input, output, creation, read] = tokens;
    format!(
        r#"{{"type":"assistant","sessionId":"s","timestamp":"{ts}","requestId":"{req}","message":{{"id":"{msg}","model":"{model}","role":"assistant","content":[{{"type":"text","text":"ok"}}],"usage":{{"input_tokens":{input},"output_tokens":{output},"cache_creation_input_tokens":{creation},"cache_read_input_tokens":{read}}}}}}}"#
    ) + "\n"
}

fn args(db: &TestDb, root: &Path) -> ServeArgs {
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.to_path_buf();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    args.pipeline.max_attempts = 3;
    args.pipeline.pipeline_retry_base = Duration::ZERO;
    args
}

pub fn client(app: &TestApp) -> SessionPipelineServiceClient<Channel> {
    SessionPipelineServiceClient::new(app.channel.clone())
}

pub async fn run(app: &TestApp, name: &str) -> Result<pb::RunStats, tonic::Status> {
    client(app)
        .run_processor(pb::RunProcessorRequest { name: name.into() })
        .await
        .map(|r| r.into_inner().stats.unwrap())
}

pub async fn usage(app: &TestApp, group_by: pb::UsageGrouping, user: &str) -> pb::GetUsageResponse {
    client(app)
        .get_usage(pb::GetUsageRequest {
            group_by: group_by as i32,
            user: user.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn states(app: &TestApp, processor: &str) -> Vec<pb::SessionState> {
    client(app)
        .list_session_states(pb::ListSessionStatesRequest {
            processor: processor.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .states
}

fn basic_corpus(root: &SessionRoot) {
    root.write(
        "alice/s1.jsonl",
        &(assistant("msg_1", "req_1", "claude-sonnet-4", "2026-03-14T10:00:00Z", [10, 20, 30, 40])
            + &assistant("msg_1", "req_1", "claude-sonnet-4", "2026-03-14T10:00:01Z", [10, 20, 30, 40])
            + "{not json\n"
            + r#"{"type":"user","timestamp":"2026-03-14T10:00:02Z","message":{"role":"user","content":"hi"}}"#
            + "\n"),
    );
    root.write(
        "alice/s2.jsonl",
        &assistant(
            "msg_2",
            "req_2",
            "claude-opus-4",
            "2026-03-14T11:00:00Z",
            [1, 2, 3, 4],
        ),
    );
    root.write(
        "bob/s3.jsonl",
        &assistant(
            "msg_3",
            "req_3",
            "claude-sonnet-4",
            "2026-03-15T09:00:00Z",
            [100, 200, 0, 0],
        ),
    );
}

#[tokio::test]
async fn incremental_runs_read_only_what_changed() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    basic_corpus(&root);
    let app = TestApp::spawn_with(args(&db, &root.path)).await;

    let first = run(&app, "usage").await.unwrap();
    assert_eq!(
        (first.scanned, first.processed, first.skipped, first.failed),
        (3, 3, 0, 0)
    );
    assert_eq!(first.files_hashed, 3);
    assert_eq!(
        first.items_extracted, 3,
        "the repeated line of msg_1 counts once"
    );
    let totals = usage(&app, pb::UsageGrouping::User, "")
        .await
        .totals
        .unwrap();
    assert_eq!(
        (
            totals.input_tokens,
            totals.output_tokens,
            totals.cache_creation_tokens,
            totals.cache_read_tokens
        ),
        (111, 222, 33, 44)
    );
    assert_eq!(totals.total_tokens, 410);
    assert_eq!(totals.messages, 3);

    // Unchanged: nothing is read at all.
    let again = run(&app, "usage").await.unwrap();
    assert_eq!(
        (
            again.processed,
            again.skipped,
            again.files_hashed,
            again.bytes_hashed
        ),
        (0, 3, 0, 0)
    );

    // Touched, same content: hashed once, not reprocessed; then skipped by stat again.
    root.set_mtime("alice/s2.jsonl", Duration::from_secs(1800));
    let touched = run(&app, "usage").await.unwrap();
    assert_eq!(
        (touched.processed, touched.skipped, touched.files_hashed),
        (0, 3, 1)
    );
    let after = run(&app, "usage").await.unwrap();
    assert_eq!(after.files_hashed, 0, "the refreshed stat is trusted");

    // Changed content: reprocessed, replacing (not adding to) its earlier items.
    let grown = assistant(
        "msg_2",
        "req_2",
        "claude-opus-4",
        "2026-03-14T11:00:00Z",
        [1, 2, 3, 4],
    ) + &assistant(
        "msg_4",
        "req_4",
        "claude-opus-4",
        "2026-03-14T11:05:00Z",
        [5, 5, 5, 5],
    );
    root.write("alice/s2.jsonl", &grown);
    let changed = run(&app, "usage").await.unwrap();
    assert_eq!((changed.processed, changed.files_hashed), (1, 1));
    let alice = usage(&app, pb::UsageGrouping::User, "alice").await;
    assert_eq!(alice.rows.len(), 1);
    assert_eq!(alice.rows[0].input_tokens, 10 + 1 + 5);
    assert_eq!(alice.rows[0].messages, 3);

    // A vanished transcript does not take its usage with it.
    std::fs::remove_file(root.path.join("bob/s3.jsonl")).unwrap();
    let vanished = run(&app, "usage").await.unwrap();
    assert_eq!(vanished.scanned, 2);
    let bob = usage(&app, pb::UsageGrouping::User, "bob").await;
    assert_eq!(bob.rows[0].input_tokens, 100);

    let s = states(&app, "usage").await;
    assert_eq!(s.len(), 3);
    assert!(
        s.iter()
            .all(|s| s.status == pb::SessionStatus::Processed as i32)
    );
    assert_eq!(s[0].session, "alice/s1.jsonl");
    assert_eq!(s[0].items_count, 1);
    assert_eq!(s[0].sha256.len(), 64);
}

#[tokio::test]
async fn no_byte_fails_a_session_and_sub_agent_transcripts_are_sessions_of_their_own() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    let line = |msg: &str, req: &str, tokens| {
        assistant(msg, req, "claude-sonnet-4", "2026-03-14T10:00:00Z", tokens)
    };
    // NUL padding a crash left (a line of its own, and before a line), a
    // line of invalid UTF-8, and an unterminated run of NULs at the end.
    let mut padded = line("msg_1", "req_1", [1, 10, 0, 100]).into_bytes();
    padded.extend_from_slice(&[0; 64]);
    padded.push(b'\n');
    padded.extend_from_slice(b"\xff\xfe not text\n");
    padded.extend_from_slice(line("msg_2", "req_2", [2, 20, 0, 0]).as_bytes());
    padded.extend_from_slice(&[0; 32]);
    std::fs::create_dir_all(root.path.join("alice")).unwrap();
    std::fs::write(root.path.join("alice/s1.jsonl"), &padded).unwrap();
    root.set_mtime("alice/s1.jsonl", Duration::from_secs(3600));
    // The session's sub-agent: a replay of the parent's msg_1 under a new
    // request id (a sidechain), and a message of its own.
    let sidechain = |l: String| l.replacen("{\"type\"", "{\"isSidechain\":true,\"type\"", 1);
    root.write(
        "alice/s1/subagents/agent-7.jsonl",
        &(sidechain(line("msg_1", "req_replay", [1, 10, 0, 50_000]))
            + &sidechain(line("msg_3", "req_3", [3, 30, 0, 0]))),
    );
    // Hidden folders are passed over.
    root.write(
        "alice/.cache/x.jsonl",
        &line("msg_9", "req_9", [9, 9, 9, 9]),
    );
    let app = TestApp::spawn_with(args(&db, &root.path)).await;

    let stats = run(&app, "usage").await.unwrap();
    assert_eq!(
        (
            stats.scanned,
            stats.processed,
            stats.failed,
            stats.lines_skipped
        ),
        (2, 2, 0, 2)
    );
    let s = states(&app, "usage").await;
    let sessions: Vec<(&str, i32, i64)> = s
        .iter()
        .map(|s| (s.session.as_str(), s.status, s.items_count))
        .collect();
    let processed = pb::SessionStatus::Processed as i32;
    assert_eq!(
        sessions,
        [
            ("alice/s1.jsonl", processed, 2),
            ("alice/s1/subagents/agent-7.jsonl", processed, 2)
        ]
    );
    // msg_1 counts once, the parent's copy; msg_3 on the sub-agent's session.
    let by_session = usage(&app, pb::UsageGrouping::Session, "").await;
    let rows: Vec<(&str, i64, i64)> = by_session
        .rows
        .iter()
        .map(|r| (r.key.as_str(), r.total_tokens, r.messages))
        .collect();
    assert_eq!(
        rows,
        [
            ("alice/s1", 111 + 22, 2),
            ("alice/s1/subagents/agent-7", 33, 1)
        ]
    );
    // A nested session is named in the calls as the scan names it (found,
    // and not retried: it was processed).
    let processed = client(&app)
        .retry_session(pb::RetrySessionRequest {
            processor: "usage".into(),
            session: "alice/s1/subagents/agent-7.jsonl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(processed.code(), Code::FailedPrecondition);
    assert!(
        processed.message().contains("is PROCESSED"),
        "{}",
        processed.message()
    );
    for bad in [
        "alice/s1/../s1.jsonl",
        "alice/a/b/c/d/e/f.jsonl",
        "alice/.x/s.jsonl",
    ] {
        let status = client(&app)
            .retry_session(pb::RetrySessionRequest {
                processor: "usage".into(),
                session: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
}

#[tokio::test]
async fn a_failing_session_is_isolated_retried_then_dead_until_requeued() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    basic_corpus(&root);
    // Content never fails a session; a file too large to read does (a
    // sparse file: no disk is used).
    root.write("bob/broken.jsonl", "{\"type\":\"assistant\"}\n");
    std::fs::File::options()
        .write(true)
        .open(root.path.join("bob/broken.jsonl"))
        .unwrap()
        .set_len(fleetcare::runtime::pipeline::MAX_FILE_BYTES + 1)
        .unwrap();
    root.set_mtime("bob/broken.jsonl", Duration::from_secs(3600));
    let app = TestApp::spawn_with(args(&db, &root.path)).await;

    let mut last = None;
    for attempt in 1..=3 {
        let stats = run(&app, "usage").await.unwrap();
        assert_eq!(stats.failed, 1, "attempt {attempt}");
        assert_eq!(stats.errors[0].session, "bob/broken.jsonl");
        assert!(
            stats.errors[0].error.contains("more than"),
            "{}",
            stats.errors[0].error
        );
        last = Some(stats);
    }
    assert_eq!(last.unwrap().dead, 1);
    // The others were processed on the first run regardless.
    assert_eq!(
        usage(&app, pb::UsageGrouping::User, "")
            .await
            .totals
            .unwrap()
            .messages,
        3
    );
    let broken = |s: Vec<pb::SessionState>| {
        s.into_iter()
            .find(|s| s.session == "bob/broken.jsonl")
            .unwrap()
    };
    let dead = broken(states(&app, "usage").await);
    assert_eq!(dead.status, pb::SessionStatus::Dead as i32);
    assert_eq!(dead.attempts, 3);
    assert!(dead.last_error.contains("more than"), "{}", dead.last_error);

    // Dead sessions are skipped without being read.
    let skipped = run(&app, "usage").await.unwrap();
    assert_eq!(
        (skipped.failed, skipped.files_hashed, skipped.dead),
        (0, 0, 1)
    );
    let filtered = client(&app)
        .list_session_states(pb::ListSessionStatesRequest {
            processor: "usage".into(),
            status: pb::SessionStatus::Dead as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.states.len(), 1);

    // Requeued: retried on the next run (and it fails again, once).
    let requeued = client(&app)
        .retry_session(pb::RetrySessionRequest {
            processor: "usage".into(),
            session: "bob/broken.jsonl".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(
        (requeued.status, requeued.attempts),
        (pb::SessionStatus::Failed as i32, 0)
    );
    let retried = run(&app, "usage").await.unwrap();
    assert_eq!(retried.failed, 1);
    assert_eq!(broken(states(&app, "usage").await).attempts, 1);

    // Fixed content gets a fresh start and is processed.
    root.write(
        "bob/broken.jsonl",
        &assistant(
            "msg_9",
            "req_9",
            "claude-sonnet-4",
            "2026-03-15T10:00:00Z",
            [7, 7, 7, 7],
        ),
    );
    let fixed = run(&app, "usage").await.unwrap();
    assert_eq!((fixed.processed, fixed.failed), (1, 0));
    assert_eq!(
        broken(states(&app, "usage").await).status,
        pb::SessionStatus::Processed as i32
    );

    let mut c = client(&app);
    let processed = c
        .retry_session(pb::RetrySessionRequest {
            processor: "usage".into(),
            session: "alice/s1.jsonl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(processed.code(), Code::FailedPrecondition);
    let missing = c
        .retry_session(pb::RetrySessionRequest {
            processor: "usage".into(),
            session: "alice/nope.jsonl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    for bad in ["../etc/passwd", "alice", "alice/x.txt", "a/./c.jsonl"] {
        let err = c
            .retry_session(pb::RetrySessionRequest {
                processor: "usage".into(),
                session: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
}

#[tokio::test]
async fn symlinks_invalid_users_and_a_missing_root_are_reported_not_followed() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    basic_corpus(&root);
    let outside = SessionRoot::new();
    outside.write(
        "secret.jsonl",
        &assistant(
            "msg_x",
            "req_x",
            "m",
            "2026-03-14T10:00:00Z",
            [9999, 9999, 0, 0],
        ),
    );
    std::os::unix::fs::symlink(
        outside.path.join("secret.jsonl"),
        root.path.join("alice/escape.jsonl"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside.path, root.path.join("mallory")).unwrap();
    root.write(
        "not valid!/s.jsonl",
        &assistant(
            "msg_y",
            "req_y",
            "m",
            "2026-03-14T10:00:00Z",
            [5000, 0, 0, 0],
        ),
    );
    let app = TestApp::spawn_with(args(&db, &root.path)).await;

    let stats = run(&app, "usage").await.unwrap();
    assert_eq!(stats.scanned, 3);
    let skipped = stats.skipped_entries.join("\n");
    assert!(skipped.contains("alice/escape.jsonl: symlink"), "{skipped}");
    assert!(skipped.contains("mallory: symlink"), "{skipped}");
    assert!(skipped.contains("not valid!"), "{skipped}");
    assert_eq!(
        usage(&app, pb::UsageGrouping::User, "")
            .await
            .totals
            .unwrap()
            .input_tokens,
        111
    );

    // The root itself missing: a clear error in the stats, and the server carries on.
    let db2 = TestDb::new();
    let app2 = TestApp::spawn_with(args(&db2, Path::new("/nonexistent/fleetcare-sessions"))).await;
    let stats = run(&app2, "usage").await.unwrap();
    assert!(
        stats.root_error.contains("/nonexistent/fleetcare-sessions"),
        "{}",
        stats.root_error
    );
    assert_eq!(stats.scanned, 0);
    assert!(run(&app2, "usage").await.is_ok(), "the lock was released");
}

fn big_corpus(root: &SessionRoot, files: usize) {
    for i in 0..files {
        root.write(
            &format!("user{}/s{i}.jsonl", i % 10),
            &assistant(
                &format!("msg_{i}"),
                &format!("req_{i}"),
                "claude-sonnet-4",
                "2026-03-14T10:00:00Z",
                [1, 1, 1, 1],
            ),
        );
    }
}

/// Holds the runs of [`Gated`] processors open: each file waits for a permit.
pub struct Gate {
    permits: Semaphore,
    entered: Semaphore,
}

impl Gate {
    pub fn closed() -> Arc<Gate> {
        Arc::new(Gate {
            permits: Semaphore::new(0),
            entered: Semaphore::new(0),
        })
    }

    /// Lets `n` more files through.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    pub fn open(&self) {
        self.permits.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Returns once `n` more files have reached the gate.
    pub async fn entered(&self, n: u32) {
        tokio::time::timeout(Duration::from_secs(30), self.entered.acquire_many(n))
            .await
            .expect("files reach the gate")
            .unwrap()
            .forget();
    }
}

/// A usage processor that waits at its gate before writing each file.
pub struct Gated {
    pub name: &'static str,
    pub gate: Arc<Gate>,
}

#[async_trait::async_trait]
impl fleetcare::processors::SessionProcessor for Gated {
    fn name(&self) -> &'static str {
        self.name
    }

    fn version(&self) -> i32 {
        1
    }

    async fn process(
        &self,
        file: &fleetcare::domain::pipeline::SessionFile,
        content: Arc<Vec<u8>>,
        sink: &mut dyn fleetcare::storage::SessionSink,
    ) -> Result<fleetcare::processors::Processed, fleetcare::processors::ProcessError> {
        self.gate.entered.add_permits(1);
        self.gate.permits.acquire().await.unwrap().forget();
        let entries = fleetcare::domain::transcript::extract_usage(&content).entries;
        let items = entries.len() as i64;
        sink.replace_usage(file, entries).await?;
        Ok(fleetcare::processors::Processed {
            items,
            lines_skipped: 0,
        })
    }
}

/// The built-in processors plus gated ones, unscheduled unless `interval` is set.
pub fn with_gated(gated: &[(&'static str, &Arc<Gate>)], interval: Duration) -> Vec<Registration> {
    let mut processors = fleetcare::processors::registry();
    for (name, gate) in gated {
        processors.push(Registration {
            processor: Arc::new(Gated {
                name,
                gate: Arc::clone(gate),
            }),
            default_interval: interval,
        });
    }
    processors
}

#[tokio::test]
async fn a_processor_never_runs_twice_at_once_on_one_server_or_across_two() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    big_corpus(&root, 5);
    let gate = Gate::closed();
    let one = TestApp::spawn_with_processors(
        args(&db, &root.path),
        with_gated(&[("gated", &gate)], Duration::ZERO),
    )
    .await;
    // The embedded store is single-node: a second server on its file is
    // refused, and the one server is the whole cluster.
    let two = if sqlite_backend() {
        let refused = fleetcare::startup::Application::build(
            args(&db, &root.path),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(refused, Err(fleetcare::error::Error::FailedPrecondition(_))),
            "a second server on the SQLite file is refused"
        );
        None
    } else {
        Some(
            TestApp::spawn_with_processors(
                args(&db, &root.path),
                with_gated(&[("gated", &gate)], Duration::ZERO),
            )
            .await,
        )
    };

    let first = tokio::spawn({
        let mut c = client(&one);
        async move {
            c.run_processor(pb::RunProcessorRequest {
                name: "gated".into(),
            })
            .await
        }
    });
    gate.entered(1).await;
    let here = run(&one, "gated").await.unwrap_err();
    assert_eq!(
        (here.code(), reason(&here).as_str()),
        (Code::Aborted, "PROCESSOR_RUNNING")
    );
    assert!(here.message().contains("this server"), "{}", here.message());
    if let Some(two) = &two {
        let there = run(two, "gated").await.unwrap_err();
        assert_eq!(
            (there.code(), reason(&there).as_str()),
            (Code::Aborted, "PROCESSOR_RUNNING")
        );
        assert!(
            there.message().contains("another server"),
            "{}",
            there.message()
        );
    }
    let two = two.as_ref().unwrap_or(&one);
    let listed = client(two)
        .list_processors(pb::ListProcessorsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .processors
            .iter()
            .any(|p| p.name == "gated" && p.running),
        "the other server sees it running"
    );
    // Other processors are not blocked.
    run(two, "errors").await.unwrap();

    gate.open();
    let stats = first.await.unwrap().unwrap().into_inner().stats.unwrap();
    assert_eq!(stats.processed, 5);
    // Released: the other server can run it now, and finds nothing to do.
    let after = run(two, "gated").await.unwrap();
    assert_eq!((after.processed, after.files_hashed), (0, 0));
}

#[tokio::test]
async fn the_lock_is_released_when_a_server_stops_mid_run() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    big_corpus(&root, 6);
    let gate = Gate::closed();
    let one = TestApp::spawn_with_processors(
        args(&db, &root.path),
        with_gated(&[("gated", &gate)], Duration::ZERO),
    )
    .await;
    let spawn_two = || {
        TestApp::spawn_with_processors(
            args(&db, &root.path),
            with_gated(&[("gated", &gate)], Duration::ZERO),
        )
    };
    // SQLite is single-node: the second server starts on the file once the
    // first has stopped (and so proves the stopped one let go of it).
    let two = if sqlite_backend() {
        None
    } else {
        Some(spawn_two().await)
    };
    let first = tokio::spawn({
        let mut c = client(&one);
        async move {
            c.run_processor(pb::RunProcessorRequest {
                name: "gated".into(),
            })
            .await
        }
    });
    // One file through, the next held at the gate when the server stops.
    gate.release(1);
    gate.entered(2).await;
    one.stop().await;
    let interrupted = first.await.unwrap().unwrap().into_inner().stats.unwrap();
    assert!(
        interrupted.root_error.contains("shutdown"),
        "{interrupted:?}"
    );
    assert!(interrupted.processed < 6, "{interrupted:?}");
    let two = match two {
        Some(two) => two,
        None => spawn_two().await,
    };
    // Whatever one committed stays; two picks up the rest at once.
    gate.open();
    let stats = run(&two, "gated").await.unwrap();
    assert_eq!(stats.processed + interrupted.processed, 6, "{stats:?}");
    let total = usage(&two, pb::UsageGrouping::User, "")
        .await
        .totals
        .unwrap();
    assert_eq!(total.messages, 6, "every session counted exactly once");
}

#[tokio::test]
async fn the_scheduler_runs_each_processor_on_its_cadence() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    basic_corpus(&root);
    let mut a = args(&db, &root.path);
    a.pipeline.pipeline_interval_usage = Duration::from_millis(300);
    let app = TestApp::spawn_with(a).await;
    let last_run = || async {
        let list = client(&app)
            .list_processors(pb::ListProcessorsRequest {})
            .await
            .unwrap()
            .into_inner();
        let usage = list
            .processors
            .iter()
            .find(|p| p.name == "usage")
            .unwrap()
            .clone();
        let errors = list
            .processors
            .iter()
            .find(|p| p.name == "errors")
            .unwrap()
            .clone();
        (usage, errors)
    };
    let first = eventually(Duration::from_secs(20), "a scheduled run", || async {
        last_run().await.0.last_run_at
    })
    .await;
    let later = eventually(Duration::from_secs(20), "another scheduled run", || async {
        last_run()
            .await
            .0
            .last_run_at
            .filter(|t| (t.seconds, t.nanos) > (first.seconds, first.nanos))
    })
    .await;
    assert!((later.seconds, later.nanos) > (first.seconds, first.nanos));
    let (usage_info, errors_info) = last_run().await;
    assert_eq!(usage_info.interval.unwrap().nanos, 300_000_000);
    assert!(
        errors_info.last_run_at.is_none(),
        "interval 0 is never scheduled"
    );
    assert_eq!(
        usage(&app, pb::UsageGrouping::User, "")
            .await
            .totals
            .unwrap()
            .messages,
        3
    );
}

async fn next_progress(
    progress: &mut tonic::Streaming<pb::WatchRunResponse>,
) -> Option<pb::WatchRunResponse> {
    tokio::time::timeout(Duration::from_secs(20), progress.message())
        .await
        .expect("progress within 20 s")
        .unwrap()
}

#[tokio::test]
async fn watch_run_reports_progress_to_the_end() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    big_corpus(&root, 4);
    let gate = Gate::closed();
    let app = TestApp::spawn_with_processors(
        args(&db, &root.path),
        with_gated(&[("gated", &gate)], Duration::ZERO),
    )
    .await;
    let mut progress = client(&app)
        .watch_run(pb::WatchRunRequest {
            name: "gated".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let running = tokio::spawn({
        let mut c = client(&app);
        async move {
            c.run_processor(pb::RunProcessorRequest {
                name: "gated".into(),
            })
            .await
        }
    });
    // One file through: the stream says so while the run is still under way.
    gate.release(1);
    let mut seen = Vec::new();
    loop {
        let msg = next_progress(&mut progress)
            .await
            .expect("the run is not over");
        seen.push(msg.clone());
        if msg.files_done == 1 {
            assert!(!msg.finished);
            assert_eq!(msg.files_total, 4);
            break;
        }
    }
    gate.open();
    while let Some(msg) = next_progress(&mut progress).await {
        seen.push(msg);
    }
    let stats = running.await.unwrap().unwrap().into_inner().stats.unwrap();
    let last = seen.last().unwrap();
    assert!(last.finished);
    assert_eq!((last.files_total, last.files_done), (4, 4));
    assert_eq!(last.stats.as_ref().unwrap().processed, stats.processed);
    assert_eq!(stats.processed, 4);
    assert!(
        seen.windows(2).all(|w| w[0].files_done <= w[1].files_done),
        "progress never goes back"
    );
    assert_eq!(seen.iter().filter(|m| m.finished).count(), 1);

    let mut c = client(&app);
    assert_eq!(run(&app, "nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        run(&app, "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = c
        .get_usage(pb::GetUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_usage(pb::GetUsageRequest {
            group_by: 1,
            user: "../x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn transcript_errors_join_the_healing_history_once() {
    use fleetcare::proto::v1::healing_service_client::HealingServiceClient;
    let db = TestDb::new();
    let root = SessionRoot::new();
    let tool_error = r#"{"type":"user","uuid":"u-1","sessionId":"s","timestamp":"2026-03-14T10:00:00Z","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","is_error":true,"content":"Command failed: execution of npm test failed"}]}}"#;
    let api_error = r#"{"type":"assistant","uuid":"u-2","sessionId":"s","timestamp":"2026-03-14T10:01:00Z","isApiErrorMessage":true,"message":{"id":"m","model":"<synthetic>","role":"assistant","content":[{"type":"text","text":"API Error: 429 rate limit exceeded"}],"usage":{"input_tokens":0,"output_tokens":0}}}"#;
    root.write("carol/s1.jsonl", &format!("{tool_error}\n{api_error}\n"));
    let app = TestApp::spawn_with(args(&db, &root.path)).await;

    let stats = run(&app, "errors").await.unwrap();
    assert_eq!((stats.processed, stats.items_extracted), (1, 2));
    let mut healing = HealingServiceClient::new(app.channel.clone());
    let events = healing
        .list_error_events(pb::ListErrorEventsRequest {
            agent_id: "carol".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let mut kinds: Vec<(i32, String)> = events
        .iter()
        .map(|e| (e.error_type, e.message.clone()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            (
                pb::ErrorType::ExecutionFailure as i32,
                "Command failed: execution of npm test failed".to_string()
            ),
            (
                pb::ErrorType::ResourceExhaustion as i32,
                "API Error: 429 rate limit exceeded".to_string()
            ),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.context.get("session").map(String::as_str) == Some("carol/s1.jsonl"))
    );

    // Reprocessing the changed file does not duplicate what was already recorded.
    let another = tool_error
        .replace("u-1", "u-3")
        .replace("10:00:00Z", "10:02:00Z");
    root.write(
        "carol/s1.jsonl",
        &format!("{tool_error}\n{api_error}\n{another}\n"),
    );
    let again = run(&app, "errors").await.unwrap();
    assert_eq!(again.processed, 1);
    let stats = healing
        .get_healing_statistics(pb::GetHealingStatisticsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.total_errors, 3,
        "the two already recorded are kept once, the new line added"
    );
}

/// A processor that panics on sessions of user `boom` and counts others.
struct Flaky;

#[async_trait::async_trait]
impl fleetcare::processors::SessionProcessor for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    fn version(&self) -> i32 {
        1
    }

    async fn process(
        &self,
        file: &fleetcare::domain::pipeline::SessionFile,
        _content: std::sync::Arc<Vec<u8>>,
        _sink: &mut dyn fleetcare::storage::SessionSink,
    ) -> Result<fleetcare::processors::Processed, fleetcare::processors::ProcessError> {
        if file.user == "boom" {
            panic!("processor bug on {}", file.path);
        }
        Ok(fleetcare::processors::Processed {
            items: 1,
            lines_skipped: 0,
        })
    }
}

#[tokio::test]
async fn a_panicking_processor_fails_its_session_and_releases_the_lock() {
    use fleetcare::runtime::pipeline::{Pipeline, PipelineConfig};
    let db = TestDb::new();
    let root = SessionRoot::new();
    basic_corpus(&root);
    root.write("boom/s.jsonl", "{}\n");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let database = test_args(&db.url).database.store_options().unwrap();
    let store = fleetcare::storage::Stores::open(&database, shutdown.clone())
        .await
        .unwrap()
        .pipeline;
    let pipeline = Pipeline::new(
        store.clone(),
        PipelineConfig {
            root: root.path.clone(),
            retry: fleetcare::domain::pipeline::RetryPolicy::default(),
            intervals: Default::default(),
            parallelism: 2,
            run_retention: fleetcare::runtime::pipeline::DEFAULT_RUN_RETENTION,
            clock: fleetcare::runtime::clock::Clock::system(),
        },
        vec![fleetcare::processors::Registration {
            processor: std::sync::Arc::new(Flaky),
            default_interval: Duration::ZERO,
        }],
        shutdown.clone(),
    );
    let stats = pipeline
        .run(
            "flaky",
            fleetcare::domain::pipeline_runs::RunTrigger::scheduler(),
        )
        .await
        .unwrap();
    assert_eq!((stats.processed, stats.failed), (3, 1));
    assert!(
        stats.errors[0].1.contains("processor bug on boom/s.jsonl"),
        "{:?}",
        stats.errors
    );
    // Neither the in-process guard nor the advisory lock outlived the run.
    assert!(!pipeline.is_running_here("flaky"));
    assert!(!store.processor_locked("flaky").await.unwrap());
    let again = pipeline
        .run(
            "flaky",
            fleetcare::domain::pipeline_runs::RunTrigger::scheduler(),
        )
        .await
        .unwrap();
    assert_eq!(
        again.processed, 0,
        "the failed session waits for its retry time"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn scheduled_processors_run_in_parallel_and_are_never_relaunched_while_running() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    big_corpus(&root, 3);
    let (a, b) = (Gate::closed(), Gate::closed());
    let app = TestApp::spawn_with_processors(
        args(&db, &root.path),
        with_gated(
            &[("gated_a", &a), ("gated_b", &b)],
            Duration::from_millis(50),
        ),
    )
    .await;
    // Both scheduled runs are held at their gates at once: neither waits for the other.
    a.entered(1).await;
    b.entered(1).await;
    let list = client(&app)
        .list_processors(pb::ListProcessorsRequest {})
        .await
        .unwrap()
        .into_inner();
    for name in ["gated_a", "gated_b"] {
        assert!(
            list.processors.iter().any(|p| p.name == name && p.running),
            "{name} running: {list:?}"
        );
    }
    // While the scheduled run is under way, another start is refused.
    let err = run(&app, "gated_a").await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Aborted, "PROCESSOR_RUNNING")
    );
    a.open();
    b.open();
    // Both write the same files' usage (concurrent transactions on the same
    // messages): each message still counts once.
    eventually(Duration::from_secs(30), "both runs finished", || async {
        let mut done = true;
        for name in ["gated_a", "gated_b"] {
            let states = states(&app, name).await;
            done &= states.len() == 3
                && states
                    .iter()
                    .all(|s| s.status == pb::SessionStatus::Processed as i32);
        }
        done.then_some(())
    })
    .await;
    let total = usage(&app, pb::UsageGrouping::Session, "").await;
    assert_eq!(total.totals.unwrap().messages, 3);
    assert_eq!(total.rows.len(), 3);
}
