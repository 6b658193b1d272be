//! An in-memory `PipelineStore` for unit tests of the runtime: no database, a
//! mutex for transactions, the domain's recount for usage reports. It can be
//! told to fail (a lock that errors, commits that conflict) to test how the
//! run and the scheduler react.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::pipeline::{RunStats, SessionFile, SessionState, SessionStatus};
use crate::domain::transcript::UsageEntry;
use crate::domain::usage::{self, MessageCopy, UsageQuery, UsageRow};
use crate::error::{Error, Result};
use crate::storage::{
    PipelineStore, ProcessorLock, SessionSink, SessionTransaction, StateUpdate,
    TranscriptErrorEvent,
};

#[derive(Default)]
struct Inner {
    states: BTreeMap<(String, String), SessionState>,
    /// Every file's copies, by path.
    copies: HashMap<String, Vec<MessageCopy>>,
    runs: BTreeMap<String, Vec<RunStats>>,
    locks: HashSet<String>,
}

#[derive(Default)]
pub struct MemoryPipelineStore {
    inner: Arc<Mutex<Inner>>,
    /// So many next `try_lock_processor` calls fail as if the store were down.
    pub fail_locks: AtomicUsize,
    /// So many next commits fail with a serialization failure.
    pub conflicting_commits: AtomicUsize,
}

impl MemoryPipelineStore {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every run recorded for the processor, oldest first.
    pub fn runs(&self, processor: &str) -> Vec<RunStats> {
        self.inner()
            .runs
            .get(processor)
            .cloned()
            .unwrap_or_default()
    }

    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

struct MemoryTransaction {
    inner: Arc<Mutex<Inner>>,
    conflict: bool,
    usage: Option<(String, Vec<MessageCopy>)>,
}

#[async_trait]
impl SessionSink for MemoryTransaction {
    async fn replace_usage(&mut self, file: &SessionFile, entries: &[UsageEntry]) -> Result<()> {
        let copies = MessageCopy::from_file(&file.path, &file.user, &file.session, entries);
        self.usage = Some((file.path.clone(), copies));
        Ok(())
    }

    async fn replace_transcript_errors(
        &mut self,
        _file: &SessionFile,
        _errors: &[TranscriptErrorEvent],
    ) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl SessionTransaction for MemoryTransaction {
    async fn commit(self: Box<Self>, state: &SessionState) -> Result<()> {
        if self.conflict {
            return Err(Error::Conflict("serialization failure".into()));
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((path, copies)) = self.usage {
            inner.copies.insert(path, copies);
        }
        inner
            .states
            .insert((state.processor.clone(), state.path.clone()), state.clone());
        Ok(())
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
        let now = Utc::now();
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

    async fn begin_session(&self, _processor: &str) -> Result<Box<dyn SessionTransaction>> {
        Ok(Box::new(MemoryTransaction {
            inner: self.inner.clone(),
            conflict: Self::take(&self.conflicting_commits),
            usage: None,
        }))
    }

    async fn record_failure(&self, state: &SessionState) -> Result<()> {
        self.inner()
            .states
            .insert((state.processor.clone(), state.path.clone()), state.clone());
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
        let state = update(current, Utc::now())?;
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

    async fn record_run(&self, processor: &str, stats: &RunStats) -> Result<()> {
        self.inner()
            .runs
            .entry(processor.to_owned())
            .or_default()
            .push(stats.clone());
        Ok(())
    }

    async fn last_runs(&self) -> Result<Vec<(String, RunStats)>> {
        Ok(self
            .inner()
            .runs
            .iter()
            .filter_map(|(p, runs)| Some((p.clone(), runs.last()?.clone())))
            .collect())
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let inner = self.inner();
        Ok(usage::recount(inner.copies.values().flatten(), query))
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(Utc::now())
    }
}
