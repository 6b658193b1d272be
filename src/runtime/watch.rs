//! One watch stream: optional snapshot, history replay, then live transitions,
//! in revision order with no gaps and no duplicates.
//!
//! The watcher subscribes to the fan-out first, then reads history from the
//! store, and from then on keeps a cursor: the last revision it has examined
//! (delivered, or skipped by its filter). A live transition at or below the
//! cursor is a duplicate and dropped; one above `cursor + 1`, or a lag
//! notice from the broadcast, means something was missed, and the watcher
//! catches up from the table. Revisions are gap-free in the table, so a gap
//! there can only mean pruning, which ends the stream with OUT_OF_RANGE.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::transition::{Agent, RevisionBounds, Transition, WatchFilter};
use crate::error::{Error, Result};
use crate::runtime::fanout::{READ_BATCH, TransitionFanout};
use crate::storage::AgentStore;

/// What a watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Deliver transitions after this revision; 0 means from now on.
    pub since_revision: i64,
    pub filter: WatchFilter,
    pub include_snapshot: bool,
}

/// One item on a watch stream.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    SnapshotAgent(Box<Agent>),
    SnapshotComplete { revision: i64, agent_count: i64 },
    Transition(Arc<Transition>),
    Progress { revision: i64 },
}

/// Items buffered per stream before the watcher waits for the client.
const STREAM_BUFFER: usize = 256;

pub fn out_of_range(since: i64, bounds: RevisionBounds) -> Error {
    Error::OutOfRange(format!(
        "cannot resume from revision {since}: retained history covers revisions after {} up to {} \
         (oldest retained revision {}); resume from a revision in that range or take a snapshot",
        bounds.pruned_through,
        bounds.head,
        bounds.oldest_retained()
    ))
}

