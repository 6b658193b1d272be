//! The session-pipeline store's flows, written once for every SQL backend.
//!
//! Each flow is a sequence (begin, read, let the domain decide, write,
//! commit) over a [`PipelineTx`], one open transaction of a backend, which
//! only runs that backend's SQL (`sqlite/pipeline.rs`,
//! `postgres/pipeline.rs`). It is the transaction the healing flows run in
//! (a [`HealingTx`]): transcript errors join the same history and recur by
//! the same count. The rows both backends read, and how they become
//! domain values, live here too ([`StateRow`], [`RunRow`], [`AgeRow`]); a
//! backend says only how it stores a time ([`StoredTime`]) and a run's
//! statistics ([`StoredStats`]). The plain reads, the processor lock and the
//! usage report are one statement or a backend's own mechanism: each backend
//! has them in [`PipelineTxs`].
//!
//! What a backend's transactions guarantee (the flows rely on it):
//! - [`PipelineTxs::write_tx`] serialises what must be: SQLite's one writer
//!   (`BEGIN IMMEDIATE`) serialises every write; Postgres locks the row
//!   [`PipelineTx::lock_state`] reads (`FOR UPDATE`) and writes states in a
//!   fixed (path) order;
//! - [`HealingTx::now`] is the store's clock (the set clock when a test set
//!   one; otherwise SQLite's system clock, Postgres's `now()`), the one
//!   [`PipelineStore::now`] reads.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::FromRow;

use crate::domain::healing;
use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{
    self, NewRun, RunAge, RunCursor, RunRecord, RunTrigger, RunsQuery,
};
use crate::domain::transcript::UsageEntry;
use crate::error::{Error, Result};
use crate::storage::decode::StoredTime;
use crate::storage::healing::HealingTx;
use crate::storage::{
    PipelineStore, ProcessorLock, SessionWrite, StateUpdate, TranscriptErrorEvent, UsageQuery,
    UsageRow, decode,
};

/// The columns of [`StateRow`], in its order.
pub(crate) const STATE_COLUMNS: &str = "processor, path, user_name, size, mtime_ns, observed_at, \
     sha256, processor_version, processed_at, items_count, attempts, last_error, status, \
     next_attempt_at";

/// The columns of a run (`pipeline_runs r`), as [`RunRow`] reads them.
pub(crate) const RUN_COLUMNS: &str =
    "r.id, r.processor, r.started_at, r.finished_at, r.started_by, r.actor, r.stats";

/// A run's statistics as a backend stores them (SQLite: JSON in TEXT;
/// Postgres: jsonb).
pub(crate) trait StoredStats {
    /// The statistics of run `id` (which names it in a corrupt-row error).
    fn stats(self, id: i64) -> Result<RunStats>;
}

/// JSON in TEXT (SQLite).
impl StoredStats for String {
    fn stats(self, id: i64) -> Result<RunStats> {
        serde_json::from_str(&self)
            .map_err(|e| Error::Internal(format!("stored stats of run {id} unreadable: {e}")))
    }
}

/// `jsonb`, decoded by sqlx (Postgres).
impl StoredStats for sqlx::types::Json<RunStats> {
    fn stats(self, _id: i64) -> Result<RunStats> {
        Ok(self.0)
    }
}

/// One row of `session_states`, `T` the backend's time.
#[derive(FromRow)]
pub(crate) struct StateRow<T> {
    processor: String,
    path: String,
    user_name: String,
    size: i64,
    mtime_ns: i64,
    observed_at: T,
    sha256: String,
    processor_version: i32,
    processed_at: Option<T>,
    items_count: i64,
    attempts: i32,
    last_error: Option<String>,
    status: String,
    next_attempt_at: Option<T>,
}

impl<T: StoredTime> TryFrom<StateRow<T>> for SessionState {
    type Error = Error;

    fn try_from(row: StateRow<T>) -> Result<SessionState> {
        Ok(SessionState {
            status: SessionStatus::parse(&row.status)
                .ok_or_else(|| decode::corrupt("session status", &row.status))?,
            processor: row.processor,
            path: row.path,
            user: row.user_name,
            size: u64::try_from(row.size).unwrap_or(0),
            mtime_ns: row.mtime_ns,
            observed_at: row.observed_at.time(),
            sha256: row.sha256,
            processor_version: row.processor_version,
            processed_at: row.processed_at.map(StoredTime::time),
            items_count: row.items_count,
            attempts: row.attempts,
            last_error: row.last_error,
            next_attempt_at: row.next_attempt_at.map(StoredTime::time),
        })
    }
}

/// One row of `pipeline_runs` ([`RUN_COLUMNS`]), `T` and `S` the backend's
/// time and statistics.
#[derive(FromRow)]
pub(crate) struct RunRow<T, S> {
    id: i64,
    processor: String,
    started_at: T,
    finished_at: T,
    started_by: String,
    actor: String,
    stats: S,
}

