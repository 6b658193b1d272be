//! Session states, usage entries, transcript errors, processor locks and runs in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::types::Json;
use sqlx::{Connection, FromRow, PgConnection, Postgres};

use super::{PgStore, db_error};

mod usage_rollups;
use crate::domain::healing;
use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{
    self, NewRun, RunAge, RunCursor, RunRecord, RunTrigger, RunsQuery,
};
use crate::domain::transcript::UsageEntry;
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::{
    PipelineStore, ProcessorLock, SessionWrite, StateUpdate, TranscriptErrorEvent, UsageQuery,
    UsageRow,
};
use usage_rollups::{replace_usage, usage_report};

const STATE_COLUMNS: &str = "processor, path, user_name, size, mtime_ns, observed_at, sha256, \
     processor_version, processed_at, items_count, attempts, last_error, status, next_attempt_at";

/// The columns of a run, as [`RunRow`] reads them.
const RUN_COLUMNS: &str =
    "r.id, r.processor, r.started_at, r.finished_at, r.started_by, r.actor, r.stats";

#[derive(FromRow)]
struct RunRow {
    id: i64,
    processor: String,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    started_by: String,
    actor: String,
    stats: Json<RunStats>,
}

impl RunRow {
    fn decode(self) -> Result<RunRecord> {
        Ok(RunRecord {
            id: self.id,
            processor: self.processor,
            trigger: RunTrigger {
                started_by: decode::started_by(&self.started_by)?,
                actor: self.actor,
            },
            started_at: self.started_at,
            finished_at: self.finished_at,
            stats: self.stats.0,
        })
    }
}

#[derive(FromRow)]
struct StateRow {
    processor: String,
    path: String,
    user_name: String,
    size: i64,
    mtime_ns: i64,
    observed_at: DateTime<Utc>,
    sha256: String,
    processor_version: i32,
    processed_at: Option<DateTime<Utc>>,
    items_count: i64,
    attempts: i32,
    last_error: Option<String>,
    status: String,
    next_attempt_at: Option<DateTime<Utc>>,
}

impl TryFrom<StateRow> for SessionState {
    type Error = Error;

    fn try_from(row: StateRow) -> Result<SessionState> {
        Ok(SessionState {
            status: SessionStatus::parse(&row.status).ok_or_else(|| {
                Error::Internal(format!(
                    "stored session status {:?} is not recognised",
                    row.status
                ))
            })?,
            processor: row.processor,
            path: row.path,
            user: row.user_name,
            size: u64::try_from(row.size).unwrap_or(0),
            mtime_ns: row.mtime_ns,
            observed_at: row.observed_at,
            sha256: row.sha256,
            processor_version: row.processor_version,
            processed_at: row.processed_at,
            items_count: row.items_count,
            attempts: row.attempts,
            last_error: row.last_error,
            next_attempt_at: row.next_attempt_at,
        })
    }
}

fn size(file: &SessionFile) -> i64 {
    i64::try_from(file.size).unwrap_or(i64::MAX)
}

/// The advisory lock key of a processor, the same on every server.
const LOCK_KEY_SQL: &str = "hashtextextended('fleetcare.processor:' || $1, 0)";

