//! The integration suite against the embedded SQLite store: the same test
//! bodies as `tests/api` (which runs them against Postgres), each test on a
//! fresh SQLite file of its own, chosen by the harness (`helpers::sqlite_backend`
//! reads this binary's name). What only Postgres can do (several replicas on
//! one database, a database reached over a network that can be cut) stays in
//! the Postgres run; what only the embedded store does is in `embedded`.

/// Tests of several replicas on one database or of a database cut by a proxy
/// are Postgres's alone: the embedded store is single-node.
macro_rules! postgres_only {
    ($($item:item)*) => {};
}

#[path = "../api/agents.rs"]
mod agents;
#[path = "../api/auth.rs"]
mod auth;
#[path = "../api/brakes.rs"]
mod brakes;
#[path = "../api/claims.rs"]
mod claims;
#[path = "../api/cli.rs"]
mod cli;
#[path = "../api/client_heartbeats.rs"]
mod client_heartbeats;
#[path = "../api/dashboard_api.rs"]
mod dashboard_api;
#[path = "../api/dispatch.rs"]
mod dispatch;
#[path = "../api/healing.rs"]
mod healing;
#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/limits.rs"]
mod limits;
#[path = "../api/metrics.rs"]
mod metrics;
#[path = "../api/pipeline.rs"]
mod pipeline;
#[path = "../api/pools.rs"]
mod pools;
#[path = "../api/post_healing.rs"]
mod post_healing;
#[path = "../api/recovery.rs"]
mod recovery;
#[path = "../api/runs.rs"]
mod runs;
#[path = "../api/server.rs"]
mod server;
#[path = "../api/sweeper.rs"]
mod sweeper;
#[path = "../api/tls.rs"]
mod tls;
#[path = "../api/tracing_otlp.rs"]
mod tracing_otlp;
#[path = "../api/usage_ccusage.rs"]
mod usage_ccusage;
#[path = "../api/usage_corpus.rs"]
mod usage_corpus;
#[path = "../api/usage_rollups.rs"]
mod usage_rollups;
#[path = "../api/watch.rs"]
mod watch;
#[path = "../api/write_path.rs"]
mod write_path;

mod embedded;
