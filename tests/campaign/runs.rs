//! The runs: the Postgres campaign, the embedded-store campaign and the
//! failover, each a test.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::check;
use crate::nemesis::{self, Kind, Nemesis, Replica};
use crate::pg::{self, Cluster};
use crate::procs::Server;
use crate::proxy::Proxy;
use crate::workload::{self, Outcome, Recorder, Tr};

/// The run's seed and length: `CAMPAIGN_SEED` (else drawn and printed),
/// `CAMPAIGN_SECS` (else `default_secs`) and `CAMPAIGN_REPLICAS`.
pub(crate) struct Settings {
    pub seed: u64,
    pub secs: u64,
    /// Replicas of the Postgres campaign (`CAMPAIGN_REPLICAS`, at least 2).
    pub replicas: usize,
}

impl Settings {
    pub fn from_env(default_secs: u64) -> Settings {
        let seed = std::env::var("CAMPAIGN_SEED")
            .ok()
            .map(|s| s.parse().expect("CAMPAIGN_SEED is a number"))
            .unwrap_or_else(rand::random);
        let secs = std::env::var("CAMPAIGN_SECS")
            .ok()
            .map(|s| s.parse().expect("CAMPAIGN_SECS is a number of seconds"))
            .unwrap_or(default_secs);
        let replicas = std::env::var("CAMPAIGN_REPLICAS")
            .ok()
            .map(|s| s.parse().expect("CAMPAIGN_REPLICAS is a number"))
            .unwrap_or(2usize)
            .max(2);
        Settings {
            seed,
            secs,
            replicas,
        }
    }
}

/// Written past the test harness's capture: CI's log shows every run's figures.
pub(crate) fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "campaign: {line}");
}

/// Postgres's binaries, or `None` after printing why the run is skipped;
/// `FLEETCARE_REQUIRE_POSTGRES` turns the skip into a failure.
pub(crate) fn postgres_binaries(run: &str) -> Option<PathBuf> {
    match pg::find_binaries() {
        Ok(bin) => Some(bin),
        Err(why) => {
            if std::env::var_os("FLEETCARE_REQUIRE_POSTGRES").is_some() {
                panic!("FLEETCARE_REQUIRE_POSTGRES is set but {why}");
            }
            report(&format!("the {run} was SKIPPED: {why}"));
            None
        }
    }
}

/// The run's directory (clusters, data, server logs): removed after a run
/// that passed, kept (and named) after one that failed.
pub(crate) struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(run: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-campaign-{run}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("campaign directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            report(&format!("kept {} for inspection", self.0.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Settings that make a short run eventful: a heartbeat timeout the faults
/// outlast (the sweeper marks agents OFFLINE), recoveries a second away.
pub(crate) fn server_args(store: &[String], scratch: &Scratch) -> Vec<String> {
    let mut args: Vec<String> = store.to_vec();
    args.extend(
        [
            "--heartbeat-timeout",
            "3s",
            "--heartbeat-flush-interval",
            "200ms",
            "--sweep-interval",
            "200ms",
            "--health-check-interval",
            "200ms",
            "--shutdown-grace",
            "2s",
            "--watch-progress-interval",
            "1s",
            "--db-acquire-timeout",
            "2s",
            "--db-max-connections",
            "6",
            "--pipeline-interval-usage",
            "0",
            "--pipeline-interval-errors",
            "0",
            "--healing-seed",
            "7",
        ]
        .map(String::from),
    );
    args.push("--session-dir".into());
    args.push(scratch.path("sessions").display().to_string());
    args
}

/// Every transition a Postgres store holds, in revision order.
pub(crate) async fn postgres_table(url: &str) -> Vec<Tr> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("read the table");
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT revision, agent_id, from_status, to_status, cause, actor FROM transitions ORDER BY revision",
    )
    .fetch_all(&mut conn)
    .await
    .expect("transitions");
    rows.into_iter().map(tr).collect()
}

async fn sqlite_table(path: &Path) -> Vec<Tr> {
    let url = format!("sqlite://{}?mode=ro", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("open the store");
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT revision, agent_id, from_status, to_status, cause, actor FROM transitions ORDER BY revision",
    )
    .fetch_all(&mut conn)
    .await
    .expect("transitions");
    rows.into_iter().map(tr).collect()
}

type Row = (i64, String, Option<String>, String, String, String);

fn tr((revision, agent_id, from, to, cause, actor): Row) -> Tr {
    Tr {
        revision,
        agent_id,
        from,
        to,
        cause,
        actor,
    }
}

