//! `fleetcare copy`, at the table level: an SQLite store filled by SQL with
//! every table's awkward values (NULLs, JSON, unicode, microseconds, large
//! integers, keys shared across page boundaries) goes to Postgres and back to
//! a second SQLite file, and every row of every table reads back equal.

use std::process::Output;

use chrono::{DateTime, Utc};
use fleetcare::error::Error;
use fleetcare::storage::copy::{self, Bound, CopyReport, Row, TABLES};
use fleetcare::storage::{StoreLocation, StoreOptions};
use indicatif::ProgressBar;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, SqliteConnection};

use crate::helpers::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_fleetcare");

/// 2025-12-01T10:34:56.123456Z, in microseconds.
const T0: i64 = 1_764_585_296_123_456;
/// A revision past 2^53 (not exact as a float).
const BIG_REVISION: i64 = 9_007_199_254_740_993;
const BIG_EVENT_ID: i64 = 4_000_000_000;

fn location(db: &TestDb) -> StoreLocation {
    StoreLocation::parse(&db.url).unwrap()
}

fn sqlite_path(db: &TestDb) -> std::path::PathBuf {
    match location(db) {
        StoreLocation::Sqlite(path) => path,
        other => panic!("not sqlite: {other:?}"),
    }
}

/// Creates and migrates the store, then opens a plain connection on it.
async fn sqlite_conn(db: &TestDb) -> SqliteConnection {
    fleetcare::storage::migrate(&StoreOptions::for_url(&db.url).unwrap())
        .await
        .expect("migrate");
    SqliteConnectOptions::new()
        .filename(sqlite_path(db))
        .connect()
        .await
        .expect("connect sqlite")
}

