//! Command-line flags with environment fallbacks, validated once at start-up.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, ValueEnum};

use crate::storage::{StoreLocation, StoreOptions};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the database is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The store: `postgres://...` for Postgres (the database is created if it
    /// does not exist; several replicas may share it), or `sqlite://PATH` for an
    /// embedded SQLite file. Unset: the embedded store in --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Where the embedded store keeps its file when no --database-url is given;
    /// created on first start.
    #[arg(long, env = "FLEETCARE_DATA_DIR", default_value = "fleetcare-data")]
    pub data_dir: PathBuf,

    /// Most connections this server opens to the database.
    #[arg(long, env = "FLEETCARE_DB_MAX_CONNECTIONS", default_value_t = StoreOptions::DEFAULT_MAX_CONNECTIONS)]
    pub db_max_connections: u32,

    /// How long a request waits for a database connection before UNAVAILABLE.
    #[arg(long, env = "FLEETCARE_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,
}

/// The file name of the embedded store inside --data-dir.
pub const SQLITE_FILE_NAME: &str = "fleetcare.db";

impl DatabaseArgs {
    /// Settings for the store at `url` (tests, `fleetcare copy`).
    pub fn for_url(url: &str) -> DatabaseArgs {
        DatabaseArgs {
            database_url: Some(url.to_owned()),
            ..DatabaseArgs::default()
        }
    }

    /// The store these settings select: --database-url when given, else the
    /// embedded store's file in --data-dir.
    pub fn location(&self) -> Result<StoreLocation, String> {
        match self.database_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => StoreLocation::parse(url),
            _ => Ok(StoreLocation::Sqlite(self.data_dir.join(SQLITE_FILE_NAME))),
        }
    }

    /// What the store is opened with (`storage::Stores::open`, `storage::migrate`):
    /// the location these settings select and the pool limits.
    pub fn store_options(&self) -> Result<StoreOptions, String> {
        Ok(StoreOptions {
            location: self.location()?,
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            clock: None,
        })
    }
}

impl Default for DatabaseArgs {
    fn default() -> Self {
        ServeArgs::default().database
    }
}

/// `--commit-pipeline-depth` unless told otherwise: how many batches the
/// committer (`runtime::committer`) has in flight at once, so that the next
/// batch waits at the store while the previous one's commit is flushed.
pub const COMMIT_PIPELINE_DEPTH: usize = 2;