/// Validates the request and starts the stream. A request that cannot be served
/// (a pruned or future revision) fails here, before any item is sent.
pub async fn open(
    store: Arc<dyn AgentStore>,
    fanout: &TransitionFanout,
    spec: WatchSpec,
    progress_interval: Duration,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<Result<WatchEvent>>> {
    let live = fanout.subscribe();
    let (out, rx) = mpsc::channel(STREAM_BUFFER);
    let mut snapshot = None;
    let cursor = if spec.include_snapshot {
        let (revision, agents) = store.snapshot(&spec.filter).await?;
        snapshot = Some(agents);
        revision
    } else {
        let bounds = store.revision_bounds().await?;
        match spec.since_revision {
            0 => bounds.head,
            since if bounds.can_resume_from(since) => since,
            since => return Err(out_of_range(since, bounds)),
        }
    };
    let watcher = Watcher {
        position: fanout.metrics().watcher(cursor),
        store,
        live,
        cursor,
        filter: spec.filter,
        out,
        progress_interval,
        last_sent: Instant::now(),
    };
    tokio::spawn(watcher.run(snapshot, shutdown));
    Ok(rx)
}

struct Watcher {
    /// This stream in the open-stream count and the lag metric.
    position: crate::metrics::WatcherGuard,
    store: Arc<dyn AgentStore>,
    live: broadcast::Receiver<Arc<Transition>>,
    /// The last revision examined.
    cursor: i64,
    filter: WatchFilter,
    out: mpsc::Sender<Result<WatchEvent>>,
    progress_interval: Duration,
    last_sent: Instant,
}

/// Why a stream stops early: the client went away, or the server is stopping.
struct Stop;

impl Watcher {
    async fn run(mut self, snapshot: Option<Vec<Agent>>, shutdown: CancellationToken) {
        let ended = tokio::select! {
            ended = self.stream(snapshot) => ended,
            // Open streams would hold graceful shutdown forever: end them cleanly.
            _ = shutdown.cancelled() => Ok(()),
        };
        if let Err(error) = ended {
            let _ = self.out.send(Err(error)).await;
        }
    }

    async fn stream(&mut self, snapshot: Option<Vec<Agent>>) -> Result<()> {
        let Ok(()) = self.replay(snapshot).await? else {
            return Ok(());
        };
        // One timer for the stream's life, re-armed only when it fires: a
        // fresh one per delivery would cost a timer registration each.
        let progress = tokio::time::sleep_until(self.last_sent + self.progress_interval);
        tokio::pin!(progress);
        loop {
            let step = tokio::select! {
                received = self.live.recv() => self.live_item(received).await?,
                () = &mut progress => {
                    let step = if Instant::now() >= self.last_sent + self.progress_interval {
                        let revision = self.cursor;
                        self.send(WatchEvent::Progress { revision }).await
                    } else {
                        Ok(())
                    };
                    progress.as_mut().reset(self.last_sent + self.progress_interval);
                    step
                }
                _ = self.out.closed() => Err(Stop),
            };
            if step.is_err() {
                return Ok(());
            }
            // What is already published goes out in the same turn.
            loop {
                let received = match self.live.try_recv() {
                    Ok(t) => Ok(t),
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        Err(broadcast::error::RecvError::Closed)
                    }
                };
                if self.live_item(received).await?.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// One item from the fan-out: delivered, dropped as a duplicate, or a
    /// sign that something was missed (then caught up from the table).
    async fn live_item(
        &mut self,
        received: Result<Arc<Transition>, broadcast::error::RecvError>,
    ) -> Result<Result<(), Stop>> {
        match received {
            Ok(t) if t.revision <= self.cursor => Ok(Ok(())),
            Ok(t) if t.revision == self.cursor + 1 => Ok(self.deliver(t).await),
            // Missed something (the fan-out started after our read, or skipped):
            // the table has it. The live item itself is re-read from the table.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
            Err(broadcast::error::RecvError::Closed) => {
                Err(Error::Unavailable("server is shutting down".into()))
            }
        }
    }

    /// Sends the snapshot (if any), then everything committed since the cursor.
    async fn replay(&mut self, snapshot: Option<Vec<Agent>>) -> Result<Result<(), Stop>> {
        if let Some(agents) = snapshot {
            let agent_count = agents.len() as i64;
            for agent in agents {
                if self
                    .send(WatchEvent::SnapshotAgent(Box::new(agent)))
                    .await
                    .is_err()
                {
                    return Ok(Err(Stop));
                }
            }
            let revision = self.cursor;
            let complete = WatchEvent::SnapshotComplete {
                revision,
                agent_count,
            };
            if self.send(complete).await.is_err() {
                return Ok(Err(Stop));
            }
        }
        self.catch_up().await
    }

    /// Reads and delivers every transition after the cursor from the table.
    async fn catch_up(&mut self) -> Result<Result<(), Stop>> {
        loop {
            let batch = self
                .store
                .transitions_after(self.cursor, None, READ_BATCH)
                .await?;
            let Some(first) = batch.first() else {
                return Ok(Ok(()));
            };
            if first.revision != self.cursor + 1 {
                // Pruned while this watcher was behind.
                let bounds = self.store.revision_bounds().await?;
                return Err(out_of_range(self.cursor, bounds));
            }
            let full = batch.len() as i64 == READ_BATCH;
            for transition in batch {
                if self.deliver(Arc::new(transition)).await.is_err() {
                    return Ok(Err(Stop));
                }
            }
            if !full {
                return Ok(Ok(()));
            }
        }
    }

    async fn deliver(&mut self, transition: Arc<Transition>) -> Result<(), Stop> {
        let revision = transition.revision;
        if self.filter.matches_transition(&transition) {
            self.send(WatchEvent::Transition(transition)).await?;
        }
        self.cursor = revision;
        self.position.at(revision);
        Ok(())
    }

    async fn send(&mut self, event: WatchEvent) -> Result<(), Stop> {
        self.out.send(Ok(event)).await.map_err(|_| Stop)?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{Event, SlotType};
    use crate::domain::batch::Command;
    use crate::runtime::agent_cache::AgentCache;
    use crate::runtime::clock::Clock;
    use crate::runtime::committer::Committer;
    use crate::storage::memory::MemoryStore;
    use chrono::TimeZone;

    /// A watcher behind a one-slot broadcast buffer lags at once, catches up from
    /// the store, and still sees every transition once, in order.
    #[tokio::test]
    async fn a_lagging_watcher_catches_up_from_the_store_without_gaps_or_repeats() {
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let shutdown = CancellationToken::new();
        let fanout = TransitionFanout::start(
            store.clone(),
            1,
            shutdown.clone(),
            crate::metrics::Metrics::new(),
        );
        let (clock, _) = Clock::manual(chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let committer = Committer::start(
            store.clone(),
            clock,
            AgentCache::new(),
            8,
            crate::config::COMMIT_PIPELINE_DEPTH,
            crate::metrics::Metrics::new(),
        );
        let spec = WatchSpec {
            since_revision: 0,
            filter: WatchFilter::default(),
            include_snapshot: false,
        };
        let mut events = open(
            store.clone(),
            &fanout,
            spec,
            Duration::from_secs(3600),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let agents = 5;
        for i in 0..agents {
            let agent_id = format!("a{i}");
            committer
                .submit(Command::Register {
                    agent_id: agent_id.clone(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                    actor: "test".into(),
                })
                .await
                .unwrap();
            for event in [Event::StartWork(SlotType::Work), Event::FinishWork] {
                committer
                    .submit(Command::Apply {
                        agent_id: agent_id.clone(),
                        event,
                        fencing_token: None,
                        actor: "test".into(),
                    })
                    .await
                    .unwrap();
            }
        }
        let mut expected = 1;
        while expected <= 3 * agents {
            match events.recv().await.expect("stream open").expect("no error") {
                WatchEvent::Transition(t) => {
                    assert_eq!(t.revision, expected, "gap or repeat");
                    expected += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        shutdown.cancel();
    }
}
