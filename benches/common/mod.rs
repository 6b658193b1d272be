//! What the benchmarks share: the integration tests' harness (a fresh
//! database and an in-process server), their knobs, and CPU accounting from
//! /proc. Each bench uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

#[path = "../../tests/api/helpers.rs"]
pub mod helpers;

/// A size from the environment (`BENCH_AGENTS=500 cargo bench ...`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) this process has used, from /proc.
pub fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0);
    // The kernel reports in clock ticks, 100 per second on Linux.
    Duration::from_millis(ticks * 10)
}

/// User + system clock ticks (100 per second) of one `/proc/<pid>/stat`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks used so far by each process named `postgres` on this machine
/// (its backends, WAL writer, checkpointer...): the database under the bench.
pub fn postgres_ticks() -> std::collections::HashMap<u32, u64> {
    let mut ticks = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains(" (postgres) ") {
            ticks.insert(pid, stat_ticks(&stat).unwrap_or(0));
        }
    }
    ticks
}

/// Postgres CPU since `before`, over the processes alive now (a backend
/// that has exited since is not counted: report before closing a pool).
pub fn postgres_cpu_since(before: &std::collections::HashMap<u32, u64>) -> Duration {
    let ticks: u64 = postgres_ticks()
        .into_iter()
        .map(|(pid, t)| t.saturating_sub(before.get(&pid).copied().unwrap_or(0)))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU time of this process's children that have exited and been waited
/// for (a peer tool run with `Command::output`), from /proc.
pub fn children_cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // cutime and cstime are fields 16 and 17 of stat; 14 and 15 after the ')'.
            Some(fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// CPU time so far of this process's threads whose name starts with
/// `prefix` (`sqlx-sqlite` for the embedded store's connection threads),
/// from /proc/self/task.
pub fn threads_cpu_time(prefix: &str) -> Duration {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("", |(name, _)| name);
        if name.starts_with(prefix) {
            ticks += stat_ticks(&stat).unwrap_or(0);
        }
    }
    Duration::from_millis(ticks * 10)
}
