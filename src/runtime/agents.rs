//! The agent write path as the handlers see it: state changes through the
//! committer (group commit), heartbeats from memory where the state machine
//! allows it (see `heartbeats`), and the pacing agents are told to heartbeat at.

use std::sync::Arc;

use chrono::Duration;

use crate::domain::agent::Event;
use crate::domain::batch::{Applied, Command};
use crate::domain::liveness::HeartbeatPacing;
use crate::domain::transition::Agent;
use crate::error::Result;
use crate::runtime::agent_cache::{AgentCache, FastHeartbeat};
use crate::runtime::clock::Clock;
use crate::runtime::committer::Committer;
use crate::runtime::heartbeats::{CATCH_UP, HeadReads};
use crate::storage::AgentStore;

#[derive(Clone)]
pub struct AgentWrites {
    store: Arc<dyn AgentStore>,
    committer: Committer,
    cache: Arc<AgentCache>,
    clock: Clock,
    pacing: HeartbeatPacing,
    metrics: Arc<crate::metrics::Metrics>,
    heads: Arc<HeadReads>,
    /// How long a heartbeat waits for the next flush when the last one is a
    /// flush interval old (see `heartbeats`).
    flush_wait: std::time::Duration,
    /// Whether a reply waits to include every transition acknowledged before
    /// the call began (`--heartbeat-fresh-replies`).
    fresh_replies: bool,
}

impl AgentWrites {
    pub fn new(
        store: Arc<dyn AgentStore>,
        committer: Committer,
        cache: Arc<AgentCache>,
        clock: Clock,
        pacing: HeartbeatPacing,
        flush_interval: std::time::Duration,
    ) -> Self {
        AgentWrites {
            heads: HeadReads::new(store.clone()),
            store,
            committer,
            cache,
            clock,
            pacing,
            metrics: crate::metrics::Metrics::new(),
            flush_wait: flush_interval.saturating_mul(2),
            fresh_replies: false,
        }
    }

    /// Replies include every transition acknowledged before the call began:
    /// each round of heartbeats reads the store's head revision first.
    pub fn with_fresh_replies(mut self, fresh: bool) -> Self {
        self.fresh_replies = fresh;
        self
    }

    /// Records into these metrics (heartbeats received).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Commits one state-changing command (group commit: see `committer`).
    pub async fn commit(&self, command: Command) -> Result<Applied> {
        self.committer.submit(command).await
    }

    /// Commits one pool command (`ParkPool`, `ReleasePool`).
    pub async fn commit_pool(
        &self,
        command: &crate::domain::batch::PoolCommand,
    ) -> Result<crate::storage::quota::PoolCommitted> {
        self.committer.commit_pool(command).await
    }

    /// The store this writes to (for the reads that go with a write).
    pub fn store(&self) -> &Arc<dyn AgentStore> {
        &self.store
    }

    /// Applies `event` to the agent on behalf of `actor`.
    pub async fn apply(&self, agent_id: String, event: Event, actor: &str) -> Result<Applied> {
        self.committer
            .submit(Command::Apply {
                agent_id,
                event,
                fencing_token: None,
                actor: actor.to_owned(),
            })
            .await
    }

    /// Records a heartbeat; returns the agent (with the transition when it came
    /// back from OFFLINE) and the interval it should heartbeat at next.
    /// A heartbeat that changes the status (back from OFFLINE) records `actor`.
    ///
    /// The agent returned reflects every transition acknowledged before this
    /// call began, and one answered from memory is lost only with the
    /// heartbeats of less than one flush interval (see `heartbeats`).
    pub async fn heartbeat(&self, agent_id: String, actor: &str) -> Result<(Applied, Duration)> {
        // Not seen here in time: the agent's row is current.
        let mut read = if self.fresh_replies {
            let head = self.heads.head().await?;
            !self.cache.caught_up(head, CATCH_UP).await
        } else {
            false
        };
        let (mut was_read, mut waited) = (false, false);
        let applied = loop {
            if read {
                // NOT_FOUND for an agent nobody registered comes from here.
                let agent = self.store.get_agent(&agent_id).await?;
                self.cache.loaded(agent);
                (read, was_read) = (false, true);
            }
            // A flush that ends from here on wakes the wait below.
            let flushed = self.cache.flushes().notified();
            tokio::pin!(flushed);
            flushed.as_mut().enable();
            match self.cache.heartbeat(&agent_id, self.clock.now()) {
                FastHeartbeat::Acknowledged(agent) => break from_memory(*agent),
                FastHeartbeat::Unknown if !was_read => read = true,
                FastHeartbeat::Unflushed if !waited => {
                    // The flush under way, or the next tick's.
                    waited = true;
                    let _ = tokio::time::timeout(self.flush_wait, flushed).await;
                }
                FastHeartbeat::Unknown | FastHeartbeat::Unflushed | FastHeartbeat::Commit => {
                    break self.apply(agent_id, Event::Heartbeat, actor).await?;
                }
            }
        };
        self.metrics.heartbeats_received.inc();
        Ok((applied, self.next_heartbeat_interval()))
    }

    /// The server's time, as the write path decides with it.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// The heartbeat interval for the fleet as this process knows it.
    pub fn next_heartbeat_interval(&self) -> Duration {
        self.pacing.next_interval(self.cache.len())
    }