impl<T: StoredTime, S: StoredStats> TryFrom<RunRow<T, S>> for RunRecord {
    type Error = Error;

    fn try_from(row: RunRow<T, S>) -> Result<RunRecord> {
        Ok(RunRecord {
            stats: row.stats.stats(row.id)?,
            id: row.id,
            processor: row.processor,
            trigger: RunTrigger {
                started_by: decode::started_by(&row.started_by)?,
                actor: row.actor,
            },
            started_at: row.started_at.time(),
            finished_at: row.finished_at.time(),
        })
    }
}

/// A run's id, processor and start: what a prune decides on.
pub(crate) type AgeRow<T> = (i64, String, T);

/// The runs' ages, as the domain compares them.
pub(crate) fn run_ages<T: StoredTime>(rows: Vec<AgeRow<T>>) -> Vec<RunAge> {
    rows.into_iter()
        .map(|(id, processor, started_at)| RunAge {
            processor,
            cursor: RunCursor {
                started_at: started_at.time(),
                id,
            },
        })
        .collect()
}

/// A size column (sizes past `i64::MAX` are stored as it).
pub(crate) fn stored_size(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

/// One open transaction of a backend: its SQL only. Dropped without
/// [`HealingTx::commit`], it rolls back.
#[async_trait]
pub(crate) trait PipelineTx: HealingTx {
    /// Replaces the usage entries of every file in `files` (distinct paths)
    /// and brings the rollups up to date (`usage_rollups`).
    async fn replace_usage(&mut self, files: &[(&SessionFile, &[UsageEntry])]) -> Result<()>;

    /// Deletes the transcript errors recorded from `path`, but those a
    /// recovery was planned for.
    async fn delete_transcript_errors(&mut self, path: &str) -> Result<()>;

    /// Inserts a transcript error of `path`, unless one with its key is kept.
    async fn insert_transcript_error(
        &mut self,
        path: &str,
        error: &TranscriptErrorEvent,
        critical: bool,
        recurring: bool,
    ) -> Result<()>;

    /// Writes state rows as the domain decided them (inserted or replaced).
    async fn upsert_states(&mut self, states: &[&SessionState]) -> Result<()>;

    /// The session's state, locked until commit.
    async fn lock_state(&mut self, processor: &str, path: &str) -> Result<Option<SessionState>>;

    /// Inserts the run; returns its id.
    async fn insert_run(&mut self, run: &NewRun) -> Result<i64>;

    /// The runs started before `before`.
    async fn runs_started_before(&mut self, before: DateTime<Utc>) -> Result<Vec<RunAge>>;

    /// Deletes the runs `ids`; returns how many.
    async fn delete_runs(&mut self, ids: &[i64]) -> Result<u64>;
}

/// Opens a backend's transactions, and its one-statement reads.
#[async_trait]
pub(crate) trait PipelineTxs: Sync {
    /// A write transaction (see the module documentation).
    async fn write_tx(&self) -> Result<Box<dyn PipelineTx + '_>>;

    /// The write transaction of [`PipelineStore::commit_sessions`].
    async fn batch_tx(&self) -> Result<Box<dyn PipelineTx + '_>> {
        self.write_tx().await
    }

    /// [`PipelineStore::session_states`]: every state of a processor, in no
    /// order. Not served by [`PipelineTxs::states_page`] without a limit:
    /// its `ORDER BY path` made Postgres read 100,000 states by the index in
    /// 90 ms where the unordered scan takes 22 ms.
    async fn states(&self, processor: &str) -> Result<Vec<SessionState>>;

    /// [`PipelineStore::list_session_states`].
    async fn states_page(
        &self,
        processor: &str,
        status: Option<SessionStatus>,
        user: Option<&str>,
        after_path: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionState>>;

    /// [`PipelineStore::last_runs`]: the newest run (by start, then id) of
    /// each processor.
    async fn newest_runs(&self) -> Result<Vec<RunRecord>>;

    /// [`PipelineStore::list_runs`].
    async fn runs_page(&self, query: &RunsQuery) -> Result<Vec<RunRecord>>;

    /// [`PipelineStore::try_lock_processor`].
    async fn lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>>;

    /// [`PipelineStore::processor_locked`].
    async fn holds_processor(&self, processor: &str) -> Result<bool>;

    /// [`PipelineStore::usage`].
    async fn usage_report(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// [`PipelineStore::now`].
    async fn clock(&self) -> Result<DateTime<Utc>>;
}

/// A backend that opens [`PipelineTxs`] is a [`PipelineStore`]: the flows below.
#[async_trait]
impl<S: PipelineTxs + Send + Sync + 'static> PipelineStore for S {
    async fn session_states(&self, processor: &str) -> Result<Vec<SessionState>> {
        self.states(processor).await
    }

    async fn list_session_states(
        &self,
        processor: &str,
        status: Option<SessionStatus>,
        user: Option<&str>,
        after_path: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionState>> {
        self.states_page(processor, status, user, after_path, limit)
            .await
    }

    async fn refresh_stat(&self, processor: &str, file: &SessionFile) -> Result<()> {
        refresh_stat(self, processor, file).await
    }

    async fn commit_sessions(&self, writes: &[SessionWrite]) -> Result<()> {
        commit_sessions(self, writes).await
    }

    async fn update_session_state(
        &self,
        processor: &str,
        path: &str,
        update: StateUpdate<'_>,
    ) -> Result<SessionState> {
        update_session_state(self, processor, path, update).await
    }

    async fn try_lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
        self.lock_processor(processor).await
    }

    async fn processor_locked(&self, processor: &str) -> Result<bool> {
        self.holds_processor(processor).await
    }

    async fn record_run(&self, run: &NewRun) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        let id = tx.insert_run(run).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn last_runs(&self) -> Result<Vec<RunRecord>> {
        self.newest_runs().await
    }

    async fn list_runs(&self, query: &RunsQuery) -> Result<Vec<RunRecord>> {
        self.runs_page(query).await
    }

    async fn prune_runs(&self, before: DateTime<Utc>) -> Result<u64> {
        prune_runs(self, before).await
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.usage_report(query).await
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        self.clock().await
    }
}

/// [`PipelineStore::commit_sessions`].
async fn commit_sessions(store: &dyn PipelineTxs, writes: &[SessionWrite]) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut tx = store.batch_tx().await?;
    let usage: Vec<(&SessionFile, &[UsageEntry])> = writes
        .iter()
        .filter_map(|w| Some((&w.file, w.output.usage.as_deref()?)))
        .collect();
    tx.replace_usage(&usage).await?;
    for w in writes {
        if let Some(errors) = &w.output.transcript_errors {
            replace_transcript_errors(&mut *tx, &w.file, errors).await?;
        }
    }
    let states: Vec<&SessionState> = writes.iter().map(|w| &w.state).collect();
    tx.upsert_states(&states).await?;
    tx.commit().await
}

