//! Post action records in Postgres: the queries of [`PostTx`]; the flows are
//! `storage::post_healing`'s. Claims on one post queue on its `post_locks`
//! row, and a claim locks the post's records until it commits.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::healing_records::StoredAction;
use crate::domain::post_healing::ActionRecord;
use crate::error::Result;
use crate::storage::post_healing::{self as flows, ActionRow, COLUMNS, PostTx};
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostHealingStore, PostVerdict, Writer};

struct PgPosts<'a> {
    store: &'a PgStore,
    tx: Transaction<'static, Postgres>,
}

impl PgStore {
    async fn posts_tx(&self) -> Result<PgPosts<'_>> {
        let tx = self.pool.begin().await.map_err(db_error)?;
        Ok(PgPosts { store: self, tx })
    }
}

fn for_update(lock: bool) -> &'static str {
    if lock { "FOR UPDATE" } else { "" }
}

#[async_trait]
impl PostTx for PgPosts<'_> {
    async fn lock_post(&mut self, post_id: &str) -> Result<()> {
        sqlx::query("INSERT INTO post_locks (post_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(post_id)
            .execute(&mut *self.tx)
            .await
            .map_err(db_error)?;
        sqlx::query("SELECT post_id FROM post_locks WHERE post_id = $1 FOR UPDATE")
            .bind(post_id)
            .execute(&mut *self.tx)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn now(&mut self) -> Result<DateTime<Utc>> {
        self.store.now_in(&mut self.tx).await
    }

    async fn history(&mut self, post_id: &str, lock: bool) -> Result<Vec<ActionRow>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE post_id = $1
             ORDER BY created_at, idempotency_key {}",
            for_update(lock)
        ))
        .bind(post_id)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn fetch(&mut self, key: &str, lock: bool) -> Result<Option<ActionRow>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE idempotency_key = $1 {}",
            for_update(lock)
        ))
        .bind(key)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn insert(&mut self, record: &ActionRecord, actor: &str) -> Result<Option<ActionRow>> {
        sqlx::query_as(&format!(
            "INSERT INTO post_actions
                 (idempotency_key, post_id, action_type, tier, status, error_code, attempts,
                  created_at, updated_at, lease_expires_at, actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {COLUMNS}"
        ))
        .bind(&record.idempotency_key)
        .bind(&record.post_id)
        .bind(record.action.as_str())
        .bind(record.tier.number())
        .bind(record.status.as_str())
        .bind(record.error_code.as_deref())
        .bind(record.attempts)
        .bind(record.created_at)
        .bind(record.updated_at)
        .bind(record.lease_expires_at)
        .bind(actor)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn update(
        &mut self,
        record: &ActionRecord,
        outcome: Option<&serde_json::Value>,
        by: Writer<'_>,
    ) -> Result<ActionRow> {
        sqlx::query_as(&format!(
            "UPDATE post_actions SET
                 status = $2, outcome = $3, error_code = $4, attempts = $5,
                 updated_at = $6, lease_expires_at = $7,
                 actor = COALESCE($8, actor), outcome_actor = COALESCE($9, outcome_actor)
             WHERE idempotency_key = $1
             RETURNING {COLUMNS}"
        ))
        .bind(&record.idempotency_key)
        .bind(record.status.as_str())
        .bind(outcome.map(Json))
        .bind(record.error_code.as_deref())
        .bind(record.attempts)
        .bind(record.updated_at)
        .bind(record.lease_expires_at)
        .bind(by.claimed())
        .bind(by.reported())
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn page(
        &mut self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<ActionRow>> {
        let (before_at, before_key) = before.unzip();
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions
             WHERE post_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, idempotency_key) < ($2, $3))
             ORDER BY created_at DESC, idempotency_key DESC
             LIMIT $4"
        ))
        .bind(post_id)
        .bind(before_at)
        .bind(before_key)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await.map_err(db_error)
    }
}

#[async_trait]
impl PostHealingStore for PgStore {
    async fn evaluate_post(
        &self,
        post_id: &str,
        now: Option<DateTime<Utc>>,
        claim_lease: Option<Duration>,
        actor: &str,
        evaluate: PostEvaluator<'_>,
    ) -> Result<PostVerdict> {
        let tx = self.posts_tx().await?;
        flows::evaluate_post(tx, post_id, now, claim_lease, actor, evaluate).await
    }

    async fn record_action_outcome(
        &self,
        update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)> {
        flows::record_action_outcome(self.posts_tx().await?, update).await
    }

    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        flows::get_action(self.posts_tx().await?, idempotency_key).await
    }

    async fn list_actions(
        &self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<StoredAction>> {
        flows::list_actions(self.posts_tx().await?, post_id, before, limit).await
    }
}
