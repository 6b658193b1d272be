//! The session-pipeline part of the embedded store: the SQL of the flows in
//! `storage::pipeline` ([`PipelineTx`]), the reads, and the processor lock.
//! Usage entries are `usage_rollups`'.
//!
//! Every write runs in one `BEGIN IMMEDIATE` transaction on the single writer,
//! so a batch sees no concurrent writer and needs no row locks. Bulk rows go
//! in multi-row `VALUES` statements of a fixed size (the statement text
//! repeats, so the connection's statement cache prepares it once), the
//! SQLite counterpart of Postgres's `UNNEST`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite};

use super::healing::SqliteTx;
use super::{SqliteStore, micros, sqlite_error};
use crate::domain::pipeline::{SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{NewRun, RunAge, RunRecord, RunsQuery};
use crate::domain::transcript::UsageEntry;
use crate::error::{Error, Result};
use crate::storage::pipeline::{
    self as flows, PipelineTx, PipelineTxs, RUN_COLUMNS, STATE_COLUMNS, run_ages, stored_size,
};
use crate::storage::{ProcessorLock, TranscriptErrorEvent, UsageQuery, UsageRow};

mod usage_rollups;

/// Rows per multi-row statement. Every statement here binds at most 14
/// values a row: far below SQLite's 32766 bound variables.
pub(super) const CHUNK_ROWS: usize = 256;

type StateRow = flows::StateRow<i64>;
type RunRow = flows::RunRow<i64, String>;

/// The in-process processor lock: this process is the only one on the file
/// (the store's file lock), so a name in `running_processors` is the whole
/// lock. Dropping the guard (a panic, a cancelled run) frees it too.
struct SqliteProcessorLock {
    running: Arc<Mutex<HashSet<String>>>,
    processor: String,
}

impl Drop for SqliteProcessorLock {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.processor);
    }
}

#[async_trait]
impl ProcessorLock for SqliteProcessorLock {
    async fn release(self: Box<Self>) {
        // Dropping `self` frees it.
    }
}

#[async_trait]
impl PipelineTxs for SqliteStore {
    async fn write_tx(&self) -> Result<Box<dyn PipelineTx + '_>> {
        let tx = self.begin_write().await?;
        Ok(Box::new(SqliteTx { store: self, tx }))
    }

    async fn states(&self, processor: &str) -> Result<Vec<SessionState>> {
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = ?1"
        ))
        .bind(processor)
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
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
             WHERE processor = ?1
               AND (?2 IS NULL OR status = ?2)
               AND (?3 IS NULL OR user_name = ?3)
               AND (?4 IS NULL OR path > ?4)
             ORDER BY path
             LIMIT ?5"
        ))
        .bind(processor)
        .bind(status.map(SessionStatus::as_str))
        .bind(user)
        .bind(after_path)
        .bind(limit)
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(SessionState::try_from).collect()
    }

    async fn newest_runs(&self) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs r
             WHERE NOT EXISTS (
                 SELECT 1 FROM pipeline_runs n
                 WHERE n.processor = r.processor
                   AND (n.started_at, n.id) > (r.started_at, r.id))
             ORDER BY r.processor"
        ))
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn runs_page(&self, query: &RunsQuery) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs r
             WHERE (?1 IS NULL OR r.processor = ?1)
               AND (?2 IS NULL OR (r.started_at, r.id) < (?2, ?3))
             ORDER BY r.started_at DESC, r.id DESC
             LIMIT ?4"
        ))
        .bind(query.processor.as_deref())
        .bind(query.before.map(|c| micros(c.started_at)))
        .bind(query.before.map_or(0, |c| c.id))
        .bind(query.limit)
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
        let mut running = self
            .running_processors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !running.insert(processor.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(SqliteProcessorLock {
            running: Arc::clone(&self.running_processors),
            processor: processor.to_owned(),
        })))
    }

    async fn holds_processor(&self, processor: &str) -> Result<bool> {
        Ok(self
            .running_processors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(processor))
    }

    async fn usage_report(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        usage_rollups::usage_report(self.readers(), query).await
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        Ok(self.store_now())
    }
}

