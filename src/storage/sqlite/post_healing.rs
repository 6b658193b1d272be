//! Post action records in the embedded store: the queries of
//! [`PostTx`]; the flows are `storage::post_healing`'s. A claim runs in one
//! [`SqliteStore::begin_write`] transaction: SQLite's single writer
//! serialises claims (on every post, not only one), so no row is locked here
//! (the per-post lock row is written only as Postgres writes it).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{FromRow, Sqlite, SqliteConnection, Transaction};

use super::{SqliteStore, from_micros, from_micros_opt, micros, sqlite_error};
use crate::domain::healing_records::StoredAction;
use crate::domain::post_healing::ActionRecord;
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::post_healing::{self as flows, ActionRow, COLUMNS, PostTx};
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostHealingStore, PostVerdict, Writer};

/// A record as SQLite stores it: times in microseconds, the outcome's JSON
/// document in TEXT.
#[derive(FromRow)]
struct SqliteActionRow {
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
    lease_expires_at: Option<i64>,
    actor: String,
    outcome_actor: String,
}

impl SqliteActionRow {
    fn row(self) -> Result<ActionRow> {
        let outcome = self
            .outcome
            .as_deref()
            .map(|text| serde_json::from_str(text).map_err(|_| decode::corrupt("outcome", text)))
            .transpose()?;
        Ok(ActionRow {
            idempotency_key: self.idempotency_key,
            post_id: self.post_id,
            action_type: self.action_type,
            tier: self.tier,
            status: self.status,
            outcome,
            error_code: self.error_code,
            attempts: self.attempts,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
            lease_expires_at: from_micros_opt(self.lease_expires_at),
            actor: self.actor,
            outcome_actor: self.outcome_actor,
        })
    }
}

/// An outcome as stored: the JSON document in TEXT.
fn outcome_text(outcome: Option<&serde_json::Value>) -> Result<Option<String>> {
    outcome
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| Error::Internal(format!("outcome encoding: {e}")))
}

/// A write transaction, a read transaction (one snapshot) or a reader's
/// connection (one statement).
enum Conn {
    Tx(Transaction<'static, Sqlite>),
    Read(PoolConnection<Sqlite>),
}

struct SqlitePosts<'a> {
    store: &'a SqliteStore,
    conn: Conn,
}

impl SqliteStore {
    /// A claim writes under the write lock: each claim sees the one before it.
    /// A plain evaluation reads one snapshot.
    async fn posts_tx(&self, write: bool) -> Result<SqlitePosts<'_>> {
        let tx = match write {
            true => self.begin_write().await?,
            false => self.readers().begin().await.map_err(sqlite_error)?,
        };
        Ok(SqlitePosts {
            store: self,
            conn: Conn::Tx(tx),
        })
    }

    async fn posts_reader(&self) -> Result<SqlitePosts<'_>> {
        let conn = self.readers().acquire().await.map_err(sqlite_error)?;
        Ok(SqlitePosts {
            store: self,
            conn: Conn::Read(conn),
        })
    }
}

impl SqlitePosts<'_> {
    fn conn(&mut self) -> &mut SqliteConnection {
        match &mut self.conn {
            Conn::Tx(tx) => tx,
            Conn::Read(conn) => conn,
        }
    }
}

#[async_trait]
impl PostTx for SqlitePosts<'_> {
    async fn lock_post(&mut self, post_id: &str) -> Result<()> {
        // Under the single writer nothing waits on it: written as Postgres does,
        // where this row's lock queues claims on a post.
        sqlx::query("INSERT INTO post_locks (post_id) VALUES (?1) ON CONFLICT DO NOTHING")
            .bind(post_id)
            .execute(self.conn())
            .await
            .map_err(sqlite_error)?;
        Ok(())
    }

    async fn now(&mut self) -> Result<DateTime<Utc>> {
        Ok(self.store.store_now())
    }

    async fn history(&mut self, post_id: &str, _lock: bool) -> Result<Vec<ActionRow>> {
        let rows: Vec<SqliteActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE post_id = ?1
             ORDER BY created_at, idempotency_key"
        ))
        .bind(post_id)
        .fetch_all(self.conn())
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(SqliteActionRow::row).collect()
    }

    async fn fetch(&mut self, key: &str, _lock: bool) -> Result<Option<ActionRow>> {
        let row: Option<SqliteActionRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM post_actions WHERE idempotency_key = ?1"
        ))
        .bind(key)
        .fetch_optional(self.conn())
        .await
        .map_err(sqlite_error)?;
        row.map(SqliteActionRow::row).transpose()
    }

    async fn insert(&mut self, record: &ActionRecord, actor: &str) -> Result<Option<ActionRow>> {
        let row: Option<SqliteActionRow> = sqlx::query_as(&format!(
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
        .fetch_optional(self.conn())
        .await
        .map_err(sqlite_error)?;
        row.map(SqliteActionRow::row).transpose()
    }

    async fn update(
        &mut self,
        record: &ActionRecord,
        outcome: Option<&serde_json::Value>,
        by: Writer<'_>,
    ) -> Result<ActionRow> {
        let row: SqliteActionRow = sqlx::query_as(&format!(
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
        .fetch_one(self.conn())
        .await
        .map_err(sqlite_error)?;
        row.row()
    }

    async fn page(
        &mut self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<ActionRow>> {
        let (before_at, before_key) = before.unzip();
        let rows: Vec<SqliteActionRow> = sqlx::query_as(&format!(
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
        .fetch_all(self.conn())
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(SqliteActionRow::row).collect()
    }

    async fn commit(self) -> Result<()> {
        match self.conn {
            Conn::Tx(tx) => tx.commit().await.map_err(sqlite_error),
            Conn::Read(_) => Ok(()),
        }
    }
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
        let tx = self.posts_tx(claim_lease.is_some()).await?;
        flows::evaluate_post(tx, post_id, now, claim_lease, actor, evaluate).await
    }

    async fn record_action_outcome(
        &self,
        update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)> {
        flows::record_action_outcome(self.posts_tx(true).await?, update).await
    }

    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)> {
        flows::get_action(self.posts_reader().await?, idempotency_key).await
    }

    async fn list_actions(
        &self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<StoredAction>> {
        flows::list_actions(self.posts_reader().await?, post_id, before, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::post_healing::{self, ActionStatus, ActionType, Tier};
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
            key_window: chrono::Duration::minutes(90),
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
                    key_window: chrono::Duration::minutes(90),
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
