//! Heartbeats without a commit each.
//!
//! A heartbeat of an agent that stays in its status (anything but OFFLINE) is
//! decided by [`crate::domain::agent::decide`] on this process's last known state of the agent,
//! acknowledged from memory, and written to the store by the flusher: one
//! statement per flush, on every replica. Heartbeats whose decision changes
//! the status (an OFFLINE agent coming back), and every heartbeat while
//! flushing fails, take the transactional path through the committer instead.
//!
//! What an answer from memory promises, on every store:
//!
//! - **What it can lose.** A heartbeat is answered from memory only while the
//!   last successful flush began less than one flush interval (F) ago
//!   ([`AgentCache::with_flush_window`]); later ones wait for the next flush
//!   (one under way, or the next tick) and are then answered, or take the
//!   transactional path, which fails UNAVAILABLE while the store is out of
//!   reach. So a server that loses its store (a cut link, a stalled one, a
//!   crash) loses at most the heartbeats it answered during less than F
//!   after its last successful flush began; the store holds every one it
//!   answered before. The sweeper's silence rule adds F to the timeout
//!   ([`liveness::silence_timeout`]), so an agent is never marked OFFLINE
//!   sooner than `timeout - h` after the last heartbeat it had answered, h
//!   being the spacing of its heartbeats (at most a third of the timeout).
//! - **How current it is.** The agent in the reply reflects every transition
//!   acknowledged (by any replica) before the call began: the call first
//!   reads the store's head revision ([`HeadReads`]: one read shared by the
//!   calls waiting, started after each of them began), then waits until this
//!   process has seen every transition through it (the fan-out delivers them
//!   all in revision order); if that takes longer than [`CATCH_UP`], it reads
//!   the agent's row instead. The read also means a server that cannot reach
//!   the store answers no heartbeat at all.
//!
//! The cache (`runtime::agent_cache`) holds every agent this process knows, as
//! of its last commit here or its last read; an agent another replica changed
//! is stale until read again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::liveness;
use crate::error::{Error, Result};
use crate::runtime::agent_cache::AgentCache;
use crate::runtime::fanout::TransitionFanout;
use crate::storage::AgentStore;

/// How long a heartbeat waits for this process to see the transitions
/// through the head it read before it reads the agent's row instead.
pub const CATCH_UP: Duration = Duration::from_millis(50);

/// Flushes every `interval` until shutdown, then once more.
pub fn spawn_flusher(
    cache: Arc<AgentCache>,
    store: Arc<dyn AgentStore>,
    interval: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = ticks.tick() => false,
            };
            match cache.flush(&*store).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.heartbeats_flushed.inc_by(n as u64);
                    tracing::trace!(heartbeats = n, "flushed heartbeats")
                }
                Err(error) => {
                    metrics.heartbeat_flush_failures.inc();
                    tracing::warn!(%error, "heartbeat flush failed, will retry")
                }
            }
            if stopping {
                return;
            }
        }
    });
}