/// Everything `fleetcare serve` needs.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLEETCARE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the HTTP listener serving Prometheus metrics at `/metrics`;
    /// an empty value turns it off.
    #[arg(long, env = "FLEETCARE_HTTP_LISTEN", default_value = "127.0.0.1:50052", value_parser = parse_http_listen)]
    pub http_listen: HttpListen,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// TOML file of the callers allowed in: each with a name, a role (agent,
    /// scheduler, reader, operator) and the SHA-256 of its bearer token (see
    /// `fleetcare token new`). Reloaded when it changes. Without it, only
    /// loopback addresses are served.
    #[arg(long, env = "FLEETCARE_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Serve a non-loopback address without an auth file: anyone who can reach
    /// the port may do everything. Logged as a warning at start.
    #[arg(long, env = "FLEETCARE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// An agent silent for longer than this goes OFFLINE.
    #[arg(long, env = "FLEETCARE_HEARTBEAT_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Recovery delay of an EXHAUSTED agent when nothing says when its limit lifts.
    #[arg(long, env = "FLEETCARE_DEFAULT_RECOVERY", default_value = "5h", value_parser = humantime::parse_duration)]
    pub default_recovery: Duration,

    /// Heartbeats of online agents are acknowledged from memory and written to the
    /// database at most this much later (a crash loses at most this much liveness).
    #[arg(long, env = "FLEETCARE_HEARTBEAT_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_flush_interval: Duration,

    /// Each heartbeat's reply includes every transition acknowledged before the
    /// call began, on any replica (a read of the store's head revision per round
    /// of heartbeats); off, a reply is this server's view, its `revision` saying
    /// which transition it reflects.
    #[arg(long, env = "FLEETCARE_HEARTBEAT_FRESH_REPLIES")]
    pub heartbeat_fresh_replies: bool,

    /// Fleet-wide heartbeats per second to stay under: agents are told to heartbeat
    /// at fleet size / this rate (within --min-heartbeat-interval and a third of
    /// --heartbeat-timeout).
    #[arg(long, env = "FLEETCARE_MAX_HEARTBEAT_RATE", default_value_t = 1000)]
    pub max_heartbeat_rate: u32,

    /// The shortest heartbeat interval agents are told to use.
    #[arg(long, env = "FLEETCARE_MIN_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_heartbeat_interval: Duration,

    /// Most state-changing calls committed in one database transaction.
    #[arg(long, env = "FLEETCARE_COMMIT_BATCH", default_value_t = 512)]
    pub commit_batch: usize,

    /// Most batches committing at once. The next batch waits at the database
    /// while the previous one's commit is flushed; batches in flight at once
    /// name different agents.
    #[arg(long, env = "FLEETCARE_COMMIT_PIPELINE_DEPTH", default_value_t = COMMIT_PIPELINE_DEPTH)]
    pub commit_pipeline_depth: usize,

    /// Recovery delay of an agent at a billing stop (insufficient_quota and the
    /// like) when nothing says when it lifts: retrying soon will not help.
    #[arg(long, env = "FLEETCARE_DEFAULT_BILLING_RECOVERY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub default_billing_recovery: Duration,

    /// How often the sweeper looks for silent and recovered agents.
    #[arg(long, env = "FLEETCARE_SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// How long transition history is kept (and so how far back a watch can resume).
    #[arg(long, env = "FLEETCARE_TRANSITION_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub transition_retention: Duration,

    /// An agent OFFLINE for longer than this is deleted by the sweeper (cause
    /// EXPIRED, its last transition on the watch); 0 keeps agents forever.
    #[arg(long, env = "FLEETCARE_OFFLINE_AGENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub offline_agent_retention: Duration,

    /// When a parked quota pool lifts, how long its other members wait for
    /// the canary (the member released first) to complete a work slot before
    /// they follow anyway (0 to 1h).
    #[arg(long, env = "FLEETCARE_POOL_CANARY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub pool_canary_timeout: Duration,

    /// A lifted pool's members after the canary are released over this long,
    /// each at an offset derived from its id and the pool's deadline (0 to 1h).
    #[arg(long, env = "FLEETCARE_POOL_RELEASE_SPREAD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub pool_release_spread: Duration,

    /// At most this many members of one pool are released in any second
    /// (1 to 1000).
    #[arg(long, env = "FLEETCARE_POOL_RELEASE_RATE", default_value_t = 10)]
    pub pool_release_rate: u32,

    /// The longest lease a ClaimAgent or RenewClaim may ask for (at least 1 s).
    #[arg(long, env = "FLEETCARE_MAX_CLAIM_LEASE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_claim_lease: Duration,

    /// An idle watch stream gets a progress message this often.
    #[arg(long, env = "FLEETCARE_WATCH_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_progress_interval: Duration,

    /// Transitions held in memory for watchers; one that falls further behind
    /// catches up from the database instead.
    #[arg(long, env = "FLEETCARE_WATCH_BUFFER", default_value_t = 4096)]
    pub watch_buffer: usize,

    /// How often the database is probed for the health service.
    #[arg(long, env = "FLEETCARE_HEALTH_CHECK_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// How long in-flight calls get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "FLEETCARE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub healing: HealingArgs,

    #[command(flatten)]
    pub pipeline: PipelineArgs,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "FLEETCARE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub tracing: TracingArgs,

    /// The clock the server and its store run on (see
    /// [`StoreOptions::clock`]): `None`, the system clock (and Postgres's
    /// own `now()`). Not a flag: tests set a manual clock to move time.
    #[arg(skip)]
    pub clock: Option<crate::storage::Clock>,
}

