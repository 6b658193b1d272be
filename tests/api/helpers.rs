//! The test harness: a fresh database and a real server on a random port per
//! test, driven through the generated client. No sleeps for readiness: the
//! listener is bound before the server is spawned.

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

/// The Postgres server tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("FLEETCARE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
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

/// Whether this run's tests use the embedded SQLite store.
pub fn sqlite_backend() -> bool {
    std::env::var("FLEETCARE_TEST_BACKEND").is_ok_and(|b| b == "sqlite")
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
        let url = self
            .url
            .replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
        assert_ne!(
            url, self.url,
            "proxy tests need the database on 127.0.0.1:5432"
        );
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
            ..defaults.healing.clone()
        },
        ..defaults
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
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
        let handle = tokio::spawn(app.run());
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        TestApp {
            addr,
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
        let app = Application::build(args, listener, shutdown.clone())
            .await
            .expect("server builds")
            .with_processors(processors);
        let handle = tokio::spawn(app.run());
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        TestApp {
            addr,
            agents: AgentStatusServiceClient::new(channel.clone()),
            channel,
            shutdown,
            handle,
        }
    }

    /// Graceful shutdown, as SIGTERM does it; returns once the server has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
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

/// A TCP proxy that a test can cut and restore: in front of Postgres, to see
/// what the server does while its database is unreachable; in front of the
/// server, to see what a client does when its connection drops.
pub struct TcpProxy {
    pub addr: SocketAddr,
    upstream: Arc<std::sync::Mutex<SocketAddr>>,

    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    pub async fn to_postgres() -> TcpProxy {
        TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await
    }

    pub async fn start(upstream_addr: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = Arc::new(std::sync::Mutex::new(upstream_addr));
        let (cut2, conns2, upstream2) = (cut.clone(), connections.clone(), upstream.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream_addr = *upstream2.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(upstream_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                conns2.lock().await.push(task);
            }
        });
        TcpProxy {
            addr,
            upstream,
            cut,
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

    /// New connections go to `upstream` (a restarted server, say).
    pub fn redirect(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
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
