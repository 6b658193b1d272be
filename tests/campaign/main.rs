//! The fault campaign against real processes (issue 25, parts 2 and 3):
//! `fleetcare serve` binaries on Postgres and on the embedded store, each
//! behind a TCP proxy the campaign controls, clients recording every call and
//! resuming watchers, a seeded nemesis (kill -9, SIGTERM, SIGSTOP, cut,
//! stalled and slow links, a crash of a throwaway Postgres), and a failover
//! from a synchronous primary to its promoted standby. After each run the
//! history checker and the campaign's own checks read what the clients and
//! watchers recorded and what the `transitions` table holds.
//!
//! `CAMPAIGN_SEED` replays a run's fault schedule (a failing run prints its
//! seed), `CAMPAIGN_SECS` sets how long the nemesis runs (default: a short CI
//! run), `CAMPAIGN_REPLICAS` the Postgres campaign's replicas (default 2),
//! `CAMPAIGN_LOG=debug` the servers' log level (their logs are in the
//! run's directory, kept when a run fails). Needs Postgres's server binaries
//! (initdb, postgres, pg_basebackup) for the Postgres runs: without them they
//! are skipped with a printed reason, or fail with `FLEETCARE_REQUIRE_POSTGRES=1`.

mod check;
mod failover;
#[path = "../support/history.rs"]
mod history;
mod nemesis;
mod pg;
mod procs;
mod proxy;
mod runs;
mod workload;
