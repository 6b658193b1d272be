//! The history of processor runs (ListRuns): every run kept with what started
//! it (the scheduler, or a RunProcessor caller by name), its counts and first
//! errors; newest first, a page at a time; filtered by processor; bad
//! requests refused; old runs pruned, each processor's newest kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use fleetcare::config::ServeArgs;
use fleetcare::domain::auth::{Role, caller_entry, token_digest};
use fleetcare::domain::pipeline::RunStats;
use fleetcare::domain::pipeline_runs::{NewRun, RunTrigger};
use fleetcare::proto::v1 as pb;
use tonic::Code;

use crate::helpers::{TestApp, TestDb, eventually, reason, test_args};
use crate::pipeline::{SessionRoot, assistant, client, run};

const WAIT: Duration = Duration::from_secs(20);

/// A session every processor fails: larger than a session may be (a sparse
/// file, no disk used).
pub fn write_oversized(root: &SessionRoot, rel: &str) {
    root.write(rel, "{\"type\":\"assistant\"}\n");
    std::fs::File::options()
        .write(true)
        .open(root.path.join(rel))
        .unwrap()
        .set_len(fleetcare::runtime::pipeline::MAX_FILE_BYTES + 1)
        .unwrap();
    root.set_mtime(rel, Duration::from_secs(3600));
}

/// Two good sessions and one that fails (too large).
fn corpus(root: &SessionRoot) {
    root.write(
        "alice/s1.jsonl",
        &assistant(
            "m1",
            "r1",
            "claude-sonnet-4",
            "2026-03-14T10:00:00Z",
            [1, 2, 3, 4],
        ),
    );
    root.write(
        "bob/s2.jsonl",
        &assistant(
            "m2",
            "r2",
            "claude-opus-4",
            "2026-03-14T11:00:00Z",
            [5, 6, 7, 8],
        ),
    );
    write_oversized(root, "bob/broken.jsonl");
}

fn args(db: &TestDb, root: &Path) -> ServeArgs {
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.to_path_buf();
    args.pipeline.pipeline_interval_usage = Duration::ZERO;
    args.pipeline.pipeline_interval_errors = Duration::ZERO;
    args.pipeline.max_attempts = 10;
    args.pipeline.pipeline_retry_base = Duration::ZERO;
    args
}

