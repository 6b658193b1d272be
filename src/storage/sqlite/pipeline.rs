//! The session-pipeline part of the embedded store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::SqliteStore;
use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::error::Result;
use crate::storage::{
    PipelineStore, ProcessorLock, SessionWrite, StateUpdate, UsageQuery, UsageRow,
};

#[async_trait]
impl PipelineStore for SqliteStore {
    async fn session_states(&self, _processor: &str) -> Result<Vec<SessionState>> {
        todo!()
    }

    async fn list_session_states(
        &self,
        _processor: &str,
        _status: Option<SessionStatus>,
        _user: Option<&str>,
        _after_path: Option<&str>,
        _limit: i64,
    ) -> Result<Vec<SessionState>> {
        todo!()
    }

    async fn refresh_stat(&self, _processor: &str, _file: &SessionFile) -> Result<()> {
        todo!()
    }

    async fn commit_sessions(&self, _writes: &[SessionWrite]) -> Result<()> {
        todo!()
    }

    async fn update_session_state(
        &self,
        _processor: &str,
        _path: &str,
        _update: StateUpdate<'_>,
    ) -> Result<SessionState> {
        todo!()
    }

    async fn try_lock_processor(&self, _processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
        todo!()
    }

    async fn processor_locked(&self, _processor: &str) -> Result<bool> {
        todo!()
    }

    async fn record_run(&self, _processor: &str, _stats: &RunStats) -> Result<()> {
        todo!()
    }

    async fn last_runs(&self) -> Result<Vec<(String, RunStats)>> {
        todo!()
    }

    async fn usage(&self, _query: &UsageQuery) -> Result<Vec<UsageRow>> {
        todo!()
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(super::store_now())
    }
}
