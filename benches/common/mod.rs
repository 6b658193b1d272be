//! What the benchmarks share: the integration tests' harness (a fresh
//! database and an in-process server) and their knobs.

#[path = "../../tests/api/helpers.rs"]
pub mod helpers;

/// A size from the environment (`BENCH_AGENTS=500 cargo bench ...`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
