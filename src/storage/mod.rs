//! The store: the one place that knows where state lives.
//!
//! Everything above this module talks to the traits here, never to Postgres
//! directly (no SQL, no LISTEN/NOTIFY, no advisory locks), so that another
//! implementation (an embedded single-node store) can slot in later.

pub mod postgres;

use async_trait::async_trait;
use chrono::Duration;
use tokio::sync::watch;

use crate::domain::agent::{AgentStatus, Event};
use crate::domain::transition::{Agent, Labels, RevisionBounds, Transition, WatchFilter};
use crate::error::Result;

/// Which agents `list_agents` returns, and where the page starts.
#[derive(Debug, Clone, Default)]
pub struct AgentQuery {
    /// Only agents whose id sorts after this one.
    pub after_agent_id: Option<String>,
    /// Empty: every status.
    pub statuses: Vec<AgentStatus>,
    /// Agents carrying every one of these labels.
    pub labels: Labels,
    pub limit: i64,
}

/// The agent-status part of the store.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// Succeeds when the store can serve requests.
    async fn ping(&self) -> Result<()>;

    /// Creates the agent (IDLE, with a REGISTERED transition) or, for an existing
    /// one, replaces its labels and records a heartbeat. Returns whether it was created.
    async fn register_agent(
        &self,
        agent_id: &str,
        labels: &Labels,
    ) -> Result<(Agent, bool, Option<Transition>)>;

    async fn get_agent(&self, agent_id: &str) -> Result<Agent>;

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>>;

    /// Applies a state-machine event to one agent atomically: the agent row is
    /// updated and, if its status changed, a transition appended, in one transaction.
    /// Time is the store's clock, never the caller's.
    async fn apply(&self, agent_id: &str, event: Event) -> Result<(Agent, Option<Transition>)>;

    /// Agents the sweeper should look at: silent ones (when `offline_allowed`) and
    /// exhausted ones whose recovery time has passed.
    async fn sweep_candidates(
        &self,
        heartbeat_timeout: Duration,
        offline_allowed: bool,
        limit: i64,
    ) -> Result<Vec<String>>;

    /// Transitions with a revision above `after`, in revision order.
    async fn transitions_after(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>>;

    async fn revision_bounds(&self) -> Result<RevisionBounds>;

    /// The matching agents as of one revision, read consistently.
    async fn snapshot(&self, filter: &WatchFilter) -> Result<(i64, Vec<Agent>)>;

    /// Deletes transitions older than `older_than`; returns how many.
    async fn prune_transitions(&self, older_than: Duration) -> Result<u64>;

    /// Ticks whenever new transitions may have been committed, by this process or
    /// another one on the same store, and after the store lost track (a
    /// reconnect): the receiver then re-reads from the history.
    fn changes(&self) -> watch::Receiver<u64>;
}
