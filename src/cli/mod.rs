//! The operator CLI: `fleetcare agents|claims|watch|healing|pipeline|usage|explain-limit`, thin
//! callers of the public gRPC API (the same one every other client uses).
//! Tables for people by default, `--json` for scripts; one-line errors with
//! distinct exit codes (see [`error::exit`]).

mod agents;
mod claims;
mod copy;
mod error;
mod explain;
mod healing;
mod pipeline;
mod pools;
mod table;
pub mod token;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

pub use copy::{CopyArgs, CopyFailure, run_copy};
pub use error::{CliError, exit};
use fleetcare_client::{Clients, ConnectError, ConnectOptions};

/// Where the server is, how to reach it, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server's address: `host:port` or an `http://` URL; `https://host:port`
    /// (or any TLS flag) connects with TLS.
    #[arg(
        long,
        env = "FLEETCARE_SERVER",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub server: String,

    /// PEM CA certificate(s) to verify the server with (TLS; without it, the
    /// system's roots).
    #[arg(long, env = "FLEETCARE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a server that wants mutual TLS (with --tls-key).
    #[arg(
        long = "tls-cert",
        env = "FLEETCARE_CLIENT_TLS_CERT",
        requires = "client_tls_key",
        global = true
    )]
    pub client_tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long = "tls-key",
        env = "FLEETCARE_CLIENT_TLS_KEY",
        requires = "client_tls_cert",
        global = true
    )]
    pub client_tls_key: Option<PathBuf>,

    /// Bearer token sent with every call (`authorization: Bearer <token>`).
    #[arg(long, env = "FLEETCARE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,

    /// Print JSON (one document; `watch` prints one object per line).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    /// The TLS and token options of these flags.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            ca_file: self.tls_ca.clone(),
            identity: self
                .client_tls_cert
                .clone()
                .zip(self.client_tls_key.clone()),
            token: self.token.clone(),
            domain_name: None,
        }
    }

    async fn connect(&self) -> Result<Clients, CliError> {
        Clients::connect_with(&self.server, &self.options())
            .await
            .map_err(|e| match e {
                ConnectError::Transport(e) => CliError::unreachable(&self.server, &e),
                other => CliError::Setup(other.to_string()),
            })
    }
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List agents or show one.
    Agents(AgentsArgs),
    /// List the active claims.
    Claims(ClaimsArgs),
    /// Quota pools: list them, show one with its release, park or release one.
    Pools(PoolsArgs),
    /// Follow agent transitions live, one line each; resumes by itself after a dropped connection.
    Watch(WatchArgs),
    /// Healing statistics.
    Healing(HealingArgs),
    /// List session processors or run one now.
    Pipeline(PipelineArgs),
    /// Token usage accounted by the `usage` processor.
    Usage(UsageArgs),
    /// What the server would infer from a rate-limit or billing report (time,
    /// source, hint, reason), without touching any agent.
    ExplainLimit(ExplainLimitArgs),
}