#[async_trait]
impl PipelineTx for SqliteTx<'_> {
    async fn replace_usage(&mut self, files: &[(&SessionFile, &[UsageEntry])]) -> Result<()> {
        usage_rollups::replace_usage(&mut self.tx, files).await
    }

    async fn delete_transcript_errors(&mut self, path: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM error_events WHERE source_path = ?1
               AND NOT EXISTS (SELECT 1 FROM recovery_actions r
                               WHERE r.error_event_id = error_events.id)",
        )
        .bind(path)
        .execute(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
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
        let context = serde_json::to_string(&e.context)
            .map_err(|err| Error::Internal(format!("error context not serialisable: {err}")))?;
        sqlx::query(
            "INSERT INTO error_events
                 (agent_id, message, context, error_type, severity, critical, recurring,
                  occurred_at, source_path, source_key, actor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (source_path, source_key) WHERE source_path IS NOT NULL DO NOTHING",
        )
        .bind(&e.agent_id)
        .bind(&e.message)
        .bind(context)
        .bind(e.error_type.as_str())
        .bind(e.severity)
        .bind(critical)
        .bind(recurring)
        .bind(micros(error.occurred_at))
        .bind(path)
        .bind(&error.key)
        .bind(&e.actor)
        .execute(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(())
    }

    /// A few hundred rows a statement.
    async fn upsert_states(&mut self, states: &[&SessionState]) -> Result<()> {
        for chunk in states.chunks(CHUNK_ROWS) {
            // Only full chunks repeat their text: only they stay prepared.
            let cached = chunk.len() == CHUNK_ROWS;
            let mut q = QueryBuilder::<Sqlite>::new(format!(
                "INSERT INTO session_states ({STATE_COLUMNS}) "
            ));
            q.push_values(chunk, |mut b, s| {
                b.push_bind(s.processor.as_str())
                    .push_bind(s.path.as_str())
                    .push_bind(s.user.as_str())
                    .push_bind(stored_size(s.size))
                    .push_bind(s.mtime_ns)
                    .push_bind(micros(s.observed_at))
                    .push_bind(s.sha256.as_str())
                    .push_bind(s.processor_version)
                    .push_bind(s.processed_at.map(micros))
                    .push_bind(s.items_count)
                    .push_bind(s.attempts)
                    .push_bind(s.last_error.as_deref())
                    .push_bind(s.status.as_str())
                    .push_bind(s.next_attempt_at.map(micros));
            });
            q.push(
                " ON CONFLICT (processor, path) DO UPDATE SET
                     user_name = excluded.user_name, size = excluded.size,
                     mtime_ns = excluded.mtime_ns, observed_at = excluded.observed_at,
                     sha256 = excluded.sha256, processor_version = excluded.processor_version,
                     attempts = excluded.attempts, last_error = excluded.last_error,
                     status = excluded.status, next_attempt_at = excluded.next_attempt_at,
                     processed_at = excluded.processed_at, items_count = excluded.items_count",
            );
            q.build()
                .persistent(cached)
                .execute(&mut *self.tx)
                .await
                .map_err(sqlite_error)?;
        }
        Ok(())
    }

    /// The write lock is held from the transaction's start: nothing to lock.
    async fn lock_state(&mut self, processor: &str, path: &str) -> Result<Option<SessionState>> {
        sqlx::query_as::<_, StateRow>(&format!(
            "SELECT {STATE_COLUMNS} FROM session_states WHERE processor = ?1 AND path = ?2"
        ))
        .bind(processor)
        .bind(path)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .map(SessionState::try_from)
        .transpose()
    }

    async fn insert_run(&mut self, run: &NewRun) -> Result<i64> {
        let json = serde_json::to_string(&run.stats)
            .map_err(|e| Error::Internal(format!("run stats not serialisable: {e}")))?;
        sqlx::query_scalar(
            "INSERT INTO pipeline_runs
                 (processor, started_at, finished_at, started_by, actor, stats)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        )
        .bind(&run.processor)
        .bind(micros(run.started_at))
        .bind(micros(run.finished_at))
        .bind(run.trigger.started_by.as_str())
        .bind(&run.trigger.actor)
        .bind(json)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn runs_started_before(&mut self, before: DateTime<Utc>) -> Result<Vec<RunAge>> {
        sqlx::query_as("SELECT id, processor, started_at FROM pipeline_runs WHERE started_at < ?1")
            .bind(micros(before))
            .fetch_all(&mut *self.tx)
            .await
            .map(run_ages::<i64>)
            .map_err(sqlite_error)
    }

    async fn delete_runs(&mut self, ids: &[i64]) -> Result<u64> {
        let mut pruned = 0;
        for chunk in ids.chunks(500) {
            let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM pipeline_runs WHERE id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            q.push(")");
            pruned += q
                .build()
                .execute(&mut *self.tx)
                .await
                .map_err(sqlite_error)?
                .rows_affected();
        }
        Ok(pruned)
    }
}

/// A fresh store in its own temporary directory, removed on drop.
#[cfg(test)]
pub(super) mod testing {
    use std::path::PathBuf;

    use crate::storage::sqlite::SqliteStore;
    use crate::storage::{StoreLocation, StoreOptions};

    pub struct TempStore {
        pub store: SqliteStore,
        dir: PathBuf,
    }

    impl TempStore {
        pub async fn new() -> TempStore {
            let dir = std::env::temp_dir().join(format!(
                "fleetcare-sqlite-pipeline-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let path = dir.join("fleetcare.db");
            let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
            let store = SqliteStore::open(&path, &args).await.expect("store opens");
            TempStore { store, dir }
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{Duration, TimeZone};

    use super::super::from_micros;
    use super::testing::TempStore;
    use super::*;
    use crate::domain::healing::ErrorType;
    use crate::domain::healing_records::NewErrorEvent;
    use crate::domain::pipeline::{self, RetryPolicy, RunStats};
    use crate::domain::pipeline_runs::RunTrigger;
    use crate::domain::pipeline_runs::StartedBy;
    use crate::storage::SessionOutput;
    use crate::storage::{PipelineStore, SessionWrite};
    use crate::storage::{StoreLocation, StoreOptions};

    fn file(path: &str) -> SessionFile {
        let (user, name) = path.split_once('/').unwrap();
        SessionFile {
            user: user.into(),
            session: name.trim_end_matches(".jsonl").into(),
            path: path.into(),
            size: 10,
            mtime_ns: 7,
        }
    }

    fn write(path: &str, output: SessionOutput, now: DateTime<Utc>) -> SessionWrite {
        let file = file(path);
        let state = pipeline::processed("p", &file, "sha", 1, 1, now);
        SessionWrite {
            file,
            output,
            state,
        }
    }

    #[tokio::test]
    async fn states_round_trip_page_by_path_and_update_under_the_write_lock() {
        let t = TempStore::new().await;
        let s = &t.store;
        let now = s.now().await.unwrap();
        let writes: Vec<SessionWrite> = ["b/2.jsonl", "a/1.jsonl", "a/3.jsonl"]
            .iter()
            .map(|p| write(p, SessionOutput::default(), now))
            .collect();
        s.commit_sessions(&writes).await.unwrap();
        let mut all = s.session_states("p").await.unwrap();
        all.sort_by(|a, b| a.path.cmp(&b.path));
        let mut expected: Vec<SessionState> = writes.iter().map(|w| w.state.clone()).collect();
        expected.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(all, expected);
        assert!(s.session_states("other").await.unwrap().is_empty());

        let page = s
            .list_session_states("p", None, None, Some("a/1.jsonl"), 1)
            .await
            .unwrap();
        assert_eq!(page[0].path, "a/3.jsonl");
        let of_a = s
            .list_session_states("p", Some(SessionStatus::Processed), Some("a"), None, 10)
            .await
            .unwrap();
        assert_eq!(of_a.len(), 2);
        assert!(
            s.list_session_states("p", Some(SessionStatus::Dead), None, None, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // A failure decided by the domain, then refreshed stat.
        let failed = s
            .update_session_state(
                "p",
                "a/1.jsonl",
                Box::new(|current, now| {
                    Ok(pipeline::failed(
                        Some(current),
                        "p",
                        &file("a/1.jsonl"),
                        "sha2",
                        1,
                        "boom",
                        &RetryPolicy::default(),
                        now,
                    ))
                }),
            )
            .await
            .unwrap();
        assert_eq!(failed.status, SessionStatus::Failed);
        let mut moved = file("a/1.jsonl");
        moved.size = 99;
        s.refresh_stat("p", &moved).await.unwrap();
        let stored = s
            .list_session_states("p", None, None, None, 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!((stored.size, stored.sha256.as_str()), (99, "sha2"));
        assert_eq!(stored.last_error, failed.last_error);
        assert_eq!(stored.next_attempt_at, failed.next_attempt_at);

        let missing = s
            .update_session_state("p", "z/9.jsonl", Box::new(|c, _| Ok(c.clone())))
            .await;
        assert!(
            matches!(missing, Err(Error::NotFound { .. })),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn the_processor_lock_is_freed_by_release_and_by_drop() {
        let t = TempStore::new().await;
        let s = &t.store;
        let lock = s.try_lock_processor("usage").await.unwrap().expect("free");
        assert!(s.processor_locked("usage").await.unwrap());
        assert!(s.try_lock_processor("usage").await.unwrap().is_none());
        let other = s.try_lock_processor("errors").await.unwrap();
        assert!(other.is_some(), "other processors are not blocked");
        lock.release().await;
        assert!(!s.processor_locked("usage").await.unwrap());
        let again = s.try_lock_processor("usage").await.unwrap().expect("free");
        drop(again);
        assert!(!s.processor_locked("usage").await.unwrap());
        drop(other);
        assert!(!s.processor_locked("errors").await.unwrap());
    }

    fn new_run(
        processor: &str,
        trigger: RunTrigger,
        started: DateTime<Utc>,
        processed: i64,
    ) -> NewRun {
        let stats = RunStats {
            processed,
            errors: vec![("a/1.jsonl".into(), "bad line".into())],
            started_at: Some(started),
            finished_at: Some(started + Duration::seconds(2)),
            ..RunStats::default()
        };
        NewRun::new(processor, trigger, &stats, started)
    }

    #[tokio::test]
    async fn every_run_is_kept_listed_newest_first_and_pruned_but_each_processors_newest() {
        let t = TempStore::new().await;
        let s = &t.store;
        assert!(s.last_runs().await.unwrap().is_empty());
        let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let mut ids = Vec::new();
        // usage at t0, t0+1h, t0+2h; errors at t0+30m; the same start twice.
        for (processor, trigger, offset, processed) in [
            ("usage", RunTrigger::scheduler(), 0, 1),
            ("errors", RunTrigger::call("alice"), 30, 2),
            ("usage", RunTrigger::call("bob"), 60, 3),
            ("usage", RunTrigger::scheduler(), 120, 4),
            ("usage", RunTrigger::scheduler(), 120, 5),
        ] {
            let run = new_run(
                processor,
                trigger,
                t0 + Duration::minutes(offset),
                processed,
            );
            ids.push((s.record_run(&run).await.unwrap(), run));
        }
        let all = |limit| RunsQuery {
            processor: None,
            before: None,
            limit,
        };
        let listed = s.list_runs(&all(10)).await.unwrap();
        let order: Vec<i64> = listed.iter().map(|r| r.stats.processed).collect();
        assert_eq!(
            order,
            [5, 4, 3, 2, 1],
            "newest first, the later id first on a tie"
        );
        let (id, run) = &ids[2];
        assert_eq!(
            listed[2],
            RunRecord::of(*id, run.clone()),
            "read back as written"
        );
        assert_eq!(listed[2].trigger, RunTrigger::call("bob"));

        // Paging from the cursor of a page's last run: no duplicate, no gap,
        // whatever is recorded meanwhile (newer runs do not shift the pages).
        let first = s.list_runs(&all(2)).await.unwrap();
        s.record_run(&new_run(
            "usage",
            RunTrigger::scheduler(),
            t0 + Duration::hours(5),
            6,
        ))
        .await
        .unwrap();
        let second = s
            .list_runs(&RunsQuery {
                before: Some(first[1].cursor()),
                ..all(2)
            })
            .await
            .unwrap();
        let got: Vec<i64> = first
            .iter()
            .chain(&second)
            .map(|r| r.stats.processed)
            .collect();
        assert_eq!(got, [5, 4, 3, 2]);
        let only_errors = s
            .list_runs(&RunsQuery {
                processor: Some("errors".into()),
                ..all(10)
            })
            .await
            .unwrap();
        assert_eq!(only_errors.len(), 1);
        assert_eq!(only_errors[0].trigger.actor, "alice");

        let newest: Vec<(String, i64)> = s
            .last_runs()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.processor, r.stats.processed))
            .collect();
        assert_eq!(newest, [("errors".into(), 2), ("usage".into(), 6)]);

        // Everything started before t0+3h goes but errors' only run.
        let pruned = s.prune_runs(t0 + Duration::hours(3)).await.unwrap();
        assert_eq!(pruned, 4);
        let left: Vec<(String, i64)> = s
            .list_runs(&all(10))
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.processor, r.stats.processed))
            .collect();
        assert_eq!(left, [("usage".into(), 6), ("errors".into(), 2)]);
        // The newest of each stays even when it is older than the cutoff.
        assert_eq!(s.prune_runs(t0 + Duration::days(100)).await.unwrap(), 0);
        // A pruned run's id is never given again.
        let next = s
            .record_run(&new_run(
                "usage",
                RunTrigger::scheduler(),
                t0 + Duration::hours(6),
                7,
            ))
            .await
            .unwrap();
        assert!(
            next > ids.iter().map(|(id, _)| *id).max().unwrap() + 1,
            "{next}"
        );
    }

    #[tokio::test]
    async fn the_last_runs_kept_before_the_history_become_its_first_runs() {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-sqlite-runs-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleetcare.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let before = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(
                    super::super::MIGRATOR
                        .iter()
                        .filter(|m| m.version < 20270101000002)
                        .cloned()
                        .collect(),
                ),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            before.run(&pool).await.unwrap();
            let stats = RunStats {
                processed: 9,
                ..RunStats::default()
            };
            sqlx::query("INSERT INTO pipeline_runs VALUES ('usage', 10, 20, ?1)")
                .bind(serde_json::to_string(&stats).unwrap())
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
        let s = SqliteStore::open(&path, &args).await.expect("migrates");
        let runs = s.last_runs().await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].processor, "usage");
        assert_eq!(runs[0].stats.processed, 9);
        assert_eq!(
            (runs[0].started_at, runs[0].finished_at),
            (from_micros(10), from_micros(20))
        );
        assert_eq!(runs[0].trigger.started_by, StartedBy::Unknown);
        assert_eq!(runs[0].trigger.actor, "");
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn error(key: &str, at: DateTime<Utc>) -> TranscriptErrorEvent {
        TranscriptErrorEvent {
            key: key.into(),
            event: NewErrorEvent {
                agent_id: "agent-1".into(),
                message: format!("failed {key}"),
                context: BTreeMap::from([("k".to_string(), "v".to_string())]),
                error_type: ErrorType::ExecutionFailure,
                severity: 0.9,
                actor: "pipeline".into(),
            },
            occurred_at: at,
        }
    }

    fn errors_output(errors: Vec<TranscriptErrorEvent>) -> SessionOutput {
        SessionOutput {
            usage: None,
            transcript_errors: Some(errors),
        }
    }

    #[tokio::test]
    async fn transcript_errors_are_replaced_recur_and_keep_those_with_a_recovery() {
        let t = TempStore::new().await;
        let s = &t.store;
        let now = s.now().await.unwrap();
        let at = Utc.with_ymd_and_hms(2026, 3, 14, 10, 0, 0).unwrap();
        let three = vec![
            error("l1", at),
            error("l2", at + Duration::minutes(1)),
            error("l3", at + Duration::minutes(2)),
        ];
        s.commit_sessions(&[write("u/s.jsonl", errors_output(three.clone()), now)])
            .await
            .unwrap();
        let rows: Vec<(i64, String, bool, bool, String, i64)> = sqlx::query_as(
            "SELECT id, source_key, recurring, critical, context, occurred_at
             FROM error_events ORDER BY source_key",
        )
        .fetch_all(s.readers())
        .await
        .unwrap();
        let flags: Vec<(&str, bool, bool)> =
            rows.iter().map(|r| (r.1.as_str(), r.2, r.3)).collect();
        // The third within the hour recurs (the domain's rule).
        assert_eq!(
            flags,
            vec![("l1", false, true), ("l2", false, true), ("l3", true, true)]
        );
        assert_eq!(rows[0].4, r#"{"k":"v"}"#);
        assert_eq!(rows[0].5, micros(at));

        // A recovery was planned for l1: it stays when the file is reprocessed.
        let mut tx = s.begin_write().await.unwrap();
        sqlx::query(
            "INSERT INTO recovery_actions (error_event_id, agent_id, error_type,
                 context_signature, strategy, chosen_strategy, estimated_duration_ms,
                 success_probability, risk, escalated, reason, status, created_at,
                 lease_expires_at)
             VALUES (?1, 'agent-1', 'EXECUTION_FAILURE', 'sig', 'RETRY', 'RETRY', 1,
                     0.5, 0.1, 0, 'r', 'ACTIVE', 0, 0)",
        )
        .bind(rows[0].0)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();

        // Reprocessed: l1 and l2 again (l1 kept, not duplicated), l3 gone.
        s.commit_sessions(&[write("u/s.jsonl", errors_output(three[..2].to_vec()), now)])
            .await
            .unwrap();
        let keys: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, source_key FROM error_events ORDER BY source_key")
                .fetch_all(s.readers())
                .await
                .unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[0], (rows[0].0, "l1".to_string()), "l1 kept as it was");
        assert_eq!(keys[1].1, "l2");

        // A processor that writes no errors leaves them alone.
        s.commit_sessions(&[write("u/s.jsonl", SessionOutput::default(), now)])
            .await
            .unwrap();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM error_events")
            .fetch_one(s.readers())
            .await
            .unwrap();
        assert_eq!(count, 2);
    }
}