/// Keeps the cache honest about transitions other replicas commit, then fills
/// it. It subscribes once the fan-out knows where it starts, then reads the
/// store's head, then fills the cache: every transition after that head
/// reaches it, and the fill saw every one through it, so the cache has seen
/// everything through the head once filled.
pub fn spawn_observer(
    cache: Arc<AgentCache>,
    store: Arc<dyn AgentStore>,
    fanout: TransitionFanout,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = fanout.published_through(None) => {}
        }
        let mut transitions = fanout.subscribe();
        let warm = {
            let cache = cache.clone();
            async move {
                loop {
                    let filled = async {
                        let head = store.revision_bounds().await?.head;
                        Ok::<_, Error>((head, cache.warm(&*store).await?))
                    };
                    match filled.await {
                        Ok((head, count)) => {
                            cache.seen_through(head);
                            tracing::debug!(agents = count, head, "agent cache filled");
                            return;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot fill the agent cache, retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        };
        tokio::pin!(warm);
        let mut warming = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = &mut warm, if warming => warming = false,
                received = transitions.recv() => match received {
                    Ok(t) => cache.observed(&t),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cache.all_stale(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
}

/// Reads of the store's head revision, shared: a caller gets the result of
/// a read that started after it asked, and at most one read is under way
/// (the callers that arrive meanwhile share the next one), as group commit
/// shares commits.
pub struct HeadReads {
    store: Arc<dyn AgentStore>,
    rounds: Mutex<Rounds>,
    /// The last finished read: its number and outcome.
    done: watch::Sender<(u64, std::result::Result<i64, ReadFailed>)>,
}

#[derive(Default)]
struct Rounds {
    /// Numbers of the reads started so far.
    started: u64,
    /// A read is under way.
    running: bool,
    /// Somebody waits for the read after the one under way.
    wanted: bool,
}

impl HeadReads {
    /// How many reads were started so far (each shared by the callers waiting).
    pub fn reads(&self) -> u64 {
        self.rounds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started
    }
}

/// A failed read, as every caller that shared it gets it.
#[derive(Clone, Debug)]
struct ReadFailed {
    unavailable: bool,
    message: String,
}

impl HeadReads {
    pub fn new(store: Arc<dyn AgentStore>) -> Arc<Self> {
        Arc::new(HeadReads {
            store,
            rounds: Mutex::default(),
            done: watch::channel((0, Ok(0))).0,
        })
    }

    /// The store's head revision, read after this call began: every
    /// transition acknowledged before is at or below it.
    pub async fn head(self: &Arc<Self>) -> Result<i64> {
        let mut done = self.done.subscribe();
        let wanted = {
            let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
            if rounds.running {
                // The one under way may have started before this call.
                rounds.wanted = true;
                rounds.started + 1
            } else {
                rounds.running = true;
                rounds.started += 1;
                let number = rounds.started;
                // A task of its own: a caller that gives up (its deadline)
                // must not leave the others waiting.
                tokio::spawn(self.clone().read_from(number));
                number
            }
        };
        let outcome = done
            .wait_for(|(number, _)| *number >= wanted)
            .await
            .map_err(|_| Error::Unavailable("server shutting down".into()))?
            .1
            .clone();
        outcome.map_err(|failed| match failed.unavailable {
            true => Error::Unavailable(failed.message),
            false => Error::Internal(failed.message),
        })
    }

    /// Reads the head as read `number`, then the next while somebody wants one.
    async fn read_from(self: Arc<Self>, mut number: u64) {
        loop {
            let outcome = self
                .store
                .revision_bounds()
                .await
                .map(|bounds| bounds.head)
                .map_err(|error| match error {
                    Error::Unavailable(message) => ReadFailed {
                        unavailable: true,
                        message,
                    },
                    other => {
                        tracing::error!(error = ?other, "reading the revision head failed");
                        ReadFailed {
                            unavailable: false,
                            message: other.to_string(),
                        }
                    }
                });
            let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
            self.done.send_modify(|done| *done = (number, outcome));
            if !rounds.wanted {
                rounds.running = false;
                return;
            }
            rounds.wanted = false;
            rounds.started += 1;
            number = rounds.started;
        }
    }
}

/// The silence rule the sweeper applies for this flush interval.
pub fn silence(heartbeat_timeout: Duration, flush_interval: Duration) -> chrono::Duration {
    let d = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    liveness::silence_timeout(d(heartbeat_timeout), d(flush_interval))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::agent::SlotType;
    use crate::domain::agent::{AgentStatus, Cause, Event};
    use crate::domain::batch::Command;
    use crate::domain::transition::Transition;
    use crate::runtime::agent_cache::FastHeartbeat;
    use crate::runtime::clock::Clock;
    use crate::runtime::committer::Committer;
    use crate::storage::memory::MemoryStore;
    use chrono::{TimeZone, Utc};

    pub(crate) const FLUSH: Duration = Duration::from_secs(1);

    /// A memory store with agents registered through a committer, on a manual clock.
    pub(crate) struct Fixture {
        pub(crate) store: Arc<MemoryStore>,
        pub(crate) cache: Arc<AgentCache>,
        pub(crate) committer: Committer,
        pub(crate) clock: Clock,
        pub(crate) hand: crate::runtime::clock::ManualClock,
    }

    pub(crate) async fn fixture(ids: &[&str]) -> Fixture {
        fixture_with(ids, None).await
    }

    /// With `window`, heartbeats are answered from memory only within one
    /// flush interval of the last successful flush, as the server runs.
    pub(crate) async fn fixture_with(ids: &[&str], window: Option<Duration>) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let (clock, hand) = Clock::manual(Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let cache = match window {
            Some(interval) => AgentCache::with_flush_window(clock.clone(), interval),
            None => AgentCache::new(),
        };
        let committer = Committer::start(
            store.clone(),
            clock.clone(),
            cache.clone(),
            64,
            crate::config::COMMIT_PIPELINE_DEPTH,
            crate::metrics::Metrics::new(),
        );
        for id in ids {
            committer
                .submit(Command::Register {
                    agent_id: (*id).into(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                    actor: "test".into(),
                })
                .await
                .unwrap();
        }
        Fixture {
            store,
            cache,
            committer,
            clock,
            hand,
        }
    }

    #[tokio::test]
    async fn a_heartbeat_is_acknowledged_from_memory_and_stored_by_the_flush() {
        let f = fixture(&["a"]).await;
        let registered_at = f
            .store
            .get_agent("a")
            .await
            .unwrap()
            .state
            .last_heartbeat_at;
        f.hand.advance(chrono::Duration::seconds(3));
        let at = f.clock.now();
        let batches = f.store.batches_committed();
        let FastHeartbeat::Acknowledged(agent) = f.cache.heartbeat("a", at) else {
            panic!("an online agent's heartbeat is acknowledged from memory");
        };
        assert_eq!(agent.state.last_heartbeat_at, at);
        assert_eq!(
            f.store.batches_committed(),
            batches,
            "no commit for a heartbeat"
        );
        let stored = f.store.get_agent("a").await.unwrap();
        assert_eq!(
            stored.state.last_heartbeat_at, registered_at,
            "not flushed yet"
        );
        assert_eq!(f.cache.flush(&*f.store).await.unwrap(), 1);
        assert_eq!(
            f.store
                .get_agent("a")
                .await
                .unwrap()
                .state
                .last_heartbeat_at,
            at
        );
        assert_eq!(
            f.cache.flush(&*f.store).await.unwrap(),
            0,
            "nothing left to flush"
        );
    }

    #[tokio::test]
    async fn an_offline_agent_s_heartbeat_takes_the_transactional_path() {
        let f = fixture(&["a"]).await;
        f.committer
            .submit(Command::Apply {
                agent_id: "a".into(),
                event: Event::MarkOffline,
                fencing_token: None,
                actor: "test".into(),
            })
            .await
            .unwrap();
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Commit
        ));
        let back = f
            .committer
            .submit(Command::Apply {
                agent_id: "a".into(),
                event: Event::Heartbeat,
                fencing_token: None,
                actor: "test".into(),
            })
            .await
            .unwrap();
        let t = back.transition.expect("the transition is in the response");
        assert_eq!(
            (t.to, t.cause),
            (AgentStatus::Idle, Cause::HeartbeatResumed)
        );
        // Committed here, so known and fresh again: the next one is from memory.
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
    }

    #[tokio::test]
    async fn another_replica_s_transition_makes_the_agent_unknown_until_read_again() {
        let f = fixture(&["a"]).await;
        let mut newer = f.store.get_agent("a").await.unwrap();
        let transition = Transition {
            revision: newer.revision + 1,
            agent_id: "a".into(),
            from: Some(AgentStatus::Idle),
            to: AgentStatus::Busy,
            cause: Cause::WorkStarted,
            occurred_at: f.clock.now(),
            exhaustion_reason: None,
            recovery_at: None,
            actor: "elsewhere".into(),
            quota_pool: None,
        };
        f.cache.observed(&transition);
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Unknown
        ));
        newer.revision += 1;
        newer.state.status = AgentStatus::Busy;
        f.cache.loaded(newer);
        let FastHeartbeat::Acknowledged(agent) = f.cache.heartbeat("a", f.clock.now()) else {
            panic!("known again after the read");
        };
        assert_eq!(agent.state.status, AgentStatus::Busy);
        // A transition this process already knows changes nothing.
        f.cache.observed(&Transition {
            revision: agent.revision,
            ..transition
        });
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_heartbeats_and_stops_acknowledging_from_memory() {
        let f = fixture(&["a"]).await;
        f.hand.advance(chrono::Duration::seconds(1));
        let at = f.clock.now();
        assert!(matches!(
            f.cache.heartbeat("a", at),
            FastHeartbeat::Acknowledged(_)
        ));
        f.store.set_unavailable(true);
        assert!(f.cache.flush(&*f.store).await.is_err());
        assert!(
            matches!(f.cache.heartbeat("a", f.clock.now()), FastHeartbeat::Commit),
            "while flushing fails, heartbeats must be committed (and so fail visibly)"
        );
        f.store.set_unavailable(false);
        assert_eq!(
            f.cache.flush(&*f.store).await.unwrap(),
            1,
            "kept for the next flush"
        );
        assert_eq!(
            f.store
                .get_agent("a")
                .await
                .unwrap()
                .state
                .last_heartbeat_at,
            at
        );
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
    }

    #[tokio::test]
    async fn warming_fills_the_cache_from_the_store() {
        let f = fixture(&["a", "b", "c"]).await;
        let cold = AgentCache::new();
        assert!(matches!(
            cold.heartbeat("b", f.clock.now()),
            FastHeartbeat::Unknown
        ));
        assert_eq!(cold.warm(&*f.store).await.unwrap(), 3);
        assert_eq!(cold.len(), 3);
        assert!(matches!(
            cold.heartbeat("b", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
    }

    fn millis(ms: i64) -> chrono::Duration {
        chrono::Duration::milliseconds(ms)
    }

    #[tokio::test]
    async fn heartbeats_are_answered_from_memory_only_within_a_flush_interval_of_the_last_flush() {
        let f = fixture_with(&["a"], Some(FLUSH)).await;
        f.hand.advance(millis(500));
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
        // One interval after the cache began (nothing pending before): no flush since.
        f.hand.advance(millis(500));
        assert!(
            matches!(
                f.cache.heartbeat("a", f.clock.now()),
                FastHeartbeat::Unflushed
            ),
            "a flush interval after the last successful flush began"
        );
        assert_eq!(f.cache.flush(&*f.store).await.unwrap(), 1);
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));

        // The store out of reach, and the flush hanging rather than failing:
        // no flush ends, and one interval later nothing is answered from memory.
        f.hand.advance(millis(999));
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Acknowledged(_)
        ));
        f.hand.advance(millis(1));
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Unflushed
        ));
        // The flush failing: the transactional path at once.
        f.store.set_unavailable(true);
        assert!(f.cache.flush(&*f.store).await.is_err());
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Commit
        ));
        f.store.set_unavailable(false);
        assert_eq!(
            f.cache.flush(&*f.store).await.unwrap(),
            1,
            "kept and written"
        );

        // A flush with nothing pending moves the window too: everything
        // answered before it is stored.
        f.hand.advance(chrono::Duration::seconds(5));
        assert!(matches!(
            f.cache.heartbeat("a", f.clock.now()),
            FastHeartbeat::Unflushed
        ));
        assert_eq!(f.cache.flush(&*f.store).await.unwrap(), 0);
        let at = f.clock.now();
        assert!(matches!(
            f.cache.heartbeat("a", at),
            FastHeartbeat::Acknowledged(_)
        ));
        assert_eq!(f.cache.flush(&*f.store).await.unwrap(), 1);
        assert_eq!(
            f.store
                .get_agent("a")
                .await
                .unwrap()
                .state
                .last_heartbeat_at,
            at
        );
    }

    #[tokio::test]
    async fn head_reads_are_made_after_the_call_and_fail_unavailable() {
        let f = fixture(&["a", "b"]).await;
        let heads = HeadReads::new(f.store.clone());
        let before = heads.head().await.unwrap();
        f.committer
            .submit(Command::Apply {
                agent_id: "a".into(),
                event: Event::StartWork(SlotType::Work),
                fencing_token: None,
                actor: "test".into(),
            })
            .await
            .unwrap();
        let reads = heads.reads();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let heads = heads.clone();
                tokio::spawn(async move { heads.head().await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), before + 1);
        }
        // The first caller's read, and one more shared by the 19 that asked
        // while it was under way (it may have started before them).
        assert_eq!(heads.reads(), reads + 2, "20 calls, 2 reads");
        f.store.set_unavailable(true);
        assert!(matches!(
            heads.head().await,
            Err(crate::error::Error::Unavailable(_))
        ));
    }
}
