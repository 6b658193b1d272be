//! What the benchmarks share: the integration tests' harness (a fresh
//! database and an in-process server), their knobs, and CPU accounting from
//! /proc. Each bench uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

#[path = "../../tests/api/helpers.rs"]
pub mod helpers;

pub mod baselines;
pub mod measure;
pub mod outside;

/// The stores a bench runs on, in order: `BENCH_BACKENDS` (`postgres`,
/// `sqlite`, comma-separated), else the embedded store alone under
/// `FLEETCARE_TEST_BACKEND=sqlite`, else Postgres then the embedded store.
pub fn backends() -> Vec<String> {
    let named = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| {
        if helpers::sqlite_backend() {
            "sqlite".into()
        } else {
            "postgres,sqlite".into()
        }
    });
    named.split(',').map(|b| b.trim().to_owned()).collect()
}

/// A size from the environment (`BENCH_AGENTS=500 cargo bench ...`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) this process has used, from /proc.
pub fn cpu_time() -> Duration {
    own_stat()
        .and_then(|s| stat_ticks(&s))
        .map_or(Duration::ZERO, from_ticks)
}

/// User + system clock ticks of one `/proc/<pid>/stat` (utime and stime,
/// fields 14 and 15).
pub fn stat_ticks(stat: &str) -> Option<u64> {
    stat_pair(stat, 14)
}

/// The sum of `/proc/<pid>/stat` fields `field` and `field + 1` (numbered
/// from 1, as in proc(5)), read after the process name, which may hold spaces.
fn stat_pair(stat: &str, field: usize) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    // Field 3 is the first after the ')'.
    let mut fields = rest.split_whitespace().skip(field - 3);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

fn own_stat() -> Option<String> {
    std::fs::read_to_string("/proc/self/stat").ok()
}

/// Clock ticks as time: the kernel counts 100 per second on Linux.
pub fn from_ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
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
    from_ticks(ticks)
}

/// CPU time of this process's children that have exited and been waited
/// for (a peer tool run with `Command::output`): cutime and cstime, fields 16
/// and 17.
pub fn children_cpu_time() -> Duration {
    own_stat()
        .and_then(|s| stat_pair(&s, 16))
        .map_or(Duration::ZERO, from_ticks)
}

/// CPU time so far of this process's threads whose name starts with
/// `prefix` (`sqlx-sqlite` for the embedded store's connection threads),
/// from /proc/self/task.
pub fn threads_cpu_time(prefix: &str) -> Duration {
    let mut total = 0;
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
            total += stat_ticks(&stat).unwrap_or(0);
        }
    }
    from_ticks(total)
}
