//! Post action records in the embedded store.
//!
//! The same queries as `storage::postgres::post_healing`. A claim evaluates
//! and writes inside one [`SqliteStore::begin_write`] transaction: SQLite's
//! single writer serialises claims (on every post, not only one), so of many
//! concurrent evaluators exactly one sees the history without the claim.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::{FromRow, SqliteConnection};

use super::{SqliteStore, from_micros, from_micros_opt, micros, sqlite_error};
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
    outcome: Option<String>,
    error_code: Option<String>,
    attempts: i32,
    created_at: i64,
    updated_at: i64,
    actor: String,
    outcome_actor: String,
    lease_expires_at: Option<i64>,
}

/// An outcome as stored: the JSON document in TEXT.
fn outcome_text(outcome: Option<&serde_json::Value>) -> Result<Option<String>> {
    outcome
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| Error::Internal(format!("outcome encoding: {e}")))
}

impl ActionRow {
    /// The record as stored, and its last reported outcome.
    fn stored(self) -> Result<(ActionRecord, Option<serde_json::Value>)> {
        let tier = decode::tier(self.tier)?;
        let outcome = self
            .outcome
            .as_deref()
            .map(|text| serde_json::from_str(text).map_err(|_| decode::corrupt("outcome", text)))
            .transpose()?;
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
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
            lease_expires_at: from_micros_opt(self.lease_expires_at),
        };
        Ok((record, outcome))
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
    conn: &mut SqliteConnection,
    record: &ActionRecord,
    outcome: Option<&serde_json::Value>,
    by: Writer<'_>,
) -> Result<ActionRow> {
    sqlx::query_as(&format!(
        "UPDATE post_actions SET
             status = ?2, outcome = ?3, error_code = ?4, attempts = ?5,
             updated_at = ?6, lease_expires_at = ?7,
             actor = COALESCE(?8, actor), outcome_actor = COALESCE(?9, outcome_actor)
         WHERE idempotency_key = ?1
         RETURNING {COLUMNS}"
    ))
    .bind(&record.idempotency_key)
    .bind(record.status.as_str())
    .bind(outcome_text(outcome)?)
    .bind(record.error_code.as_deref())
    .bind(record.attempts)
    .bind(micros(record.updated_at))
    .bind(record.lease_expires_at.map(micros))
    .bind(by.claimed())
    .bind(by.reported())
    .fetch_one(&mut *conn)
    .await
    .map_err(sqlite_error)
}

/// Inserts the domain's new record unless its key exists (then `None`).
async fn insert_record(
    conn: &mut SqliteConnection,
    record: &ActionRecord,
    actor: &str,
) -> Result<Option<ActionRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO post_actions
             (idempotency_key, post_id, action_type, tier, status, error_code, attempts,
              created_at, updated_at, lease_expires_at, actor)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
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
    .bind(micros(record.created_at))
    .bind(micros(record.updated_at))
    .bind(record.lease_expires_at.map(micros))
    .bind(actor)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlite_error)
}

async fn fetch(conn: &mut SqliteConnection, key: &str) -> Result<Option<ActionRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM post_actions WHERE idempotency_key = ?1"
    ))
    .bind(key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlite_error)
}

