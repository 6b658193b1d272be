//! Session-pipeline throughput, over real gRPC against a real store: Postgres,
//! or the embedded SQLite store with FLEETCARE_TEST_BACKEND=sqlite.
//!
//!     cargo bench --bench pipeline
//!     CCUSAGE_BIN=/work/ccusage-peer/node_modules/.bin/ccusage cargo bench --bench pipeline
//!     FLEETCARE_TEST_BACKEND=sqlite CCUSAGE_BIN=... cargo bench --bench pipeline
//!     BENCH_SESSIONS=2000 BENCH_TURNS=8 BENCH_RESCAN_FILES=5000 cargo bench --bench pipeline
//!
//! 1. A Claude Code corpus of BENCH_SESSIONS sessions over BENCH_USERS users
//!    (about BENCH_TURNS turns each; a message written on 1 to 3 lines, one
//!    session in six resumed from an earlier one, copying its history): the
//!    first `usage` run beside ccusage 20 (native) over the same files with a
//!    warm page cache, their ratio, the unchanged rerun, and GetUsage by day.
//!    When ccusage ran, the daily totals must be equal. ccusage is skipped
//!    (said so) unless CCUSAGE_BIN names its launcher; install it outside the
//!    repository: `npm install ccusage@20.0.24 @ccusage/ccusage-linux-x64@20.0.24`
//!    and point CCUSAGE_BIN at `node_modules/.bin/ccusage`.
//! 2. BENCH_RESCAN_FILES small session files: the first run, then the time of
//!    an unchanged rescan (nothing read: stat only).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::session_pipeline_service_client::SessionPipelineServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

mod common;

use common::{
    children_cpu_time, cpu_time, env_usize, helpers, postgres_cpu_since, postgres_ticks,
    threads_cpu_time,
};

fn line(user: usize, session: usize, i: usize) -> String {
    format!(
        r#"{{"parentUuid":"p-{user}-{session}-{i}","isSidechain":false,"userType":"external","cwd":"/work/project","sessionId":"s{session}","version":"1.0.80","type":"assistant","uuid":"u-{user}-{session}-{i}","timestamp":"2026-03-14T10:{:02}:{:02}.000Z","requestId":"req_{user}_{session}_{i}","message":{{"id":"msg_{user}_{session}_{i}","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[{{"type":"text","text":"Reading the file and applying the change the user asked for, then running the tests again to make sure nothing else broke."}}],"stop_reason":null,"usage":{{"input_tokens":{},"output_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{}}}}}}}"#,
        (i / 60) % 60,
        i % 60,
        3 + i % 7,
        100 + i % 13,
        1000 + i % 17,
        20000 + i % 19
    ) + "\n"
}

