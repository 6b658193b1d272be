//! Heartbeats without a commit each.
//!
//! A heartbeat of an agent that stays in its status (anything but OFFLINE) is
//! decided by [`crate::domain::agent::decide`] on this process's last known state of the agent,
//! acknowledged from memory, and written to the store by the flusher: one
//! statement per flush, at most `flush_interval` later, on every replica. What a
//! crash may lose is at most one flush interval of liveness, never a transition;
//! the sweeper's silence rule adds the flush interval to the timeout
//! ([`liveness::silence_timeout`]), so an agent that keeps heartbeating is never
//! marked OFFLINE meanwhile.
//!
//! The cache (`runtime::agent_cache`) holds every agent this process knows, as
//! of its last commit here or its last read; a stale or unknown agent's next
//! heartbeat reads it again first. Heartbeats whose decision changes the
//! status (an OFFLINE agent coming back), and every heartbeat while flushing
//! fails, take the transactional path through the committer instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::liveness;
use crate::domain::transition::Transition;
use crate::runtime::agent_cache::AgentCache;
use crate::storage::AgentStore;

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
/// it. Subscribing before the fill means nothing committed in between is missed.
pub fn spawn_observer(
    cache: Arc<AgentCache>,
    store: Arc<dyn AgentStore>,
    mut transitions: broadcast::Receiver<Arc<Transition>>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let warm = {
            let cache = cache.clone();
            async move {
                loop {
                    match cache.warm(&*store).await {
                        Ok(count) => {
                            tracing::debug!(agents = count, "agent cache filled");
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
                    Err(broadcast::error::RecvError::Lagged(_)) => cache.all_stale(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
}

/// The silence rule the sweeper applies for this flush interval.
pub fn silence(heartbeat_timeout: Duration, flush_interval: Duration) -> chrono::Duration {
    let d = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    liveness::silence_timeout(d(heartbeat_timeout), d(flush_interval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentStatus, Cause, Event};
    use crate::domain::batch::Command;
    use crate::runtime::agent_cache::FastHeartbeat;
    use crate::runtime::clock::Clock;
    use crate::runtime::committer::Committer;
    use crate::storage::memory::MemoryStore;
    use chrono::{TimeZone, Utc};

    struct Fixture {
        store: Arc<MemoryStore>,
        cache: Arc<AgentCache>,
        committer: Committer,
        clock: Clock,
        hand: crate::runtime::clock::ManualClock,
    }

    async fn fixture(ids: &[&str]) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let (clock, hand) = Clock::manual(Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let cache = AgentCache::new();
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
}
