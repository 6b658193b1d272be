//! The agent-status part of the embedded store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::SqliteStore;
use crate::domain::batch::{Applied, Command, Refusal};
use crate::domain::liveness::SweepQuery;
use crate::domain::transition::{Agent, RevisionBounds, Transition, WatchFilter};
use crate::error::Result;
use crate::storage::{AgentQuery, AgentStore};

#[async_trait]
impl AgentStore for SqliteStore {
    async fn ping(&self) -> Result<()> {
        todo!()
    }

    async fn commit_batch(
        &self,
        _commands: &[Command],
        _now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>> {
        todo!()
    }

    async fn record_heartbeats(&self, _beats: &[(String, DateTime<Utc>)]) -> Result<()> {
        todo!()
    }

    async fn get_agent(&self, _agent_id: &str) -> Result<Agent> {
        todo!()
    }

    async fn list_agents(&self, _query: &AgentQuery) -> Result<Vec<Agent>> {
        todo!()
    }

    async fn sweep_candidates(&self, _query: &SweepQuery, _limit: i64) -> Result<Vec<String>> {
        todo!()
    }

    async fn transitions_after(
        &self,
        _after: i64,
        _agent_id: Option<&str>,
        _limit: i64,
    ) -> Result<Vec<Transition>> {
        todo!()
    }

    async fn revision_bounds(&self) -> Result<RevisionBounds> {
        todo!()
    }

    async fn snapshot(&self, _filter: &WatchFilter) -> Result<(i64, Vec<Agent>)> {
        todo!()
    }

    async fn prune_transitions(&self, _before: DateTime<Utc>) -> Result<u64> {
        todo!()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
