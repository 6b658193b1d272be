//! The usage rollups against a recount from the files: random sequences of
//! file creations, rewrites, appends and deletions across users, with message
//! keys shared between files (resumed sessions), each followed by a `usage`
//! run on the real server; after each, GetUsage by every grouping (and over a
//! day-aligned and a non-aligned range, and for one user) equals ccusage's
//! rule applied from scratch to what every file last held (a deleted
//! transcript keeps what was derived from it). And two batches committed
//! at once by concurrent transactions over shared messages (on SQLite, one
//! after the other on its single writer) count each once.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, TimeZone, Utc};
use fleetcare::domain::pipeline::{self, SessionFile};
use fleetcare::domain::transcript::{UsageEntry, extract_usage};
use fleetcare::domain::usage::{self, MessageCopy, UsageGrouping, UsageQuery, UsageRow};
use fleetcare::proto::v1 as pb;
use fleetcare::storage::{PipelineStore, SessionOutput, SessionWrite, Stores};
use proptest::prelude::*;

use crate::helpers::{TestApp, TestDb};
use crate::pipeline::{SessionRoot, client, run};

const FILES: [&str; 5] = [
    "u0/a.jsonl",
    "u0/b.jsonl",
    "u1/c.jsonl",
    "u1/d.jsonl",
    "u0/e.jsonl",
];

/// One line: a message key (or none: no requestId), its day and minute.
#[derive(Debug, Clone)]
struct Line {
    message: Option<u8>,
    day: u8,
    minute: u8,
    tokens: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize, Vec<Line>),
    Append(usize, Vec<Line>),
    Delete(usize),
}

