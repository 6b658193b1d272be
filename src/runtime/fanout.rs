//! One reader of the transitions table per process, fanning out to every watcher.
//!
//! The store's change signal (local commits, NOTIFY from other replicas, and
//! reconnects) wakes the hub, which reads every transition after the last one it
//! published and broadcasts them in revision order. Watchers that fall behind the
//! broadcast buffer catch up from the table themselves (see `watch`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::transition::Transition;
use crate::storage::AgentStore;

/// How many transitions one read of the table returns.
pub const READ_BATCH: i64 = 512;
/// A safety net under NOTIFY: the table is polled this often anyway.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct TransitionFanout {
    sender: broadcast::Sender<Arc<Transition>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TransitionFanout {
    /// Starts the hub task; it stops when `shutdown` fires. `capacity` transitions
    /// are kept for slow watchers before they must catch up from the table.
    pub fn start(
        store: Arc<dyn AgentStore>,
        capacity: usize,
        shutdown: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        tokio::spawn(run_hub(store, sender.clone(), metrics.clone(), shutdown));
        TransitionFanout { sender, metrics }
    }

    /// The metrics watchers report their position to.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Subscribe *before* reading history, then drop what was already delivered
    /// by revision: the other order loses whatever commits in between.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Transition>> {
        self.sender.subscribe()
    }
}

async fn run_hub(
    store: Arc<dyn AgentStore>,
    sender: broadcast::Sender<Arc<Transition>>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = store.changes();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Where publishing starts: the head when the hub first reaches the store.
    let mut cursor: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = poll.tick() => {}
        }
        let start = match cursor {
            Some(c) => c,
            None => match store.revision_bounds().await {
                Ok(bounds) => {
                    metrics.published(bounds.head);
                    *cursor.insert(bounds.head)
                }
                Err(error) => {
                    tracing::warn!(%error, "fan-out cannot read the revision head");
                    continue;
                }
            },
        };
        let mut next = start;
        loop {
            match store.transitions_after(next, None, READ_BATCH).await {
                Ok(batch) => {
                    let full = batch.len() as i64 == READ_BATCH;
                    for transition in batch {
                        next = transition.revision;
                        // No receivers is fine: nobody is watching right now.
                        let _ = sender.send(Arc::new(transition));
                    }
                    if !full {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "fan-out cannot read transitions");
                    break;
                }
            }
        }
        metrics.published(next);
        cursor = Some(next);
    }
}
