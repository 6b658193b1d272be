//! Integration tests: the real server over real gRPC against a real Postgres.
//! One binary, so it compiles once.

/// What only Postgres can do (several replicas on one database, a database
/// reached over a network that a test cuts): compiled into this run only;
/// `tests/api_sqlite/main.rs` defines the same macro to expand to nothing.
macro_rules! postgres_only {
    ($($item:item)*) => { $($item)* };
}

mod agents;
mod auth;
mod brakes;
mod claims;
mod cli;
mod client_heartbeats;
mod copy;
mod dashboard_api;
mod dispatch;
mod healing;
mod helpers;
mod limits;
mod metrics;
mod outage;
mod pipeline;
mod pools;
mod post_healing;
mod recovery;
mod runs;
mod server;
mod sweeper;
mod tls;
mod tracing_otlp;
mod usage_ccusage;
mod usage_corpus;
mod usage_rollups;
mod watch;
mod write_path;
