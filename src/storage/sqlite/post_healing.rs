//! The post-healing part of the embedded store.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use super::SqliteStore;
use crate::domain::healing_records::StoredAction;
use crate::error::Result;
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostHealingStore, PostVerdict};

#[async_trait]
impl PostHealingStore for SqliteStore {
    async fn evaluate_post(
        &self,
        _post_id: &str,
        _now: Option<DateTime<Utc>>,
        _claim_lease: Option<Duration>,
        _evaluate: PostEvaluator<'_>,
    ) -> Result<PostVerdict> {
        todo!()
    }

    async fn record_action_outcome(
        &self,
        _update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)> {
        todo!()
    }

    async fn get_action(&self, _idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        todo!()
    }

    async fn list_actions(
        &self,
        _post_id: &str,
        _before: Option<(DateTime<Utc>, String)>,
        _limit: i64,
    ) -> Result<Vec<StoredAction>> {
        todo!()
    }
}