/// Span export: none unless --otlp-endpoint is given.
#[derive(Debug, Clone, Args)]
pub struct TracingArgs {
    /// Export spans (one per call, commits, pipeline runs) over OTLP/gRPC to
    /// this collector, e.g. http://127.0.0.1:4317; a caller's W3C
    /// `traceparent` is continued. Unset: no export.
    #[arg(long, env = "FLEETCARE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` the exported spans carry.
    #[arg(long, env = "FLEETCARE_OTLP_SERVICE_NAME", default_value = "fleetcare")]
    pub otlp_service_name: String,
}

/// TLS: none of these is plaintext, as before.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) to serve TLS with; needs --tls-key.
    #[arg(long, env = "FLEETCARE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLEETCARE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for mutual TLS: a client must present a
    /// certificate signed by one of them. Needs --tls-cert and --tls-key.
    #[arg(long, env = "FLEETCARE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes (new connections get a
    /// new certificate without a restart; SIGHUP checks at once); 0: SIGHUP only.
    #[arg(long, env = "FLEETCARE_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
}

impl TlsArgs {
    /// The files to serve TLS with, `None` for plaintext; an error for an
    /// incomplete set.
    pub fn files(&self) -> Result<Option<crate::tls::TlsFiles>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            })),
            (_, _, Some(_)) if self.tls_cert.is_none() || self.tls_key.is_none() => {
                Err("--tls-client-ca needs --tls-cert and --tls-key".into())
            }
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }
}

/// Bounds that hold under abuse: connections, calls, streams, message sizes.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Most client connections open at once; one beyond it is closed at once.
    /// Keep it below the process's descriptor limit (raised to its hard limit
    /// at start) minus what the database pool needs.
    #[arg(long, env = "FLEETCARE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// A new connection that sends nothing for this long is closed (the TLS
    /// handshake, when there is one, runs within it).
    #[arg(long, env = "FLEETCARE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Most calls in progress at once (server-wide, health and reflection
    /// aside); beyond it a call is refused RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "FLEETCARE_MAX_CONCURRENT_CALLS", default_value_t = 1024)]
    pub max_concurrent_calls: usize,

    /// Most watch streams (WatchTransitions, WatchRun) one caller (its IP
    /// address) holds open; beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLEETCARE_MAX_WATCHES_PER_CALLER", default_value_t = 32)]
    pub max_watches_per_caller: usize,

    /// Largest message, in bytes, a call may send or receive; a larger request
    /// is refused RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLEETCARE_MAX_MESSAGE_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub max_message_size: usize,
}

/// Tuning of the healing services.
#[derive(Debug, Clone, Args)]
pub struct HealingArgs {
    /// An active recovery without an outcome for this long expires and frees its agent.
    #[arg(long, env = "FLEETCARE_RECOVERY_LEASE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub recovery_lease: Duration,

    /// A recovery plan riskier than this becomes ESCALATE.
    #[arg(long, env = "FLEETCARE_SAFETY_LIMIT", default_value_t = 0.7)]
    pub safety_limit: f64,

    /// Error events and ended recovery actions older than this are pruned
    /// (what the planner learned is kept); 0 keeps them forever.
    #[arg(long, env = "FLEETCARE_HEALING_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub healing_retention: Duration,

    /// The remediation policy file (TOML; see docs/operations.md), read over
    /// the --healing-* flags below and re-read when it changes.
    #[arg(long, env = "FLEETCARE_HEALING_POLICY")]
    pub healing_policy: Option<std::path::PathBuf>,

    /// At most this percent of the fleet, and of each group, in active
    /// recovery or OFFLINE at once.
    #[arg(long, env = "FLEETCARE_HEALING_MAX_UNHEALTHY", default_value_t = 40)]
    pub healing_max_unhealthy: u32,

    /// Whatever the share, this many agents of a group may be unhealthy at once.
    #[arg(long, env = "FLEETCARE_HEALING_MIN_UNHEALTHY", default_value_t = 1)]
    pub healing_min_unhealthy: u32,

    /// The label key whose values name the groups the brakes also apply to.
    #[arg(long, env = "FLEETCARE_HEALING_GROUP_BY")]
    pub healing_group_by: Option<String>,

