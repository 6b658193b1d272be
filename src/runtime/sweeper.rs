//! The sweeper: silent agents go OFFLINE, exhausted agents whose recovery time
//! has passed go IDLE, and expired transition history is pruned.
//!
//! Every replica may sweep at once. Each candidate is re-decided under its row
//! lock by the state machine, so a transition still happens exactly once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::domain::agent::Event;
use crate::error::Error;
use crate::storage::AgentStore;

/// Candidates handled per sweep tick; the rest wait for the next tick.
const SWEEP_BATCH: i64 = 1000;

#[derive(Debug, Clone)]
pub struct SweeperConfig {
    pub heartbeat_timeout: Duration,
    pub sweep_interval: Duration,
    pub transition_retention: Duration,
}

pub fn spawn(store: Arc<dyn AgentStore>, config: SweeperConfig, shutdown: CancellationToken) {
    tokio::spawn(run(store, config, shutdown));
}

async fn run(store: Arc<dyn AgentStore>, config: SweeperConfig, shutdown: CancellationToken) {
    // After the service was down nobody heartbeated successfully, so every agent
    // looks silent: give them one full timeout from start-up before any goes OFFLINE.
    let grace_ends = Instant::now() + config.heartbeat_timeout;
    let heartbeat_timeout =
        chrono::Duration::from_std(config.heartbeat_timeout).unwrap_or(chrono::Duration::MAX);
    let retention =
        chrono::Duration::from_std(config.transition_retention).unwrap_or(chrono::Duration::MAX);
    // Pruning is cheap but need not run every tick.
    // (`clamp` would panic when the sweep interval is above a minute.)
    let prune_every = (config.transition_retention / 10)
        .min(Duration::from_secs(60))
        .max(config.sweep_interval);
    let mut next_prune = Instant::now();

    let mut ticks = tokio::time::interval(config.sweep_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let offline_allowed = Instant::now() >= grace_ends;
        if let Err(error) = sweep_once(&*store, heartbeat_timeout, offline_allowed).await {
            tracing::warn!(%error, "sweep failed");
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + prune_every;
            match store.prune_transitions(retention).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned transition history"),
                Err(error) => tracing::warn!(%error, "pruning failed"),
            }
        }
    }
}

/// One pass over the agents that need a look. Returns how many transitioned.
pub async fn sweep_once(
    store: &dyn AgentStore,
    heartbeat_timeout: chrono::Duration,
    offline_allowed: bool,
) -> Result<usize, Error> {
    let candidates = store
        .sweep_candidates(heartbeat_timeout, offline_allowed, SWEEP_BATCH)
        .await?;
    let mut transitioned = 0;
    for agent_id in candidates {
        let event = Event::Sweep {
            heartbeat_timeout,
            offline_allowed,
        };
        match store.apply(&agent_id, event).await {
            Ok((_, Some(transition))) => {
                transitioned += 1;
                tracing::info!(
                    agent_id = %agent_id,
                    revision = transition.revision,
                    to = %transition.to,
                    cause = transition.cause.as_str(),
                    "swept"
                );
            }
            // Another replica got there first, or the agent heartbeated meanwhile.
            Ok((_, None)) => {}
            Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(transitioned)
}