/// Replaces a session's transcript errors inside the caller's transaction.
async fn replace_transcript_errors(
    conn: &mut PgConnection,
    file: &SessionFile,
    errors: &[TranscriptErrorEvent],
) -> Result<()> {
    // Events a recovery was planned for stay; the rest are replaced.
    sqlx::query(
        "DELETE FROM error_events e WHERE e.source_path = $1
           AND NOT EXISTS (SELECT 1 FROM recovery_actions r WHERE r.error_event_id = e.id)",
    )
    .bind(&file.path)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    for error in errors {
        let e = &error.event;
        // Earlier inserts of this loop are visible here: they count too.
        let window = healing::recurrence_window(error.occurred_at);
        let earlier: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM error_events
             WHERE agent_id = $1 AND error_type = $2 AND occurred_at > $3 AND occurred_at <= $4",
        )
        .bind(&e.agent_id)
        .bind(e.error_type.as_str())
        .bind(window.after)
        .bind(window.until)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
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
        .bind(healing::is_critical(e.severity))
        .bind(healing::recurring_given(earlier))
        .bind(error.occurred_at)
        .bind(&file.path)
        .bind(&error.key)
        .bind(&e.actor)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Writes state rows as the domain decided them (`domain::pipeline::processed`,
/// `failed` or `requeue`), in one statement, in path order (a fixed lock order).
async fn upsert_states(
    conn: &mut PgConnection,
    states: &[&SessionState],
) -> std::result::Result<(), sqlx::Error> {
    let mut states = states.to_vec();
    states.sort_by(|a, b| (&a.processor, &a.path).cmp(&(&b.processor, &b.path)));
    let col = |f: fn(&SessionState) -> String| states.iter().map(|s| f(s)).collect::<Vec<_>>();
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
    .bind(col(|s| s.processor.clone()))
    .bind(col(|s| s.path.clone()))
    .bind(col(|s| s.user.clone()))
    .bind(
        states
            .iter()
            .map(|s| i64::try_from(s.size).unwrap_or(i64::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(states.iter().map(|s| s.mtime_ns).collect::<Vec<_>>())
    .bind(states.iter().map(|s| s.observed_at).collect::<Vec<_>>())
    .bind(col(|s| s.sha256.clone()))
    .bind(
        states
            .iter()
            .map(|s| s.processor_version)
            .collect::<Vec<_>>(),
    )
    .bind(states.iter().map(|s| s.processed_at).collect::<Vec<_>>())
    .bind(states.iter().map(|s| s.items_count).collect::<Vec<_>>())
    .bind(states.iter().map(|s| s.attempts).collect::<Vec<_>>())
    .bind(
        states
            .iter()
            .map(|s| s.last_error.clone())
            .collect::<Vec<_>>(),
    )
    .bind(col(|s| s.status.as_str().to_owned()))
    .bind(states.iter().map(|s| s.next_attempt_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

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
impl PipelineStore for PgStore {
    async fn session_states(&self, processor: &str) -> Result<Vec<SessionState>> {
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = $1"
        ))
        .bind(processor)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(SessionState::try_from).collect()
    }

    async fn list_session_states(
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

    async fn refresh_stat(&self, processor: &str, file: &SessionFile) -> Result<()> {
        sqlx::query(
            "UPDATE session_states SET size = $3, mtime_ns = $4, observed_at = COALESCE($5, now())
             WHERE processor = $1 AND path = $2",
        )
        .bind(processor)
        .bind(&file.path)
        .bind(size(file))
        .bind(file.mtime_ns)
        .bind(self.set_now())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn commit_sessions(&self, writes: &[SessionWrite]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Every statement below finds its rows by key (a file's entries by
        // path, a message's copies by key). Until the tables are analyzed,
        // which a first run outpaces, the planner guesses that a few hundred
        // keys match most of the table and scans all of it: once per batch,
        // so a first run grew with the square of its files.
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let usage: Vec<(&SessionFile, &[UsageEntry])> = writes
            .iter()
            .filter_map(|w| Some((&w.file, w.output.usage.as_deref()?)))
            .collect();
        replace_usage(&mut tx, &usage).await?;
        for w in writes {
            if let Some(errors) = &w.output.transcript_errors {
                replace_transcript_errors(&mut tx, &w.file, errors).await?;
            }
        }
        let states: Vec<&SessionState> = writes.iter().map(|w| &w.state).collect();
        upsert_states(&mut tx, &states).await.map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn update_session_state(
        &self,
        processor: &str,
        path: &str,
        update: StateUpdate<'_>,
    ) -> Result<SessionState> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let current: Option<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = $1 AND path = $2 FOR UPDATE"
        ))
        .bind(processor)
        .bind(path)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let current: SessionState = current
            .ok_or_else(|| Error::NotFound {
                kind: "session",
                id: format!("{processor}:{path}"),
            })?
            .try_into()?;
        let now = self.now_in(&mut tx).await?;
        let state = update(&current, now)?;
        upsert_states(&mut tx, &[&state]).await.map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(state)
    }

    async fn try_lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
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

    async fn processor_locked(&self, processor: &str) -> Result<bool> {
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

    async fn record_run(&self, run: &NewRun) -> Result<i64> {
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
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }

    async fn last_runs(&self) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT DISTINCT ON (r.processor) {RUN_COLUMNS} FROM pipeline_runs r
             ORDER BY r.processor, r.started_at DESC, r.id DESC"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RunRow::decode).collect()
    }

    async fn list_runs(&self, query: &RunsQuery) -> Result<Vec<RunRecord>> {
        let (before_at, before_id) = match query.before {
            Some(c) => (Some(c.started_at), c.id),
            None => (None, 0),
        };
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs r
             WHERE ($1::text IS NULL OR r.processor = $1)
               AND ($2::timestamptz IS NULL OR (r.started_at, r.id) < ($2, $3))
             ORDER BY r.started_at DESC, r.id DESC
             LIMIT $4"
        ))
        .bind(query.processor.as_deref())
        .bind(before_at)
        .bind(before_id)
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RunRow::decode).collect()
    }

    async fn prune_runs(&self, before: DateTime<Utc>) -> Result<u64> {
        // The candidates and each processor's newest run; the domain picks.
        // Runs recorded meanwhile are newer: they only keep more.
        let ages = |rows: Vec<(i64, String, DateTime<Utc>)>| -> Vec<RunAge> {
            rows.into_iter()
                .map(|(id, processor, started_at)| RunAge {
                    processor,
                    cursor: RunCursor { started_at, id },
                })
                .collect()
        };
        let candidates = ages(
            sqlx::query_as(
                "SELECT id, processor, started_at FROM pipeline_runs WHERE started_at < $1",
            )
            .bind(before)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?,
        );
        if candidates.is_empty() {
            return Ok(0);
        }
        let newest = ages(
            sqlx::query_as(
                "SELECT DISTINCT ON (processor) id, processor, started_at FROM pipeline_runs
                 ORDER BY processor, started_at DESC, id DESC",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?,
        );
        let ids = pipeline_runs::prune_ids(&candidates, &newest, before);
        let pruned = sqlx::query("DELETE FROM pipeline_runs WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
        Ok(pruned)
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        usage_report(&self.pool, query).await
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        if let Some(now) = self.set_now() {
            return Ok(now);
        }
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }
}
