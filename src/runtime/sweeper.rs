//! The sweeper: silent agents go OFFLINE, exhausted agents whose recovery time
//! has passed go IDLE, and expired transition history is pruned.
//!
//! Every replica may sweep at once. The store only finds candidates (the
//! domain's [`liveness::sweep_query`]); each is decided again by the state machine
//! inside a committed batch, under its row lock, so a transition still happens
//! exactly once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::domain::batch::Command;
use crate::domain::liveness;
use crate::error::Error;
use crate::runtime::clock::Clock;
use crate::runtime::committer::Committer;
use crate::storage::AgentStore;

/// Candidates handled per sweep tick; the rest wait for the next tick.
const SWEEP_BATCH: i64 = 1000;

#[derive(Debug, Clone)]
pub struct SweeperConfig {
    pub heartbeat_timeout: Duration,
    /// How long a heartbeat may wait in memory before it is stored.
    pub heartbeat_flush_interval: Duration,
    pub sweep_interval: Duration,
    pub transition_retention: Duration,
    /// `--offline-agent-retention` (zero: agents are kept).
    pub offline_agent_retention: chrono::Duration,
    /// How lifted quota pools release their members (`runtime::pools`).
    pub pool_release: crate::domain::quota::ReleaseSettings,
}

pub fn spawn(
    store: Arc<dyn AgentStore>,
    committer: Committer,
    clock: Clock,
    config: SweeperConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    // After the service was down nobody heartbeated successfully, so every
    // agent looks silent: give them one full timeout from start-up (read here,
    // not when the task first runs) before any goes OFFLINE, on the clock
    // silence is judged by (a test's manual clock moves both).
    let grace_ends = clock
        .now()
        .checked_add_signed(
            chrono::Duration::from_std(config.heartbeat_timeout).unwrap_or(chrono::Duration::MAX),
        )
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
    tokio::spawn(run(
        store, committer, clock, config, grace_ends, metrics, shutdown,
    ));
}

async fn run(
    store: Arc<dyn AgentStore>,
    committer: Committer,
    clock: Clock,
    config: SweeperConfig,
    grace_ends: chrono::DateTime<chrono::Utc>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let silence = crate::runtime::heartbeats::silence(
        config.heartbeat_timeout,
        config.heartbeat_flush_interval,
    );
    let retention =
        chrono::Duration::from_std(config.transition_retention).unwrap_or(chrono::Duration::MAX);
    // Pruning is cheap but need not run every tick.
    let prune_every = prune_interval(config.transition_retention, config.sweep_interval);
    let mut next_prune = Instant::now();

    let mut ticks = tokio::time::interval(config.sweep_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            // A stopping server sweeps no more, even when a tick is due too
            // (unbiased, select may pick the tick after the stop).
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let offline_allowed = clock.now() >= grace_ends;
        metrics.sweeper_runs.inc();
        let look = Look {
            silence,
            offline_allowed,
            offline_retention: config.offline_agent_retention,
        };
        match sweep_once(&*store, &committer, &clock, look).await {
            Ok(changed) => {
                metrics.sweeper_changes.inc_by(changed as u64);
            }
            Err(error) => tracing::warn!(%error, "sweep failed"),
        }
        match crate::runtime::pools::release_once(&*store, &committer, &clock, &config.pool_release)
            .await
        {
            Ok(released) => {
                metrics.pool_releases.inc_by(released as u64);
            }
            Err(error) => tracing::warn!(%error, "quota pool release failed"),
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + prune_every;
            let before = clock
                .now()
                .checked_sub_signed(retention)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            match store.prune_transitions(before).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned transition history"),
                Err(error) => tracing::warn!(%error, "pruning failed"),
            }
        }
    }
}

/// How often history kept for `retention` is pruned: a tenth of it, at
/// most a minute, at least a sweep interval. (`clamp` would panic when the
/// sweep interval is above a minute.)
pub fn prune_interval(retention: Duration, sweep_interval: Duration) -> Duration {
    (retention / 10)
        .min(Duration::from_secs(60))
        .max(sweep_interval)
}

/// Prunes healing records older than `retention` (`--healing-retention`;
/// zero keeps them) every `every`, on the server's clock, until `shutdown`.
pub fn spawn_healing_pruner(
    store: Arc<dyn crate::storage::HealingStore>,
    clock: Clock,
    retention: chrono::Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    if retention <= chrono::Duration::zero() {
        return;
    }
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match prune_healing_once(&*store, &clock, retention).await {
                Ok((0, 0)) => {}
                Ok((events, actions)) => {
                    tracing::info!(events, actions, "pruned healing records")
                }
                Err(error) => tracing::warn!(%error, "pruning healing records failed"),
            }
        }
    });
}

