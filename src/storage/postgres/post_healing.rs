//! Post action records in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::healing_records::StoredAction;
use crate::domain::post_healing::{self, ActionRecord, ActionStatus, ActionType};
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostHealingStore, PostVerdict, Writer};

const COLUMNS: &str = "idempotency_key, post_id, action_type, tier, status, outcome, error_code, \
     attempts, created_at, updated_at, lease_expires_at, actor, outcome_actor";

#[derive(FromRow)]
struct ActionRow {
    idempotency_key: String,
    post_id: String,
    action_type: String,
    tier: i32,
    status: String,
    outcome: Option<Json<serde_json::Value>>,
    error_code: Option<String>,
    attempts: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    actor: String,
    outcome_actor: String,
    lease_expires_at: Option<DateTime<Utc>>,
}

impl ActionRow {
    /// The record as stored, and its last reported outcome.
    fn stored(self) -> Result<(ActionRecord, Option<serde_json::Value>)> {
        let tier = decode::tier(self.tier)?;
        let record = ActionRecord {
            action: ActionType::parse(&self.action_type)
                .ok_or_else(|| decode::corrupt("action type", &self.action_type))?,
            status: ActionStatus::parse(&self.status)
                .ok_or_else(|| decode::corrupt("action status", &self.status))?,
            idempotency_key: self.idempotency_key,
            post_id: self.post_id,
            tier,
            attempts: self.attempts,
            error_code: self.error_code,
            created_at: self.created_at,
            updated_at: self.updated_at,
            lease_expires_at: self.lease_expires_at,
        };
        Ok((record, self.outcome.map(|j| j.0)))
    }

    /// The record as a reader at `now` sees it (the domain decides what an
    /// expired claim is).
    fn at(mut self, now: DateTime<Utc>) -> Result<StoredAction> {
        let actor = std::mem::take(&mut self.actor);
        let outcome_actor = std::mem::take(&mut self.outcome_actor);
        let (record, outcome) = self.stored()?;
        Ok(StoredAction {
            record: post_healing::as_of(record, now),
            outcome,
            actor,
            outcome_actor,
        })
    }
}

/// Writes the domain's record over the stored one with the same key.
async fn update_record(
    tx: &mut Transaction<'_, Postgres>,
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
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)
}

/// Inserts the domain's new record unless its key exists (then `None`).
async fn insert_record(
    tx: &mut Transaction<'_, Postgres>,
    record: &ActionRecord,
    actor: &str,
) -> Result<Option<ActionRow>> {
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
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)
}

async fn fetch(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    lock: bool,
) -> Result<Option<ActionRow>> {
    let lock = if lock { "FOR UPDATE" } else { "" };
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM post_actions WHERE idempotency_key = $1 {lock}"
    ))
    .bind(key)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)
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
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        if claim_lease.is_some() {
            // Claims on one post queue on its lock row: each sees the one before it.
            sqlx::query("INSERT INTO post_locks (post_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(post_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            sqlx::query("SELECT post_id FROM post_locks WHERE post_id = $1 FOR UPDATE")
                .bind(post_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        let now = match now {
            Some(now) => now,
            None => self.now_in(&mut tx).await?,
        };
        // A claim writes over one of these records: lock them until it commits.
        let lock = if claim_lease.is_some() {
            "FOR UPDATE"
        } else {
            ""
        };
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE post_id = $1 ORDER BY created_at {lock}"
        ))
        .bind(post_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let stored = rows
            .into_iter()
            .map(|row| row.at(now))
            .collect::<Result<Vec<_>>>()?;
        let history: Vec<ActionRecord> = stored.iter().map(|s| s.record.clone()).collect();
        let evaluation = evaluate(now, &history);
        let (Some(lease), true) = (claim_lease, evaluation.eligible) else {
            return Ok(PostVerdict {
                evaluation,
                claimed: None,
            });
        };
        let (Some(key), Some(stagnation)) = (&evaluation.idempotency_key, &evaluation.stagnation)
        else {
            return Err(Error::Internal("eligible evaluation without a plan".into()));
        };
        // A key may exist as a failed (or expired) earlier attempt: claiming it again
        // re-runs it, as the domain's record says.
        let existing = stored.iter().find(|s| &s.record.idempotency_key == key);
        let claimed =
            post_healing::claim(existing.map(|s| &s.record), post_id, stagnation, now, lease);
        let row = match existing {
            Some(existing) => {
                update_record(
                    &mut tx,
                    &claimed,
                    existing.outcome.as_ref(),
                    Writer::Claim(actor),
                )
                .await?
            }
            None => insert_record(&mut tx, &claimed, actor)
                .await?
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "post action {key} was recorded meanwhile by another call"
                    ))
                })?,
        };
        tx.commit().await.map_err(db_error)?;
        Ok(PostVerdict {
            evaluation,
            claimed: Some(row.at(now)?),
        })
    }

    async fn record_action_outcome(
        &self,
        update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = self.now_in(&mut tx).await?;
        let key = &update.idempotency_key;
        let mut existing = fetch(&mut tx, key, true).await?;
        let created = existing.is_none();
        if created {
            let Some((post_id, action, tier)) = &update.new_record else {
                return Err(Error::NotFound {
                    kind: "post action",
                    id: key.clone(),
                });
            };
            let expected = post_healing::idempotency_key(post_id, *action, *tier);
            if &expected != key {
                return Err(Error::invalid(format!(
                    "idempotency_key {key:?} does not match post_id, action_type and tier \
                     (expected {expected:?})"
                )));
            }
            // A concurrent creator may win: the update below then applies on top of it.
            let base = post_healing::reported(post_id, *action, *tier, update.status, now);
            existing = match insert_record(&mut tx, &base, &update.actor).await? {
                Some(row) => Some(row),
                None => fetch(&mut tx, key, true).await?,
            };
        }
        let (stored, outcome) = existing
            .ok_or_else(|| Error::Conflict(format!("post action {key} was removed meanwhile")))?
            .stored()?;
        let updated = post_healing::apply_outcome(stored, update.status, update.error_code, now);
        // An outcome is kept until a report brings a new one.
        let outcome = update.outcome.or(outcome);
        let row = update_record(
            &mut tx,
            &updated,
            outcome.as_ref(),
            Writer::Report(&update.actor),
        )
        .await?;
        tx.commit().await.map_err(db_error)?;
        Ok((row.at(now)?, created))
    }

    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = self.now_in(&mut tx).await?;
        let row = fetch(&mut tx, idempotency_key, false)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "post action",
                id: idempotency_key.to_owned(),
            })?;
        tx.commit().await.map_err(db_error)?;
        Ok((row.at(now)?, now))
    }

    async fn list_actions(
        &self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<StoredAction>> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = self.now_in(&mut tx).await?;
        let (before_at, before_key) = before.unzip();
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
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
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        rows.into_iter().map(|row| row.at(now)).collect()
    }
}