#[async_trait]
impl PostHealingStore for SqliteStore {
    async fn evaluate_post(
        &self,
        post_id: &str,
        now: Option<DateTime<Utc>>,
        claim_lease: Option<Duration>,
        actor: &str,
        evaluate: PostEvaluator<'_>,
    ) -> Result<PostVerdict> {
        // A claim evaluates and writes under the write lock: each claim sees the
        // one before it. A plain evaluation reads one snapshot.
        let mut tx = match claim_lease {
            Some(_) => {
                let mut tx = self.begin_write().await?;
                // Parity with Postgres, where this row's lock queues claims on a post.
                sqlx::query("INSERT INTO post_locks (post_id) VALUES (?1) ON CONFLICT DO NOTHING")
                    .bind(post_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(sqlite_error)?;
                tx
            }
            None => self.readers().begin().await.map_err(sqlite_error)?,
        };
        let now = now.unwrap_or_else(|| self.store_now());
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE post_id = ?1
             ORDER BY created_at, idempotency_key"
        ))
        .bind(post_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(sqlite_error)?;
        let stored = rows
            .into_iter()
            .map(|row| row.at(now))
            .collect::<Result<Vec<_>>>()?;
        let history: Vec<ActionRecord> = stored.iter().map(|s| s.record.clone()).collect();
        let evaluation = evaluate(now, &history);
        let (Some(lease), true) = (claim_lease, evaluation.eligible) else {
            // Nothing to write (a claim's lock row is only for parity): roll back.
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
        tx.commit().await.map_err(sqlite_error)?;
        Ok(PostVerdict {
            evaluation,
            claimed: Some(row.at(now)?),
        })
    }

    async fn record_action_outcome(
        &self,
        update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)> {
        let mut tx = self.begin_write().await?;
        let now = self.store_now();
        let key = &update.idempotency_key;
        let mut existing = fetch(&mut tx, key).await?;
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
            // Under the write lock nobody creates it meanwhile; kept as Postgres
            // has it: a record found after all is updated on top.
            let base = post_healing::reported(post_id, *action, *tier, update.status, now);
            existing = match insert_record(&mut tx, &base, &update.actor).await? {
                Some(row) => Some(row),
                None => fetch(&mut tx, key).await?,
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
        tx.commit().await.map_err(sqlite_error)?;
        Ok((row.at(now)?, created))
    }

    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        let mut conn = self.readers().acquire().await.map_err(sqlite_error)?;
        let now = self.store_now();
        let row = fetch(&mut conn, idempotency_key)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "post action",
                id: idempotency_key.to_owned(),
            })?;
        Ok((row.at(now)?, now))
    }

    async fn list_actions(
        &self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<StoredAction>> {
        let mut conn = self.readers().acquire().await.map_err(sqlite_error)?;
        let now = self.store_now();
        let (before_at, before_key) = before.unzip();
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions
             WHERE post_id = ?1
               AND (?2 IS NULL OR (created_at, idempotency_key) < (?2, ?3))
             ORDER BY created_at DESC, idempotency_key DESC
             LIMIT ?4"
        ))
        .bind(post_id)
        .bind(before_at.map(micros))
        .bind(before_key)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(|row| row.at(now)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::post_healing::Tier;
    use crate::storage::{StoreLocation, StoreOptions};

    struct TempStore {
        store: SqliteStore,
        dir: std::path::PathBuf,
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn temp_store() -> TempStore {
        let dir =
            std::env::temp_dir().join(format!("fleetcare-posts-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("fleetcare.db");
        let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
        let store = SqliteStore::open(&path, &args).await.expect("store opens");
        TempStore { store, dir }
    }

    #[tokio::test]
    async fn outcomes_update_or_create_records_by_key() {
        let t = temp_store().await;
        let key = post_healing::idempotency_key("p1", ActionType::Edit, Tier::Tier2);
        let update = |new_record| ActionOutcomeUpdate {
            idempotency_key: key.clone(),
            status: ActionStatus::Failed,
            outcome: Some(serde_json::json!({"edited": false})),
            error_code: Some("rate_limit".into()),
            new_record,
            actor: "alice".into(),
        };
        assert!(matches!(
            t.store.record_action_outcome(update(None)).await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            t.store
                .record_action_outcome(ActionOutcomeUpdate {
                    new_record: Some(("p2".into(), ActionType::Edit, Tier::Tier2)),
                    ..update(None)
                })
                .await,
            Err(Error::InvalidArgument(_))
        ));
        let new = Some(("p1".to_owned(), ActionType::Edit, Tier::Tier2));
        let (created, was_created) = t
            .store
            .record_action_outcome(update(new.clone()))
            .await
            .unwrap();
        assert!(was_created);
        assert_eq!(created.record.attempts, 1);
        assert_eq!(created.record.error_code.as_deref(), Some("rate_limit"));
        assert_eq!(created.outcome, Some(serde_json::json!({"edited": false})));
        // Created by a report: its reporter is both who made it and who reported.
        assert_eq!(
            (created.actor.as_str(), created.outcome_actor.as_str()),
            ("alice", "alice")
        );
        let (later, was_created) = t
            .store
            .record_action_outcome(ActionOutcomeUpdate {
                status: ActionStatus::Succeeded,
                outcome: None,
                error_code: None,
                actor: "bob".into(),
                ..update(new)
            })
            .await
            .unwrap();
        assert!(!was_created);
        assert_eq!(later.record.status, ActionStatus::Succeeded);
        assert_eq!(later.record.attempts, 2);
        // The outcome stays until a report brings a new one.
        assert_eq!(later.outcome, Some(serde_json::json!({"edited": false})));
        assert_eq!(
            (later.actor.as_str(), later.outcome_actor.as_str()),
            ("alice", "bob")
        );
    }

    #[tokio::test]
    async fn pages_of_a_post_run_newest_first_by_created_at_then_key() {
        let t = temp_store().await;
        let mut created = Vec::new();
        for (action, tier) in [
            (ActionType::Comment, Tier::Tier1),
            (ActionType::Edit, Tier::Tier2),
            (ActionType::Thread, Tier::Tier3),
        ] {
            let (stored, _) = t
                .store
                .record_action_outcome(ActionOutcomeUpdate {
                    idempotency_key: post_healing::idempotency_key("p1", action, tier),
                    status: ActionStatus::Succeeded,
                    outcome: None,
                    error_code: None,
                    new_record: Some(("p1".into(), action, tier)),
                    actor: "alice".into(),
                })
                .await
                .unwrap();
            created.push((stored.record.created_at, stored.record.idempotency_key));
        }
        created.sort();
        created.reverse();
        let keys: Vec<String> = created.into_iter().map(|(_, key)| key).collect();
        let first = t.store.list_actions("p1", None, 2).await.unwrap();
        let page: Vec<_> = first
            .iter()
            .map(|a| a.record.idempotency_key.clone())
            .collect();
        assert_eq!(page, keys[..2]);
        let last = &first[1].record;
        let rest = t
            .store
            .list_actions(
                "p1",
                Some((last.created_at, last.idempotency_key.clone())),
                2,
            )
            .await
            .unwrap();
        let page: Vec<_> = rest
            .iter()
            .map(|a| a.record.idempotency_key.clone())
            .collect();
        assert_eq!(page, keys[2..]);
        assert!(
            t.store
                .list_actions("other", None, 2)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
