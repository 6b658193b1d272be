//! One publisher of committed transitions per process, fanning out to every watcher.
//!
//! Two sources feed the hub, and it publishes from both strictly in revision
//! order, without gaps or repeats (its cursor is the last revision published):
//!
//! - this process's commits, handed over by the committer as they commit
//!   ([`LocalCommits`]): published as they are, without reading them back. A
//!   batch that starts after the cursor + 1 follows revisions another replica
//!   committed in between, or a batch of this process's that was in flight
//!   at the same time and committed first (it is handed over next, and
//!   skipped); those committed before it (the revision row orders commits),
//!   so the hub reads the gap from the table first;
//! - the store's change signal (NOTIFY from other replicas, reconnects, and a
//!   poll as a safety net): the hub reads every transition after the cursor.
//!
//! Watchers that fall behind the broadcast buffer catch up from the table
//! themselves (see `watch`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
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
    local: LocalCommits,
    metrics: Arc<crate::metrics::Metrics>,
    /// The hub's cursor, once it has read the store's head.
    published: watch::Receiver<Option<i64>>,
}

/// Where the committer hands this process's committed transitions to the hub,
/// one batch at a time, in the order the batches started (two in flight at
/// once may have committed in the other order). Never blocks the committer.
#[derive(Clone)]
pub struct LocalCommits(mpsc::UnboundedSender<Vec<Transition>>);

impl LocalCommits {
    /// A committed batch's transitions, in revision order.
    pub fn publish(&self, batch: Vec<Transition>) {
        if !batch.is_empty() {
            // A stopped hub (shutdown) has nobody to publish to.
            let _ = self.0.send(batch);
        }
    }
}

