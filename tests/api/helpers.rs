//! The test harness: a fresh database and a real server on a random port per
//! test, driven through the generated client. No sleeps for readiness: the
//! listener is bound before the server is spawned.
//!
//! Shared by the Postgres run (`tests/api`), the SQLite run (`tests/api_sqlite`)
//! and the benches, each of which uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetcare::config::{DatabaseArgs, HealingArgs, LogFormat, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::agent_status_service_client::AgentStatusServiceClient;
use fleetcare::startup::Application;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The Postgres server tests create their databases on (its `postgres`
/// database's URL), found once per test binary:
/// `FLEETCARE_TEST_DATABASE_URL` when set; else a throwaway server started
/// from the locally installed `initdb` and `postgres` (as the pgtemp crate
/// does), stopped when the test binary exits; else the Postgres run is skipped
/// with one line saying why, unless `FLEETCARE_REQUIRE_POSTGRES` is set (CI),
/// which turns the skip into a failure.
/// Creates `db` (a `TestDb::postgres()`) with only the migrations older than
/// `version` applied: the schema a server of before that migration left, for
/// a test that stores rows in it and then lets a server migrate the rest.
pub async fn postgres_migrated_before(db: &TestDb, version: i64) -> sqlx::PgPool {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            fleetcare::storage::postgres::MIGRATOR
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    pool
}

pub fn admin_url() -> String {
    static SERVER: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    match SERVER.get_or_init(throwaway_postgres::resolve) {
        Ok(url) => url.clone(),
        Err(why) => {
            if std::env::var_os("FLEETCARE_REQUIRE_POSTGRES").is_some() {
                panic!("FLEETCARE_REQUIRE_POSTGRES is set but {why}");
            }
            // Written past the test harness's capture, once, then the whole
            // binary ends successfully: every test of it needs Postgres.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\nfleetcare: the Postgres test run was SKIPPED: {why}\n"
            );
            std::process::exit(0);
        }
    }
}

/// Where the Postgres server of [`admin_url`] listens.
pub fn postgres_addr() -> SocketAddr {
    let options: sqlx::postgres::PgConnectOptions = admin_url().parse().expect("postgres url");
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", options.get_port())
        .parse()
        .expect("proxy tests need the database at an IP address")
}

mod throwaway_postgres {
    //! A Postgres server of our own for the test run, from the locally
    //! installed binaries, in a temporary directory, on a free port.

    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The supervisor shell: while its stdin stays open (the test binary is
    /// alive) the server runs; at EOF it stops the server and removes its
    /// files. The test binary never closes it: the OS does when it exits.
    static SUPERVISOR: std::sync::Mutex<Option<Child>> = std::sync::Mutex::new(None);

    pub fn resolve() -> Result<String, String> {
        if let Ok(url) = std::env::var("FLEETCARE_TEST_DATABASE_URL") {
            return Ok(url);
        }
        let bin = find_binaries().ok_or(
            "FLEETCARE_TEST_DATABASE_URL is not set and no initdb/postgres binaries \
             were found (FLEETCARE_TEST_POSTGRES_BIN, PATH, /usr/lib/postgresql); \
             install PostgreSQL, or point FLEETCARE_TEST_DATABASE_URL at a server",
        )?;
        start(&bin).map_err(|e| format!("a throwaway Postgres could not start: {e}"))
    }

    /// `FLEETCARE_TEST_POSTGRES_BIN` names the directory to take them from;
    /// else PATH, then Debian's /usr/lib/postgresql/<version>/bin, newest first.
    fn find_binaries() -> Option<PathBuf> {
        let usable = |dir: &PathBuf| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Some(dir) = std::env::var_os("FLEETCARE_TEST_POSTGRES_BIN") {
            return Some(PathBuf::from(dir)).filter(usable);
        }
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|dirs| dirs.flatten().map(|d| d.path().join("bin")).collect())
            .unwrap_or_default();
        installed.sort();
        installed.reverse();
        on_path.into_iter().chain(installed).find(usable)
    }

