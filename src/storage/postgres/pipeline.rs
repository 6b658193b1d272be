//! Session states, transcript errors, processor locks and runs in Postgres:
//! the SQL of the flows in `storage::pipeline` ([`PipelineTx`]), the reads,
//! and the advisory processor lock. Usage entries are `usage_rollups`'.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, Postgres};

use super::healing::PgTx;
use super::{PgStore, db_error};
use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{NewRun, RunAge, RunRecord, RunsQuery};
use crate::domain::transcript::UsageEntry;
use crate::error::Result;
use crate::storage::pipeline::{
    self as flows, PipelineTx, PipelineTxs, RUN_COLUMNS, STATE_COLUMNS, run_ages, stored_size,
};
use crate::storage::{ProcessorLock, TranscriptErrorEvent, UsageQuery, UsageRow};

mod usage_rollups;

type StateRow = flows::StateRow<DateTime<Utc>>;
type RunRow = flows::RunRow<DateTime<Utc>, Json<RunStats>>;

/// One column of `states`, as an array to `UNNEST`.
fn column<T>(states: &[&SessionState], f: impl Fn(&SessionState) -> T) -> Vec<T> {
    states.iter().map(|s| f(s)).collect()
}

/// The advisory lock key of a processor, the same on every server.
const LOCK_KEY_SQL: &str = "hashtextextended('fleetcare.processor:' || $1, 0)";

/// Holds a session-level advisory lock on its own connection, outside the pool:
/// if the guard is dropped (panic, cancellation) the connection closes and
/// Postgres frees the lock; so it does if this process dies.
struct PgProcessorLock {
    conn: PgConnection,
    processor: String,
}

#[async_trait]
impl ProcessorLock for PgProcessorLock {
    async fn release(mut self: Box<Self>) {
        let unlocked = sqlx::query(&format!("SELECT pg_advisory_unlock({LOCK_KEY_SQL})"))
            .bind(&self.processor)
            .execute(&mut self.conn)
            .await;
        if let Err(error) = unlocked {
            tracing::warn!(%error, processor = %self.processor, "advisory unlock failed; closing its connection frees it");
        }
        let _ = self.conn.close().await;
    }
}

#[async_trait]
impl PipelineTxs for PgStore {
    async fn write_tx(&self) -> Result<Box<dyn PipelineTx + '_>> {
        let tx = self.pool.begin().await.map_err(db_error)?;
        Ok(Box::new(PgTx { store: self, tx }))
    }

    async fn batch_tx(&self) -> Result<Box<dyn PipelineTx + '_>> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Every statement of a batch finds its rows by key (a file's entries
        // by path, a message's copies by key). Until the tables are analyzed,
        // which a first run outpaces, the planner guesses that a few hundred
        // keys match most of the table and scans all of it: once per batch,
        // so a first run grew with the square of its files.
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        Ok(Box::new(PgTx { store: self, tx }))
    }

    async fn states(&self, processor: &str) -> Result<Vec<SessionState>> {
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = $1"
        ))
        .bind(processor)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(SessionState::try_from).collect()
    }

    async fn states_page(
        &self,
        processor: &str,
        status: Option<SessionStatus>,
        user: Option<&str>,
        after_path: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionState>> {
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states
             WHERE processor = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR user_name = $3)
               AND ($4::text IS NULL OR path > $4)
             ORDER BY path
             LIMIT $5"
        ))
        .bind(processor)
        .bind(status.map(SessionStatus::as_str))
        .bind(user)
        .bind(after_path)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(SessionState::try_from).collect()
    }

    async fn newest_runs(&self) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT DISTINCT ON (r.processor) {RUN_COLUMNS} FROM pipeline_runs r
             ORDER BY r.processor, r.started_at DESC, r.id DESC"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn runs_page(&self, query: &RunsQuery) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs r
             WHERE ($1::text IS NULL OR r.processor = $1)
               AND ($2::timestamptz IS NULL OR (r.started_at, r.id) < ($2, $3))
             ORDER BY r.started_at DESC, r.id DESC
             LIMIT $4"
        ))
        .bind(query.processor.as_deref())
        .bind(query.before.map(|c| c.started_at))
        .bind(query.before.map_or(0, |c| c.id))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
        let conn: PoolConnection<Postgres> = self.pool.acquire().await.map_err(db_error)?;
        // Detached: never handed back to the pool still holding the lock.
        let mut conn = conn.detach();
        let locked: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"))
                .bind(processor)
                .fetch_one(&mut conn)
                .await
                .map_err(db_error)?;
        if !locked {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(Box::new(PgProcessorLock {
            conn,
            processor: processor.to_owned(),
        })))
    }

    async fn holds_processor(&self, processor: &str) -> Result<bool> {
        // A bigint advisory key shows in pg_locks as (classid, objid) = (high, low) 32 bits.
        sqlx::query_scalar(&format!(
            "WITH k AS (SELECT {LOCK_KEY_SQL} AS key)
             SELECT EXISTS (
                 SELECT 1 FROM pg_locks l, k
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND l.classid::bigint = (k.key >> 32) & 4294967295
                   AND l.objid::bigint = k.key & 4294967295)"
        ))
        .bind(processor)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }

    async fn usage_report(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        usage_rollups::usage_report(&self.pool, query).await
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        if let Some(now) = self.set_now() {
            return Ok(now);
        }
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }
}