#[cfg(test)]
impl LocalCommits {
    /// A handle whose batches arrive on the receiver (for the committer's tests).
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<Vec<Transition>>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (LocalCommits(sender), receiver)
    }
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
        let (local, batches) = mpsc::unbounded_channel();
        let (cursor, published) = watch::channel(None);
        let hub = Hub {
            store,
            sender: sender.clone(),
            metrics: metrics.clone(),
            cursor,
        };
        tokio::spawn(hub.run(batches, shutdown));
        TransitionFanout {
            sender,
            local: LocalCommits(local),
            metrics,
            published,
        }
    }

    /// Waits until the hub has published through `revision` (`None`: until it
    /// has read the store's head, where it starts).
    pub async fn published_through(&self, revision: Option<i64>) {
        let mut published = self.published.clone();
        let _ = published.wait_for(|p| p.is_some() && *p >= revision).await;
    }

    /// The handle the committer publishes this process's commits through.
    pub fn local_commits(&self) -> LocalCommits {
        self.local.clone()
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

/// What woke the hub.
enum Wake {
    Local(Vec<Transition>),
    Table,
}

struct Hub {
    store: Arc<dyn AgentStore>,
    sender: broadcast::Sender<Arc<Transition>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The last revision published; `None` until the hub first reaches the
    /// store, when publishing starts at the head.
    cursor: watch::Sender<Option<i64>>,
}

impl Hub {
    async fn run(
        mut self,
        mut batches: mpsc::UnboundedReceiver<Vec<Transition>>,
        shutdown: CancellationToken,
    ) {
        let mut changes = self.store.changes();
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            // Local commits first: publishing them costs no read, and a table
            // read woken meanwhile then finds less (or nothing) left to read.
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(batch) = batches.recv() => Wake::Local(batch),
                changed = changes.changed() => match changed {
                    Ok(()) => Wake::Table,
                    Err(_) => return,
                },
                _ = poll.tick() => Wake::Table,
            };
            let Some(cursor) = self.cursor().await else {
                continue;
            };
            let published = match wake {
                Wake::Local(batch) => self.publish_local(cursor, batch).await,
                Wake::Table => self.read_table(cursor, None).await,
            };
            self.metrics.published(published);
            self.cursor.send_if_modified(|c| {
                let moved = *c != Some(published);
                *c = Some(published);
                moved
            });
        }
    }

    /// The cursor, read from the store's head the first time.
    async fn cursor(&mut self) -> Option<i64> {
        if let Some(c) = *self.cursor.borrow() {
            return Some(c);
        }
        match self.store.revision_bounds().await {
            Ok(bounds) => {
                self.metrics.published(bounds.head);
                self.cursor.send_replace(Some(bounds.head));
                Some(bounds.head)
            }
            Err(error) => {
                tracing::warn!(%error, "fan-out cannot read the revision head");
                None
            }
        }
    }

    /// Publishes a local batch after `cursor`; returns the new cursor. What was
    /// published already (read from the table) is skipped; a gap before the
    /// batch is read from the table first. If the gap cannot be read, the batch
    /// waits for the next table read (publishing it now would skip revisions).
    async fn publish_local(&self, cursor: i64, batch: Vec<Transition>) -> i64 {
        let mut cursor = cursor;
        let Some(first) = batch.first().map(|t| t.revision) else {
            return cursor;
        };
        if first > cursor + 1 {
            cursor = self.read_table(cursor, Some(first - 1)).await;
            if cursor + 1 < first {
                return cursor;
            }
        }
        for transition in batch {
            if transition.revision <= cursor {
                continue;
            }
            if transition.revision != cursor + 1 {
                // Not contiguous (never expected from one batch): the table decides.
                return self.read_table(cursor, None).await;
            }
            cursor = transition.revision;
            self.send(transition);
        }
        cursor
    }

    /// Reads and publishes every transition after `cursor` (up to `through`,
    /// when given) from the table; returns the new cursor.
    async fn read_table(&self, cursor: i64, through: Option<i64>) -> i64 {
        let mut next = cursor;
        loop {
            let limit = through.map_or(READ_BATCH, |t| (t - next).min(READ_BATCH));
            if limit <= 0 {
                return next;
            }
            match self.store.transitions_after(next, None, limit).await {
                Ok(batch) => {
                    let full = batch.len() as i64 == limit;
                    for transition in batch {
                        if transition.revision != next + 1 {
                            // Pruned under the hub: watchers find out from the table.
                            tracing::warn!(
                                after = next,
                                found = transition.revision,
                                "fan-out found a gap in the transitions table"
                            );
                        }
                        next = transition.revision;
                        self.send(transition);
                    }
                    if !full {
                        return next;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "fan-out cannot read transitions");
                    return next;
                }
            }
        }
    }

    fn send(&self, transition: Transition) {
        // No receivers is fine: nobody is watching right now.
        let _ = self.sender.send(Arc::new(transition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{Event, SlotType};
    use crate::domain::batch::Command;
    use crate::storage::memory::MemoryStore;
    use chrono::TimeZone;

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap()
    }

    fn register(id: &str) -> Command {
        Command::Register {
            agent_id: id.into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
            actor: "test".into(),
        }
    }

    fn toggle(id: &str, n: usize) -> Command {
        let event = if n.is_multiple_of(2) {
            Event::StartWork(SlotType::Work)
        } else {
            Event::FinishWork
        };
        Command::Apply {
            agent_id: id.into(),
            event,
            fencing_token: None,
            actor: "test".into(),
        }
    }

    /// Commits `commands` straight on the store; returns their transitions.
    async fn commit(store: &MemoryStore, commands: &[Command]) -> Vec<Transition> {
        store
            .commit_batch(commands, now())
            .await
            .unwrap()
            .into_iter()
            .filter_map(|o| o.unwrap().transition)
            .collect()
    }

    /// A hub on `store` that has read its starting head (the hub and these
    /// tests share one thread, and the memory store never waits).
    async fn started(store: &Arc<MemoryStore>) -> (TransitionFanout, CancellationToken) {
        let shutdown = CancellationToken::new();
        let fanout = TransitionFanout::start(
            store.clone(),
            64,
            shutdown.clone(),
            crate::metrics::Metrics::new(),
        );
        fanout.published_through(None).await;
        (fanout, shutdown)
    }

    async fn next(rx: &mut broadcast::Receiver<Arc<Transition>>) -> i64 {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a transition within 5 s")
            .expect("no lag, no close")
            .revision
    }

    /// Nothing more is published once the hub has nothing left to do.
    async fn assert_quiet(rx: &mut broadcast::Receiver<Arc<Transition>>) {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn a_local_batch_is_published_as_committed_without_reading_the_table() {
        let store = Arc::new(MemoryStore::new());
        store.set_quiet(true);
        let (fanout, shutdown) = started(&store).await;
        let mut rx = fanout.subscribe();
        let reads = store.transition_reads();
        let batch = commit(&store, &[register("a"), register("b"), toggle("a", 0)]).await;
        fanout.local_commits().publish(batch);
        for expected in 1..=3 {
            assert_eq!(next(&mut rx).await, expected);
        }
        assert_eq!(store.transition_reads(), reads, "the hub read the table");
        assert_quiet(&mut rx).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_local_batch_after_another_replicas_revisions_publishes_them_first() {
        let store = Arc::new(MemoryStore::new());
        store.set_quiet(true);
        let (fanout, shutdown) = started(&store).await;
        let mut rx = fanout.subscribe();
        let local = fanout.local_commits();
        // Another replica commits 1..=3; its NOTIFY has not arrived yet.
        commit(&store, &[register("x"), toggle("x", 0), toggle("x", 1)]).await;
        // This process then commits 4 and 5 and hands them over.
        local.publish(commit(&store, &[register("a"), toggle("a", 0)]).await);
        for expected in 1..=5 {
            assert_eq!(next(&mut rx).await, expected, "gap or reorder");
        }
        // The late NOTIFY of 1..=3 and a poll find nothing new.
        store.set_quiet(false);
        commit(&store, &[toggle("x", 2)]).await;
        assert_eq!(next(&mut rx).await, 6);
        assert_quiet(&mut rx).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn notify_driven_reads_and_local_batches_interleave_without_repeats_or_gaps() {
        let store = Arc::new(MemoryStore::new());
        let (fanout, shutdown) = started(&store).await;
        let mut rx = fanout.subscribe();
        let local = fanout.local_commits();
        commit(&store, &[register("a"), register("x")]).await;
        let mut head = 0;
        let (mut a, mut x) = (0, 0);
        let mut late = Vec::new();
        for n in 0..30 {
            match n % 3 {
                // Another replica, announced by NOTIFY (the store's tick).
                0 => {
                    store.set_quiet(false);
                    commit(&store, &[toggle("x", x)]).await;
                    x += 1;
                }
                // Local, handed over at once, no tick.
                1 => {
                    store.set_quiet(true);
                    local.publish(commit(&store, &[toggle("a", a)]).await);
                    a += 1;
                }
                // Local, but handed over only after a table read published
                // it already: it must not be published twice.
                _ => {
                    store.set_quiet(false);
                    late.push(commit(&store, &[toggle("a", a)]).await);
                    a += 1;
                }
            }
            while head < store.revision_bounds().await.unwrap().head {
                head += 1;
                assert_eq!(next(&mut rx).await, head, "gap, repeat or reorder");
            }
            for batch in late.drain(..) {
                local.publish(batch);
            }
        }
        assert_eq!(head, 32);
        assert_quiet(&mut rx).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn local_batches_handed_over_out_of_revision_order_are_published_once_in_order() {
        // Two batches in flight at once: the one started second took the
        // revision row first, and the committer hands them over in the order
        // they started.
        let store = Arc::new(MemoryStore::new());
        store.set_quiet(true);
        let (fanout, shutdown) = started(&store).await;
        let mut rx = fanout.subscribe();
        let local = fanout.local_commits();
        let lower = commit(&store, &[register("b"), toggle("b", 0)]).await;
        let higher = commit(&store, &[register("a"), toggle("a", 0)]).await;
        local.publish(higher);
        local.publish(lower);
        for expected in 1..=4 {
            assert_eq!(next(&mut rx).await, expected, "gap, repeat or reorder");
        }
        assert_quiet(&mut rx).await;
        shutdown.cancel();
    }
}