/// Writes the files with an mtime an hour ago; returns the total bytes.
fn write_corpus(root: &Path, users: usize, sessions: usize, lines: usize) -> u64 {
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let mut bytes = 0;
    for u in 0..users {
        let dir = root.join(format!("user{u:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for s in 0..sessions {
            let content: String = (0..lines).map(|i| line(u, s, i)).collect();
            bytes += content.len() as u64;
            let path = dir.join(format!("session-{s:05}.jsonl"));
            std::fs::write(&path, content).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
        }
    }
    bytes
}

const MODELS: [&str; 3] = [
    "claude-sonnet-4-20250514",
    "claude-opus-4-1-20250805",
    "claude-3-5-haiku-20241022",
];

const WORDS: [&str; 16] = [
    "reading", "the", "file", "and", "applying", "change", "tests", "again", "to", "make", "sure",
    "nothing", "else", "broke", "refactor", "module",
];

fn text(rng: &mut StdRng, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// One session's new lines: per turn a user line, then the assistant's
/// message on 1 to 3 lines (thinking, text, tool use) sharing ids and usage.
fn session_lines(
    rng: &mut StdRng,
    user: usize,
    session: usize,
    turns: usize,
    day: u32,
) -> Vec<String> {
    let sid = format!("{user:03}-{session:05}");
    let model = MODELS[rng.random_range(0..MODELS.len())];
    let mut lines = Vec::new();
    let mut second = rng.random_range(0..40_000u32);
    for t in 0..turns {
        second += rng.random_range(5..60);
        let ts = |s: u32| {
            format!(
                "2026-02-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                day + s / 86_400,
                (s / 3600) % 24,
                (s / 60) % 60,
                s % 60,
                rng_free_millis(s)
            )
        };
        lines.push(format!(
            r#"{{"parentUuid":"a-{sid}-{}","isSidechain":false,"userType":"external","cwd":"/work/project-{user}","sessionId":"{sid}","version":"1.0.80","gitBranch":"main","type":"user","message":{{"role":"user","content":"{}"}},"uuid":"u-{sid}-{t}","timestamp":"{}"}}"#,
            t.saturating_sub(1),
            text(rng, 12),
            ts(second)
        ));
        let blocks = rng.random_range(1..=3);
        let usage = format!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"output_tokens":{},"service_tier":"standard"}}"#,
            rng.random_range(1..40),
            rng.random_range(0..5000),
            rng.random_range(0..60_000),
            rng.random_range(10..2000)
        );
        for b in 0..blocks {
            let content = match b {
                0 if blocks > 1 => format!(
                    r#"{{"type":"thinking","thinking":"{}","signature":"sig"}}"#,
                    text(rng, 40)
                ),
                _ if b == blocks - 1 && blocks == 3 => format!(
                    r#"{{"type":"tool_use","id":"toolu_{sid}_{t}","name":"Edit","input":{{"file_path":"/work/src/lib.rs","old_string":"{}","new_string":"{}"}}}}"#,
                    text(rng, 10),
                    text(rng, 10)
                ),
                _ => format!(r#"{{"type":"text","text":"{}"}}"#, text(rng, 30)),
            };
            lines.push(format!(
                r#"{{"parentUuid":"u-{sid}-{t}","isSidechain":false,"userType":"external","cwd":"/work/project-{user}","sessionId":"{sid}","version":"1.0.80","gitBranch":"main","message":{{"id":"msg_{sid}_{t}","type":"message","role":"assistant","model":"{model}","content":[{content}],"stop_reason":null,"stop_sequence":null,"usage":{usage}}},"requestId":"req_{sid}_{t}","type":"assistant","uuid":"a-{sid}-{t}-{b}","timestamp":"{}"}}"#,
                ts(second + 1 + b as u32)
            ));
        }
    }
    lines
}

fn rng_free_millis(s: u32) -> u32 {
    (s * 37) % 1000
}