/// The clients and watchers of a run.
pub(crate) struct Load {
    pub recorder: Arc<Recorder>,
    clients: JoinSet<()>,
    stop_clients: CancellationToken,
    watchers: JoinSet<()>,
    stop_watchers: CancellationToken,
    pub seen: Vec<Arc<AtomicI64>>,
}

impl Load {
    /// Registers the agents, then starts `clients` clients and `watchers`
    /// watchers (resuming from the head after the registrations).
    pub async fn start(
        seed: u64,
        targets: Vec<SocketAddr>,
        clients: usize,
        watchers: usize,
        head: impl AsyncFnOnce() -> i64,
    ) -> Load {
        let recorder = Arc::new(Recorder::default());
        let agents = workload::agent_ids(6);
        workload::register_all(targets[0], &agents, &recorder).await;
        let from = head().await;
        assert!(from >= agents.len() as i64, "registrations stored");
        let stop_watchers = CancellationToken::new();
        let mut watcher_tasks = JoinSet::new();
        let mut seen = Vec::new();
        for id in 0..watchers {
            let last = Arc::new(AtomicI64::new(from));
            seen.push(last.clone());
            watcher_tasks.spawn(workload::watcher(
                id,
                targets.clone(),
                from,
                last,
                recorder.clone(),
                stop_watchers.clone(),
            ));
        }
        let stop_clients = CancellationToken::new();
        let mut client_tasks = JoinSet::new();
        for id in 0..clients {
            client_tasks.spawn(workload::client(
                id,
                seed,
                targets.clone(),
                agents.clone(),
                recorder.clone(),
                stop_clients.clone(),
            ));
        }
        Load {
            recorder,
            clients: client_tasks,
            stop_clients,
            watchers: watcher_tasks,
            stop_watchers,
            seen,
        }
    }

    pub async fn stop_clients(&mut self) {
        self.stop_clients.cancel();
        while self.clients.join_next().await.is_some() {}
    }

    /// Waits until every watcher has seen the table's head (the sweeper may
    /// still be adding to it), then stops them.
    pub async fn drain_watchers(&mut self, head: impl AsyncFn() -> i64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            let head = head().await;
            let behind: Vec<i64> = self
                .seen
                .iter()
                .map(|s| s.load(Ordering::SeqCst))
                .filter(|&s| s < head)
                .collect();
            if behind.is_empty() {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "watchers still behind the head {head} after 60 s: at {behind:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.stop_watchers.cancel();
        while self.watchers.join_next().await.is_some() {}
        result
    }

    pub fn figures(&self) -> String {
        let calls = self.recorder.calls.lock().unwrap();
        let ok = calls
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Ok { .. }))
            .count();
        let unknown = calls.iter().filter(|c| check::unknown(c)).count();
        let sessions = self.recorder.sessions.lock().unwrap();
        let delivered: usize = sessions.iter().map(|s| s.received.len()).sum();
        format!(
            "{} calls ({ok} ok, {} refused, {unknown} unknown), {} watch sessions delivering {delivered} transitions",
            calls.len(),
            calls.len() - ok - unknown,
            sessions.len(),
        )
    }
}

/// Runs the history checker on the run's records and the table, and reports
/// (past the capture) what it measured; panics naming the seed when it, or
/// the run itself (`found`), found a violation.
pub(crate) fn verify(run: &str, seed: u64, load: &Load, table: &[Tr], mut found: Vec<String>) {
    let calls = load.recorder.calls.lock().unwrap().clone();
    let sessions = load.recorder.sessions.lock().unwrap().clone();
    let checked = check::check(&calls, table, &sessions);
    let stale = &checked.stale_replies;
    let oldest = stale.iter().map(|s| s.age).max().unwrap_or(0);
    report(&format!(
        "{run} (seed {seed}): the history checker found {} violations; {} unknown outcomes \
         explained a stored transition; {} stale replies (oldest {:.0} ms behind an acknowledged transition)",
        checked.violations.len(),
        checked.unknown_explained,
        stale.len(),
        oldest as f64 / 1e6,
    ));
    found.extend(checked.violations.iter().map(|v| v.to_string()));
    // The checker reads a table starting past revision 1 as pruned; nothing
    // is pruned during a run (7 days' retention), so that would be a loss.
    if let Some(first) = table.first()
        && first.revision != 1
    {
        found.push(format!(
            "the table starts at revision {}: revisions before it are lost",
            first.revision
        ));
    }
    if !found.is_empty() {
        panic!(
            "{run} (CAMPAIGN_SEED={seed}) found {} violations:\n  {}",
            found.len(),
            found.join("\n  ")
        );
    }
}