async fn exec(conn: &mut SqliteConnection, sql: &str) {
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Rows in every table; returns how many per table.
async fn fill(db: &TestDb) -> Vec<(&'static str, u64)> {
    let mut c = sqlite_conn(db).await;
    let mut counts = Vec::new();

    let agent_ids: Vec<String> = (0..9)
        .map(|i| format!("agent-{i:02}"))
        .chain(["agent-ünï-ß-😀".to_owned()])
        .collect();
    for (i, id) in agent_ids.iter().enumerate() {
        let i = i as i64;
        let exhausted = i % 3 == 0;
        let claimed = i % 5 == 1;
        sqlx::query(
            "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(if exhausted { "EXHAUSTED" } else { "IDLE" })
        .bind(if i % 2 == 0 {
            r#"{"team": "plätform", "zone": "eu-1", "n": "7"}"#.to_owned()
        } else {
            "{}".to_owned()
        })
        .bind(T0 + i)
        .bind(T0 + i * 1_000_001)
        .bind(-1_000_000 + i) // before the epoch
        .bind(if i == 9 { BIG_REVISION } else { i + 1 })
        .bind(exhausted.then_some("RATE_LIMIT"))
        .bind(exhausted.then_some(T0 + 3_600_000_000))
        .bind(exhausted.then_some("retry-after"))
        .bind(exhausted.then_some("résumé at 2am ⏰"))
        // Cordoned with a reason, with an empty one, or schedulable (NULL).
        .bind(match i % 4 {
            1 => Some("disk failing ⚠"),
            2 => Some(""),
            _ => None,
        })
        // An active claim on some (its holder and key unusual text).
        .bind(claimed.then(|| format!("claim-{i}")))
        .bind(claimed.then_some("sched «ü»"))
        .bind(claimed.then_some(BIG_REVISION - i))
        .bind(claimed.then_some(""))
        .bind(claimed.then_some(T0 + 5))
        .bind(claimed.then_some(T0 + 30_000_005))
        // Quota pools on some, in an order that is not sorted.
        .bind(if i % 2 == 1 {
            r#"["acct-42/opus", "acct-42"]"#
        } else {
            "[]"
        })
        // Held by a pool on the exhausted ones of those (one released, with
        // its own exhaustion kept apart).
        .bind(if exhausted && i % 2 == 1 {
            r#"{"pools": {"acct-42": {"episode": 1775030000000000, "parked_at": 1775030000000001}, "acct-42/opus": {"episode": 1, "parked_at": 2, "released_at": 3}}, "own": {"reason": "RATE_LIMIT", "recovery_at": 1775030000000009, "source": "EXPLICIT", "hint": "own «ü»"}}"#
        } else {
            "{}"
        })
        .bind(exhausted && i % 2 == 1)
        .execute(&mut c)
        .await
        .unwrap();
    }
    counts.push(("agents", agent_ids.len() as u64));
    for i in 0..3_i64 {
        sqlx::query("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(format!("claim-{i}"))
            .bind(&agent_ids[i as usize])
            .bind("sched «ü»")
            .bind(if i == 0 {
                String::new()
            } else {
                format!("job-{i} ✓")
            })
            .bind(BIG_REVISION - i)
            .bind(if i == 2 { "ON_CALL" } else { "WORK" })
            .bind(T0 + i)
            .bind(T0 + i + 1_000_000)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("claims", 3));
    exec(
        &mut c,
        &format!("UPDATE revision_head SET head_revision = {BIG_REVISION}"),
    )
    .await;
    exec(&mut c, "UPDATE revision_retention SET pruned_through = 2").await;
    counts.push(("revision_head", 1));
    counts.push(("revision_retention", 1));

    let revisions: Vec<i64> = (3..=12).chain([BIG_REVISION]).collect();
    for (i, revision) in revisions.iter().enumerate() {
        sqlx::query("INSERT INTO transitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(revision)
            .bind(&agent_ids[i % agent_ids.len()])
            .bind((i > 0).then_some("IDLE"))
            .bind("BUSY")
            .bind(format!("cause {i} — «quoted»"))
            .bind(T0 + i as i64 * 7)
            .bind((i % 4 == 0).then_some("BILLING"))
            .bind((i % 4 == 0).then_some(T0 * 2))
            .bind(format!("caller «{i}»"))
            .bind((i % 3 == 1).then_some("acct-42/opus"))
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("transitions", revisions.len() as u64));
    for (i, name) in ["acct-42", "acct-42/opus"].iter().enumerate() {
        sqlx::query("INSERT INTO quota_pools VALUES (?, ?, ?)")
            .bind(name)
            .bind(format!(
                r#"{{"windows": {{"WEEKLY": {{"until": {}, "source": "OPERATOR", "hint": "parked by «ops»", "reported_by": "ops", "reported_at": {}}}}}, "canary": {{"agent_id": "agent-01", "released_at": {}}}, "episode": {}, "settled": {}}}"#,
                T0 + 99,
                T0 + i as i64,
                T0 + 100,
                T0,
                i == 1
            ))
            .bind(T0 + i as i64)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("quota_pools", 2));

    let event_ids = [1_i64, 2, 3, 5, 8, 13, BIG_EVENT_ID];
    for (i, id) in event_ids.iter().enumerate() {
        sqlx::query("INSERT INTO error_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(id)
            .bind(&agent_ids[i])
            .bind(format!("429 Too Many Requests 🚦 #{i}\nline two"))
            .bind(
                r#"{"status": 429, "headers": {"retry-after": "30"}, "ratio": 0.1,
                    "tiny": -1.5e-7, "list": [1, "two", null, true], "big": 12345678901234}"#,
            )
            .bind("RATE_LIMIT")
            .bind([0.1, 1.0, 0.0, 0.3333333333333333][i % 4])
            .bind((i % 2) as i64)
            .bind(((i + 1) % 2) as i64)
            .bind(T0 - i as i64)
            .bind((i % 3 == 0).then(|| format!("user/s{i}.jsonl")))
            .bind((i % 3 == 0).then(|| format!("line:{i}")))
            .bind(if i % 3 == 0 {
                "pipeline"
            } else {
                "agent-runner"
            })
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("error_events", event_ids.len() as u64));

    for (i, event) in [1_i64, 2, 5, 13, BIG_EVENT_ID].iter().enumerate() {
        let active = i == 4;
        sqlx::query(
            "INSERT INTO recovery_actions VALUES \
             (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(if active {
            BIG_EVENT_ID + 10
        } else {
            i as i64 + 1
        })
        .bind(event)
        .bind(&agent_ids[i])
        .bind("RATE_LIMIT")
        .bind("sig:ünï")
        .bind("BACKOFF")
        .bind("BACKOFF")
        .bind(r#"{"delay_ms": 30000, "jitter": 0.25}"#)
        .bind(i64::MAX)
        .bind(0.875)
        .bind(1e-300)
        .bind(i64::from(active))
        .bind("learned 🧠")
        .bind(if active { "ACTIVE" } else { "SUCCEEDED" })
        .bind(T0)
        .bind(T0 + 600_000_000)
        .bind((!active).then_some(T0 + 1))
        .bind((!active).then_some(i64::MIN + 1))
        .bind((!active).then_some("done"))
        .bind("alice")
        .bind(if active { "" } else { "bob" })
        .execute(&mut c)
        .await
        .unwrap();
    }
    counts.push(("recovery_actions", 5));

    for i in 0..4_i64 {
        sqlx::query("INSERT INTO healing_patterns VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind("RATE_LIMIT")
            .bind(if i < 2 { "sig:a" } else { "sig:ü" })
            .bind(["BACKOFF", "RESTART"][(i % 2) as usize])
            .bind(i * 1_000_000_000_000)
            .bind(i)
            .bind(123.456 * i as f64)
            .bind(T0 + i)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("healing_patterns", 4));

    for i in 0..3_i64 {
        sqlx::query(
            "INSERT INTO healing_decisions VALUES \
             (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(if i == 2 { BIG_EVENT_ID + 20 } else { i + 1 })
        .bind(i + 1)
        .bind(&agent_ids[i as usize])
        .bind(T0 + i)
        .bind(["PLANNED", "BRAKED", "DRY_RUN"][i as usize])
        .bind((i > 0).then_some("HEALING_BRAKE_UNHEALTHY_SHARE ü"))
        .bind("braked: group \"blué\" 🧯")
        .bind((i != 1).then_some("RESTART"))
        .bind((i == 0).then_some(i64::MAX))
        .bind(i64::from(u32::MAX))
        .bind(i)
        .bind((i > 0).then_some("blué"))
        .bind(100 - i)
        .bind(40 + i)
        .bind(i * 7)
        .bind(i * 3)
        .bind(2)
        .bind("alice")
        .execute(&mut c)
        .await
        .unwrap();
    }
    counts.push(("healing_decisions", 3));

    for (scope, reason) in [("fleet", "provider outage ☁"), ("group:blué", "bad config")] {
        sqlx::query("INSERT INTO healing_pauses VALUES (?, ?, ?, ?)")
            .bind(scope)
            .bind(reason)
            .bind("carol")
            .bind(T0 - 5)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("healing_pauses", 2));

    for (i, state) in ["CLOSED", "OPEN", "HALF_OPEN"].iter().enumerate() {
        sqlx::query("INSERT INTO healing_breakers VALUES (?, ?, ?, ?, ?, ?)")
            .bind("RATE_LIMIT")
            .bind(["BACKOFF", "RESTART", "RETRY"][i])
            .bind(state)
            .bind(i as i64 * 2)
            .bind((i > 0).then_some(T0 + i as i64))
            .bind(T0)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("healing_breakers", 3));

    for post in ["post-1", "post-2", "pöst-3"] {
        sqlx::query("INSERT INTO post_locks VALUES (?)")
            .bind(post)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("post_locks", 3));

    for i in 0..4_i64 {
        sqlx::query("INSERT INTO post_actions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(format!("key-{i}"))
            .bind("post-1")
            .bind(["comment", "edit", "thread", "comment"][i as usize])
            .bind(i % 3 + 1)
            .bind(["RUNNING", "SUCCEEDED", "FAILED", "SUCCEEDED"][i as usize])
            .bind((i % 2 == 1).then_some(r#"{"url": "https://example.com/ü", "ok": true}"#))
            .bind((i == 2).then_some("E_TIMEOUT"))
            .bind(i)
            .bind(T0 + i)
            .bind(T0 + i + 1)
            .bind((i == 0).then_some(T0 + 900_000_000))
            .bind("alice")
            .bind(if i == 0 { "" } else { "dora ✓" })
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("post_actions", 4));

    for i in 0..5_i64 {
        sqlx::query("INSERT INTO session_states VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(if i < 3 { "usage" } else { "errors" })
            .bind(format!("user-ü/s{i}.jsonl"))
            .bind("user-ü")
            .bind(i64::MAX - i)
            .bind(1_764_585_296_123_456_789 + i)
            .bind(T0 + i)
            .bind(format!("{:064x}", i))
            .bind(3)
            .bind((i != 1).then_some(T0 + 5))
            .bind(i * 1000)
            .bind(i)
            .bind((i == 1).then_some("unexpected EOF at line 3: «{»"))
            .bind(["PROCESSED", "FAILED", "PROCESSED", "DEAD", "PROCESSED"][i as usize])
            .bind((i == 1).then_some(T0 + 30_000_000))
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("session_states", 5));

    // (path, line_no) repeats, across the test's page boundaries.
    let entries: &[(&str, i64)] = &[
        ("a/1.jsonl", 1),
        ("a/1.jsonl", 2),
        ("a/1.jsonl", 2),
        ("a/1.jsonl", 2),
        ("a/1.jsonl", 2),
        ("a/1.jsonl", 3),
        ("a/ü.jsonl", 1),
        ("b/1.jsonl", 1),
        ("b/1.jsonl", 1),
    ];
    for (i, (path, line)) in entries.iter().enumerate() {
        let i = i as i64;
        sqlx::query("INSERT INTO usage_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(path)
            .bind(&path[..1])
            .bind("session-1")
            .bind(line)
            .bind((i % 2 == 0).then_some("claude-ünï"))
            .bind(T0 + i)
            .bind(i * 10)
            .bind(i64::MAX / 2)
            .bind(0)
            .bind(i)
            .bind(format!("line:{path}:{line}:{i}"))
            .bind(i % 3 == 0)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("usage_entries", entries.len() as u64));

    for i in 0..4_i64 {
        sqlx::query("INSERT INTO usage_messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(format!("m:msg_{i}"))
            .bind("a/1.jsonl")
            .bind(i)
            .bind("a")
            .bind("session-1")
            .bind(if i == 0 { "" } else { "claude-ünï" })
            .bind(T0 + i)
            .bind(["2025-12-01", "1999-01-31", "2025-12-01", "2026-02-28"][i as usize])
            .bind(i)
            .bind(i + 1)
            .bind(i + 2)
            .bind(i64::MAX)
            .bind(i == 2)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("usage_messages", 4));

    for (i, day) in ["2025-12-01", "1999-01-31", "2026-02-28"]
        .iter()
        .enumerate()
    {
        let i = i as i64;
        sqlx::query("INSERT INTO usage_cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(day)
            .bind("a")
            .bind("session-1")
            .bind(if i == 0 { "" } else { "claude-ünï" })
            .bind(i)
            .bind(i)
            .bind(i)
            .bind(i64::MAX)
            .bind(i + 1)
            .bind(T0)
            .bind(T0 + 1)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("usage_cells", 3));

    // A history: several runs of one processor, each trigger, ids with gaps
    // (pruned runs), the runs kept before the history (unknown trigger).
    for (id, processor, started_by, actor, stats) in [
        (
            1,
            "errors",
            "",
            "",
            r#"{"scanned": 3, "failed": 0, "duration_seconds": 0.5}"#,
        ),
        (
            4,
            "usage",
            "scheduler",
            "scheduler",
            r#"{"scanned": 12, "notes": ["ünï", "😀"], "nested": {"a": null}}"#,
        ),
        (
            9,
            "usage",
            "call",
            "ålice",
            r#"{"scanned": 12, "errors": [["a/1.jsonl", "NUL byte"]]}"#,
        ),
    ] {
        sqlx::query("INSERT INTO pipeline_runs VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(id)
            .bind(processor)
            .bind(T0 + id)
            .bind(T0 + 999_999)
            .bind(started_by)
            .bind(actor)
            .bind(stats)
            .execute(&mut c)
            .await
            .unwrap();
    }
    counts.push(("pipeline_runs", 3));
    c.close().await.unwrap();
    counts
}

/// Every table's rows, in a stable order (rows sharing a key have no order).
async fn dump(db: &TestDb) -> Vec<(&'static str, Vec<Row>)> {
    let mut store = fleetcare::storage::open_copy_source(&location(db))
        .await
        .expect("open");
    let mut tables = Vec::new();
    for table in TABLES {
        let mut rows = store.read(table, Bound::Start, None).await.unwrap();
        rows.sort_by_cached_key(|row| format!("{row:?}"));
        tables.push((table.name, rows));
    }
    store.commit().await.unwrap();
    tables
}

async fn run_copy(from: &TestDb, to: &TestDb, page_size: usize) -> Result<CopyReport, Error> {
    copy::copy_paged(
        &location(from),
        &location(to),
        page_size,
        &ProgressBar::hidden(),
    )
    .await
}

fn sorted(mut counts: Vec<(&'static str, u64)>) -> Vec<(&'static str, u64)> {
    counts.sort();
    counts
}

#[tokio::test]
async fn sqlite_to_postgres_and_back_copies_every_row_exactly() {
    let first = TestDb::sqlite();
    let counts = fill(&first).await;
    assert_eq!(counts.len(), TABLES.len(), "the fixture fills every table");
    let pg = TestDb::postgres();
    let back = TestDb::sqlite();

    // Pages of 3 rows: keyset paging, and runs of one key across pages.
    let report = run_copy(&first, &pg, 3).await.expect("sqlite to postgres");
    assert_eq!(sorted(report.tables.clone()), sorted(counts.clone()));
    let report = run_copy(&pg, &back, 2).await.expect("postgres to sqlite");
    assert_eq!(sorted(report.tables), sorted(counts));

    let original = dump(&first).await;
    let in_postgres = dump(&pg).await;
    let copied_back = dump(&back).await;
    for ((name, a), ((_, b), (_, c))) in original.iter().zip(in_postgres.iter().zip(&copied_back)) {
        assert_eq!(a, b, "{name}: sqlite vs postgres");
        assert_eq!(a, c, "{name}: sqlite vs sqlite copied back");
    }

    // Spot checks in Postgres's own types.
    let mut conn = PgConnection::connect(&pg.url).await.unwrap();
    let (registered, heartbeat, labels): (DateTime<Utc>, DateTime<Utc>, serde_json::Value) =
        sqlx::query_as(
            "SELECT registered_at, last_transition_at, labels FROM agents WHERE agent_id = 'agent-00'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(registered, DateTime::from_timestamp_micros(T0).unwrap());
    assert_eq!(registered.timestamp_subsec_micros(), 123_456);
    assert_eq!(
        heartbeat,
        DateTime::from_timestamp_micros(-1_000_000).unwrap()
    );
    assert_eq!(labels["team"], "plätform");
    let head: i64 = sqlx::query_scalar("SELECT head_revision FROM revision_head")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(head, BIG_REVISION);
    let revisions: Vec<i64> = sqlx::query_scalar("SELECT revision FROM transitions ORDER BY 1")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        revisions,
        (3..=12).chain([BIG_REVISION]).collect::<Vec<_>>()
    );
    let day: chrono::NaiveDate =
        sqlx::query_scalar("SELECT day FROM usage_messages WHERE dedup_key = 'm:msg_1'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(day.to_string(), "1999-01-31");

    // The census is not copied but counted on each target from its agents:
    // what a count of the fixture's agents gives (it wrote them without one).
    const CENSUS: &str = "SELECT label_key, label_value, agents, offline, exhausted \
                          FROM agent_census WHERE agents > 0 ORDER BY 1, 2";
    type Census = Vec<(String, String, i64, i64, i64)>;
    let in_postgres: Census = sqlx::query_as(CENSUS).fetch_all(&mut conn).await.unwrap();
    let copied_back: Census = sqlx::query_as(CENSUS)
        .fetch_all(&mut sqlite_conn(&back).await)
        .await
        .unwrap();
    let counted: Census = sqlx::query_as(
        "SELECT p.key, p.value, count(*), sum(p.status = 'OFFLINE'), sum(p.status = 'EXHAUSTED')
         FROM (SELECT '' AS key, '' AS value, status FROM agents
               UNION ALL
               SELECT j.key, j.value, a.status FROM agents a, json_each(a.labels) j) p
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&mut sqlite_conn(&first).await)
    .await
    .unwrap();
    assert_eq!(counted[0].0, "", "{counted:?}");
    assert_eq!(counted[0].2, 10, "{counted:?}");
    assert_eq!(in_postgres, counted);
    assert_eq!(copied_back, counted);
}

#[tokio::test]
async fn postgres_sequences_continue_past_the_copied_ids() {
    let source = TestDb::sqlite();
    fill(&source).await;
    let pg = TestDb::postgres();
    run_copy(&source, &pg, copy::PAGE_SIZE).await.unwrap();

    let mut conn = PgConnection::connect(&pg.url).await.unwrap();
    let event: i64 = sqlx::query_scalar(
        "INSERT INTO error_events (agent_id, message, error_type, severity, critical, recurring, occurred_at) \
         VALUES ('agent-00', 'new', 'RATE_LIMIT', 0.5, false, false, now()) RETURNING id",
    )
    .fetch_one(&mut conn)
    .await
    .expect("a new error event gets a fresh id");
    assert!(event > BIG_EVENT_ID, "{event}");
    let action: i64 = sqlx::query_scalar(
        "INSERT INTO recovery_actions (error_event_id, agent_id, error_type, context_signature, \
         strategy, chosen_strategy, estimated_duration_ms, success_probability, risk, escalated, \
         reason, status, created_at, lease_expires_at) \
         VALUES ($1, 'agent-01', 'RATE_LIMIT', 's', 'BACKOFF', 'BACKOFF', 1, 0.5, 0.1, false, 'r', \
         'ACTIVE', now(), now()) RETURNING id",
    )
    .bind(event)
    .fetch_one(&mut conn)
    .await
    .expect("a new recovery action gets a fresh id");
    assert!(action > BIG_EVENT_ID + 10, "{action}");
}

/// Row counts of every table (to show nothing was written).
async fn counts(db: &TestDb) -> Vec<(&'static str, usize)> {
    dump(db)
        .await
        .into_iter()
        .map(|(name, rows)| (name, rows.len()))
        .collect()
}

#[tokio::test]
async fn a_target_with_rows_is_refused_and_left_as_it_was() {
    let source = TestDb::sqlite();
    fill(&source).await;
    let pg = TestDb::postgres();
    run_copy(&source, &pg, copy::PAGE_SIZE).await.unwrap();
    let before = dump(&pg).await;

    let other = TestDb::sqlite();
    fill(&other).await;
    match run_copy(&other, &pg, copy::PAGE_SIZE).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains("is not empty"), "{message}");
            assert!(message.contains("agents: 10 rows"), "{message}");
            assert!(message.contains("nothing was copied"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(dump(&pg).await, before);

    // Into SQLite: a store whose only trace is an allocated revision.
    let target = TestDb::sqlite();
    let mut conn = sqlite_conn(&target).await;
    exec(&mut conn, "UPDATE revision_head SET head_revision = 5").await;
    conn.close().await.unwrap();
    match run_copy(&source, &target, copy::PAGE_SIZE).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(
                message.contains("revision_head.head_revision = 5"),
                "{message}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(counts(&target).await.iter().all(|(name, n)| match *name {
        "revision_head" | "revision_retention" => *n == 1,
        _ => *n == 0,
    }));
}

#[tokio::test]
async fn the_same_store_twice_is_refused() {
    let sqlite = TestDb::sqlite();
    fill(&sqlite).await;
    let dir = sqlite.dir.clone().unwrap();
    let same = TestDb {
        name: sqlite.name.clone(),
        url: format!("sqlite://{}", dir.join(".").join("fleetcare.db").display()),
        dir: None,
    };
    match run_copy(&sqlite, &same, copy::PAGE_SIZE).await {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("the same store"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    std::mem::forget(same); // shares the directory with `sqlite`

    let pg = TestDb::postgres();
    match run_copy(&pg, &pg, copy::PAGE_SIZE).await {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("the same store"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_source_in_use_or_not_a_store_is_refused() {
    let source = TestDb::sqlite();
    fill(&source).await;
    let target = TestDb::sqlite();
    let server = fleetcare::storage::sqlite::SqliteStore::open(
        &sqlite_path(&source),
        &StoreOptions::for_url(&source.url).unwrap(),
    )
    .await
    .unwrap();
    match run_copy(&source, &target, copy::PAGE_SIZE).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains("stop it"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(server);

    let missing = TestDb::sqlite();
    match run_copy(&missing, &target, copy::PAGE_SIZE).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains("does not exist"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let blank = TestDb::sqlite();
    std::fs::create_dir_all(blank.dir.as_ref().unwrap()).unwrap();
    SqliteConnectOptions::new()
        .filename(sqlite_path(&blank))
        .create_if_missing(true)
        .connect()
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    match run_copy(&blank, &target, copy::PAGE_SIZE).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains("not a fleetcare store"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        !sqlite_path(&target).exists(),
        "a refused copy creates no target"
    );
}

/// The table list is the Postgres schema, column for column.
#[tokio::test]
async fn the_tables_are_the_postgres_schema() {
    let pg = TestDb::postgres();
    fleetcare::storage::migrate(&StoreOptions::for_url(&pg.url).unwrap())
        .await
        .unwrap();
    let mut conn = PgConnection::connect(&pg.url).await.unwrap();
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let columns: Vec<_> = columns
        .into_iter()
        .filter(|(t, _, _)| !copy::DERIVED.contains(&t.as_str()))
        .collect();
    let mut expected: Vec<(String, String, String)> = Vec::new();
    let mut specs: Vec<_> = TABLES.iter().collect();
    specs.sort_by_key(|t| t.name);
    for table in specs {
        for (column, kind) in table.columns {
            let actual = columns
                .iter()
                .find(|(t, c, _)| t == table.name && c == column)
                .map(|(_, _, ty)| ty.as_str())
                .unwrap_or_else(|| panic!("{}.{column} is not in Postgres", table.name));
            use copy::Kind::*;
            let types: &[&str] = match kind {
                Text => &["text"],
                Int => &["bigint", "integer"],
                Float => &["double precision"],
                Bool => &["boolean"],
                Json => &["jsonb"],
                Timestamp => &["timestamp with time zone"],
                Date => &["date"],
            };
            assert!(types.contains(&actual), "{}.{column}: {actual}", table.name);
            expected.push((table.name.into(), column.to_string(), actual.to_owned()));
        }
    }
    assert_eq!(
        columns.len(),
        expected.len(),
        "Postgres has columns the copy does not know"
    );
}

fn run(args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run fleetcare")
}

#[tokio::test]
async fn the_copy_command_copies_then_refuses_a_second_time() {
    let source = TestDb::sqlite();
    let total: u64 = fill(&source).await.iter().map(|(_, n)| n).sum();
    let target = TestDb::sqlite();
    let (from, to) = (source.url.clone(), target.url.clone());

    let output = tokio::task::spawn_blocking({
        let (from, to) = (from.clone(), to.clone());
        move || run(&["copy", "--from", &from, "--to", &to])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("copied {total} rows")), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["usage_entries", "9"])),
        "{stdout}"
    );
    assert_eq!(dump(&source).await, dump(&target).await);

    let again = tokio::task::spawn_blocking(move || run(&["copy", "--from", &from, "--to", &to]))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(5), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("fleetcare: the target sqlite://"),
        "{stderr}"
    );
    assert!(stderr.contains("is not empty"), "{stderr}");

    let url = source.url.clone();
    let same = tokio::task::spawn_blocking(move || run(&["copy", "--from", &url, "--to", &url]))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&same.stderr);
    assert_eq!(same.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.starts_with("fleetcare: --from and --to are the same store"),
        "{stderr}"
    );
}

/// What a client sees of a store, through every service's list calls.
#[derive(Debug, PartialEq)]
struct ServiceView {
    agents: Vec<fleetcare::proto::v1::Agent>,
    transitions: Vec<fleetcare::proto::v1::Transition>,
    errors: Vec<fleetcare::proto::v1::ErrorEvent>,
    recoveries: Vec<fleetcare::proto::v1::RecoveryAction>,
    post_actions: Vec<fleetcare::proto::v1::PostAction>,
    sessions: Vec<fleetcare::proto::v1::SessionState>,
    usage: Vec<fleetcare::proto::v1::UsageRow>,
    runs: Vec<fleetcare::proto::v1::PipelineRun>,
}

async fn view(app: &crate::helpers::TestApp) -> ServiceView {
    use fleetcare::proto::v1 as pb;
    let mut agents = app.agents.clone();
    let mut healing = pb::healing_service_client::HealingServiceClient::new(app.channel.clone());
    let mut posts =
        pb::post_healing_service_client::PostHealingServiceClient::new(app.channel.clone());
    let mut pipeline =
        pb::session_pipeline_service_client::SessionPipelineServiceClient::new(app.channel.clone());
    ServiceView {
        agents: agents
            .list_agents(pb::ListAgentsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .agents,
        transitions: app.history("").await,
        errors: healing
            .list_error_events(pb::ListErrorEventsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events,
        recoveries: healing
            .list_recovery_actions(pb::ListRecoveryActionsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .actions,
        post_actions: posts
            .list_actions(pb::ListActionsRequest {
                post_id: "post-1".into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .actions,
        sessions: pipeline
            .list_session_states(pb::ListSessionStatesRequest {
                processor: "usage".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .states,
        usage: pipeline
            .get_usage(pb::GetUsageRequest {
                group_by: pb::UsageGrouping::Day as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows,
        runs: pipeline
            .list_runs(pb::ListRunsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .runs,
    }
}

/// Fills a store the way clients do: agents through their lifecycle, an error
/// with a recovery and its outcome, a claimed post action, a usage run.
async fn use_every_service(app: &crate::helpers::TestApp) {
    use fleetcare::proto::v1 as pb;
    let mut agents = app.agents.clone();
    for id in ["a-1", "a-2", "a-3"] {
        agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.into(),
                labels: [("team".to_string(), "ünïcode ✓".to_string())].into(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
    }
    app.start_work("a-1").await.unwrap();
    agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "a-2".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "5-hour limit reached ∙ resets 2am".into(),
            time_zone: "Europe/London".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    agents
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "a-3".into(),
        })
        .await
        .unwrap();
    let mut healing = pb::healing_service_client::HealingServiceClient::new(app.channel.clone());
    let event = healing
        .report_error(pb::ReportErrorRequest {
            agent_id: "a-1".into(),
            message: "connection reset by peer".into(),
            context: [("attempt".to_string(), "2".to_string())].into(),
            ..Default::default()
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
            details: "restarted".into(),
        })
        .await
        .unwrap();
    let mut posts =
        pb::post_healing_service_client::PostHealingServiceClient::new(app.channel.clone());
    let now = Utc::now();
    let point = |mins: i64, k: i64| pb::MetricPoint {
        observed_at: Some(prost_types::Timestamp {
            seconds: (now - chrono::Duration::minutes(mins)).timestamp(),
            nanos: 0,
        }),
        impressions: 1000 * k,
        engagements: 5 * k,
    };
    let verdict = posts
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: "post-1".into(),
            points: vec![point(30, 0), point(20, 1), point(10, 2)],
            now: None,
            claim: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.eligible, "{verdict:?}");
    crate::pipeline::run(app, "usage").await.unwrap();
    crate::pipeline::run(app, "errors").await.unwrap();
    crate::pipeline::run(app, "usage").await.unwrap();
}

/// A store moved SQLite -> Postgres -> SQLite with `fleetcare copy` serves
/// exactly what it served before, through every service, and goes on from
/// where it was (the next transition takes the next revision).
#[tokio::test]
async fn a_copied_store_serves_the_same_through_every_service() {
    use crate::helpers::{TestApp, test_args};
    let sessions = tempdir_with_sessions();
    let serve = |db: &TestDb| {
        let mut args = test_args(&db.url);
        args.pipeline.session_dir = sessions.clone();
        args.pipeline.pipeline_interval_usage = std::time::Duration::ZERO;
        args.pipeline.pipeline_interval_errors = std::time::Duration::ZERO;
        args.heartbeat_timeout = std::time::Duration::from_secs(3600);
        args
    };
    let embedded = TestDb::sqlite();
    let app = TestApp::spawn_with(serve(&embedded)).await;
    use_every_service(&app).await;
    let before = view(&app).await;
    assert_eq!(before.agents.len(), 3);
    assert!(!before.usage.is_empty() && !before.post_actions.is_empty());
    app.stop().await;

    let pg = TestDb::postgres();
    run_copy(&embedded, &pg, 1000)
        .await
        .expect("sqlite -> postgres");
    let app = TestApp::spawn_with(serve(&pg)).await;
    assert_eq!(view(&app).await, before, "postgres after the copy");
    // The run history goes on from the copied ids (the sequence passed them).
    assert_eq!(before.runs.len(), 3);
    let newest = before.runs.iter().map(|r| r.id).max().unwrap();
    crate::pipeline::run(&app, "errors").await.unwrap();
    let after = view(&app).await;
    assert_eq!(after.runs.len(), 4, "{:?}", after.runs);
    assert!(after.runs[0].id > newest, "{:?}", after.runs);
    assert_eq!(after.runs[1..], before.runs[..]);
    app.stop().await;

    let back = TestDb::sqlite();
    run_copy(&pg, &back, 1000)
        .await
        .expect("postgres -> sqlite");
    let app = TestApp::spawn_with(serve(&back)).await;
    assert_eq!(view(&app).await, after, "sqlite after the copy back");
    let next = app.finish_work("a-1").await.unwrap();
    let last = before.transitions.last().unwrap().revision;
    assert_eq!(next.transition.unwrap().revision, last + 1);
    app.stop().await;
    let _ = std::fs::remove_dir_all(&sessions);
}

/// A session directory with one user's transcript.
fn tempdir_with_sessions() -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("fleetcare-copy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(root.join("alice")).unwrap();
    let lines = [
        crate::pipeline::assistant(
            "m1",
            "r1",
            "claude-sonnet-4",
            "2026-11-30T10:00:00Z",
            [10, 20, 30, 40],
        ),
        crate::pipeline::assistant(
            "m2",
            "r2",
            "claude-opus-4",
            "2026-12-01T09:00:00Z",
            [1, 2, 3, 4],
        ),
    ];
    std::fs::write(root.join("alice").join("s1.jsonl"), lines.concat()).unwrap();
    root
}