/// Replaces a session's transcript errors inside `tx`.
async fn replace_transcript_errors(
    tx: &mut dyn PipelineTx,
    file: &SessionFile,
    errors: &[TranscriptErrorEvent],
) -> Result<()> {
    // Events a recovery was planned for stay; the rest are replaced.
    tx.delete_transcript_errors(&file.path).await?;
    for error in errors {
        let e = &error.event;
        // Earlier inserts of this loop are visible here: they count too.
        let window = healing::recurrence_window(error.occurred_at);
        let earlier = tx.count_errors(&e.agent_id, e.error_type, window).await?;
        let (critical, recurring) = (
            healing::is_critical(e.severity),
            healing::recurring_given(earlier),
        );
        tx.insert_transcript_error(&file.path, error, critical, recurring)
            .await?;
    }
    Ok(())
}

/// [`PipelineStore::refresh_stat`]: the stat, observed at the store's clock
/// (a session without a state is left so).
async fn refresh_stat(store: &dyn PipelineTxs, processor: &str, file: &SessionFile) -> Result<()> {
    let mut tx = store.write_tx().await?;
    let Some(current) = tx.lock_state(processor, &file.path).await? else {
        return Ok(());
    };
    let refreshed = SessionState {
        size: file.size,
        mtime_ns: file.mtime_ns,
        observed_at: tx.now().await?,
        ..current
    };
    tx.upsert_states(&[&refreshed]).await?;
    tx.commit().await
}

/// [`PipelineStore::update_session_state`].
async fn update_session_state(
    store: &dyn PipelineTxs,
    processor: &str,
    path: &str,
    update: StateUpdate<'_>,
) -> Result<SessionState> {
    let mut tx = store.write_tx().await?;
    // Locked from here: nobody changes the row meanwhile.
    let current = tx
        .lock_state(processor, path)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "session",
            id: format!("{processor}:{path}"),
        })?;
    let now = tx.now().await?;
    let state = update(&current, now)?;
    tx.upsert_states(&[&state]).await?;
    tx.commit().await?;
    Ok(state)
}

/// [`PipelineStore::prune_runs`].
async fn prune_runs(store: &dyn PipelineTxs, before: DateTime<Utc>) -> Result<u64> {
    // The candidates and each processor's newest run; the domain picks. The
    // newest are read beside the transaction: on SQLite nobody writes while
    // it holds the writer; on Postgres runs recorded meanwhile are newer:
    // they only keep more.
    let mut tx = store.write_tx().await?;
    let candidates = tx.runs_started_before(before).await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let newest: Vec<RunAge> = store
        .newest_runs()
        .await?
        .iter()
        .map(|run| RunAge {
            processor: run.processor.clone(),
            cursor: run.cursor(),
        })
        .collect();
    let ids = pipeline_runs::prune_ids(&candidates, &newest, before);
    let pruned = tx.delete_runs(&ids).await?;
    tx.commit().await?;
    Ok(pruned)
}