pub(crate) async fn postgres_head(url: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("read the head");
    sqlx::query_scalar("SELECT coalesce(max(revision), 0) FROM transitions")
        .fetch_one(&mut conn)
        .await
        .expect("head")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_campaign_replicas_under_faults() {
    let Some(bin) = postgres_binaries("Postgres campaign") else {
        return;
    };
    let settings = Settings::from_env(20);
    let seed = settings.seed;
    report(&format!(
        "Postgres campaign: CAMPAIGN_SEED={seed} CAMPAIGN_SECS={} CAMPAIGN_REPLICAS={}",
        settings.secs, settings.replicas
    ));
    let started = Instant::now();
    let scratch = Scratch::new("postgres");
    let mut cluster = Cluster::init(&bin, &scratch.0, "pg").await.expect("initdb");
    cluster.start().await.expect("postgres starts");
    let table_url = cluster.url("fleetcare");
    let cluster_addr = cluster.addr();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));

    let mut replicas = Vec::new();
    for i in 0..settings.replicas {
        let db = Arc::new(Proxy::start(cluster_addr).await);
        let url = format!("postgres://postgres@{}/fleetcare", db.addr);
        let mut server = Server::start(
            &format!("replica-{i}"),
            server_args(&["--database-url".into(), url], &scratch),
            scratch.path(&format!("replica-{i}.log")),
        );
        // One at a time: the first creates the database and migrates it.
        server
            .wait_serving(Duration::from_secs(60))
            .await
            .expect("replica serves");
        replicas.push(Replica::new(server, Some(db)).await);
    }
    let replicas = Arc::new(replicas);
    let targets = nemesis::fronts(&replicas);
    let head = async || postgres_head(&table_url).await;
    let mut load = Load::start(seed, targets, 4, 3, &head).await;

    let kinds = vec![
        Kind::Kill9,
        Kind::Sigterm,
        Kind::Sigstop,
        Kind::CutClientLink,
        Kind::StallClientLink,
        Kind::SlowClientLink,
        Kind::CutDatabaseLink,
        Kind::StallDatabaseLink,
        Kind::SlowDatabaseLink,
        Kind::CrashPostgres,
    ];
    let nemesis = Nemesis {
        replicas: replicas.clone(),
        postgres: Some(cluster.clone()),
        kinds: kinds.clone(),
    };
    let stop = CancellationToken::new();
    let faults = tokio::spawn({
        let stop = stop.clone();
        async move { nemesis.run(seed, stop).await }
    });
    // The run's length, not a wait for anything.
    tokio::time::sleep(Duration::from_secs(settings.secs)).await;
    stop.cancel();
    let done = faults.await.expect("nemesis");
    std::fs::write(scratch.path("faults.txt"), nemesis::timeline(&done)).expect("faults.txt");
    let mut found: Vec<String> = done.iter().filter_map(|d| d.trouble.clone()).collect();
    // Healed: every replica serves again; the clients go on a moment in peace.
    for r in replicas.iter() {
        if let Err(e) = r
            .server
            .lock()
            .await
            .wait_serving(Duration::from_secs(60))
            .await
        {
            found.push(format!("after the faults: {e}"));
        }
    }
    load.stop_clients().await;
    if let Err(e) = load.drain_watchers(&head).await {
        found.push(e);
    }
    let table = postgres_table(&table_url).await;
    report(&format!(
        "Postgres campaign (seed {seed}): {}; {}; {} transitions stored; {:.1} s",
        nemesis::summary(&done),
        load.figures(),
        table.len(),
        started.elapsed().as_secs_f64()
    ));
    let missing = nemesis::missing(&done, &kinds);
    assert!(
        missing.is_empty(),
        "no fault of kinds {missing:?} in the run: {}",
        nemesis::summary(&done)
    );
    verify("the Postgres campaign", seed, &load, &table, found);
    for r in replicas.iter() {
        assert!(
            r.server.lock().await.terminate().await,
            "a clean stop at the end"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_campaign_one_server_killed_stopped_and_frozen() {
    let settings = Settings::from_env(12);
    let seed = settings.seed;
    report(&format!(
        "embedded campaign: CAMPAIGN_SEED={seed} CAMPAIGN_SECS={}",
        settings.secs
    ));
    let started = Instant::now();
    let scratch = Scratch::new("embedded");
    let data = scratch.path("data");
    let mut server = Server::start(
        "embedded",
        server_args(&["--data-dir".into(), data.display().to_string()], &scratch),
        scratch.path("embedded.log"),
    );
    server
        .wait_serving(Duration::from_secs(60))
        .await
        .expect("serves");
    let replicas = Arc::new(vec![Replica::new(server, None).await]);
    let targets = nemesis::fronts(&replicas);
    let db_file = data.join("fleetcare.db");
    let head = async || {
        let table = sqlite_table(&db_file).await;
        table.last().map_or(0, |t| t.revision)
    };
    let mut load = Load::start(seed, targets, 3, 2, &head).await;
    let kinds = vec![
        Kind::Kill9,
        Kind::Sigterm,
        Kind::Sigstop,
        Kind::CutClientLink,
    ];
    let nemesis = Nemesis {
        replicas: replicas.clone(),
        postgres: None,
        kinds: kinds.clone(),
    };
    let stop = CancellationToken::new();
    let faults = tokio::spawn({
        let stop = stop.clone();
        async move { nemesis.run(seed, stop).await }
    });
    tokio::time::sleep(Duration::from_secs(settings.secs)).await;
    stop.cancel();
    let done = faults.await.expect("nemesis");
    std::fs::write(scratch.path("faults.txt"), nemesis::timeline(&done)).expect("faults.txt");
    let mut found: Vec<String> = done.iter().filter_map(|d| d.trouble.clone()).collect();
    if let Err(e) = replicas[0]
        .server
        .lock()
        .await
        .wait_serving(Duration::from_secs(60))
        .await
    {
        found.push(format!("after the faults: {e}"));
    }
    load.stop_clients().await;
    if let Err(e) = load.drain_watchers(&head).await {
        found.push(e);
    }
    assert!(
        replicas[0].server.lock().await.terminate().await,
        "a clean stop at the end"
    );
    let table = sqlite_table(&db_file).await;
    report(&format!(
        "embedded campaign (seed {seed}): {}; {}; {} transitions stored; {:.1} s",
        nemesis::summary(&done),
        load.figures(),
        table.len(),
        started.elapsed().as_secs_f64()
    ));
    let missing = nemesis::missing(&done, &kinds);
    assert!(
        missing.is_empty(),
        "no fault of kinds {missing:?} in the run: {}",
        nemesis::summary(&done)
    );
    verify("the embedded campaign", seed, &load, &table, found);
    // The checker sees through these records: bugs planted in them are named.
    let calls = load.recorder.calls.lock().unwrap().clone();
    let sessions = load.recorder.sessions.lock().unwrap().clone();
    let missed = check::missed_plants(&calls, &table, &sessions);
    assert!(
        missed.is_empty(),
        "planted bugs the checker missed: {missed:#?}"
    );
}

/// Found by the campaign: a replica restarted while its database link failed
/// in the middle of its migrations exited ("migrations failed: ...
/// Connection reset by peer") instead of waiting for its database, as it
/// does when the link fails before or after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_link_lost_during_migrations_is_waited_out() {
    let Some(bin) = postgres_binaries("migrations-interrupted run") else {
        return;
    };
    let scratch = Scratch::new("migrations");
    let mut cluster = Cluster::init(&bin, &scratch.0, "pg").await.expect("initdb");
    cluster.start().await.expect("postgres starts");
    let db = Proxy::start(cluster.addr()).await;
    // Every connection is dropped once it has sent 6 KB: past the first
    // migrations (2.5 to 4 KB of SQL each), before the last.
    db.limit_upstream(Some(6 * 1024));
    let url = format!("postgres://postgres@{}/fleetcare", db.addr);
    let mut server = Server::start(
        "replica",
        server_args(&["--database-url".into(), url], &scratch),
        scratch.path("replica.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.limited() == 0 {
        assert!(Instant::now() < deadline, "no connection reached the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.limit_upstream(None);
    let serving = server.wait_serving(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(scratch.path("replica.log")).unwrap_or_default();
    assert!(serving.is_ok(), "{serving:?}; its log:\n{log}");
    let applied: i64 = {
        let mut conn = sqlx::PgConnection::connect(&cluster.url("fleetcare"))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(
        applied,
        fleetcare::storage::postgres::MIGRATOR.iter().count() as i64,
        "every migration applied once"
    );
    assert!(server.terminate().await, "a clean stop");
}