fn line() -> impl Strategy<Value = Line> {
    (
        prop::option::weighted(0.85, 0u8..10),
        0u8..3,
        0u8..60,
        1u8..50,
    )
        .prop_map(|(message, day, minute, tokens)| Line {
            message,
            day,
            minute,
            tokens,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let file = 0..FILES.len();
    prop_oneof![
        4 => (file.clone(), prop::collection::vec(line(), 0..6)).prop_map(|(f, l)| Op::Write(f, l)),
        3 => (file.clone(), prop::collection::vec(line(), 1..4)).prop_map(|(f, l)| Op::Append(f, l)),
        1 => file.prop_map(Op::Delete),
    ]
}

fn render(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| {
            let ts = format!("2026-03-{:02}T{:02}:{:02}:00Z", 14 + l.day, 6 * l.day + 1, l.minute);
            let model = ["claude-sonnet-4", "claude-opus-4", ""][usize::from(l.tokens % 3)];
            let model = if model.is_empty() {
                String::new()
            } else {
                format!(r#""model":"{model}","#)
            };
            let (id, request) = match l.message {
                Some(k) => (format!("msg_{k}"), format!(r#""requestId":"req_{k}","#)),
                None => (format!("msg_x{}", l.minute), String::new()),
            };
            let t = u64::from(l.tokens);
            format!(
                r#"{{"type":"assistant","timestamp":"{ts}",{request}"message":{{"id":"{id}",{model}"role":"assistant","usage":{{"input_tokens":{t},"output_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{}}}}}}}"#,
                t * 2,
                t * 3,
                t * 5
            ) + "\n"
        })
        .collect()
}

fn time(t: Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.unwrap();
    Utc.timestamp_opt(t.seconds, t.nanos as u32).unwrap()
}

fn from_pb(r: &pb::UsageRow) -> UsageRow {
    UsageRow {
        key: r.key.clone(),
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        cache_creation_tokens: r.cache_creation_tokens,
        cache_read_tokens: r.cache_read_tokens,
        messages: r.messages,
        first_at: time(r.first_at),
        last_at: time(r.last_at),
        models: r.models.clone(),
    }
}

fn grouping_pb(g: UsageGrouping) -> pb::UsageGrouping {
    match g {
        UsageGrouping::Day => pb::UsageGrouping::Day,
        UsageGrouping::Session => pb::UsageGrouping::Session,
        UsageGrouping::Model => pb::UsageGrouping::Model,
        UsageGrouping::User => pb::UsageGrouping::User,
    }
}

async fn check(app: &TestApp, processed: &BTreeMap<&str, String>, step: usize) {
    let copies: Vec<MessageCopy> = processed
        .iter()
        .flat_map(|(path, content)| {
            let (user, file) = path.split_once('/').unwrap();
            let session = file.strip_suffix(".jsonl").unwrap();
            MessageCopy::from_file(
                path,
                user,
                session,
                &extract_usage(content.as_bytes()).entries,
            )
        })
        .collect();
    let day = |d: u32| Utc.with_ymd_and_hms(2026, 3, d, 0, 0, 0).unwrap();
    let ranges = [
        (None, None),
        (Some(day(15)), Some(day(16))),
        (Some(day(14) + chrono::Duration::hours(12)), None),
        // Bounds inside days: the cut days' messages, through their cells.
        (None, Some(day(15) + chrono::Duration::minutes(7 * 60 + 30))),
        (
            Some(day(14) + chrono::Duration::minutes(80)),
            Some(day(14) + chrono::Duration::minutes(100)),
        ),
        (
            Some(day(14) + chrono::Duration::minutes(90)),
            Some(day(16) + chrono::Duration::minutes(13 * 60 + 30)),
        ),
    ];
    for group_by in [
        UsageGrouping::Day,
        UsageGrouping::Session,
        UsageGrouping::Model,
        UsageGrouping::User,
    ] {
        for (since, until) in ranges {
            for user in [None, Some("u1")] {
                let query = UsageQuery {
                    group_by,
                    since,
                    until,
                    user: user.map(Into::into),
                };
                let got = client(app)
                    .get_usage(pb::GetUsageRequest {
                        group_by: grouping_pb(group_by) as i32,
                        since: since.map(fleetcare::proto::timestamp),
                        until: until.map(fleetcare::proto::timestamp),
                        user: user.unwrap_or_default().into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let rows: Vec<UsageRow> = got.rows.iter().map(from_pb).collect();
                let expected = usage::recount(&copies, &query);
                assert_eq!(rows, expected, "step {step}, {query:?}");
                assert_eq!(
                    got.totals.as_ref().map(from_pb),
                    usage::totals(&expected),
                    "step {step}, totals of {query:?}"
                );
            }
        }
    }
}

async fn scenario(ops: Vec<Op>) {
    let db = TestDb::new();
    let root = SessionRoot::new();
    let mut args = crate::helpers::test_args(&db.url);
    args.pipeline.session_dir = root.path.clone();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    let app = TestApp::spawn_with(args).await;
    let mut on_disk: BTreeMap<&str, Vec<Line>> = BTreeMap::new();
    // What each file held when last processed: a deleted file keeps it.
    let mut processed: BTreeMap<&str, String> = BTreeMap::new();
    let base = SystemTime::now() - Duration::from_secs(24 * 3600);
    for (step, op) in ops.into_iter().enumerate() {
        let path = match &op {
            Op::Write(f, _) | Op::Append(f, _) | Op::Delete(f) => FILES[*f],
        };
        match op {
            Op::Write(_, lines) => {
                on_disk.insert(path, lines);
            }
            Op::Append(_, lines) => on_disk.entry(path).or_default().extend(lines),
            Op::Delete(_) => {
                on_disk.remove(path);
                let _ = std::fs::remove_file(root.path.join(path));
            }
        }
        if let Some(lines) = on_disk.get(path) {
            let content = render(lines);
            root.write(path, &content);
            // A distinct mtime per write, well in the past: never the racy case.
            std::fs::File::options()
                .write(true)
                .open(root.path.join(path))
                .unwrap()
                .set_modified(base + Duration::from_secs(step as u64 + 1))
                .unwrap();
            processed.insert(path, content);
        }
        let stats = run(&app, "usage").await.unwrap();
        assert_eq!(
            (stats.failed, stats.root_error.as_str()),
            (0, ""),
            "{stats:?}"
        );
        check(&app, &processed, step).await;
    }
    app.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rollups_equal_a_recount_after_random_file_changes(ops in prop::collection::vec(op(), 1..8)) {
        tokio::runtime::Runtime::new().unwrap().block_on(scenario(ops));
    }
}

/// One file's entries in one round of the concurrent test: 8 of 12 shared
/// messages, at times (and so with a file order) that change every round, and
/// tokens that say which file's copy counted.
fn round_entries(file: u32, round: u32) -> Vec<UsageEntry> {
    let base = Utc.with_ymd_and_hms(2026, 3, 14, 10, 0, 0).unwrap();
    (0..12u32)
        .filter(|k| !(k + file + round).is_multiple_of(3))
        .enumerate()
        .map(|(line, k)| UsageEntry {
            line_no: line as u32 + 1,
            timestamp: base
                + chrono::Duration::minutes(i64::from((file * 7 + round * 5 + k * 11) % 50))
                + chrono::Duration::days(i64::from(k % 2)),
            message_id: Some(format!("msg_{k}")),
            sidechain: false,
            model: Some(["claude-sonnet-4", "claude-opus-4"][(file % 2) as usize].into()),
            input_tokens: u64::from(k * 100 + file),
            output_tokens: u64::from(round + 1),
            cache_creation_tokens: 0,
            cache_read_tokens: u64::from(k),
        })
        .collect()
}

async fn commit_retrying(
    store: &dyn PipelineStore,
    writes: &[SessionWrite],
) -> Result<u32, fleetcare::error::Error> {
    let mut conflicts = 0;
    loop {
        match store.commit_sessions(writes).await {
            Ok(()) => return Ok(conflicts),
            Err(fleetcare::error::Error::Conflict(_)) if conflicts < 50 => conflicts += 1,
            Err(error) => return Err(error),
        }
    }
}

#[tokio::test]
async fn concurrent_batches_sharing_messages_count_each_message_once() {
    let db = TestDb::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let database = crate::helpers::test_args(&db.url)
        .database
        .store_options()
        .unwrap();
    let stores = Stores::open(&database, shutdown.clone()).await.unwrap();
    let store = stores.pipeline.as_ref();
    let now = store.now().await.unwrap();
    let mut last: BTreeMap<String, (SessionFile, Vec<UsageEntry>)> = BTreeMap::new();
    for round in 0..6 {
        // Two batches of four files each, written at once by two transactions.
        let batch = |side: u32| -> Vec<SessionWrite> {
            (side * 4..side * 4 + 4)
                .map(|f| {
                    let user = format!("u{}", f % 2);
                    let file = SessionFile {
                        path: format!("{user}/f{f}.jsonl"),
                        session: format!("f{f}"),
                        user,
                        size: 1,
                        mtime_ns: i64::from(round),
                    };
                    let entries = round_entries(f, round);
                    let state =
                        pipeline::processed("usage", &file, "sha", 1, entries.len() as i64, now);
                    SessionWrite {
                        file,
                        output: SessionOutput {
                            usage: Some(entries),
                            transcript_errors: None,
                        },
                        state,
                    }
                })
                .collect()
        };
        let (a, b) = (batch(0), batch(1));
        let (ra, rb) = tokio::join!(commit_retrying(store, &a), commit_retrying(store, &b));
        ra.unwrap();
        rb.unwrap();
        for w in a.into_iter().chain(b) {
            let entries = w.output.usage.unwrap();
            last.insert(w.file.path.clone(), (w.file, entries));
        }
        let copies: Vec<MessageCopy> = last
            .values()
            .flat_map(|(f, e)| MessageCopy::from_file(&f.path, &f.user, &f.session, e))
            .collect();
        for group_by in [
            UsageGrouping::Day,
            UsageGrouping::Session,
            UsageGrouping::Model,
            UsageGrouping::User,
        ] {
            let query = UsageQuery {
                group_by,
                since: None,
                until: None,
                user: None,
            };
            let got = store.usage(&query).await.unwrap();
            assert_eq!(
                got,
                usage::recount(&copies, &query),
                "round {round}, {query:?}"
            );
        }
        assert_eq!(
            store.session_states("usage").await.unwrap().len(),
            8,
            "round {round}"
        );
    }
    shutdown.cancel();
}

/// The migration to message keys (20270101000001): usage stored by the
/// earlier code (copies keyed `<len>:<message id>:<request id>`, the first
/// file's copy counted) is rekeyed by message id, the counted copies and the
/// cells are rebuilt by the new rule, and GetUsage answers from them.
#[tokio::test]
async fn usage_stored_under_the_old_keys_is_rekeyed_and_recounted() {
    use sqlx::migrate::Migrator;
    use sqlx::{ConnectOptions, Connection};
    const FIRST_NEW: i64 = 20270101000001;
    fn before(m: &Migrator) -> Migrator {
        Migrator {
            migrations: m
                .migrations
                .iter()
                .filter(|m| m.version < FIRST_NEW)
                .cloned()
                .collect::<Vec<_>>()
                .into(),
            ..Migrator::DEFAULT
        }
    }
    // One message (a non-ASCII id: the key's length is in bytes) under two
    // request ids, in two files (the larger copy in the later file), and a
    // line without ids; the old totals counted the message twice.
    let at = Utc.with_ymd_and_hms(2026, 3, 14, 10, 0, 0).unwrap();
    let id = "msg_é1";
    let rows: [(&str, i32, String, i64); 3] = [
        ("u0/a.jsonl", 1, format!("{}:{id}:req_a", id.len()), 10),
        ("u0/b.jsonl", 1, format!("{}:{id}:req_b", id.len()), 30),
        ("u0/a.jsonl", 3, "line:u0/a.jsonl:3".to_owned(), 5),
    ];
    let db = TestDb::new();
    if let Some(dir) = &db.dir {
        std::fs::create_dir_all(dir).unwrap();
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("fleetcare.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        before(&fleetcare::storage::sqlite::MIGRATOR)
            .run(&mut conn)
            .await
            .unwrap();
        for (path, line, key, input) in &rows {
            sqlx::query(
                "INSERT INTO usage_entries (path, user_name, session_id, line_no, file_first_at,
                     model, occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                     cache_read_tokens, dedup_key)
                 VALUES (?, 'u0', ?, ?, ?, 'claude-sonnet-4', ?, ?, 1, 0, 0, ?)",
            )
            .bind(path)
            .bind(&path[3..4])
            .bind(line)
            .bind(at.timestamp_micros())
            .bind(at.timestamp_micros())
            .bind(input)
            .bind(key)
            .execute(&mut conn)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO usage_messages (dedup_key, path, line_no, file_first_at, user_name,
                     session_id, model, occurred_at, day, input_tokens, output_tokens,
                     cache_creation_tokens, cache_read_tokens)
                 VALUES (?, ?, ?, ?, 'u0', ?, 'claude-sonnet-4', ?, '2026-03-14', ?, 1, 0, 0)",
            )
            .bind(key)
            .bind(path)
            .bind(line)
            .bind(at.timestamp_micros())
            .bind(&path[3..4])
            .bind(at.timestamp_micros())
            .bind(input)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO usage_cells VALUES ('2026-03-14', 'u0', 'a', 'claude-sonnet-4', 45, 3, 0, 0, 3, ?, ?)",
        )
        .bind(at.timestamp_micros())
        .bind(at.timestamp_micros())
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    } else {
        let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
        let mut admin = options
            .clone()
            .database("postgres")
            .connect()
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
            .execute(&mut admin)
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect_with(options).await.unwrap();
        before(&fleetcare::storage::postgres::MIGRATOR)
            .run(&pool)
            .await
            .unwrap();
        for (path, line, key, input) in &rows {
            sqlx::query(
                "INSERT INTO usage_entries (path, user_name, session_id, line_no, file_first_at,
                     model, occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                     cache_read_tokens, dedup_key)
                 VALUES ($1, 'u0', $2, $3, $4, 'claude-sonnet-4', $4, $5, 1, 0, 0, $6)",
            )
            .bind(path)
            .bind(&path[3..4])
            .bind(line)
            .bind(at)
            .bind(input)
            .bind(key)
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO usage_messages (dedup_key, path, line_no, file_first_at, user_name,
                     session_id, model, occurred_at, day, input_tokens, output_tokens,
                     cache_creation_tokens, cache_read_tokens)
                 VALUES ($1, $2, $3, $4, 'u0', $5, 'claude-sonnet-4', $4, '2026-03-14', $6, 1, 0, 0)",
            )
            .bind(key)
            .bind(path)
            .bind(line)
            .bind(at)
            .bind(&path[3..4])
            .bind(input)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO usage_cells VALUES ('2026-03-14', 'u0', 'a', 'claude-sonnet-4', 45, 3, 0, 0, 3, $1, $1)",
        )
        .bind(at)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }

    // The server applies the rest of the migrations at start.
    let app = TestApp::spawn_with(crate::helpers::test_args(&db.url)).await;
    let by_session = client(&app)
        .get_usage(pb::GetUsageRequest {
            group_by: pb::UsageGrouping::Session as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, i64, i64)> = by_session
        .rows
        .iter()
        .map(|r| (r.key.as_str(), r.input_tokens, r.messages))
        .collect();
    // The message once, through its larger copy (in b); the line alone in a.
    assert_eq!(got, [("u0/a", 5, 1), ("u0/b", 30, 1)]);
}
