//! Integration tests: the real server over real gRPC against a real Postgres.
//! One binary, so it compiles once.

mod agents;
mod auth;
mod cli;
mod client_heartbeats;
mod healing;
mod helpers;
mod pipeline;
mod post_healing;
mod recovery;
mod server;
mod sweeper;
mod usage_corpus;
mod usage_rollups;
mod watch;
mod write_path;
