//! An in-memory store: the cheap test double that lets `runtime/` be unit-tested
//! without a database. It decides exactly as the real stores do (the domain's
//! batch planner) and keeps every guarantee a single process can see: atomic
//! batches, global gap-free revisions, wake-ups for the fan-out. Nothing is
//! durable, so it is never offered to `serve`: it is compiled into the
//! crate's unit tests and, with the `test-support` feature, the simulation
//! (`storage/mod.rs` declares it `#[cfg(any(test, feature = "test-support"))]`).

mod agents;
mod pipeline;

pub use agents::{CommitEvent, MemoryStore};
pub use pipeline::MemoryPipelineStore;