    /// initdb refuses to run as root: then the server runs as `postgres`.
    fn run_as() -> Result<Option<&'static str>, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Ok(None);
        }
        let known = Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .is_ok_and(|o| o.status.success());
        if known {
            Ok(Some("postgres"))
        } else {
            Err("running as root, and there is no postgres user to run initdb as".into())
        }
    }

    fn command(user: Option<&str>, program: &Path) -> Command {
        match user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn start(bin: &Path) -> Result<String, String> {
        let user = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-test-postgres-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some(user) = user {
            let chown = Command::new("chown")
                .arg(user)
                .arg(&dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !chown.success() {
                return Err(format!("chown {user} {} failed", dir.display()));
            }
        }
        let data = dir.join("data");
        let init = command(user, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !init.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&init.stderr).trim()
            ));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        // Durability does not matter for a throwaway: no fsync.
        let script = format!(
            "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=400 >'{dir}/log' 2>&1 & pid=$!; \
             cat >/dev/null; kill -INT $pid; wait $pid; rm -rf '{dir}'",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let supervisor = command(user, Path::new("sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        *SUPERVISOR.lock().unwrap() = Some(supervisor);
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        wait_until_ready(&url, &dir)?;
        Ok(url)
    }

    /// The server is another process: poll until it accepts a login (it
    /// refuses them while it starts up), for at most 60 s.
    fn wait_until_ready(url: &str, dir: &Path) -> Result<(), String> {
        let url = url.to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                loop {
                    use sqlx::Connection;
                    match sqlx::PgConnection::connect(&url).await {
                        Ok(conn) => {
                            let _ = conn.close().await;
                            return Ok(());
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => return Err(format!("not ready after 60 s: {e}")),
                    }
                }
            })
        })
        .join()
        .map_err(|_| "readiness check panicked".to_string())?
        .map_err(|e| {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            format!("{e}; server log:\n{log}")
        })
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    format!("{server}/{name}{query}")
}

/// The store a test runs against: a fresh Postgres database, or a fresh SQLite
/// file in its own directory (`FLEETCARE_TEST_BACKEND=sqlite`).
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The SQLite file's directory (None for Postgres).
    pub dir: Option<std::path::PathBuf>,
}

/// Whether this run's tests use the embedded SQLite store: the `api_sqlite`
/// test binary (the same test bodies as `api`), or `FLEETCARE_TEST_BACKEND=sqlite`.
pub fn sqlite_backend() -> bool {
    env!("CARGO_CRATE_NAME") == "api_sqlite"
        || std::env::var("FLEETCARE_TEST_BACKEND").is_ok_and(|b| b == "sqlite")
}

impl TestDb {
    pub fn new() -> TestDb {
        if sqlite_backend() {
            return TestDb::sqlite();
        }
        TestDb::postgres()
    }

    /// A fresh Postgres database, whatever the backend of this run.
    pub fn postgres() -> TestDb {
        let name = format!("fleetcare_test_{}", uuid::Uuid::new_v4().simple());
        TestDb {
            url: with_database(&admin_url(), &name),
            name,
            dir: None,
        }
    }

