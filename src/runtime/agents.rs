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
use crate::storage::AgentStore;

#[derive(Clone)]
pub struct AgentWrites {
    store: Arc<dyn AgentStore>,
    committer: Committer,
    cache: Arc<AgentCache>,
    clock: Clock,
    pacing: HeartbeatPacing,
    metrics: Arc<crate::metrics::Metrics>,
}

impl AgentWrites {
    pub fn new(
        store: Arc<dyn AgentStore>,
        committer: Committer,
        cache: Arc<AgentCache>,
        clock: Clock,
        pacing: HeartbeatPacing,
    ) -> Self {
        AgentWrites {
            store,
            committer,
            cache,
            clock,
            pacing,
            metrics: crate::metrics::Metrics::new(),
        }
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
    pub async fn heartbeat(&self, agent_id: String, actor: &str) -> Result<(Applied, Duration)> {
        let applied = match self.cache.heartbeat(&agent_id, self.clock.now()) {
            FastHeartbeat::Acknowledged(agent) => from_memory(*agent),
            FastHeartbeat::Unknown => {
                // NOT_FOUND for an agent nobody registered comes from here.
                let agent = self.store.get_agent(&agent_id).await?;
                self.cache.loaded(agent);
                match self.cache.heartbeat(&agent_id, self.clock.now()) {
                    FastHeartbeat::Acknowledged(agent) => from_memory(*agent),
                    FastHeartbeat::Unknown | FastHeartbeat::Commit => {
                        self.apply(agent_id, Event::Heartbeat, actor).await?
                    }
                }
            }
            FastHeartbeat::Commit => self.apply(agent_id, Event::Heartbeat, actor).await?,
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
