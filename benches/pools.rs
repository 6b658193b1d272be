//! Quota pools (issue 23) over real gRPC against a real store: Postgres (a
//! fresh database), then the embedded store (a fresh SQLite file); one
//! backend with FLEETCARE_TEST_BACKEND=sqlite or BENCH_BACKENDS=postgres.
//!
//! - `park`: BENCH_POOL_MEMBERS (10,000) agents of one pool registered IDLE,
//!   a watch open from the head; one member's `ReportExhausted` naming the
//!   pool. Printed: the report's round trip (its commit parks every member),
//!   the time from sending it until the watch delivered the last member's
//!   POOL_EXHAUSTED, and that all of them came in one commit (one block of
//!   consecutive revisions, one commit in the server's
//!   `fleetcare_commit_batch_size`). Beside it, on the same database the same
//!   minute: one transaction updating those rows in a single statement (the
//!   least a store can do to park them), and the health check's p50.
//! - `release`: the pool released (`ReleasePool`) on a server run with
//!   `--pool-release-rate` BENCH_RELEASE_RATE (500), no spread, no canary
//!   timeout: every member's POOL_RELEASED counted off the watch, the most
//!   released within any second (each release with those in the second
//!   before it, by the transitions' server times), which must not exceed the
//!   rate, the mean rate, and that each member was released exactly once.
//!
//! Run:
//!
//!     cargo bench --bench pools
//!     BENCH_POOL_MEMBERS=2000 BENCH_RELEASE_RATE=200 cargo bench --bench pools

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::quota_service_client::QuotaServiceClient;
use pb::watch_transitions_response::Event;

mod common;

use common::measure::{drive, pct, report};
use common::{env_usize, helpers};

const POOL: &str = "bench/acct-1";

fn member(i: usize) -> String {
    format!("pm-{i:06}")
}

async fn start(db: &helpers::TestDb, rate: u32) -> helpers::TestApp {
    let args = ServeArgs {
        http_listen: fleetcare::config::HttpListen::at("127.0.0.1:0".parse().unwrap()),
        database: DatabaseArgs {
            database_url: Some(db.url.clone()),
            data_dir: Default::default(),
            db_max_connections: 20,
            db_acquire_timeout: Duration::from_secs(5),
        },
        // The agents never heartbeat: none goes OFFLINE during the bench.
        heartbeat_timeout: Duration::from_secs(3600),
        sweep_interval: Duration::from_millis(100),
        pool_release_rate: rate,
        pool_release_spread: Duration::ZERO,
        pool_canary_timeout: Duration::ZERO,
        ..ServeArgs::default()
    };
    helpers::TestApp::spawn_with(args).await
}

/// One GET of the server's /metrics.
async fn scrape(app: &helpers::TestApp) -> HashMap<String, f64> {
    match app.http_addr {
        Some(addr) => common::baselines::scrape(addr).await,
        None => HashMap::new(),
    }
}

/// Commits the server counted (`fleetcare_commit_batch_size_count`).
fn commits(m: &HashMap<String, f64>) -> f64 {
    m.get("fleetcare_commit_batch_size_count")
        .copied()
        .unwrap_or(0.0)
}

/// The next transition of `watch`.
async fn next(watch: &mut tonic::Streaming<pb::WatchTransitionsResponse>) -> pb::Transition {
    loop {
        let event = watch.message().await.unwrap().expect("stream open").event;
        if let Some(Event::Transition(t)) = event {
            return t;
        }
    }
}

/// The least a store does to park `members`: one transaction, one
/// statement updating their rows (the row versions, the WAL, the commit).
async fn one_statement(db: &helpers::TestDb, members: usize) -> Duration {
    let ids: Vec<String> = (0..members).map(member).collect();
    if helpers::sqlite_backend() || db.url.starts_with("sqlite:") {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db.url.trim_start_matches("sqlite://"))
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        let t = Instant::now();
        sqlx::query(
            "UPDATE agents SET recovery_hint = 'baseline', revision = revision
             WHERE agent_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(&ids).unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
        return t.elapsed();
    }
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let t = Instant::now();
    sqlx::query(
        "UPDATE agents SET recovery_hint = 'baseline', revision = revision
         WHERE agent_id = ANY($1)",
    )
    .bind(&ids)
    .execute(&pg)
    .await
    .unwrap();
    let took = t.elapsed();
    pg.close().await;
    took
}

async fn health_p50(app: &helpers::TestApp) -> Duration {
    let (_, latencies) = common::baselines::health_checks(&app.channel, 200, 1).await;
    pct(&latencies, 0.5)
}

