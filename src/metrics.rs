//! Prometheus metrics: one registry per server ([`Metrics`], owned by the
//! `Application` and passed to where things happen), rendered by `prometheus-client`
//! in the OpenMetrics text format at `/metrics` (see `http`).
//!
//! Counters and histograms are recorded where the event happens, once each. What
//! is a state rather than an event (agents by status, database pools, the slowest
//! watcher's lag) is read when scraped. No label grows with the fleet: labels are
//! statuses, causes, methods, codes, processors, strategies, never agent ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::domain::agent::AgentStatus;
use crate::storage::AgentStore;

/// What `prometheus-client` writes: the OpenMetrics text format (counters'
/// samples end in `_total`, `# UNIT` lines, `# EOF`), which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scrape waits for the store's counts before answering without them.
const SCRAPE_STORE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: String,
    pub method: String,
    pub code: &'static str,
    /// How the call came in: `grpc`, or `http` (the dashboard's API calling
    /// the same service in-process).
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub cause: &'static str,
    pub to_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabel {
    pub window: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The reasons a ClaimAgent call is refused, as its error says them.
pub const CLAIM_REFUSALS: [&str; 3] = [
    "NO_AGENT_AVAILABLE",
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessorLabels {
    pub processor: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrategyLabel {
    pub strategy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The labels of `fleetcare_healing_decisions`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: &'static str,
    /// The brake's reason, HEALING_DRY_RUN, or "" when planned.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: &'static str,
}

/// The `stream` label of `fleetcare_watch_streams`: WatchTransitions.
pub const TRANSITIONS_STREAM: &str = "transitions";
/// The `stream` label of `fleetcare_watch_streams`: WatchRun.
pub const RUN_STREAM: &str = "run";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn acquire_histogram() -> Histogram {
    // 50 µs .. ~1.6 s, and +Inf beyond (a wait that runs out at the timeout)
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    pub rpc_duration: HistogramFamily<RpcLabels>,
    pub transitions: Family<TransitionLabels, Counter>,
    agents: Family<StatusLabel, Gauge>,
    pub heartbeats_received: Counter,
    pub heartbeats_flushed: Counter,
    pub heartbeat_flush_failures: Counter,
    watch_streams: Family<StreamLabel, Gauge>,
    watch_lag: Gauge,
    pub commit_batch_size: Histogram,
    pub commit_duration: Histogram,
    pub sweeper_runs: Counter,
    pub sweeper_changes: Counter,
    /// Members let go by their quota pool's staggered release.
    pub pool_releases: Counter,
    pools_parked: Family<WindowLabel, Gauge>,
    pool_members_held: Gauge,
    pub pipeline_runs: Family<ProcessorLabels, Counter>,
    pub pipeline_sessions: Family<ProcessorLabels, Counter>,
    pub healing_plans: Family<StrategyLabel, Counter>,
    pub healing_outcomes: Family<ResultLabel, Counter>,
    /// Decisions on PlanRecovery, braked or not.
    pub healing_decisions: Family<DecisionLabels, Counter>,
    pub post_actions: Family<StatusLabel, Counter>,
    /// ClaimAgent calls answered without a claim, by reason.
    pub claims_refused: Family<ReasonLabel, Counter>,
    /// ClaimAgent calls of this process waiting for an agent.
    pub claims_waiting: Gauge,
    db_connections: Family<PoolLabels, Gauge>,
    db_max_connections: Family<PoolLabel, Gauge>,
    db_acquire_duration: HistogramFamily<PoolLabel>,
    db_acquire_timeouts: Family<PoolLabel, Counter>,
    /// What the scrape reads from: set once the store is open.
    agent_store: Mutex<Option<Arc<dyn AgentStore>>>,
    /// The server's clock (the store's): whether a pool's window is in
    /// force is judged on it.
    clock: Mutex<Option<crate::storage::clock::Clock>>,
    watchers: Watchers,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("fleetcare");
        let rpc_duration: HistogramFamily<RpcLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "rpc_duration",
            "Calls of the services by service, method, final status code and transport (grpc, or http for the dashboard API; a stream: until it ends)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "transitions",
            "Agent status transitions committed by this server, by cause and new status",
            transitions.clone(),
        );
        let agents = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "agents",
            "Registered agents by status (read from the store when scraped)",
            agents.clone(),
        );
        let heartbeats_received = Counter::default();
        registry.register(
            "heartbeats_received",
            "Heartbeats accepted by this server",
            heartbeats_received.clone(),
        );
        let heartbeats_flushed = Counter::default();
        registry.register(
            "heartbeats_flushed",
            "Heartbeats acknowledged from memory and then written to the store",
            heartbeats_flushed.clone(),
        );
        let heartbeat_flush_failures = Counter::default();
        registry.register(
            "heartbeat_flush_failures",
            "Heartbeat flushes the store refused (retried at the next flush)",
            heartbeat_flush_failures.clone(),
        );
        let watch_streams = Family::<StreamLabel, Gauge>::default();
        registry.register(
            "watch_streams",
            "Watch streams open on this server, by stream (transitions: WatchTransitions, run: WatchRun)",
            watch_streams.clone(),
        );
        let watch_lag = Gauge::default();
        registry.register(
            "watch_lag_revisions",
            "Revisions the slowest open watch stream is behind the newest published one",
            watch_lag.clone(),
        );
        let commit_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "commit_batch_size",
            "Calls per group-commit batch",
            commit_batch_size.clone(),
        );
        let commit_duration = latency_histogram();
        registry.register_with_unit(
            "commit_duration",
            "Time to commit one group-commit batch",
            Unit::Seconds,
            commit_duration.clone(),
        );
        let sweeper_runs = Counter::default();
        registry.register("sweeper_runs", "Sweeps run", sweeper_runs.clone());
        let sweeper_changes = Counter::default();
        registry.register(
            "sweeper_changes",
            "Agents the sweeper moved (OFFLINE on silence, or recovered)",
            sweeper_changes.clone(),
        );
        let pool_releases = Counter::default();
        registry.register(
            "quota_pool_releases",
            "Members released by their quota pool's staggered release",
            pool_releases.clone(),
        );
        let pools_parked = Family::<WindowLabel, Gauge>::default();
        registry.register(
            "quota_pools_parked",
            "Quota pools parked, by window in force (a pool parked for two windows counts in both)",
            pools_parked.clone(),
        );
        let pool_members_held = Gauge::default();
        registry.register(
            "quota_pool_members_held",
            "Agents a quota pool holds (parked, not yet released)",
            pool_members_held.clone(),
        );
        let pipeline_runs = Family::<ProcessorLabels, Counter>::default();
        registry.register(
            "pipeline_runs",
            "Session pipeline runs by processor and result (ok, error)",
            pipeline_runs.clone(),
        );
        let pipeline_sessions = Family::<ProcessorLabels, Counter>::default();
        registry.register(
            "pipeline_sessions",
            "Sessions handled by processor and result (processed, failed, dead)",
            pipeline_sessions.clone(),
        );
        let healing_plans = Family::<StrategyLabel, Counter>::default();
        registry.register(
            "healing_plans",
            "Recovery plans made, by strategy",
            healing_plans.clone(),
        );
        let healing_outcomes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "healing_outcomes",
            "Recovery outcomes reported, by the action's resulting status",
            healing_outcomes.clone(),
        );
        let healing_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "healing_decisions",
            "Decisions on recovery plan requests, by verdict and the brake's reason",
            healing_decisions.clone(),
        );
        let post_actions = Family::<StatusLabel, Counter>::default();
        registry.register(
            "post_actions",
            "Post actions claimed (RUNNING) and outcomes recorded, by status",
            post_actions.clone(),
        );
        let claims_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "claims_refused",
            "ClaimAgent calls answered without a claim, by reason (claims made and \
             expired are transitions with cause CLAIMED and CLAIM_EXPIRED)",
            claims_refused.clone(),
        );
        let claims_waiting = Gauge::default();
        registry.register(
            "claims_waiting",
            "ClaimAgent calls of this process waiting (wait_timeout) for a matching agent, once a first attempt found none",
            claims_waiting.clone(),
        );
        let db_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_connections",
            "Database connections by pool and state (in_use, idle)",
            db_connections.clone(),
        );
        let db_max_connections = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "db_max_connections",
            "Most connections each database pool may open",
            db_max_connections.clone(),
        );
        let db_acquire_duration: HistogramFamily<PoolLabel> =
            Family::new_with_constructor(acquire_histogram);
        registry.register_with_unit(
            "db_acquire_duration",
            "Time to get a database connection from each pool (waiting for one, opening one)",
            Unit::Seconds,
            db_acquire_duration.clone(),
        );
        let db_acquire_timeouts = Family::<PoolLabel, Counter>::default();
        registry.register(
            "db_acquire_timeouts",
            "Waits for a database connection that ran out at --db-acquire-timeout (answered UNAVAILABLE)",
            db_acquire_timeouts.clone(),
        );
        // Series of bounded label sets exist from the start at 0, so a rate or
        // an alert sees them before the first event.
        for strategy in crate::domain::healing::Strategy::ALL {
            drop(healing_plans.get_or_create(&StrategyLabel {
                strategy: strategy.as_str(),
            }));
        }
        for result in ["SUCCEEDED", "FAILED"] {
            drop(healing_outcomes.get_or_create(&ResultLabel { result }));
        }
        for status in crate::domain::post_healing::ActionStatus::ALL {
            drop(post_actions.get_or_create(&StatusLabel {
                status: status.as_str(),
            }));
        }
        for reason in CLAIM_REFUSALS {
            drop(claims_refused.get_or_create(&ReasonLabel { reason }));
        }
        for status in AgentStatus::ALL {
            drop(agents.get_or_create(&StatusLabel {
                status: status.as_str(),
            }));
        }
        for stream in [TRANSITIONS_STREAM, RUN_STREAM] {
            drop(watch_streams.get_or_create(&StreamLabel { stream }));
        }
        Arc::new(Metrics {
            registry,
            rpc_duration,
            transitions,
            agents,
            heartbeats_received,
            heartbeats_flushed,
            heartbeat_flush_failures,
            watch_streams,
            watch_lag,
            commit_batch_size,
            commit_duration,
            sweeper_runs,
            sweeper_changes,
            pool_releases,
            pools_parked,
            pool_members_held,
            pipeline_runs,
            pipeline_sessions,
            healing_plans,
            healing_outcomes,
            healing_decisions,
            post_actions,
            claims_refused,
            claims_waiting,
            db_connections,
            db_max_connections,
            db_acquire_duration,
            db_acquire_timeouts,
            agent_store: Mutex::new(None),
            clock: Mutex::new(None),
            watchers: Watchers::default(),
        })
    }

    /// The store the scrape reads agents by status and pool occupancy from;
    /// its pools' acquisitions are timed from now on.
    /// The clock state gauges judge time by (the server's).
    pub fn set_clock(&self, clock: crate::storage::clock::Clock) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(clock);
    }

    pub fn set_store(&self, store: Arc<dyn AgentStore>) {
        store.observe_pools(&|pool| crate::storage::pool::AcquireMetrics {
            duration: self
                .db_acquire_duration
                .get_or_create(&PoolLabel { pool })
                .clone(),
            timeouts: self
                .db_acquire_timeouts
                .get_or_create(&PoolLabel { pool })
                .clone(),
        });
        *self.agent_store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    /// One committed transition.
    pub fn transition(&self, cause: crate::domain::agent::Cause, to: AgentStatus) {
        self.transitions
            .get_or_create(&TransitionLabels {
                cause: cause.as_str(),
                to_status: to.as_str(),
            })
            .inc();
    }

    /// Starts the pipeline series of a processor at 0.
    pub fn processor(&self, processor: &'static str) {
        for result in ["ok", "error"] {
            drop(
                self.pipeline_runs
                    .get_or_create(&ProcessorLabels { processor, result }),
            );
        }
        for result in ["processed", "failed", "dead"] {
            drop(
                self.pipeline_sessions
                    .get_or_create(&ProcessorLabels { processor, result }),
            );
        }
    }

    /// The newest revision the fan-out published.
    pub fn published(&self, revision: i64) {
        self.watchers.head.fetch_max(revision, Ordering::Relaxed);
    }

    /// Registers an open WatchTransitions stream; it counts (and its cursor
    /// in the lag) until the guard is dropped.
    pub fn watcher(self: &Arc<Self>, cursor: i64) -> WatcherGuard {
        let id = self.watchers.next.fetch_add(1, Ordering::Relaxed);
        let position = Arc::new(AtomicI64::new(cursor));
        self.watchers
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, position.clone());
        WatcherGuard {
            _open: self.stream_open(TRANSITIONS_STREAM),
            metrics: self.clone(),
            id,
            position,
        }
    }

    /// Counts one open stream of this kind until the guard is dropped.
    pub fn stream_open(&self, stream: &'static str) -> StreamGuard {
        let gauge = self
            .watch_streams
            .get_or_create(&StreamLabel { stream })
            .clone();
        gauge.inc();
        StreamGuard { gauge }
    }

    /// Reads the state gauges, then encodes everything.
    pub async fn render(&self) -> String {
        self.refresh().await;
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        out
    }

    async fn refresh(&self) {
        let head = self.watchers.head.load(Ordering::Relaxed);
        let slowest = self
            .watchers
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.load(Ordering::Relaxed))
            .min();
        self.watch_lag
            .set(slowest.map_or(0, |cursor| (head - cursor).max(0)));
        let store = self
            .agent_store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(store) = store else { return };
        for pool in store.pool_stats() {
            let in_use = i64::from(pool.size) - pool.idle as i64;
            self.db_connections
                .get_or_create(&PoolLabels {
                    pool: pool.pool,
                    state: "in_use",
                })
                .set(in_use.max(0));
            self.db_connections
                .get_or_create(&PoolLabels {
                    pool: pool.pool,
                    state: "idle",
                })
                .set(pool.idle as i64);
            self.db_max_connections
                .get_or_create(&PoolLabel { pool: pool.pool })
                .set(i64::from(pool.max));
        }
        match tokio::time::timeout(SCRAPE_STORE_TIMEOUT, store.count_by_status()).await {
            Ok(Ok(counts)) => {
                for status in AgentStatus::ALL {
                    let count = counts.of(status);
                    self.agents
                        .get_or_create(&StatusLabel {
                            status: status.as_str(),
                        })
                        .set(count);
                }
            }
            // The last values stay; the store's health has its own probe.
            Ok(Err(error)) => tracing::debug!(%error, "metrics: cannot count agents"),
            Err(_) => tracing::debug!("metrics: counting agents timed out"),
        }
        let now = self
            .clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(chrono::Utc::now, |c| c.now());
        if let Ok(Ok(pools)) =
            tokio::time::timeout(SCRAPE_STORE_TIMEOUT, store.quota_pool_states()).await
        {
            for window in crate::domain::quota::Window::ALL {
                let parked = pools
                    .iter()
                    .filter(|(_, s)| s.windows.get(&window).is_some_and(|w| w.until > now))
                    .count();
                self.pools_parked
                    .get_or_create(&WindowLabel {
                        window: window.as_str(),
                    })
                    .set(parked as i64);
            }
        }
        if let Ok(Ok(members)) =
            tokio::time::timeout(SCRAPE_STORE_TIMEOUT, store.quota_pool_members()).await
        {
            // An agent in two pools both holding it counts once per pool.
            self.pool_members_held
                .set(members.iter().map(|m| m.held).sum());
        }
    }
}