/// `<root>/<user>/<session>.jsonl`, mtime an hour ago; returns (files, bytes).
fn write_claude_corpus(root: &Path, users: usize, sessions: usize, turns: usize) -> (usize, u64) {
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let mut rng = StdRng::seed_from_u64(7);
    let mut bytes = 0;
    let mut histories: Vec<Vec<Vec<String>>> = vec![Vec::new(); users];
    for s in 0..sessions {
        let user = s % users;
        let day = 1 + rng.random_range(0..27u32);
        let n = rng.random_range(turns / 2..=turns * 3 / 2).max(1);
        let own = session_lines(&mut rng, user, s, n, day);
        // One in six resumes an earlier session of the user: its history first.
        let lines: Vec<String> = match histories[user].len() {
            n if n > 0 && rng.random_range(0..6) == 0 => {
                let earlier = &histories[user][rng.random_range(0..n)];
                earlier.iter().cloned().chain(own).collect()
            }
            _ => own,
        };
        let content = lines.join("\n") + "\n";
        bytes += content.len() as u64;
        let dir = root.join(format!("user{user:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("session-{s:05}.jsonl"));
        std::fs::write(&path, content).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        histories[user].push(lines);
    }
    (sessions, bytes)
}

/// Per day: input, output, cache creation, cache read, total.
type DayTotals = BTreeMap<String, [i64; 5]>;

/// ccusage's daily totals over `config_dir/projects`, and how long it took;
/// `None` (said so) when CCUSAGE_BIN does not name it.
fn ccusage_daily(config_dir: &Path) -> Option<(Duration, DayTotals)> {
    let Some(bin) = std::env::var_os("CCUSAGE_BIN").map(PathBuf::from) else {
        println!(
            "ccusage: skipped (set CCUSAGE_BIN to node_modules/.bin/ccusage of ccusage 20 to compare)"
        );
        return None;
    };
    if !bin.exists() {
        println!("ccusage: skipped ({} does not exist)", bin.display());
        return None;
    }
    let cpu_before = children_cpu_time();
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .args(["daily", "--json", "--offline", "-z", "UTC"])
        .env("CLAUDE_CONFIG_DIR", config_dir)
        .output()
        .expect("ccusage runs");
    let took = started.elapsed();
    println!(
        "ccusage daily's CPU: {:.2?}",
        children_cpu_time() - cpu_before
    );
    assert!(
        out.status.success(),
        "ccusage failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ccusage prints JSON");
    let n = |row: &serde_json::Value, k: &str| row[k].as_i64().unwrap_or(0);
    let days = json["daily"]
        .as_array()
        .expect("daily rows")
        .iter()
        .map(|row| {
            let day = row["period"]
                .as_str()
                .or(row["date"].as_str())
                .unwrap()
                .to_owned();
            (
                day,
                [
                    n(row, "inputTokens"),
                    n(row, "outputTokens"),
                    n(row, "cacheCreationTokens"),
                    n(row, "cacheReadTokens"),
                    n(row, "totalTokens"),
                ],
            )
        })
        .collect();
    Some((took, days))
}

/// The server, in-process on a fresh database (dropped with the `TestDb`).
async fn start(
    root: &Path,
    db: &helpers::TestDb,
) -> (helpers::TestApp, SessionPipelineServiceClient<Channel>) {
    let mut args = ServeArgs {
        http_listen: fleetcare::config::HttpListen::off(),
        database: DatabaseArgs {
            database_url: Some(db.url.clone()),
            data_dir: Default::default(),
            db_max_connections: 10,
            db_acquire_timeout: Duration::from_secs(30),
        },
        ..ServeArgs::default()
    };
    args.pipeline.session_dir = root.to_path_buf();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    let app = helpers::TestApp::spawn_with(args).await;
    let client = SessionPipelineServiceClient::new(app.channel.clone());
    (app, client)
}

async fn run(client: &mut SessionPipelineServiceClient<Channel>) -> (Duration, pb::RunStats) {
    let started = Instant::now();
    let stats = client
        .run_processor(pb::RunProcessorRequest {
            name: "usage".into(),
        })
        .await
        .expect("run")
        .into_inner()
        .stats
        .unwrap();
    (started.elapsed(), stats)
}

fn scan_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for user in std::fs::read_dir(root).unwrap().flatten() {
        for file in std::fs::read_dir(user.path()).unwrap().flatten() {
            files.push(file.path());
        }
    }
    files
}

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("fleetcare-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 20).max(1);
    let sessions = env_usize("BENCH_SESSIONS", 10_000);
    let turns = env_usize("BENCH_TURNS", 12).max(1);
    let rescan_files = env_usize("BENCH_RESCAN_FILES", 20_000);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "fleetcare pipeline bench, {} cores, store: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if helpers::sqlite_backend() {
            "embedded SQLite"
        } else {
            "Postgres"
        }
    );

    // 1. First run against ccusage, rerun, GetUsage.
    let config_dir = temp_root("claude");
    let root = config_dir.join("projects");
    let generated = Instant::now();
    let (files, bytes) = write_claude_corpus(&root, users, sessions, turns);
    println!(
        "corpus: {files} sessions of {users} users (about {turns} turns, 1 in 6 resumed), {:.1} MB, written in {:.1?}",
        mb(bytes),
        generated.elapsed()
    );
    // Warm page cache for both.
    let warm = Instant::now();
    let read: u64 = scan_files(&root)
        .iter()
        .map(|p| std::fs::read(p).unwrap().len() as u64)
        .sum();
    assert_eq!(read, bytes);
    println!(
        "page cache warmed (read every file) in {:.2?}",
        warm.elapsed()
    );
    let peer = ccusage_daily(&config_dir);
    let db = helpers::TestDb::new();
    let (app, mut client) = start(&root, &db).await;
    let (cpu, postgres) = (cpu_time(), postgres_ticks());
    let sqlite_threads = threads_cpu_time("sqlx-sqlite");
    let (first, stats) = run(&mut client).await;
    println!(
        "fleetcare's first run's CPU: {:.2?} in this process (server and client; {:.2?} of it in SQLite's connection threads), {:.2?} in Postgres",
        cpu_time() - cpu,
        threads_cpu_time("sqlx-sqlite").saturating_sub(sqlite_threads),
        postgres_cpu_since(&postgres)
    );
    assert_eq!(stats.processed as usize, files, "{stats:?}");
    println!(
        "fleetcare usage first run      {first:>9.2?}  {:>7.1} MB/s  {} entries",
        mb(bytes) / first.as_secs_f64(),
        stats.items_extracted
    );
    if let Some((took, _)) = &peer {
        println!(
            "ccusage daily (native)         {took:>9.2?}  {:>7.1} MB/s",
            mb(bytes) / took.as_secs_f64()
        );
        println!(
            "first run / ccusage: {:.2} (below 1: fleetcare is faster)",
            first.as_secs_f64() / took.as_secs_f64()
        );
    }
    let (again, stats) = run(&mut client).await;
    assert_eq!(stats.files_hashed, 0);
    println!("unchanged rerun of {files} files {again:>9.2?}");
    let by_day = || pb::GetUsageRequest {
        group_by: pb::UsageGrouping::Day as i32,
        ..Default::default()
    };
    let mut latencies = Vec::new();
    let mut days = pb::GetUsageResponse::default();
    for _ in 0..21 {
        let started = Instant::now();
        days = client
            .get_usage(by_day())
            .await
            .expect("usage")
            .into_inner();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "GetUsage by day ({} days): median {:.2?}, max {:.2?} over 21 calls",
        days.rows.len(),
        latencies[10],
        latencies[20]
    );
    if let Some((_, expected)) = &peer {
        let ours: DayTotals = days
            .rows
            .iter()
            .map(|r| {
                (
                    r.key.clone(),
                    [
                        r.input_tokens,
                        r.output_tokens,
                        r.cache_creation_tokens,
                        r.cache_read_tokens,
                        r.total_tokens,
                    ],
                )
            })
            .collect();
        assert_eq!(&ours, expected, "daily totals equal ccusage's");
        println!("daily totals equal ccusage's on all {} days", ours.len());
    }
    app.stop().await;
    drop(db);
    let _ = std::fs::remove_dir_all(&config_dir);

    // 2. Unchanged rescan of many files.
    let root = temp_root("rescan");
    let per_user = rescan_files.div_ceil(100);
    let bytes = write_corpus(&root, 100, per_user, 1);
    let files = 100 * per_user;
    let db = helpers::TestDb::new();
    let (app, mut client) = start(&root, &db).await;
    let (first, stats) = run(&mut client).await;
    assert_eq!(stats.processed as usize, files);
    println!(
        "rescan corpus: {files} files, {:.1} MB; first run {first:.2?} ({:.0} files/s)",
        mb(bytes),
        files as f64 / first.as_secs_f64()
    );
    for _ in 0..3 {
        let (rescan, stats) = run(&mut client).await;
        assert_eq!((stats.files_hashed, stats.skipped as usize), (0, files));
        println!("unchanged rescan of {files} files: {rescan:.2?} (nothing read)");
    }
    app.stop().await;
    drop(db);
    let _ = std::fs::remove_dir_all(&root);
}