#[derive(Debug, Args)]
pub struct ExplainLimitArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The provider's error text or JSON body, as the agent saw it.
    #[arg(long, default_value = "")]
    pub message: String,
    /// A response header, as NAME=VALUE (repeatable).
    #[arg(long, value_parser = parse_header)]
    pub header: Vec<(String, String)>,
    /// IANA zone for wall-clock times that name none (e.g. America/Los_Angeles).
    #[arg(long)]
    pub time_zone: Option<String>,
    /// Use this agent's `time_zone` label when no zone is given (the agent is only read).
    #[arg(long)]
    pub agent: Option<String>,
    /// The reason the agent would report.
    #[arg(long, value_enum, default_value_t = ReasonArg::RateLimit)]
    pub reason: ReasonArg,
    /// The limit window the report is for, when known (else inferred):
    /// five-hour, weekly, requests, tokens, billing or other.
    #[arg(long, value_parser = parse_window)]
    pub window: Option<fleetcare_client::pb::QuotaWindow>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReasonArg {
    RateLimit,
    Billing,
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: AgentsCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Every agent (all pages), optionally filtered.
    List {
        /// Keep agents with this status (repeatable).
        #[arg(long, value_enum)]
        status: Vec<StatusArg>,
        /// Keep agents with this label, as KEY=VALUE (repeatable; all must match).
        #[arg(long, value_parser = parse_label)]
        label: Vec<(String, String)>,
    },
    /// One agent.
    Get {
        /// The agent's id.
        agent_id: String,
    },
    /// Return an EXHAUSTED agent to IDLE now (operator or scheduler).
    Resume {
        /// The agent's id.
        agent_id: String,
        /// Why, for the server's log (free text, at most 1024 bytes).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take an agent out of rotation: it keeps its status and work but is
    /// never claimed (operator or scheduler). A cordoned agent stays as it is.
    Cordon {
        /// The agent's id.
        agent_id: String,
        /// Why, shown as the agent's cordon reason (at most 1024 bytes).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Put a cordoned agent back in rotation (operator or scheduler).
    Uncordon {
        /// The agent's id.
        agent_id: String,
    },
    /// Remove an agent, with a last DELETED transition (operator or
    /// scheduler); refused while it holds a claim whose lease runs.
    Delete {
        /// The agent's id.
        agent_id: String,
    },
}

#[derive(Debug, Args)]
pub struct PoolsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: PoolsCommand,
}

#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// Every pool an agent is in or that was parked, by name.
    List {
        /// Only pools PARKED or RELEASING.
        #[arg(long)]
        parked: bool,
    },
    /// One pool: its windows, members, canary and release schedule.
    Get { pool: String },
    /// Park a pool's window until a time (and its IDLE members with it).
    Park {
        pool: String,
        /// When the window lifts: an RFC 3339 time (2026-04-01T10:00:00Z).
        #[arg(long, value_parser = parse_time)]
        until: chrono::DateTime<chrono::Utc>,
        /// The limit window: five-hour, weekly, requests, tokens, billing or other.
        #[arg(long, value_parser = parse_window, default_value = "other")]
        window: fleetcare_client::pb::QuotaWindow,
        /// Why (kept as the window's hint).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End every window of a pool now; its members are released canary
    /// first, spread.
    Release {
        pool: String,
        /// Why (logged by the server).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct ClaimsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: ClaimsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Every active claim (all pages), ordered by agent id.
    List {
        /// Only the claims this caller holds (its name in the auth file;
        /// `anonymous` on a server without one).
        #[arg(long)]
        holder: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Idle,
    Busy,
    OnCall,
    Offline,
    Exhausted,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Start after this revision (replaying retained history); default: from now on.
    #[arg(long, default_value_t = 0)]
    pub since: i64,
    /// Only this agent's transitions (repeatable).
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// Stop after this many transitions (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct HealingArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: HealingCommand,
}

#[derive(Debug, Subcommand)]
pub enum HealingCommand {
    /// Errors by type, active recoveries and what has been learned per strategy.
    Stats,
    /// The remediation policy and where its brakes stand: pauses, open
    /// breakers, each group's unhealthy share, spent retry budgets.
    Policy,
    /// Stop new recovery plans for the fleet (or one group) until resumed.
    Pause {
        /// Why (required; shown to everyone whose plan is braked).
        #[arg(long)]
        reason: String,
        /// Pause one group (a value of the policy's group_by label) instead of the fleet.
        #[arg(long)]
        group: Option<String>,
    },
    /// Lift the pause of the fleet (or one group).
    Resume {
        #[arg(long)]
        group: Option<String>,
    },
    /// The latest decisions on recovery plan requests, braked or not.
    Decisions {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: PipelineCommand,
}

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Every processor with its cadence and last run.
    List,
    /// Run a processor now, with a progress bar, and print what it did.
    Run {
        /// The processor's name (see `pipeline list`).
        name: String,
    },
    /// The recorded runs, newest first: when, who or what started them, how
    /// long they took, their counts and first errors.
    Runs {
        /// Only this processor's runs.
        #[arg(long)]
        processor: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// How to group the rows.
    #[arg(long, value_enum, default_value_t = UsageBy::Day)]
    pub by: UsageBy,
    /// Usage at or after this time: a date (midnight UTC) or an RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Usage before this time: a date (midnight UTC, so the day is excluded) or an RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// One user's usage.
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UsageBy {
    Day,
    Session,
    Model,
    User,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A `QuotaWindow` by its name without the prefix, in any case, `-` for `_`
/// (`five-hour`, `WEEKLY`).
fn parse_window(s: &str) -> Result<fleetcare_client::pb::QuotaWindow, String> {
    crate::views::quota_window_named(s).ok_or_else(|| {
        format!("{s:?} is not a window: five-hour, weekly, requests, tokens, billing or other")
    })
}

/// `NAME=VALUE`; the value may hold `=` and may be empty.
fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
        .map_err(|_| format!("expected a date (2026-04-01) or an RFC 3339 time, got {s:?}"))
}

/// Runs one client command.
pub async fn run(command: ClientCommand) -> Result<(), CliError> {
    let result = match command {
        ClientCommand::Agents(args) => agents::run(args).await,
        ClientCommand::Claims(args) => claims::run(args).await,
        ClientCommand::Pools(args) => pools::run(args).await,
        ClientCommand::Watch(args) => agents::watch(args).await,
        ClientCommand::Healing(args) => healing::stats(args).await,
        ClientCommand::Pipeline(args) => pipeline::run(args).await,
        ClientCommand::Usage(args) => pipeline::usage(args).await,
        ClientCommand::ExplainLimit(args) => explain::run(args).await,
    };
    match result {
        // `fleetcare watch | head -3`: the reader left, which is not a failure.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes a text block or a JSON document to stdout.
fn print(
    json: bool,
    value: &impl Serialize,
    text: impl FnOnce() -> String,
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        out.write_all(text().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_need_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_label("team=a=b").unwrap(),
            ("team".into(), "a=b".into())
        );
        assert_eq!(
            parse_label("team=").unwrap(),
            ("team".into(), String::new())
        );
        assert!(parse_label("team").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn headers_need_a_name_and_an_equals_sign() {
        assert_eq!(
            parse_header("retry-after=30").unwrap(),
            ("retry-after".into(), "30".into())
        );
        assert_eq!(parse_header("x=a=b").unwrap(), ("x".into(), "a=b".into()));
        assert!(parse_header("retry-after").is_err());
        assert!(parse_header(" =1").is_err());
    }

    #[test]
    fn times_are_dates_at_midnight_utc_or_rfc3339() {
        assert_eq!(
            parse_time("2026-04-01").unwrap().to_rfc3339(),
            "2026-04-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-04-01T12:00:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2026-04-01T10:00:00+00:00"
        );
        assert!(parse_time("yesterday").is_err());
    }
}
