//! The baselines the benches set their figures against, measured in the same
//! run on the same database server: single-statement autocommit UPDATEs of one
//! row (Postgres, or an SQLite file with the embedded store's settings),
//! `pgbench -N`'s transaction, and the agent write path's durable transitions
//! (StartWork/FinishWork pairs). Each prints its line and the CPU per call.

use std::time::Duration;

use fleetcare::proto::v1 as pb;

use super::helpers::{self, TestDb};
use super::measure::{CpuMeter, drive, quiet, rate, report};

pub type AgentClient =
    pb::agent_status_service_client::AgentStatusServiceClient<tonic::transport::Channel>;

/// StartWork + FinishWork pairs, each in-flight caller on its own agent.
pub async fn transitions(
    client: &AgentClient,
    id: impl Fn(usize) -> String,
    pairs: usize,
    concurrency: usize,
    offset: usize,
) -> f64 {
    // Calls complete out of order: an in-flight pair takes a free agent and
    // gives it back, so no two pairs ever share one.
    let free = std::sync::Mutex::new((0..concurrency).map(|i| id(offset + i)).collect::<Vec<_>>());
    let free = &free;
    let r = drive(pairs, concurrency, |_| {
        let mut c = client.clone();
        async move {
            let agent_id = free.lock().unwrap().pop().expect("a free agent per caller");
            c.start_work(pb::StartWorkRequest {
                agent_id: agent_id.clone(),
                slot_type: pb::SlotType::Work as i32,
            })
            .await
            .unwrap();
            c.finish_work(pb::FinishWorkRequest {
                agent_id: agent_id.clone(),
                fencing_token: 0,
            })
            .await
            .unwrap();
            free.lock().unwrap().push(agent_id);
        }
    })
    .await;
    let label = format!("StartWork+FinishWork pairs, {concurrency} in flight");
    report(&label, pairs, &r);
    let per_sec = rate(2 * pairs, r.0);
    if quiet() {
        return per_sec;
    }
    println!(
        "  {:<44} {:>8} {:>21.0}/s",
        "  durable transitions",
        2 * pairs,
        per_sec
    );
    per_sec
}

/// One-row UPDATEs, each its own autocommit transaction, on `connections`
/// connections (each its own row): `pgbench -N` without pgbench. On the
/// embedded store, the same on the server's SQLite file with the server's
/// settings (WAL, synchronous=FULL, busy timeout), in a table of its own.
pub async fn updates(db: &TestDb, total: usize, connections: usize) -> f64 {
    if helpers::sqlite_backend() {
        return updates_sqlite(db, total, connections).await;
    }
    let pool = pool(db, connections).await;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline (id int PRIMARY KEY, n bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO bench_baseline SELECT g, 0 FROM generate_series(0, $1) g ON CONFLICT DO NOTHING",
    )
    .bind(connections as i32)
    .execute(&pool)
    .await
    .unwrap();
    let cpu = CpuMeter::start();
    let r = drive(total, connections, |i| {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE bench_baseline SET n = n + 1 WHERE id = $1")
                .bind((i % connections) as i32)
                .execute(&pool)
                .await
                .unwrap();
        }
    })
    .await;
    let label = format!("baseline: 1-row UPDATE, autocommit, {connections} conns");
    let per_sec = report(&label, total, &r);
    // Measured while the pool's backends are still alive.
    cpu.report("UPDATE", total);
    per_sec
}

/// A pool of `connections` connections to the bench's database, kept
/// open (`min_connections`) for the whole baseline.
pub async fn pool(db: &TestDb, connections: usize) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections as u32)
        .min_connections(connections as u32)
        .connect(&db.url)
        .await
        .unwrap()
}

/// `pgbench -N`'s transaction at scale 1 (BEGIN; UPDATE an account;
/// SELECT its balance; INSERT a history row; COMMIT), on `connections`
/// connections: the figure the issue measured (4,100 TPS there) beside the
/// literal single-statement baseline above.
pub async fn pgbench_n(db: &TestDb, total: usize, connections: usize) -> f64 {
    let pool = pool(db, connections).await;
    for statement in [
        "CREATE TABLE IF NOT EXISTS bench_accounts (aid int PRIMARY KEY, bid int NOT NULL, \
         abalance int NOT NULL, filler char(84)) WITH (fillfactor = 100)",
        "CREATE TABLE IF NOT EXISTS bench_history (tid int, bid int, aid int, delta int, \
         mtime timestamp, filler char(22))",
        "INSERT INTO bench_accounts SELECT g, 1, 0, '' FROM generate_series(1, 100000) g \
         ON CONFLICT DO NOTHING",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let cpu = CpuMeter::start();
    let r = drive(total, connections, |i| {
        let pool = pool.clone();
        async move {
            // pgbench draws aid, tid and delta at random; a fixed
            // scramble of i spreads them the same way, reproducibly.
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
            let aid = (h % 100_000) as i32 + 1;
            let tid = (h % 10) as i32 + 1;
            let delta = (h % 10_001) as i32 - 5_000;
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("UPDATE bench_accounts SET abalance = abalance + $1 WHERE aid = $2")
                .bind(delta)
                .bind(aid)
                .execute(&mut *tx)
                .await
                .unwrap();
            let _: i32 = sqlx::query_scalar("SELECT abalance FROM bench_accounts WHERE aid = $1")
                .bind(aid)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO bench_history (tid, bid, aid, delta, mtime) \
                 VALUES ($1, 1, $2, $3, CURRENT_TIMESTAMP)",
            )
            .bind(tid)
            .bind(aid)
            .bind(delta)
            .execute(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
    })
    .await;
    let per_sec = report(
        &format!("pgbench -N transaction, {connections} conns"),
        total,
        &r,
    );
    // Measured while the pool's backends are still alive.
    cpu.report("pgbench -N transaction", total);
    per_sec
}

/// The SQLite baseline, on a file of its own beside the server's (the
/// server holds its file's single-node lock; the disk is the same).
pub async fn updates_sqlite(db: &TestDb, total: usize, connections: usize) -> f64 {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let dir = db.dir.as_ref().expect("sqlite test db");
    let options = SqliteConnectOptions::new()
        .filename(dir.join("baseline.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(connections as u32)
        .min_connections(connections as u32)
        .connect_with(options)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for id in 0..=connections as i64 {
        sqlx::query("INSERT OR IGNORE INTO bench_baseline VALUES (?, 0)")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
    }
    let r = drive(total, connections, |i| {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE bench_baseline SET n = n + 1 WHERE id = ?")
                .bind((i % connections) as i64)
                .execute(&pool)
                .await
                .unwrap();
        }
    })
    .await;
    pool.close().await;
    report(
        &format!("baseline: SQLite 1-row UPDATE, autocommit, {connections} conns"),
        total,
        &r,
    )
}

/// `calls` health checks on `channel`, `concurrency` in flight: the gRPC
/// call with nothing behind it, the baseline of a server's own cost.
pub async fn health_checks(
    channel: &tonic::transport::Channel,
    calls: usize,
    concurrency: usize,
) -> (Duration, Vec<Duration>) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let health = HealthClient::new(channel.clone());
    drive(calls, concurrency, |_| {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        }
    })
    .await
}

/// One GET of a server's /metrics: every sample by its series (name and
/// labels as exposed).
pub async fn scrape(addr: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