    /// At most this many recovery plans per minute, fleet-wide.
    #[arg(
        long,
        env = "FLEETCARE_HEALING_MAX_PLANS_PER_MINUTE",
        default_value_t = 60
    )]
    pub healing_max_plans_per_minute: u32,

    /// At most this many recovery plans per minute in one group.
    #[arg(
        long,
        env = "FLEETCARE_HEALING_MAX_GROUP_PLANS_PER_MINUTE",
        default_value_t = 20
    )]
    pub healing_max_group_plans_per_minute: u32,

    /// At most this many plans per agent per --healing-retry-window.
    #[arg(long, env = "FLEETCARE_HEALING_RETRY_BUDGET", default_value_t = 3)]
    pub healing_retry_budget: u32,

    /// The window of the retry budget.
    #[arg(long, env = "FLEETCARE_HEALING_RETRY_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub healing_retry_window: Duration,

    /// An agent healthy this long after a successful recovery gets its budget back.
    #[arg(long, env = "FLEETCARE_HEALING_MIN_HEALTHY_PERIOD", default_value = "1h", value_parser = humantime::parse_duration)]
    pub healing_min_healthy_period: Duration,

    /// Failures in a row of one (error type, strategy), fleet-wide, that open its breaker.
    #[arg(long, env = "FLEETCARE_HEALING_BREAKER_FAILURES", default_value_t = 5)]
    pub healing_breaker_failures: u32,

    /// How long an open breaker waits before letting one plan through.
    #[arg(long, env = "FLEETCARE_HEALING_BREAKER_COOLDOWN", default_value = "5m", value_parser = humantime::parse_duration)]
    pub healing_breaker_cooldown: Duration,

    /// Decide and record plans without handing them out.
    #[arg(long, env = "FLEETCARE_HEALING_DRY_RUN")]
    pub healing_dry_run: bool,

    /// Check the share, rate and budget brakes (`false` leaves only pauses,
    /// EXHAUSTED agents and breakers: for measuring their cost, not for production).
    #[arg(long, env = "FLEETCARE_HEALING_BRAKES", default_value_t = true, action = clap::ArgAction::Set)]
    pub healing_brakes: bool,

    /// Seed for the planner's Thompson sampling and retry jitter (reproducible runs); random when unset.
    #[arg(long, env = "FLEETCARE_HEALING_SEED")]
    pub healing_seed: Option<u64>,

    /// Metric points older than this are ignored when judging a post.
    #[arg(long, env = "FLEETCARE_POST_WINDOW", default_value = "90m", value_parser = humantime::parse_duration)]
    pub post_window: Duration,

    /// At most this many actions per post per window.
    #[arg(
        long,
        env = "FLEETCARE_POST_MAX_ACTIONS_PER_WINDOW",
        default_value_t = 2
    )]
    pub post_max_actions_per_window: usize,

    /// Cooldown after a comment on a post.
    #[arg(long, env = "FLEETCARE_POST_COOLDOWN_COMMENT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub post_cooldown_comment: Duration,

    /// Cooldown after an edit of a post.
    #[arg(long, env = "FLEETCARE_POST_COOLDOWN_EDIT", default_value = "2h", value_parser = humantime::parse_duration)]
    pub post_cooldown_edit: Duration,

    /// Cooldown after a thread on a post.
    #[arg(long, env = "FLEETCARE_POST_COOLDOWN_THREAD", default_value = "3h", value_parser = humantime::parse_duration)]
    pub post_cooldown_thread: Duration,

    /// A claimed post action without an outcome for this long counts as failed ("timeout").
    #[arg(long, env = "FLEETCARE_POST_CLAIM_LEASE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub post_claim_lease: Duration,

    /// A failed post action is retried while its attempts are below this.
    #[arg(long, env = "FLEETCARE_POST_MAX_ATTEMPTS", default_value_t = 3)]
    pub post_max_attempts: i32,

    /// A post whose engagement rate over the window (new engagements per new
    /// impression) is at or above this is HEALTHY: no action is proposed. In
    /// (0, 1]; the default 0.05 is where the stagnation score reaches 0.
    #[arg(long, env = "FLEETCARE_POST_HEALTHY_RATE", default_value_t = 0.05)]
    pub post_healthy_rate: f64,

    /// A post that gained fewer impressions than this over the window gets no
    /// stagnation verdict (LOW_EXPOSURE); 0 turns the floor off.
    #[arg(long, env = "FLEETCARE_POST_MIN_IMPRESSIONS", default_value_t = 100)]
    pub post_min_impressions: i64,
}