/// One prune of the healing records older than `retention` at the clock's
/// now: (events, actions) deleted.
pub async fn prune_healing_once(
    store: &dyn crate::storage::HealingStore,
    clock: &Clock,
    retention: chrono::Duration,
) -> Result<(u64, u64), Error> {
    let before = clock
        .now()
        .checked_sub_signed(retention)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    store.prune_healing(before).await
}

/// What one sweep looks for.
#[derive(Debug, Clone, Copy)]
pub struct Look {
    /// [`liveness::silence_timeout`].
    pub silence: chrono::Duration,
    /// False during the start-up grace.
    pub offline_allowed: bool,
    /// `--offline-agent-retention` (zero: agents are kept).
    pub offline_retention: chrono::Duration,
}

/// One pass over the agents that need a look: silent, recovered, holding an
/// expired lease, or OFFLINE past retention. Returns how many transitioned.
pub async fn sweep_once(
    store: &dyn AgentStore,
    committer: &Committer,
    clock: &Clock,
    look: Look,
) -> Result<usize, Error> {
    let now = clock.now();
    let query = liveness::sweep_query(now, look.silence, look.offline_allowed)
        .with_offline_retention(look.offline_retention, now);
    let candidates = store.sweep_candidates(&query, SWEEP_BATCH).await?;
    // Submitted together, so the committer takes them in few batches.
    let results = futures::future::join_all(candidates.into_iter().map(|agent_id| {
        committer.submit(Command::Sweep {
            agent_id,
            heartbeat_timeout: look.silence,
            offline_allowed: look.offline_allowed,
            offline_retention: look.offline_retention,
            actor: crate::domain::auth::SWEEPER.to_owned(),
        })
    }))
    .await;
    let mut transitioned = 0;
    for result in results {
        match result {
            Ok(applied) => {
                if let Some(transition) = applied.transition {
                    transitioned += 1;
                    tracing::info!(
                        agent_id = %transition.agent_id,
                        revision = transition.revision,
                        to = %transition.to,
                        cause = transition.cause.as_str(),
                        "swept"
                    );
                }
            }
            // Another replica got there first, or the agent heartbeated meanwhile.
            Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(transitioned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentStatus, Event};
    use crate::runtime::agent_cache::{AgentCache, FastHeartbeat};
    use crate::storage::memory::MemoryStore;
    use chrono::TimeZone;

    fn look(silence: chrono::Duration, offline_allowed: bool) -> Look {
        Look {
            silence,
            offline_allowed,
            offline_retention: chrono::Duration::zero(),
        }
    }

    #[tokio::test]
    async fn only_agents_silent_for_timeout_plus_flush_interval_go_offline_once() {
        let store = Arc::new(MemoryStore::new());
        let (clock, hand) =
            Clock::manual(chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let cache = AgentCache::new();
        let committer = Committer::start(
            store.clone(),
            clock.clone(),
            cache.clone(),
            64,
            crate::config::COMMIT_PIPELINE_DEPTH,
            crate::metrics::Metrics::new(),
        );
        for id in ["silent", "alive"] {
            committer
                .submit(Command::Register {
                    agent_id: id.into(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                    actor: "test".into(),
                })
                .await
                .unwrap();
        }
        let silence =
            crate::runtime::heartbeats::silence(Duration::from_secs(10), Duration::from_secs(1));
        // "alive" heartbeats every 5 s, acknowledged from memory and flushed.
        for _ in 0..2 {
            hand.advance(chrono::Duration::seconds(5));
            assert!(matches!(
                cache.heartbeat("alive", clock.now()),
                FastHeartbeat::Acknowledged(_)
            ));
            cache.flush(&*store).await.unwrap();
        }
        // 10 s of silence: not yet, the flush interval is added.
        assert_eq!(
            sweep_once(&*store, &committer, &clock, look(silence, true))
                .await
                .unwrap(),
            0
        );
        hand.advance(chrono::Duration::milliseconds(1001));
        assert!(matches!(
            cache.heartbeat("alive", clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
        // The grace period keeps everyone online.
        assert_eq!(
            sweep_once(&*store, &committer, &clock, look(silence, false))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            sweep_once(&*store, &committer, &clock, look(silence, true))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store.get_agent("silent").await.unwrap().state.status,
            AgentStatus::Offline
        );
        assert_eq!(
            store.get_agent("alive").await.unwrap().state.status,
            AgentStatus::Idle
        );
        assert_eq!(
            sweep_once(&*store, &committer, &clock, look(silence, true))
                .await
                .unwrap(),
            0,
            "exactly once"
        );
        // The state machine, not the query, has the last word: a heartbeat in
        // between brings the agent back.
        let back = committer
            .submit(Command::Apply {
                agent_id: "silent".into(),
                event: Event::Heartbeat,
                fencing_token: None,
                actor: "test".into(),
            })
            .await
            .unwrap();
        assert_eq!(back.agent.state.status, AgentStatus::Idle);
    }
}
