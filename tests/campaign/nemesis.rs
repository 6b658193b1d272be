//! The nemesis: a seeded schedule of faults against real processes and
//! links, several at once on different targets, each healing itself after a
//! while. The seed fixes which faults, on what, for how long and the gaps
//! between them; the processes' own timing is not replayable (they are real),
//! so a seed repeats a run's faults, not its interleavings.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pg::Cluster;
use crate::procs::Server;
use crate::proxy::{Link, Proxy};

/// One replica: its process, the proxy clients reach it through, and (on
/// Postgres) the proxy it reaches its database through.
pub struct Replica {
    pub server: Arc<tokio::sync::Mutex<Server>>,
    pub front: Arc<Proxy>,
    pub front_lock: Arc<tokio::sync::Mutex<()>>,
    pub db: Option<Arc<Proxy>>,
    pub db_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Replica {
    pub async fn new(server: Server, db: Option<Arc<Proxy>>) -> Replica {
        let front = Arc::new(Proxy::start(server.addr).await);
        Replica {
            server: Arc::new(tokio::sync::Mutex::new(server)),
            front,
            front_lock: Arc::default(),
            db,
            db_lock: Arc::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Kill9,
    Sigterm,
    Sigstop,
    CutClientLink,
    StallClientLink,
    SlowClientLink,
    CutDatabaseLink,
    StallDatabaseLink,
    SlowDatabaseLink,
    CrashPostgres,
}

/// A fault as it happened: when (from the start), what, on which replica.
#[derive(Debug, Clone)]
pub struct Done {
    pub at: Duration,
    pub kind: Kind,
    pub target: Option<usize>,
    pub held: Duration,
    /// What went wrong healing it (a SIGTERM that did not end the server
    /// cleanly, a replica not serving again): a finding.
    pub trouble: Option<String>,
}

pub struct Nemesis {
    pub replicas: Arc<Vec<Replica>>,
    pub postgres: Option<Arc<tokio::sync::Mutex<Cluster>>>,
    pub kinds: Vec<Kind>,
}

impl Nemesis {
    /// Runs faults until `stop`, then waits for every fault to heal.
    pub async fn run(&self, seed: u64, stop: CancellationToken) -> Vec<Done> {
        let mut rng = StdRng::seed_from_u64(seed);
        let done: Arc<Mutex<Vec<Done>>> = Arc::default();
        let started = Instant::now();
        let mut faults = JoinSet::new();
        let mut round: Vec<Kind> = Vec::new();
        loop {
            let gap = Duration::from_millis(rng.random_range(150..700));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(gap) => {}
            }
            // Every kind once per round, in a shuffled order, so that a
            // short run has them all.
            if round.is_empty() {
                round = self.kinds.clone();
                round.shuffle(&mut rng);
            }
            let kind = round[round.len() - 1];
            let target = rng.random_range(0..self.replicas.len());
            let held = Duration::from_millis(rng.random_range(200..1500));
            let latency = Duration::from_millis(rng.random_range(20..400));
            let Some(fault) = self.fault(kind, target, held, latency) else {
                continue; // its target is busy with another fault: try again
            };
            round.pop();
            let done = done.clone();
            faults.spawn(async move {
                let at = started.elapsed();
                let trouble = fault.await;
                done.lock().unwrap().push(Done {
                    at,
                    kind,
                    target: (kind != Kind::CrashPostgres).then_some(target),
                    held,
                    trouble,
                });
            });
        }
        while faults.join_next().await.is_some() {}
        let mut done = std::mem::take(&mut *done.lock().unwrap());
        done.sort_by_key(|d| d.at);
        done
    }

    /// The fault as a future that applies it, holds it and heals it, if its
    /// target is free.
    fn fault(
        &self,
        kind: Kind,
        i: usize,
        held: Duration,
        latency: Duration,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>> {
        let replica = &self.replicas[i];
        let front = replica.front.clone();
        Some(match kind {
            Kind::Kill9 | Kind::Sigterm | Kind::Sigstop => {
                let mut server = replica.server.clone().try_lock_owned().ok()?;
                Box::pin(async move {
                    let mut trouble = None;
                    match kind {
                        Kind::Sigstop => {
                            server.freeze();
                            tokio::time::sleep(held).await;
                            server.thaw();
                            return None;
                        }
                        Kind::Kill9 => server.kill9().await,
                        _ => {
                            if !server.terminate().await {
                                trouble = Some(format!(
                                    "{} did not exit cleanly within 30 s of SIGTERM",
                                    server.name
                                ));
                            }
                        }
                    }
                    tokio::time::sleep(held).await;
                    // Up again before it is another fault's target (its
                    // database may be down meanwhile: long enough for that).
                    // The free port it was given may have been taken in the
                    // meantime (by another test's process): then another.
                    for attempt in 1.. {
                        server.restart();
                        front.redirect(server.addr);
                        match server.wait_serving(Duration::from_secs(30)).await {
                            Err(e) if e.contains("os error 98") && attempt < 3 => continue,
                            Err(e) => trouble = trouble.or(Some(e)),
                            Ok(()) => {}
                        }
                        break;
                    }
                    trouble
                })
            }
            Kind::CutClientLink | Kind::StallClientLink | Kind::SlowClientLink => {
                let guard = replica.front_lock.clone().try_lock_owned().ok()?;
                Box::pin(link_fault(guard, front, kind, held, latency))
            }
            Kind::CutDatabaseLink | Kind::StallDatabaseLink | Kind::SlowDatabaseLink => {
                let guard = replica.db_lock.clone().try_lock_owned().ok()?;
                let db = replica.db.clone()?;
                Box::pin(link_fault(guard, db, kind, held, latency))
            }
            Kind::CrashPostgres => {
                let mut cluster = self.postgres.clone()?.try_lock_owned().ok()?;
                Box::pin(async move {
                    cluster.crash().await;
                    tokio::time::sleep(held).await;
                    cluster.start().await.err()
                })
            }
        })
    }
}

async fn link_fault(
    _guard: tokio::sync::OwnedMutexGuard<()>,
    proxy: Arc<Proxy>,
    kind: Kind,
    held: Duration,
    latency: Duration,
) -> Option<String> {
    match kind {
        Kind::CutClientLink | Kind::CutDatabaseLink => proxy.cut(),
        Kind::StallClientLink | Kind::StallDatabaseLink => proxy.set_link(Link::Stall),
        _ => proxy.set_link(Link::Latency(latency)),
    }
    tokio::time::sleep(held).await;
    proxy.restore();
    None
}

/// The faults one per line (for the run's directory, kept when it fails).
pub fn timeline(done: &[Done]) -> String {
    done.iter()
        .map(|d| {
            format!(
                "{:>8.3} s  {:?}{} for {} ms{}\n",
                d.at.as_secs_f64(),
                d.kind,
                d.target
                    .map(|t| format!(" on replica-{t}"))
                    .unwrap_or_default(),
                d.held.as_millis(),
                d.trouble
                    .as_deref()
                    .map(|t| format!(": {t}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// The kinds of `kinds` that no fault of `done` was.
pub fn missing(done: &[Done], kinds: &[Kind]) -> Vec<Kind> {
    kinds
        .iter()
        .copied()
        .filter(|k| !done.iter().any(|d| d.kind == *k))
        .collect()
}

/// Faults per kind, for the report.
pub fn summary(done: &[Done]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for d in done {
        *counts.entry(d.kind).or_insert(0usize) += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
    format!("{} faults ({})", done.len(), parts.join(", "))
}

/// The replicas' front addresses (what clients and watchers dial).
pub fn fronts(replicas: &[Replica]) -> Vec<SocketAddr> {
    replicas.iter().map(|r| r.front.addr).collect()
}