/// The session pipeline.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Root of the session transcripts: `<root>/<user>/<session>.jsonl`.
    #[arg(long, env = "SESSION_DATA_DIR", default_value = "./data/user_sessions")]
    pub session_dir: std::path::PathBuf,

    /// How often the `usage` processor runs (0 disables).
    #[arg(long, env = "FLEETCARE_PIPELINE_INTERVAL_USAGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub pipeline_interval_usage: Duration,

    /// How often the `errors` processor runs (0 disables).
    #[arg(long, env = "FLEETCARE_PIPELINE_INTERVAL_ERRORS", default_value = "15m", value_parser = humantime::parse_duration)]
    pub pipeline_interval_errors: Duration,

    /// A failing session becomes DEAD after this many attempts.
    #[arg(long, env = "FLEETCARE_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,

    /// First retry delay of a failing session; it doubles with each attempt (capped at 6 h).
    #[arg(long, env = "FLEETCARE_PIPELINE_RETRY_BASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub pipeline_retry_base: Duration,

    /// How long the history of processor runs is kept (each processor's newest run is always kept).
    #[arg(long, env = "FLEETCARE_RUN_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub run_retention: Duration,
}

/// Where the HTTP (metrics) listener binds, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

impl HttpListen {
    pub fn off() -> Self {
        HttpListen(None)
    }

    pub fn at(addr: SocketAddr) -> Self {
        HttpListen(Some(addr))
    }
}

/// `--http-listen`: an address, or empty for none.
pub fn parse_http_listen(value: &str) -> Result<HttpListen, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(HttpListen(None));
    }
    value
        .parse()
        .map(|addr| HttpListen(Some(addr)))
        .map_err(|e| format!("invalid --http-listen {value:?}: {e} (an address such as 127.0.0.1:50052, or empty)"))
}

/// Parses an empty command line, so that defaults (and env fallbacks) live in one place.
#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    serve: ServeArgs,
}

impl Default for ServeArgs {
    fn default() -> Self {
        DefaultsOnly::parse_from(["fleetcare"]).serve
    }
}

/// A flag's duration as a chrono duration, or an error naming the flag.
pub fn chrono_duration(flag: &str, value: Duration) -> Result<chrono::Duration, String> {
    chrono::Duration::from_std(value).map_err(|_| format!("{flag} is too large"))
}

/// What serving `addr` without authentication would mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Callers must present a token (an auth file is given).
    Authenticated,
    /// No auth file, on a loopback address: only this machine can connect.
    Loopback,
    /// No auth file on another address, allowed by --insecure-no-auth.
    Insecure,
}

/// Safe by default (as Redis's protected mode): without an auth file only
/// loopback addresses are served, unless --insecure-no-auth says otherwise.
pub fn exposure(
    addr: SocketAddr,
    auth_file: bool,
    insecure_no_auth: bool,
) -> Result<Exposure, String> {
    if auth_file && insecure_no_auth {
        return Err("--insecure-no-auth contradicts --auth-file: give one of them".into());
    }
    if auth_file {
        return Ok(Exposure::Authenticated);
    }
    if addr.ip().to_canonical().is_loopback() {
        return Ok(Exposure::Loopback);
    }
    if insecure_no_auth {
        return Ok(Exposure::Insecure);
    }
    Err(format!(
        "refusing to serve {addr} without authentication: anyone who can reach it could \
         change every agent. Give --auth-file FILE (see `fleetcare token new`), listen on a \
         loopback address (127.0.0.1:50051), or pass --insecure-no-auth to accept the risk"
    ))
}

