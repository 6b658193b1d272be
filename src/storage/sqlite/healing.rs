//! The agent-healing part of the embedded store.

use async_trait::async_trait;
use chrono::Duration;

use super::SqliteStore;
use crate::domain::healing_records::{
    ErrorEvent, HealingStatistics, NewErrorEvent, RecoveryAction, RecoveryOutcome,
};
use crate::error::Result;
use crate::storage::{ErrorEventQuery, HealingStore, Planner, RecoveryActionQuery};

#[async_trait]
impl HealingStore for SqliteStore {
    async fn record_error(&self, _event: NewErrorEvent) -> Result<ErrorEvent> {
        todo!()
    }

    async fn plan_recovery(
        &self,
        _error_event_id: i64,
        _lease: Duration,
        _planner: Planner<'_>,
    ) -> Result<RecoveryAction> {
        todo!()
    }

    async fn record_recovery_outcome(
        &self,
        _action_id: i64,
        _outcome: RecoveryOutcome,
    ) -> Result<RecoveryAction> {
        todo!()
    }

    async fn healing_statistics(&self) -> Result<HealingStatistics> {
        todo!()
    }

    async fn list_error_events(&self, _query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>> {
        todo!()
    }

    async fn list_recovery_actions(
        &self,
        _query: &RecoveryActionQuery,
    ) -> Result<Vec<RecoveryAction>> {
        todo!()
    }
}
