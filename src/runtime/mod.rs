//! Background work and the write path: group commit, heartbeats from memory,
//! the transition fan-out and watch streams, the sweeper, the health monitor and
//! the session pipeline.

pub mod agent_cache;
pub mod agents;
pub mod auth;
pub mod claims;
pub mod clock;
pub mod committer;
pub mod connections;
pub mod fanout;
pub mod file_watch;
pub mod healing_policy;
pub mod health;
pub mod heartbeats;
pub mod pipeline;
pub mod pools;
pub mod sweeper;
pub mod watch;
