//! An in-memory `PipelineStore` for unit tests of the runtime: no database, a
//! mutex for transactions, the domain's recount for usage reports. It can be
//! told to fail (a lock that errors, commits that conflict) to test how the
//! run and the scheduler react.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;

use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{self, NewRun, RunRecord, RunsQuery};
use crate::domain::usage::{self, MessageCopy, UsageQuery, UsageRow};
use crate::error::{Error, Result};
use crate::storage::{PipelineStore, ProcessorLock, SessionWrite, StateUpdate};

#[derive(Default)]
struct Inner {
    states: BTreeMap<(String, String), SessionState>,
    /// Every file's copies, by path.
    copies: HashMap<String, Vec<MessageCopy>>,
    /// Every recorded run, in the order recorded.
    runs: Vec<RunRecord>,
    last_run_id: i64,
    locks: HashSet<String>,
    /// The paths of every committed batch, in commit order.
    batches: Vec<Vec<String>>,
}

pub struct MemoryPipelineStore {
    inner: Arc<Mutex<Inner>>,
    /// So many next `try_lock_processor` calls fail as if the store were down.
    pub fail_locks: AtomicUsize,
    /// So many next `commit_sessions` calls fail with a serialization failure.
    pub conflicting_commits: AtomicUsize,
    /// When set, each `commit_sessions` waits for a permit of it before
    /// committing (a slow commit a test lets through).
    pub hold_commits: Option<Arc<Semaphore>>,
    /// One permit added per `commit_sessions` call, on entry.
    pub commits_started: Arc<Semaphore>,
    /// The store's clock (the system clock unless a test sets one).
    pub clock: crate::storage::Clock,
}

impl Default for MemoryPipelineStore {
    fn default() -> Self {
        MemoryPipelineStore {
            inner: Arc::default(),
            fail_locks: AtomicUsize::new(0),
            conflicting_commits: AtomicUsize::new(0),
            hold_commits: None,
            commits_started: Arc::new(Semaphore::new(0)),
            clock: crate::storage::Clock::system(),
        }
    }
}

impl MemoryPipelineStore {
    /// A store whose commits each wait for a permit of `hold`.
    pub fn holding_commits(hold: Arc<Semaphore>) -> Self {
        MemoryPipelineStore {
            hold_commits: Some(hold),
            ..MemoryPipelineStore::default()
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stats of every run recorded for the processor, oldest first.
    pub fn runs(&self, processor: &str) -> Vec<RunStats> {
        self.inner()
            .runs
            .iter()
            .filter(|r| r.processor == processor)
            .map(|r| r.stats.clone())
            .collect()
    }

    /// Every recorded run (pruned ones gone), in the order recorded.
    pub fn records(&self) -> Vec<RunRecord> {
        self.inner().runs.clone()
    }

    /// The paths of every committed batch, in commit order.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.inner().batches.clone()
    }

    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

struct MemoryLock {
    inner: Arc<Mutex<Inner>>,
    processor: String,
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.locks.remove(&self.processor);
    }
}

#[async_trait]
impl ProcessorLock for MemoryLock {
    async fn release(self: Box<Self>) {}
}

#[async_trait]
impl PipelineStore for MemoryPipelineStore {
    async fn session_states(&self, processor: &str) -> Result<Vec<SessionState>> {
        Ok(self
            .inner()
            .states
            .values()
            .filter(|s| s.processor == processor)
            .cloned()
            .collect())
    }

    async fn list_session_states(
        &self,
        processor: &str,
        status: Option<SessionStatus>,
        user: Option<&str>,
        after_path: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionState>> {
        Ok(self
            .inner()
            .states
            .values()
            .filter(|s| {
                s.processor == processor
                    && status.is_none_or(|st| s.status == st)
                    && user.is_none_or(|u| s.user == u)
                    && after_path.is_none_or(|a| s.path.as_str() > a)
            })
            .take(usize::try_from(limit).unwrap_or(0))
            .cloned()
            .collect())
    }

    async fn refresh_stat(&self, processor: &str, file: &SessionFile) -> Result<()> {
        let now = self.clock.now();
        if let Some(s) = self
            .inner()
            .states
            .get_mut(&(processor.to_owned(), file.path.clone()))
        {
            s.size = file.size;
            s.mtime_ns = file.mtime_ns;
            s.observed_at = now;
        }
        Ok(())
    }

    async fn commit_sessions(&self, writes: &[SessionWrite]) -> Result<()> {
        self.commits_started.add_permits(1);
        if let Some(hold) = &self.hold_commits {
            hold.acquire().await.expect("never closed").forget();
        }
        if Self::take(&self.conflicting_commits) {
            return Err(Error::Conflict("serialization failure".into()));
        }
        let mut inner = self.inner();
        for w in writes {
            if let Some(entries) = &w.output.usage {
                let f = &w.file;
                let copies = MessageCopy::from_file(&f.path, &f.user, &f.session, entries);
                inner.copies.insert(f.path.clone(), copies);
            }
            inner.states.insert(
                (w.state.processor.clone(), w.state.path.clone()),
                w.state.clone(),
            );
        }
        inner
            .batches
            .push(writes.iter().map(|w| w.file.path.clone()).collect());
        Ok(())
    }

    async fn update_session_state(
        &self,
        processor: &str,
        path: &str,
        update: StateUpdate<'_>,
    ) -> Result<SessionState> {
        let mut inner = self.inner();
        let key = (processor.to_owned(), path.to_owned());
        let current = inner.states.get(&key).ok_or_else(|| Error::NotFound {
            kind: "session",
            id: format!("{processor}:{path}"),
        })?;
        let state = update(current, self.clock.now())?;
        inner.states.insert(key, state.clone());
        Ok(state)
    }

    async fn try_lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>> {
        if Self::take(&self.fail_locks) {
            return Err(Error::Unavailable("store down (test)".into()));
        }
        if !self.inner().locks.insert(processor.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(MemoryLock {
            inner: self.inner.clone(),
            processor: processor.to_owned(),
        })))
    }

    async fn processor_locked(&self, processor: &str) -> Result<bool> {
        Ok(self.inner().locks.contains(processor))
    }

    async fn record_run(&self, run: &NewRun) -> Result<i64> {
        let mut inner = self.inner();
        inner.last_run_id += 1;
        let id = inner.last_run_id;
        inner.runs.push(RunRecord::of(id, run.clone()));
        Ok(id)
    }

    async fn last_runs(&self) -> Result<Vec<RunRecord>> {
        let inner = self.inner();
        let mut newest: BTreeMap<&str, &RunRecord> = BTreeMap::new();
        for run in &inner.runs {
            let slot = newest.entry(&run.processor).or_insert(run);
            if run.cursor() > slot.cursor() {
                *slot = run;
            }
        }
        Ok(newest.into_values().cloned().collect())
    }

    async fn list_runs(&self, query: &RunsQuery) -> Result<Vec<RunRecord>> {
        let mut runs: Vec<RunRecord> = self
            .inner()
            .runs
            .iter()
            .filter(|r| query.matches(r))
            .cloned()
            .collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.cursor()));
        runs.truncate(usize::try_from(query.limit).unwrap_or(0));
        Ok(runs)
    }

    async fn prune_runs(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut inner = self.inner();
        let gone: HashSet<i64> = pipeline_runs::pruned(&inner.runs, before)
            .iter()
            .map(|r| r.id)
            .collect();
        inner.runs.retain(|r| !gone.contains(&r.id));
        Ok(gone.len() as u64)
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let inner = self.inner();
        Ok(usage::recount(inner.copies.values().flatten(), query))
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(self.clock.now())
    }
}