    /// Shows the newest heartbeat this process knows of, flushed or not.
    pub fn with_latest_heartbeat(&self, mut agent: Agent) -> Agent {
        if let Some(at) = self.cache.last_heartbeat(&agent.agent_id) {
            agent.state.last_heartbeat_at = agent.state.last_heartbeat_at.max(at);
        }
        agent
    }
}

fn from_memory(agent: Agent) -> Applied {
    Applied {
        agent,
        transition: None,
        created: false,
        claim: None,
        others: Vec::new(),
        other_transitions: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentStatus, Cause, SlotType};
    use crate::domain::transition::Transition;
    use crate::runtime::heartbeats::tests::{FLUSH, Fixture, fixture, fixture_with};
    use chrono::Utc;

    fn writes(f: &Fixture) -> AgentWrites {
        AgentWrites::new(
            f.store.clone(),
            f.committer.clone(),
            f.cache.clone(),
            f.clock.clone(),
            HeartbeatPacing {
                max_rate: 1000,
                min_interval: chrono::Duration::seconds(5),
                heartbeat_timeout: chrono::Duration::seconds(120),
            },
            FLUSH,
        )
    }

    /// As the observer does once it has seen every transition so far.
    async fn seen_everything(f: &Fixture) {
        let head = f.store.revision_bounds().await.unwrap().head;
        f.cache.seen_through(head);
    }

    async fn heartbeat_status(writes: &AgentWrites) -> (AgentStatus, i64) {
        let (applied, _) = writes.heartbeat("a".into(), "agent").await.unwrap();
        (applied.agent.state.status, applied.agent.revision)
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_past_the_window_waits_for_the_next_flush_or_is_committed() {
        let f = fixture_with(&["a"], Some(FLUSH)).await;
        seen_everything(&f).await;
        let writes = writes(&f);
        f.hand.advance(chrono::Duration::seconds(2));
        let committed = f.store.batches_committed();

        // A flush ends while it waits: answered from memory.
        let waiting = tokio::spawn({
            let writes = writes.clone();
            async move { writes.heartbeat("a".into(), "agent").await }
        });
        // Nothing else runs meanwhile: the heartbeat is waiting for a flush.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        f.cache.flush(&*f.store).await.unwrap();
        let (applied, _) = waiting.await.unwrap().unwrap();
        assert!(applied.transition.is_none());
        assert_eq!(applied.agent.state.last_heartbeat_at, f.clock.now());
        assert_eq!(f.store.batches_committed(), committed, "from memory");

        // No flush ends within two intervals (the flusher stuck on the
        // store): the heartbeat takes the transactional path.
        f.hand.advance(chrono::Duration::seconds(2));
        let (applied, _) = writes.heartbeat("a".into(), "agent").await.unwrap();
        assert_eq!(f.store.batches_committed(), committed + 1, "committed");
        assert_eq!(
            f.store
                .get_agent("a")
                .await
                .unwrap()
                .state
                .last_heartbeat_at,
            applied.agent.state.last_heartbeat_at,
            "stored before the answer"
        );
        f.store.set_unavailable(true);
        f.hand.advance(chrono::Duration::seconds(2));
        let refused = writes.heartbeat("a".into(), "agent").await.unwrap_err();
        assert!(
            matches!(refused, crate::error::Error::Unavailable(_)),
            "{refused}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_reflects_every_transition_acknowledged_before_the_heartbeat() {
        let f = fixture(&["a"]).await;
        seen_everything(&f).await;
        let plain = writes(&f);
        let writes = writes(&f).with_fresh_replies(true);
        let registered = f.store.get_agent("a").await.unwrap().revision;
        assert_eq!(
            heartbeat_status(&writes).await,
            (AgentStatus::Idle, registered)
        );
        // Another replica's StartWork: committed and acknowledged there, not
        // yet seen here (its transition has not reached this fan-out).
        let elsewhere = f
            .store
            .commit_batch(
                &[Command::Apply {
                    agent_id: "a".into(),
                    event: Event::StartWork(SlotType::Work),
                    fencing_token: None,
                    actor: "replica-b".into(),
                }],
                f.clock.now(),
            )
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let busy = elsewhere.transition.unwrap().revision;
        assert!(
            f.cache.known(["a"]).is_some(),
            "this process still holds the agent as fresh, IDLE"
        );
        // Without fresh replies: this server's view, saying which revision.
        assert_eq!(
            heartbeat_status(&plain).await,
            (AgentStatus::Idle, registered)
        );
        assert_eq!(
            heartbeat_status(&writes).await,
            (AgentStatus::Busy, busy),
            "the reply is read again, not the stale IDLE"
        );

        // Seen through the fan-out: answered from memory again, as current.
        f.cache.observed(&elsewhere_transition(busy));
        assert_eq!(f.cache.observed_through(), busy);
        assert_eq!(heartbeat_status(&writes).await, (AgentStatus::Busy, busy));
    }

    fn elsewhere_transition(revision: i64) -> Transition {
        Transition {
            revision,
            agent_id: "a".into(),
            from: Some(AgentStatus::Idle),
            to: AgentStatus::Busy,
            cause: Cause::WorkStarted,
            occurred_at: Utc::now(),
            exhaustion_reason: None,
            recovery_at: None,
            actor: "replica-b".into(),
            quota_pool: None,
        }
    }
}
