//! Session-pipeline throughput, over real gRPC against a real Postgres.
//!
//!     cargo bench --bench pipeline
//!     BENCH_USERS=20 BENCH_SESSIONS=50 BENCH_LINES=200 BENCH_RESCAN_FILES=100000 cargo bench --bench pipeline
//!
//! 1. A corpus of users x sessions x lines: first-run throughput of the `usage`
//!    processor in MB/s, beside `sha256sum` over the same files.
//! 2. BENCH_RESCAN_FILES small session files: the first run, then the time of
//!    an unchanged rescan (nothing read: stat only).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::session_pipeline_service_client::SessionPipelineServiceClient;
use tonic::transport::Channel;

mod common;

use common::{env_usize, helpers};

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

/// The server, in-process on a fresh database (dropped with the `TestDb`).
async fn start(
    root: &Path,
    db: &helpers::TestDb,
) -> (helpers::TestApp, SessionPipelineServiceClient<Channel>) {
    let mut args = ServeArgs {
        database: DatabaseArgs {
            database_url: db.url.clone(),
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

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("fleetcare-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 20);
    let sessions = env_usize("BENCH_SESSIONS", 50);
    let lines = env_usize("BENCH_LINES", 200);
    let rescan_files = env_usize("BENCH_RESCAN_FILES", 100_000);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "fleetcare pipeline bench, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Throughput.
    let root = temp_root("throughput");
    let bytes = write_corpus(&root, users, sessions, lines);
    let files = users * sessions;
    let started = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find '{}' -name '*.jsonl' -print0 | xargs -0 sha256sum > /dev/null",
            root.display()
        ))
        .status()
        .expect("sha256sum runs");
    assert!(status.success());
    let sha = started.elapsed();
    let db = helpers::TestDb::new();
    let (app, mut client) = start(&root, &db).await;
    let (first, stats) = run(&mut client).await;
    assert_eq!(stats.processed as usize, files);
    println!(
        "corpus: {files} files ({users} users x {sessions} sessions x {lines} lines), {:.1} MB",
        mb(bytes)
    );
    println!(
        "sha256sum over the corpus      {sha:>9.2?}  {:>7.1} MB/s",
        mb(bytes) / sha.as_secs_f64()
    );
    println!(
        "usage first run (read, hash, parse, store) {first:>9.2?}  {:>7.1} MB/s  {} entries",
        mb(bytes) / first.as_secs_f64(),
        stats.items_extracted
    );
    let (again, stats) = run(&mut client).await;
    assert_eq!(stats.files_hashed, 0);
    println!("unchanged rerun of {files} files {again:>9.2?}");
    app.stop().await;
    drop(db);
    let _ = std::fs::remove_dir_all(&root);

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