async fn run(backend: &str, members: usize, rate: u32) {
    println!("\n{backend}: one pool of {members} idle members");
    let db = if backend == "sqlite" {
        helpers::TestDb::sqlite()
    } else {
        helpers::TestDb::postgres()
    };
    let app = start(&db, rate).await;
    let r = drive(members, 64, |i| {
        let mut c = app.agents.clone();
        async move {
            c.register_agent(pb::RegisterAgentRequest {
                agent_id: member(i),
                labels: Default::default(),
                quota_pools: vec![POOL.into()],
            })
            .await
            .unwrap();
        }
    })
    .await;
    report(&format!("RegisterAgent ({members} members)"), members, &r);

    // Members' transitions against other agents' (a member's batch reads
    // and locks its pool's row; others take the one-statement path).
    let pairs = env_usize("BENCH_PAIRS", 4000);
    let concurrency = 64;
    for (kind, pools) in [("member", vec!["bench/tx".to_owned()]), ("other", vec![])] {
        for i in 0..concurrency {
            app.agents
                .clone()
                .register_agent(pb::RegisterAgentRequest {
                    agent_id: format!("tx-{kind}-{i}"),
                    labels: Default::default(),
                    quota_pools: pools.clone(),
                })
                .await
                .unwrap();
        }
    }
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..3 {
        for kind in ["other", "member"] {
            let per_sec = common::baselines::transitions(
                &app.agents,
                |i| format!("tx-{kind}-{i}"),
                pairs,
                concurrency,
                0,
            )
            .await;
            rates.entry(kind).or_default().push(per_sec);
        }
    }
    let ratios: Vec<String> = rates["member"]
        .iter()
        .zip(&rates["other"])
        .map(|(m, o)| format!("{:.2}", m / o))
        .collect();
    println!(
        "  transitions of pool members / of agents in no pool, {concurrency} in flight, 3 rounds: {}",
        ratios.join(", ")
    );

    // park
    let mut watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let before = scrape(&app).await;
    let sent = Instant::now();
    let reported = app
        .agents
        .clone()
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: member(0),
            reason: pb::ExhaustionReason::RateLimit as i32,
            recovery_at: Some(fleetcare::proto::timestamp(
                chrono::Utc::now() + chrono::Duration::hours(5),
            )),
            quota_pool: POOL.into(),
            window: pb::QuotaWindow::FiveHour as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let answered = sent.elapsed();
    let first = reported.transition.unwrap().revision;
    let mut revisions = Vec::with_capacity(members);
    let mut last = Duration::ZERO;
    while revisions.len() < members {
        let t = next(&mut watch).await;
        if t.revision >= first {
            revisions.push(t.revision);
            last = sent.elapsed();
        }
    }
    let after = scrape(&app).await;
    let consecutive = revisions
        .iter()
        .enumerate()
        .all(|(i, r)| *r == first + i as i64);
    let batches = commits(&after) - commits(&before);
    let baseline = one_statement(&db, members).await;
    let health = health_p50(&app).await;
    println!(
        "  ReportExhausted parking {members}: answered in {answered:.2?}, last POOL_EXHAUSTED on the watch {last:.2?} after sending"
    );
    println!(
        "  one commit: revisions {first}..{} consecutive: {consecutive}; commits counted meanwhile: {batches}",
        first + members as i64 - 1
    );
    println!(
        "  baseline, same database: one UPDATE of the {members} rows {baseline:.2?} (report / baseline {:.1}); health check p50 {health:.2?}",
        answered.as_secs_f64() / baseline.as_secs_f64()
    );
    assert!(consecutive, "every member parked in one commit");

    // release
    let sent = Instant::now();
    QuotaServiceClient::new(app.channel.clone())
        .release_pool(pb::ReleasePoolRequest {
            pool: POOL.into(),
            reason: "bench".into(),
        })
        .await
        .unwrap();
    let mut released: BTreeMap<String, usize> = BTreeMap::new();
    let mut times: Vec<chrono::DateTime<chrono::Utc>> = Vec::with_capacity(members);
    while times.len() < members {
        let t = next(&mut watch).await;
        if t.cause == pb::TransitionCause::PoolReleased as i32 {
            *released.entry(t.agent_id.clone()).or_default() += 1;
            let at = t.occurred_at.unwrap();
            times.push(chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).unwrap());
        }
    }
    let took = sent.elapsed();
    times.sort();
    // Each release with those in the second before it: (x - 1 s, x].
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    let span = (times[times.len() - 1] - times[0]).num_milliseconds() as f64 / 1000.0;
    let once = released.len() == members && released.values().all(|n| *n == 1);
    println!(
        "  ReleasePool at --pool-release-rate {rate}: {members} released in {took:.2?} ({:.0}/s over {span:.1} s of server time); most within any second: {most} (rate {rate}); each exactly once: {once}",
        (members - 1) as f64 / span.max(f64::MIN_POSITIVE)
    );
    assert!(most <= rate as usize, "never faster than the rate");
    assert!(once, "each member released exactly once");
    app.stop().await;
}

#[tokio::main]
async fn main() {
    let members = env_usize("BENCH_POOL_MEMBERS", 10_000).max(2);
    let rate = env_usize("BENCH_RELEASE_RATE", 500).clamp(1, 1000) as u32;
    println!(
        "fleetcare pools bench: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for backend in common::backends() {
        run(&backend, members, rate).await;
    }
}