#[async_trait]
impl PipelineTx for PgTx<'_> {
    async fn replace_usage(&mut self, files: &[(&SessionFile, &[UsageEntry])]) -> Result<()> {
        usage_rollups::replace_usage(&mut self.tx, files).await
    }

    async fn delete_transcript_errors(&mut self, path: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM error_events e WHERE e.source_path = $1
               AND NOT EXISTS (SELECT 1 FROM recovery_actions r WHERE r.error_event_id = e.id)",
        )
        .bind(path)
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn insert_transcript_error(
        &mut self,
        path: &str,
        error: &TranscriptErrorEvent,
        critical: bool,
        recurring: bool,
    ) -> Result<()> {
        let e = &error.event;
        sqlx::query(
            "INSERT INTO error_events
                 (agent_id, message, context, error_type, severity, critical, recurring,
                  occurred_at, source_path, source_key, actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (source_path, source_key) WHERE source_path IS NOT NULL DO NOTHING",
        )
        .bind(&e.agent_id)
        .bind(&e.message)
        .bind(Json(&e.context))
        .bind(e.error_type.as_str())
        .bind(e.severity)
        .bind(critical)
        .bind(recurring)
        .bind(error.occurred_at)
        .bind(path)
        .bind(&error.key)
        .bind(&e.actor)
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// In one statement, in path order (a fixed lock order).
    async fn upsert_states(&mut self, states: &[&SessionState]) -> Result<()> {
        let mut states = states.to_vec();
        states.sort_by(|a, b| (&a.processor, &a.path).cmp(&(&b.processor, &b.path)));
        sqlx::query(&format!(
            "INSERT INTO session_states ({STATE_COLUMNS})
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                 $6::timestamptz[], $7::text[], $8::int[], $9::timestamptz[], $10::bigint[],
                 $11::int[], $12::text[], $13::text[], $14::timestamptz[])
             ON CONFLICT (processor, path) DO UPDATE SET
                 user_name = EXCLUDED.user_name, size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns,
                 observed_at = EXCLUDED.observed_at, sha256 = EXCLUDED.sha256,
                 processor_version = EXCLUDED.processor_version, attempts = EXCLUDED.attempts,
                 last_error = EXCLUDED.last_error, status = EXCLUDED.status,
                 next_attempt_at = EXCLUDED.next_attempt_at,
                 processed_at = EXCLUDED.processed_at, items_count = EXCLUDED.items_count"
        ))
        .bind(column(&states, |s| s.processor.clone()))
        .bind(column(&states, |s| s.path.clone()))
        .bind(column(&states, |s| s.user.clone()))
        .bind(column(&states, |s| stored_size(s.size)))
        .bind(column(&states, |s| s.mtime_ns))
        .bind(column(&states, |s| s.observed_at))
        .bind(column(&states, |s| s.sha256.clone()))
        .bind(column(&states, |s| s.processor_version))
        .bind(column(&states, |s| s.processed_at))
        .bind(column(&states, |s| s.items_count))
        .bind(column(&states, |s| s.attempts))
        .bind(column(&states, |s| s.last_error.clone()))
        .bind(column(&states, |s| s.status.as_str()))
        .bind(column(&states, |s| s.next_attempt_at))
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn lock_state(&mut self, processor: &str, path: &str) -> Result<Option<SessionState>> {
        sqlx::query_as::<_, StateRow>(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = $1 AND path = $2 FOR UPDATE"
        ))
        .bind(processor)
        .bind(path)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)?
        .map(SessionState::try_from)
        .transpose()
    }

    async fn insert_run(&mut self, run: &NewRun) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO pipeline_runs
                 (processor, started_at, finished_at, started_by, actor, stats)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&run.processor)
        .bind(run.started_at)
        .bind(run.finished_at)
        .bind(run.trigger.started_by.as_str())
        .bind(&run.trigger.actor)
        .bind(Json(&run.stats))
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn runs_started_before(&mut self, before: DateTime<Utc>) -> Result<Vec<RunAge>> {
        sqlx::query_as("SELECT id, processor, started_at FROM pipeline_runs WHERE started_at < $1")
            .bind(before)
            .fetch_all(&mut *self.tx)
            .await
            .map(run_ages::<DateTime<Utc>>)
            .map_err(db_error)
    }

    async fn delete_runs(&mut self, ids: &[i64]) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM pipeline_runs WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *self.tx)
            .await
            .map_err(db_error)?;
        Ok(deleted.rows_affected())
    }
}