#[derive(Default)]
struct Watchers {
    /// The newest revision the fan-out published.
    head: AtomicI64,
    next: AtomicU64,
    cursors: Mutex<HashMap<u64, Arc<AtomicI64>>>,
}

/// One open stream in `fleetcare_watch_streams`.
pub struct StreamGuard {
    gauge: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// An open watch stream's place in the count and its cursor.
pub struct WatcherGuard {
    _open: StreamGuard,
    metrics: Arc<Metrics>,
    id: u64,
    position: Arc<AtomicI64>,
}

impl WatcherGuard {
    /// The last revision this stream examined.
    pub fn at(&self, revision: i64) {
        self.position.store(revision, Ordering::Relaxed);
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.metrics
            .watchers
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_follow_the_conventions_and_lag_is_head_minus_the_slowest_cursor() {
        let metrics = Metrics::new();
        metrics.transition(crate::domain::agent::Cause::WorkStarted, AgentStatus::Busy);
        metrics.published(10);
        let slow = metrics.watcher(3);
        let fast = metrics.watcher(9);
        fast.at(10);
        let text = metrics.render().await;
        assert!(
            text.contains(
                "fleetcare_transitions_total{cause=\"WORK_STARTED\",to_status=\"BUSY\"} 1"
            ),
            "{text}"
        );
        let run = metrics.stream_open(RUN_STREAM);
        let text = metrics.render().await;
        assert!(
            text.contains("fleetcare_watch_streams{stream=\"transitions\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fleetcare_watch_streams{stream=\"run\"} 1"),
            "{text}"
        );
        assert!(text.contains("fleetcare_watch_lag_revisions 7"), "{text}");
        assert!(text.contains("# TYPE fleetcare_commit_duration_seconds histogram"));
        assert!(text.contains("# UNIT fleetcare_commit_duration_seconds seconds"));
        drop(slow);
        drop(fast);
        drop(run);
        let text = metrics.render().await;
        assert!(
            text.contains("fleetcare_watch_streams{stream=\"transitions\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fleetcare_watch_streams{stream=\"run\"} 0"),
            "{text}"
        );
        assert!(text.contains("fleetcare_watch_lag_revisions 0"), "{text}");
    }
}