    /// A fresh SQLite file in its own directory, whatever the backend of this run.
    pub fn sqlite() -> TestDb {
        let name = format!("fleetcare_test_{}", uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(&name);
        TestDb {
            url: format!("sqlite://{}", dir.join("fleetcare.db").display()),
            name,
            dir: Some(dir),
        }
    }

    /// The same database reached through `proxy`, which a test can cut.
    pub fn url_via(&self, proxy: &TcpProxy) -> String {
        let server = postgres_addr().to_string();
        let url = self.url.replacen(&server, &proxy.addr.to_string(), 1);
        assert_ne!(url, self.url, "proxy tests need the database at {server}");
        url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping database {} for inspection", self.url);
            return;
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// Server settings for tests: everything quick, nothing timing-critical.
pub fn test_args(database_url: &str) -> ServeArgs {
    let defaults = ServeArgs::default();
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Every test server gets a metrics listener of its own.
        http_listen: fleetcare::config::HttpListen::at("127.0.0.1:0".parse().unwrap()),
        database: DatabaseArgs {
            database_url: Some(database_url.to_owned()),
            data_dir: Default::default(),
            db_max_connections: 10,
            db_acquire_timeout: Duration::from_secs(2),
        },
        sweep_interval: Duration::from_millis(100),
        heartbeat_flush_interval: Duration::from_millis(100),
        health_check_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        healing: HealingArgs {
            healing_seed: Some(7),
            ..unbraked(defaults.healing.clone())
        },
        ..defaults
    }
}

/// Healing settings with the remediation brakes out of reach: tests of
/// planning and learning plan many times for few agents; the brakes' own
/// tests (`tests/api/brakes.rs`) set the policy they test.
pub fn unbraked(healing: HealingArgs) -> HealingArgs {
    HealingArgs {
        healing_max_unhealthy: 100,
        healing_min_unhealthy: 1_000_000,
        healing_max_plans_per_minute: 1_000_000,
        healing_max_group_plans_per_minute: 1_000_000,
        healing_retry_budget: 1000,
        healing_breaker_failures: 1000,
        ..healing
    }
}

/// Puts the server `args` start (and its store) on a manual clock, starting
/// at the system clock's now, and returns the hand that moves it: a test about
/// expiry advances it instead of sleeping. Servers started from clones of
/// `args` share it.
pub fn manual_clock(args: &mut ServeArgs) -> fleetcare::runtime::clock::ManualClock {
    let (clock, hand) = fleetcare::runtime::clock::Clock::manual(chrono::Utc::now());
    args.clock = Some(clock);
    hand
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics listener (`--http-listen`), when there is one.
    pub http_addr: Option<SocketAddr>,
    /// The server's own store, for tests that look beneath the API.
    pub stores: fleetcare::storage::Stores,
    pub agents: AgentStatusServiceClient<Channel>,
    pub channel: Channel,
    pub shutdown: CancellationToken,
    handle: JoinHandle<Result<(), fleetcare::error::Error>>,
}

impl TestApp {
    /// A server with the test settings on `db`.
    pub async fn spawn(db: &TestDb) -> TestApp {
        TestApp::spawn_with(test_args(&db.url)).await
    }

    pub async fn spawn_with(args: ServeArgs) -> TestApp {
        if std::env::var_os("TEST_LOG").is_some() {
            fleetcare::telemetry::init(LogFormat::Text);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = Application::build(args, listener, shutdown.clone())
            .await
            .expect("server builds");
        let stores = app.stores().await.expect("store opens");
        let http_addr = app.http_addr();
        let handle = tokio::spawn(app.run());
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        TestApp {
            addr,
            http_addr,
            stores,
            agents: AgentStatusServiceClient::new(channel.clone()),
            channel,
            shutdown,
            handle,
        }
    }

    /// A server running `processors` instead of the built-in session processors
    /// (a test holds a run open with a gated one).
    pub async fn spawn_with_processors(
        args: ServeArgs,
        processors: Vec<fleetcare::processors::Registration>,
    ) -> TestApp {
        if std::env::var_os("TEST_LOG").is_some() {
            fleetcare::telemetry::init(LogFormat::Text);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = Application::build_with_processors(args, listener, shutdown.clone(), processors)
            .await
            .expect("server builds");
        let stores = app.stores().await.expect("store opens");
        let http_addr = app.http_addr();
        let handle = tokio::spawn(app.run());
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        TestApp {
            addr,
            http_addr,
            stores,
            agents: AgentStatusServiceClient::new(channel.clone()),
            channel,
            shutdown,
            handle,
        }
    }

    /// Graceful shutdown, as SIGTERM does it; returns once the server has stopped.
    pub async fn stop(self) {
        let TestApp {
            shutdown,
            handle,
            stores,
            ..
        } = self;
        // The server waits for every handle on its store to go, this one too.
        drop(stores);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("server stops within 30 s")
            .expect("server task")
            .expect("server ran cleanly");
    }

    pub async fn register(&self, agent_id: &str) -> pb::Agent {
        self.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: agent_id.into(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .expect("register")
            .into_inner()
            .agent
            .unwrap()
    }

    pub async fn get(&self, agent_id: &str) -> pb::Agent {
        self.agents
            .clone()
            .get_agent(pb::GetAgentRequest {
                agent_id: agent_id.into(),
            })
            .await
            .expect("get agent")
            .into_inner()
            .agent
            .unwrap()
    }

    pub async fn start_work(&self, agent_id: &str) -> Result<pb::StartWorkResponse, tonic::Status> {
        self.agents
            .clone()
            .start_work(pb::StartWorkRequest {
                agent_id: agent_id.into(),
                slot_type: pb::SlotType::Work as i32,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn finish_work(
        &self,
        agent_id: &str,
    ) -> Result<pb::FinishWorkResponse, tonic::Status> {
        self.agents
            .clone()
            .finish_work(pb::FinishWorkRequest {
                agent_id: agent_id.into(),
                fencing_token: 0,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Every transition in the retained history, oldest first.
    pub async fn history(&self, agent_id: &str) -> Vec<pb::Transition> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .agents
                .clone()
                .list_transitions(pb::ListTransitionsRequest {
                    agent_id: agent_id.into(),
                    after_revision: 0,
                    page_size: 1000,
                    page_token,
                })
                .await
                .expect("list transitions")
                .into_inner();
            all.extend(page.transitions);
            if page.next_page_token.is_empty() {
                return all;
            }
            page_token = page.next_page_token;
        }
    }
}

/// Polls `check` every 50 ms until it returns Some, or fails after `within`.
/// For waiting on background work (the sweeper), never for readiness.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn status(s: pb::AgentStatus) -> i32 {
    s as i32
}

/// A TCP proxy that a test can cut, stall and restore: in front of Postgres,
/// to see what the server does while its database is unreachable; in front of
/// the server, to see what a client does when its connection drops.
pub struct TcpProxy {
    pub addr: SocketAddr,
    upstream: Arc<std::sync::Mutex<SocketAddr>>,

    cut: Arc<AtomicBool>,
    /// While true, bytes are held: connections stay open and say nothing.
    stalled: tokio::sync::watch::Sender<bool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Copies `from` to `to`, holding each chunk while the link is stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl TcpProxy {
    pub async fn to_postgres() -> TcpProxy {
        TcpProxy::start(postgres_addr()).await
    }

    pub async fn start(upstream_addr: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stalled = tokio::sync::watch::channel(false).0;
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = Arc::new(std::sync::Mutex::new(upstream_addr));
        let (cut2, conns2, upstream2) = (cut.clone(), connections.clone(), upstream.clone());
        let stalled2 = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream_addr = *upstream2.lock().unwrap();
                let stalled = stalled2.subscribe();
                let task = tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(upstream_addr).await {
                        let (client_read, client_write) = client.into_split();
                        let (upstream_read, upstream_write) = upstream.into_split();
                        tokio::join!(
                            pump(client_read, upstream_write, stalled.clone()),
                            pump(upstream_read, client_write, stalled),
                        );
                    }
                });
                conns2.lock().await.push(task);
            }
        });
        TcpProxy {
            addr,
            upstream,
            cut,
            stalled,
            connections,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().await.drain(..) {
            task.abort();
        }
    }

    /// Holds every byte from now on, both ways, on open and new connections:
    /// a link that drops packets rather than closing (what a firewall rule
    /// or a partition does); nothing fails until something times out.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// New connections go to `upstream` (a restarted server, say).
    pub fn redirect(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// Ends a cut or a stall.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.send_replace(false);
    }
}

/// The stable `google.rpc.ErrorInfo` reason of a refusal ("" when it has none).
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// A `fleetcare serve` process (the real binary, for kill -9 and start-up
/// behaviour), killed with SIGKILL when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `fleetcare serve --listen <free port> <args>` and waits until its
    /// health check answers.
    pub async fn start(args: &[&str]) -> ServerProcess {
        ServerProcess::start_under(&[], args).await
    }

    /// Like [`ServerProcess::start`], the command run through `wrapper`
    /// (`["prlimit", "--nofile=1024:1024", "--"]`, say) when it is not empty.
    pub async fn start_under(wrapper: &[&str], args: &[&str]) -> ServerProcess {
        ServerProcess::start_with(wrapper, &[], args).await
    }

    /// Like [`ServerProcess::start`], with these environment variables set.
    pub async fn start_with_env(env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        ServerProcess::start_with(&[], env, args).await
    }

    async fn start_with(wrapper: &[&str], env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_fleetcare"));
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_fleetcare")),
        };
        let child = command
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start fleetcare serve");
        let process = ServerProcess { child, addr };
        // Readiness of another process: its health check, polled.
        eventually(
            Duration::from_secs(30),
            "server process serving",
            || async {
                let channel = Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let status = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .status;
                // The port answers NOT_SERVING until the store is open.
                (status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    .then_some(())
            },
        )
        .await;
        process
    }

    pub async fn client(&self) -> AgentStatusServiceClient<Channel> {
        AgentStatusServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// The process id (the server's own: a wrapper such as prlimit execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, the clean stop, and waits for the process to exit; returns
    /// whether it exited successfully.
    pub async fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "SIGTERM sent");
        let child = &mut self.child;
        let status = tokio::task::block_in_place(|| child.wait()).expect("wait for the server");
        status.success()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
