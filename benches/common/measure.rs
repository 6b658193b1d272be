//! Driving calls and reporting them: a fixed number of calls at a fixed
//! concurrency, their rate and latency percentiles, and where the CPU went
//! (this process, Postgres, the machine's cores), from /proc.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{cpu_time, postgres_cpu_since, postgres_ticks};

/// Runs `total` calls of `call(i)` with `concurrency` in flight; returns the
/// elapsed time and sorted per-call latencies.
pub async fn drive<F, Fut>(total: usize, concurrency: usize, call: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(0..total)
        .map(|i| {
            let fut = call(i);
            async move {
                let t = Instant::now();
                fut.await;
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    latencies.sort();
    (started.elapsed(), latencies)
}

pub fn rate(total: usize, elapsed: Duration) -> f64 {
    total as f64 / elapsed.as_secs_f64()
}

/// The `p` quantile of sorted `latencies` (nearest rank below).
pub fn pct(latencies: &[Duration], p: f64) -> Duration {
    latencies[((latencies.len() as f64 - 1.0) * p) as usize]
}

/// While set, `report` and `CpuMeter::report` print nothing (a figure
/// measured in slices).
pub static QUIET: AtomicBool = AtomicBool::new(false);

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Prints one measured run (count, time, rate, p50, p99); returns the rate.
pub fn report(what: &str, total: usize, (elapsed, latencies): &(Duration, Vec<Duration>)) -> f64 {
    let r = rate(total, *elapsed);
    if quiet() {
        return r;
    }
    println!(
        "  {what:<44} {total:>8} in {:>8.2?} {:>9.0}/s  p50 {:>9.2?}  p99 {:>9.2?}",
        elapsed,
        r,
        pct(latencies, 0.50),
        pct(latencies, 0.99),
    );
    r
}

/// Resident memory of this process (server and bench client), from /proc.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// (busy, total) clock ticks of the whole machine, all cores, from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The CPU one measured run took, per call.
#[derive(Debug, Clone, Copy)]
pub struct CpuPerCall {
    /// This process (server and bench client), seconds per call.
    pub own: f64,
    /// Every `postgres` process, seconds per call.
    pub postgres: f64,
    /// The share of the machine's cores busy meanwhile (0 to 1).
    pub busy: f64,
    /// What all cores would sustain at this cost, calls per second.
    pub ceiling: f64,
}

/// Where the CPU of one measured run went: this process (server and bench
/// client), Postgres, and how busy the machine's cores were. With it, a rate
/// can be set against what the cores could sustain if nothing but CPU bound
/// it: `cores / (CPU per call)`.
pub struct CpuMeter {
    own: Duration,
    postgres: std::collections::HashMap<u32, u64>,
    machine: (u64, u64),
}

impl CpuMeter {
    pub fn start() -> Self {
        CpuMeter {
            own: cpu_time(),
            postgres: postgres_ticks(),
            machine: machine_ticks(),
        }
    }

    /// The CPU per call since `start`.
    pub fn per_call(&self, calls: usize) -> CpuPerCall {
        let own = (cpu_time() - self.own).as_secs_f64();
        let postgres = postgres_cpu_since(&self.postgres).as_secs_f64();
        let (busy, total) = machine_ticks();
        let busy = (busy - self.machine.0) as f64 / (total - self.machine.1).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let calls = calls.max(1) as f64;
        let per_call = (own + postgres) / calls;
        CpuPerCall {
            own: own / calls,
            postgres: postgres / calls,
            busy,
            ceiling: cores / per_call.max(f64::MIN_POSITIVE),
        }
    }

    /// Prints the CPU per call and the CPU-bound ceiling; returns the ceiling
    /// in calls per second.
    pub fn report(&self, what: &str, calls: usize) -> f64 {
        let c = self.per_call(calls);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !quiet() {
            println!(
                "    cpu per {what}: {:.1} µs server+client, {:.1} µs Postgres; cores {:.0} % busy; \
                 all {cores} cores would sustain {:.0}/s",
                c.own * 1e6,
                c.postgres * 1e6,
                c.busy * 100.0,
                c.ceiling,
            );
        }
        c.ceiling
    }
}