impl ServeArgs {
    /// What the server opens its store with: the database flags'
    /// [`DatabaseArgs::store_options`], on [`ServeArgs::clock`].
    pub fn store_options(&self) -> Result<StoreOptions, String> {
        Ok(StoreOptions {
            clock: self.clock.clone(),
            ..self.database.store_options()?
        })
    }

    /// Whether serving `addr` (the address actually bound) with these flags is
    /// allowed, and how exposed it is.
    pub fn exposure_at(&self, addr: SocketAddr) -> Result<Exposure, String> {
        exposure(addr, self.auth_file.is_some(), self.insecure_no_auth)
    }

    /// Rejects settings that would make the server misbehave rather than fail.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--heartbeat-timeout", self.heartbeat_timeout),
            ("--sweep-interval", self.sweep_interval),
            ("--transition-retention", self.transition_retention),
            ("--watch-progress-interval", self.watch_progress_interval),
            ("--health-check-interval", self.health_check_interval),
            ("--db-acquire-timeout", self.database.db_acquire_timeout),
            ("--heartbeat-flush-interval", self.heartbeat_flush_interval),
        ];
        for (flag, value) in positive {
            if value.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if self.heartbeat_flush_interval >= self.heartbeat_timeout {
            return Err(
                "--heartbeat-flush-interval must be shorter than --heartbeat-timeout".into(),
            );
        }
        if self.max_heartbeat_rate == 0 || self.commit_batch == 0 || self.commit_pipeline_depth == 0
        {
            return Err(
                "--max-heartbeat-rate, --commit-batch and --commit-pipeline-depth must be at least 1"
                    .into(),
            );
        }
        if self.watch_buffer == 0 {
            return Err("--watch-buffer must be at least 1".into());
        }
        let l = &self.limits;
        if l.handshake_timeout.is_zero() {
            return Err("--handshake-timeout must be greater than zero".into());
        }
        for (flag, value) in [
            ("--max-connections", l.max_connections),
            ("--max-concurrent-calls", l.max_concurrent_calls),
            ("--max-watches-per-caller", l.max_watches_per_caller),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if l.max_message_size < 64 * 1024 {
            return Err("--max-message-size must be at least 65536 bytes".into());
        }
        if self.database.db_max_connections < 2 {
            return Err("--db-max-connections must be at least 2".into());
        }
        self.database.location()?;
        self.tls.files()?;
        self.exposure_at(self.listen)?;
        if let Some(endpoint) = &self.tracing.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            return Err(format!(
                "--otlp-endpoint {endpoint}: give an http:// address of an OTLP/gRPC collector \
                 (such as http://127.0.0.1:4317); TLS to the collector is not supported"
            ));
        }
        let h = &self.healing;
        let durations = [
            ("--default-recovery", self.default_recovery),
            ("--default-billing-recovery", self.default_billing_recovery),
            ("--heartbeat-timeout", self.heartbeat_timeout),
            ("--heartbeat-flush-interval", self.heartbeat_flush_interval),
            ("--min-heartbeat-interval", self.min_heartbeat_interval),
            ("--recovery-lease", h.recovery_lease),
            ("--post-window", h.post_window),
            ("--post-cooldown-comment", h.post_cooldown_comment),
            ("--post-cooldown-edit", h.post_cooldown_edit),
            ("--post-cooldown-thread", h.post_cooldown_thread),
            ("--post-claim-lease", h.post_claim_lease),
            ("--healing-retention", h.healing_retention),
            ("--offline-agent-retention", self.offline_agent_retention),
            ("--max-claim-lease", self.max_claim_lease),
        ];
        for (flag, value) in durations {
            chrono_duration(flag, value)?;
        }

        for (flag, value) in [
            ("--recovery-lease", h.recovery_lease),
            ("--post-window", h.post_window),
            ("--post-claim-lease", h.post_claim_lease),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if !(h.safety_limit > 0.0 && h.safety_limit <= 1.0) {
            return Err("--safety-limit must be in (0, 1]".into());
        }
        if self.pipeline.max_attempts < 1 {
            return Err("--max-attempts must be at least 1".into());
        }
        chrono_duration("--pipeline-retry-base", self.pipeline.pipeline_retry_base)?;
        if self.pipeline.run_retention.is_zero() {
            return Err("--run-retention must be greater than zero".into());
        }
        if h.post_max_actions_per_window == 0 || h.post_max_attempts < 1 {
            return Err(
                "--post-max-actions-per-window and --post-max-attempts must be at least 1".into(),
            );
        }
        if !(h.post_healthy_rate > 0.0 && h.post_healthy_rate <= 1.0) {
            return Err(format!(
                "--post-healthy-rate must be in (0, 1], got {}",
                h.post_healthy_rate
            ));
        }
        if h.post_min_impressions < 0 {
            return Err(format!(
                "--post-min-impressions must be 0 or more, got {}",
                h.post_min_impressions
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_options_are_the_flags_and_their_defaults() {
        let args = DatabaseArgs::for_url("sqlite://some/fleetcare.db");
        assert_eq!(
            args.store_options(),
            Ok(StoreOptions::new(StoreLocation::Sqlite(
                "some/fleetcare.db".into()
            )))
        );
        let args = DatabaseArgs {
            db_max_connections: 3,
            db_acquire_timeout: Duration::from_millis(250),
            ..DatabaseArgs::for_url("postgres://db/fleet")
        };
        let options = args.store_options().unwrap();
        assert_eq!(
            options.location,
            StoreLocation::Postgres("postgres://db/fleet".into())
        );
        assert_eq!(
            (options.max_connections, options.acquire_timeout),
            (3, Duration::from_millis(250))
        );
        assert!(DatabaseArgs::for_url("mysql://db").store_options().is_err());
    }

    #[test]
    fn an_otlp_endpoint_must_be_a_plaintext_grpc_address() {
        let mut args = ServeArgs::default();
        args.tracing.otlp_endpoint = Some("http://127.0.0.1:4317".into());
        assert_eq!(args.validate(), Ok(()));
        for refused in ["https://collector:4317", "collector:4317"] {
            args.tracing.otlp_endpoint = Some(refused.into());
            let error = args.validate().unwrap_err();
            assert!(error.contains("--otlp-endpoint"), "{error}");
        }
    }

    #[test]
    fn post_verdict_floors_are_checked_naming_their_flag() {
        let args = ServeArgs::default();
        assert_eq!(args.healing.post_healthy_rate, 0.05);
        assert_eq!(args.healing.post_min_impressions, 100);
        for rate in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
            let mut args = ServeArgs::default();
            args.healing.post_healthy_rate = rate;
            let error = args.validate().unwrap_err();
            assert!(error.starts_with("--post-healthy-rate "), "{rate}: {error}");
        }
        let mut args = ServeArgs::default();
        args.healing.post_healthy_rate = 1.0;
        args.healing.post_min_impressions = 0;
        assert_eq!(args.validate(), Ok(()));
        args.healing.post_min_impressions = -1;
        let error = args.validate().unwrap_err();
        assert!(error.starts_with("--post-min-impressions "), "{error}");
    }

    #[test]
    fn without_auth_only_loopback_is_served_unless_insecure() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        for loopback in [
            "127.0.0.1:50051",
            "127.8.0.1:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(
                exposure(at(loopback), false, false),
                Ok(Exposure::Loopback),
                "{loopback}"
            );
        }
        for open in ["0.0.0.0:50051", "[::]:50051", "10.0.0.5:50051"] {
            let refused = exposure(at(open), false, false).unwrap_err();
            assert!(refused.contains("without authentication"), "{refused}");
            assert_eq!(exposure(at(open), false, true), Ok(Exposure::Insecure));
            assert_eq!(exposure(at(open), true, false), Ok(Exposure::Authenticated));
        }
        assert!(exposure(at("0.0.0.0:1"), true, true).is_err());
    }
}