async fn list(
    app: &TestApp,
    processor: &str,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListRunsResponse, tonic::Status> {
    client(app)
        .list_runs(pb::ListRunsRequest {
            processor: processor.into(),
            page_size,
            page_token: page_token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Every run of the listing, following its pages.
async fn all_runs(app: &TestApp, processor: &str, page_size: i32) -> Vec<pb::PipelineRun> {
    let mut runs = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(app, processor, page_size, &token).await.unwrap();
        assert!(page.runs.len() <= page_size as usize);
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return runs;
        }
        token = page.next_page_token;
    }
}

fn started(run: &pb::PipelineRun) -> (i64, i32) {
    let at = run.started_at.unwrap();
    (at.seconds, at.nanos)
}

struct AuthDir(PathBuf);

impl Drop for AuthDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn as_<T>(name: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer token-of-{name}").parse().unwrap(),
    );
    request
}

#[tokio::test]
async fn every_run_is_kept_with_who_started_it_its_counts_and_first_errors() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    corpus(&root);
    let dir = AuthDir(
        std::env::temp_dir().join(format!("fleetcare-runs-{}", uuid::Uuid::new_v4().simple())),
    );
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("callers.toml");
    let entry = |name: &str, role| {
        caller_entry(name, role, &token_digest(&format!("token-of-{name}")), &[])
    };
    let bot = caller_entry(
        "bot",
        Role::Agent,
        &token_digest("token-of-bot"),
        &["bot-*".to_owned()],
    );
    std::fs::write(
        &file,
        [
            entry("alice", Role::Operator),
            entry("carol", Role::Reader),
            bot,
        ]
        .join("\n"),
    )
    .unwrap();
    let mut args = args(&db, &root.path);
    args.auth_file = Some(file);
    // The scheduler runs `errors` at once, then hourly: one scheduled run.
    args.pipeline.pipeline_interval_errors = Duration::from_secs(3600);
    let app = TestApp::spawn_with(args).await;
    let mut pipeline = client(&app);

    let scheduled = eventually(WAIT, "the scheduled errors run", || {
        let mut pipeline = pipeline.clone();
        async move {
            let page = pipeline
                .list_runs(as_(
                    "carol",
                    pb::ListRunsRequest {
                        processor: "errors".into(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            page.runs.into_iter().next()
        }
    })
    .await;
    assert_eq!(scheduled.trigger, pb::RunTrigger::Scheduler as i32);
    assert_eq!(scheduled.actor, "scheduler");
    assert_eq!(scheduled.processor, "errors");
    assert_eq!(scheduled.stats.as_ref().unwrap().scanned, 3);

    let mut stats = Vec::new();
    for _ in 0..2 {
        let ran = pipeline
            .run_processor(as_(
                "alice",
                pb::RunProcessorRequest {
                    name: "usage".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
        stats.push(ran);
    }
    assert_eq!(stats[0].failed, 1, "{:?}", stats[0]);

    // A reader lists them; an agent caller may not.
    let runs = pipeline
        .list_runs(as_("carol", pb::ListRunsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(runs.next_page_token.is_empty());
    let summary: Vec<(&str, i32, &str)> = runs
        .runs
        .iter()
        .map(|r| (r.processor.as_str(), r.trigger, r.actor.as_str()))
        .collect();
    let call = pb::RunTrigger::Call as i32;
    assert_eq!(
        summary,
        [
            ("usage", call, "alice"),
            ("usage", call, "alice"),
            ("errors", pb::RunTrigger::Scheduler as i32, "scheduler"),
        ],
        "newest first"
    );
    let ids: HashSet<i64> = runs.runs.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 3, "each run has its own id");
    // The newest is the second call: its stats are what RunProcessor answered.
    let newest = &runs.runs[0];
    assert_eq!(newest.stats.as_ref().unwrap(), &stats[1]);
    let first = runs.runs[1].stats.as_ref().unwrap();
    assert_eq!((first.scanned, first.processed, first.failed), (3, 2, 1));
    assert_eq!(first.errors.len(), 1);
    assert_eq!(first.errors[0].session, "bob/broken.jsonl");
    assert!(
        first.errors[0].error.contains("more than"),
        "{:?}",
        first.errors
    );
    for r in &runs.runs {
        let (start, end) = (r.started_at.unwrap(), r.finished_at.unwrap());
        assert!(
            (start.seconds, start.nanos) <= (end.seconds, end.nanos),
            "{r:?}"
        );
        assert_eq!(r.stats.as_ref().unwrap().started_at, r.started_at);
    }
    assert!(started(&runs.runs[0]) >= started(&runs.runs[1]));

    // ListProcessors' last run is each processor's newest recorded run.
    let processors = pipeline
        .list_processors(as_("carol", pb::ListProcessorsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .processors;
    let last = |name: &str| {
        processors
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .last_run
            .clone()
            .unwrap()
    };
    assert_eq!(&last("usage"), newest.stats.as_ref().unwrap());
    assert_eq!(&last("errors"), scheduled.stats.as_ref().unwrap());

    let refused = pipeline
        .list_runs(as_("bot", pb::ListRunsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("ListRuns"), "{refused:?}");
    app.stop().await;
}

#[tokio::test]
async fn runs_come_newest_first_a_page_at_a_time_with_no_duplicates_or_gaps() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    corpus(&root);
    let app = TestApp::spawn_with(args(&db, &root.path)).await;
    // 5 usage runs and 2 errors runs, interleaved.
    for name in [
        "usage", "errors", "usage", "usage", "errors", "usage", "usage",
    ] {
        run(&app, name).await.unwrap();
    }
    let everything = list(&app, "", 0, "").await.unwrap();
    assert_eq!(everything.runs.len(), 7, "the default page holds them all");
    assert!(everything.next_page_token.is_empty());
    for pair in everything.runs.windows(2) {
        assert!(
            (started(&pair[0]), pair[0].id) > (started(&pair[1]), pair[1].id),
            "newest first: {pair:?}"
        );
    }
    let order: Vec<&str> = everything
        .runs
        .iter()
        .map(|r| r.processor.as_str())
        .collect();
    assert_eq!(
        order,
        [
            "usage", "usage", "errors", "usage", "usage", "errors", "usage"
        ]
    );

    // Pages of 3; a run recorded between pages is newer than every page
    // already served: it shifts nothing (keyset, not offset).
    let first = list(&app, "", 3, "").await.unwrap();
    assert_eq!(first.runs.len(), 3);
    assert!(!first.next_page_token.is_empty());
    run(&app, "errors").await.unwrap();
    let second = list(&app, "", 3, &first.next_page_token).await.unwrap();
    let third = list(&app, "", 3, &second.next_page_token).await.unwrap();
    assert_eq!(third.runs.len(), 1);
    assert!(third.next_page_token.is_empty());
    let paged: Vec<i64> = [first.runs, second.runs, third.runs]
        .concat()
        .iter()
        .map(|r| r.id)
        .collect();
    let expected: Vec<i64> = everything.runs.iter().map(|r| r.id).collect();
    assert_eq!(paged, expected, "no duplicate, no gap");

    // One processor's runs, paged by 1.
    let errors = all_runs(&app, "errors", 1).await;
    assert_eq!(errors.len(), 3);
    assert!(errors.iter().all(|r| r.processor == "errors"));
    let usage = all_runs(&app, "usage", 2).await;
    assert_eq!(usage.len(), 5);
    assert!(usage.iter().all(|r| r.processor == "usage"));
    // An oversized page is clamped, not refused.
    assert_eq!(list(&app, "", 100_000, "").await.unwrap().runs.len(), 8);
    app.stop().await;
}

#[tokio::test]
async fn unknown_processors_and_bad_pages_are_refused_with_their_reason() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    let app = TestApp::spawn_with(args(&db, &root.path)).await;
    run(&app, "usage").await.unwrap();

    let unknown = list(&app, "nope", 0, "").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert_eq!(reason(&unknown), "NOT_FOUND");
    assert!(unknown.message().contains("nope"), "{unknown:?}");

    let negative = list(&app, "", -1, "").await.unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument, "{negative:?}");
    assert!(negative.message().contains("page_size"), "{negative:?}");

    let issued = list(&app, "", 1, "").await.unwrap();
    assert!(issued.next_page_token.is_empty(), "one run, one page");
    for token in [
        "garbage",
        "after:",
        "after:abc",
        "after:12.x",
        "after:12.-3",
        "after:99999999999999999999.1",
    ] {
        let bad = list(&app, "", 0, token).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{token}: {bad:?}");
        assert_eq!(reason(&bad), "INVALID_ARGUMENT", "{token}");
        assert!(bad.message().contains("page_token"), "{token}: {bad:?}");
    }
    app.stop().await;
}

/// A kept run, recorded straight into the server's store as the runtime
/// would have, `ago` before now.
fn old_run(processor: &str, ago: chrono::Duration, scanned: i64) -> NewRun {
    let at = Utc::now() - ago;
    let stats = RunStats {
        scanned,
        started_at: Some(at),
        finished_at: Some(at + chrono::Duration::seconds(1)),
        ..RunStats::default()
    };
    NewRun::new(processor, RunTrigger::scheduler(), &stats, at)
}

#[tokio::test]
async fn runs_older_than_the_retention_are_pruned_after_a_run_but_each_processors_newest() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    corpus(&root);
    let mut args = args(&db, &root.path);
    args.pipeline.run_retention = Duration::from_secs(3600);
    let app = TestApp::spawn_with(args).await;
    // Runs as a server would have recorded them over the past hours.
    let store = app.stores.pipeline.clone();
    let hours = chrono::Duration::hours;
    let mut seeded = Vec::new();
    for (processor, ago, scanned) in [
        ("usage", hours(3), 101),
        ("errors", hours(3), 102),
        ("usage", hours(2), 103),
        ("usage", chrono::Duration::minutes(10), 104),
    ] {
        seeded.push(
            store
                .record_run(&old_run(processor, ago, scanned))
                .await
                .unwrap(),
        );
    }
    assert_eq!(all_runs(&app, "", 50).await.len(), 4, "nothing pruned yet");

    // A run is recorded: the prune after it drops the usage runs past the
    // hour, keeps the one within it, and keeps errors' only run however old.
    let ran = run(&app, "usage").await.unwrap();
    let left = eventually(WAIT, "the prune after the run", || async {
        let runs = all_runs(&app, "", 50).await;
        (runs.len() == 3).then_some(runs)
    })
    .await;
    let scanned: Vec<(&str, i64)> = left
        .iter()
        .map(|r| (r.processor.as_str(), r.stats.as_ref().unwrap().scanned))
        .collect();
    assert_eq!(
        scanned,
        [("usage", ran.scanned), ("usage", 104), ("errors", 102)]
    );
    let ids: Vec<i64> = left.iter().map(|r| r.id).collect();
    assert_eq!(ids[1..], [seeded[3], seeded[1]]);
    app.stop().await;
}

postgres_only! {
    /// On Postgres too, the last runs kept before the history become its
    /// first runs (unknown trigger), and the history's ids go on after them.
    #[tokio::test]
    async fn the_last_runs_kept_before_the_history_become_its_first_runs_on_postgres() {
        let db = TestDb::postgres();
        let pool = crate::helpers::postgres_migrated_before(&db, 20270101000002).await;
        let started = Utc::now() - chrono::Duration::minutes(5);
        let stats = RunStats {
            scanned: 42,
            ..RunStats::default()
        };
        sqlx::query("INSERT INTO pipeline_runs VALUES ('usage', $1, $2, $3)")
            .bind(started)
            .bind(started + chrono::Duration::seconds(3))
            .bind(sqlx::types::Json(&stats))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;

        let root = SessionRoot::new();
        let app = TestApp::spawn_with(args(&db, &root.path)).await;
        let kept = all_runs(&app, "", 10).await;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].processor, "usage");
        assert_eq!(kept[0].trigger, pb::RunTrigger::Unspecified as i32);
        assert_eq!(kept[0].actor, "");
        assert_eq!(kept[0].stats.as_ref().unwrap().scanned, 42);
        run(&app, "usage").await.unwrap();
        let runs = all_runs(&app, "", 10).await;
        assert_eq!(runs.len(), 2);
        assert!(runs[0].id > kept[0].id, "{runs:?}");
        assert_eq!(runs[1], kept[0]);
        app.stop().await;
    }
}
