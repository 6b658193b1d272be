//! Post action records in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::healing_records::StoredAction;
use crate::domain::post_healing::{self, ActionRecord, ActionStatus, ActionType, Tier};
use crate::error::{Error, Result};
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostHealingStore, PostVerdict};

const COLUMNS: &str = "idempotency_key, post_id, action_type, tier, status, outcome, error_code, \
     attempts, created_at, updated_at, lease_expires_at";

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
    lease_expires_at: Option<DateTime<Utc>>,
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("stored {what} {value:?} is not recognised"))
}

impl ActionRow {
    /// The record as of `now`: a RUNNING claim past its lease is a failed attempt
    /// with error "timeout", so a crashed worker neither blocks the post nor hides a retry.
    fn at(self, now: DateTime<Utc>) -> Result<StoredAction> {
        let tier = match self.tier {
            1 => Tier::Tier1,
            2 => Tier::Tier2,
            3 => Tier::Tier3,
            other => return Err(corrupt("tier", &other.to_string())),
        };
        let mut record = ActionRecord {
            action: ActionType::parse(&self.action_type)
                .ok_or_else(|| corrupt("action type", &self.action_type))?,
            status: ActionStatus::parse(&self.status)
                .ok_or_else(|| corrupt("action status", &self.status))?,
            idempotency_key: self.idempotency_key,
            post_id: self.post_id,
            tier,
            attempts: self.attempts,
            error_code: self.error_code,
            created_at: self.created_at,
            updated_at: self.updated_at,
            lease_expires_at: self.lease_expires_at,
        };
        if lease_expired(&record, now) {
            let expired_at = record.lease_expires_at.unwrap_or(now);
            record.status = ActionStatus::Failed;
            record.error_code = Some("timeout".into());
            record.attempts += 1;
            record.updated_at = expired_at;
        }
        Ok(StoredAction {
            record,
            outcome: self.outcome.map(|j| j.0),
        })
    }
}

fn lease_expired(record: &ActionRecord, now: DateTime<Utc>) -> bool {
    record.status == ActionStatus::Running && record.lease_expires_at.is_some_and(|at| at <= now)
}

async fn db_now(tx: &mut Transaction<'_, Postgres>) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut **tx)
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
            None => db_now(&mut tx).await?,
        };
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE post_id = $1 ORDER BY created_at"
        ))
        .bind(post_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let history = rows
            .into_iter()
            .map(|row| row.at(now).map(|stored| stored.record))
            .collect::<Result<Vec<_>>>()?;
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
        // re-runs it. An expired claim counts as the attempt it was.
        let row: ActionRow = sqlx::query_as(&format!(
            "INSERT INTO post_actions
                 (idempotency_key, post_id, action_type, tier, status, attempts,
                  created_at, updated_at, lease_expires_at)
             VALUES ($1, $2, $3, $4, 'RUNNING', 0, $5, $5, $6)
             ON CONFLICT (idempotency_key) DO UPDATE SET
                 attempts = post_actions.attempts
                     + CASE WHEN post_actions.status = 'RUNNING' THEN 1 ELSE 0 END,
                 status = 'RUNNING',
                 error_code = NULL,
                 updated_at = EXCLUDED.updated_at,
                 lease_expires_at = EXCLUDED.lease_expires_at
             RETURNING {COLUMNS}"
        ))
        .bind(key)
        .bind(post_id)
        .bind(stagnation.action.as_str())
        .bind(stagnation.tier.number())
        .bind(now)
        .bind(now + lease)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
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
        let now = db_now(&mut tx).await?;
        let key = &update.idempotency_key;
        let existing = fetch(&mut tx, key, true).await?;
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
            sqlx::query(
                "INSERT INTO post_actions
                     (idempotency_key, post_id, action_type, tier, status, attempts, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $6)
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(key)
            .bind(post_id)
            .bind(action.as_str())
            .bind(tier.number())
            .bind(update.status.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        // RUNNING renews nothing here: a lease is only granted by a claim.
        let row: ActionRow = sqlx::query_as(&format!(
            "UPDATE post_actions SET
                 status = $2,
                 outcome = COALESCE($3, outcome),
                 error_code = $4,
                 attempts = attempts + 1,
                 updated_at = $5,
                 lease_expires_at = CASE WHEN $2 = 'RUNNING' THEN lease_expires_at ELSE NULL END
             WHERE idempotency_key = $1
             RETURNING {COLUMNS}"
        ))
        .bind(key)
        .bind(update.status.as_str())
        .bind(update.outcome.as_ref().map(Json))
        .bind(update.error_code.as_deref())
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok((row.at(now)?, created))
    }

    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = db_now(&mut tx).await?;
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
        let now = db_now(&mut tx).await?;
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
