//! Runs session processors: one run scans the root, skips unchanged files
//! cheaply, processes changed ones each in its own transaction, isolates and
//! retries failing ones, and never runs a processor twice at once.

mod scan;
pub mod scheduler;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::pipeline::{
    self, ContentVerdict, RetryPolicy, RunStats, SessionFile, SessionState, SessionStatus,
    StatVerdict,
};
use crate::error::{Error, Result};
use crate::processors::{ProcessError, Registration, SessionProcessor};
use crate::storage::{PipelineStore, ProcessorLock};

/// Files larger than this are not read (a session transcript is far smaller).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub root: PathBuf,
    pub retry: RetryPolicy,
    /// Per processor; zero disables scheduling.
    pub intervals: HashMap<String, Duration>,
}

/// Progress of a processor's runs on this server, for WatchRun.
#[derive(Debug, Clone, Default)]
pub struct RunProgress {
    /// Increases with every run started here.
    pub run: u64,
    pub running: bool,
    pub files_total: i64,
    pub files_done: i64,
    pub bytes_hashed: i64,
    /// Set when the run finished.
    pub stats: Option<RunStats>,
}

struct Entry {
    processor: Arc<dyn SessionProcessor>,
    interval: Duration,
    progress: watch::Sender<RunProgress>,
}

pub struct Pipeline {
    store: Arc<dyn PipelineStore>,
    config: PipelineConfig,
    entries: Vec<Entry>,
    /// Processors running on this server: asked before the cluster-wide lock,
    /// so one server never even asks twice.
    running: Arc<Mutex<HashSet<&'static str>>>,
    shutdown: CancellationToken,
}

/// Removes a processor from the running set however its run ends.
struct LocalGuard {
    running: Arc<Mutex<HashSet<&'static str>>>,
    name: &'static str,
}

impl LocalGuard {
    fn acquire(running: &Arc<Mutex<HashSet<&'static str>>>, name: &'static str) -> Option<Self> {
        let mut set = running.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(name).then(|| LocalGuard {
            running: running.clone(),
            name,
        })
    }
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        let mut set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(self.name);
    }
}

/// What the run learned about one file.
enum FileOutcome {
    Skipped { dead: bool },
    Processed { items: i64 },
    Failed { dead: bool, error: String },
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn PipelineStore>,
        config: PipelineConfig,
        registry: Vec<Registration>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let entries = registry
            .into_iter()
            .map(|r| Entry {
                interval: config
                    .intervals
                    .get(r.processor.name())
                    .copied()
                    .unwrap_or(r.default_interval),
                processor: r.processor,
                progress: watch::channel(RunProgress::default()).0,
            })
            .collect();
        Arc::new(Pipeline {
            store,
            config,
            entries,
            running: Arc::default(),
            shutdown,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.processor.name() == name)
            .ok_or_else(|| Error::NotFound {
                kind: "processor",
                id: name.to_owned(),
            })
    }

    /// (name, version, interval) of every processor.
    pub fn processors(&self) -> Vec<(&'static str, i32, Duration)> {
        self.entries
            .iter()
            .map(|e| (e.processor.name(), e.processor.version(), e.interval))
            .collect()
    }

    pub fn store(&self) -> &Arc<dyn PipelineStore> {
        &self.store
    }

    pub fn is_running_here(&self, name: &str) -> bool {
        let set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        set.contains(name)
    }

    pub fn progress(&self, name: &str) -> Result<watch::Receiver<RunProgress>> {
        Ok(self.entry(name)?.progress.subscribe())
    }

    /// Runs a processor now and returns its stats. ABORTED when it is already
    /// running, here or on another server. The run goes on to its end even if
    /// the caller goes away.
    pub async fn run(self: &Arc<Self>, name: &str) -> Result<RunStats> {
        let entry = self.entry(name)?;
        let name = entry.processor.name();
        let local = LocalGuard::acquire(&self.running, name).ok_or_else(|| {
            Error::Aborted(format!(
                "processor {name} is already running on this server"
            ))
        })?;
        let lock = self.store.try_lock_processor(name).await?.ok_or_else(|| {
            Error::Aborted(format!(
                "processor {name} is already running on another server"
            ))
        })?;
        let this = self.clone();
        let run = tokio::spawn(async move {
            let _local = local;
            this.run_locked(name, lock).await
        });
        run.await
            .map_err(|e| Error::Internal(format!("processor {name} run crashed: {e}")))
    }

    async fn run_locked(&self, name: &'static str, lock: Box<dyn ProcessorLock>) -> RunStats {
        let entry = self
            .entry(name)
            .expect("the entry was found before the run");
        let processor = entry.processor.clone();
        let progress = &entry.progress;
        progress.send_modify(|p| {
            *p = RunProgress {
                run: p.run + 1,
                running: true,
                ..RunProgress::default()
            }
        });
        let mut stats = RunStats {
            started_at: Some(chrono::Utc::now()),
            ..RunStats::default()
        };
        if let Err(error) = self
            .scan_and_process(&*processor, progress, &mut stats)
            .await
        {
            stats.root_error = Some(error.to_string());
        }
        stats.finished_at = Some(chrono::Utc::now());
        if let Err(error) = self.store.record_run(name, &stats).await {
            tracing::warn!(%error, processor = name, "cannot record the run");
        }
        lock.release().await;
        tracing::info!(
            processor = name,
            scanned = stats.scanned,
            processed = stats.processed,
            skipped = stats.skipped,
            failed = stats.failed,
            items = stats.items_extracted,
            "run finished"
        );
        progress.send_modify(|p| {
            p.running = false;
            p.stats = Some(stats.clone());
        });
        stats
    }

    async fn scan_and_process(
        &self,
        processor: &dyn SessionProcessor,
        progress: &watch::Sender<RunProgress>,
        stats: &mut RunStats,
    ) -> Result<()> {
        let root = self.config.root.clone();
        let scan = tokio::task::spawn_blocking(move || scan::scan(&root))
            .await
            .map_err(|e| Error::Internal(format!("scan crashed: {e}")))?;
        stats.skipped_entries = scan.skipped;
        if let Some(error) = scan.root_error {
            stats.root_error = Some(error);
            return Ok(());
        }
        let states: HashMap<String, SessionState> = self
            .store
            .session_states(processor.name())
            .await?
            .into_iter()
            .map(|s| (s.path.clone(), s))
            .collect();
        let now = self.store.now().await?;
        progress.send_modify(|p| p.files_total = scan.files.len() as i64);
        for file in &scan.files {
            if self.shutdown.is_cancelled() {
                stats.root_error = Some("interrupted by shutdown".into());
                break;
            }
            stats.scanned += 1;
            let state = states.get(&file.path);
            let outcome = self.handle_file(processor, file, state, now, stats).await?;
            match outcome {
                FileOutcome::Skipped { dead } => {
                    stats.skipped += 1;
                    stats.dead += i64::from(dead);
                }
                FileOutcome::Processed { items } => {
                    stats.processed += 1;
                    stats.items_extracted += items;
                }
                FileOutcome::Failed { dead, error } => {
                    stats.failed += 1;
                    stats.dead += i64::from(dead);
                    tracing::warn!(processor = processor.name(), session = %file.path, %error, "session failed");
                    stats.record_error(&file.path, error);
                }
            }
            let (done, bytes) = (stats.scanned, stats.bytes_hashed);
            progress.send_modify(|p| {
                p.files_done = done;
                p.bytes_hashed = bytes;
            });
        }
        Ok(())
    }

    /// One file: decide from the stat, then from the hash, then process it.
    /// Errors returned are the store's (the run stops); the session's own
    /// failures are recorded on it.
    async fn handle_file(
        &self,
        processor: &dyn SessionProcessor,
        file: &SessionFile,
        state: Option<&SessionState>,
        now: chrono::DateTime<chrono::Utc>,
        stats: &mut RunStats,
    ) -> Result<FileOutcome> {
        let name = processor.name();
        let version = processor.version();
        let is_dead = |s: Option<&SessionState>| s.is_some_and(|s| s.status == SessionStatus::Dead);
        match pipeline::stat_verdict(state, file, version, now) {
            StatVerdict::Skip => {
                return Ok(FileOutcome::Skipped {
                    dead: is_dead(state),
                });
            }
            StatVerdict::Wait => return Ok(FileOutcome::Skipped { dead: false }),
            StatVerdict::Read => {}
        }
        let (content, sha256) = match read_and_hash(&self.config.root, file).await {
            Ok(read) => read,
            Err(error) => {
                // Unreadable now (vanished, permissions, too large): a session failure.
                return self.fail(processor, file, state, "", &error, now).await;
            }
        };
        stats.files_hashed += 1;
        stats.bytes_hashed += content.len() as i64;
        match pipeline::content_verdict(state, &sha256, version, now) {
            ContentVerdict::Unchanged | ContentVerdict::StillDead => {
                self.store.refresh_stat(name, file).await?;
                return Ok(FileOutcome::Skipped {
                    dead: is_dead(state),
                });
            }
            ContentVerdict::Wait => return Ok(FileOutcome::Skipped { dead: false }),
            ContentVerdict::Process => {}
        }
        let mut tx = self.store.begin_session(name).await?;
        // A panicking processor fails its session, not the run.
        let processed = AssertUnwindSafe(processor.process(file, content, tx.as_mut()))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(ProcessError::Session(format!(
                    "processor panicked: {message}"
                )))
            });
        match processed {
            Ok(items) => {
                tx.commit(file, &sha256, version, items).await?;
                Ok(FileOutcome::Processed { items })
            }
            Err(ProcessError::Store(error)) => Err(error),
            Err(ProcessError::Session(error)) => {
                drop(tx); // rolls back whatever the processor wrote
                self.fail(processor, file, state, &sha256, &error, now)
                    .await
            }
        }
    }

    async fn fail(
        &self,
        processor: &dyn SessionProcessor,
        file: &SessionFile,
        state: Option<&SessionState>,
        sha256: &str,
        error: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<FileOutcome> {
        let (attempts, status, next) =
            pipeline::after_failure(state, sha256, &self.config.retry, now);
        self.store
            .record_failure(
                processor.name(),
                file,
                sha256,
                processor.version(),
                error,
                attempts,
                status,
                next,
            )
            .await?;
        Ok(FileOutcome::Failed {
            dead: status == SessionStatus::Dead,
            error: error.to_owned(),
        })
    }
}

/// Reads the whole file once and hashes that same content.
async fn read_and_hash(
    root: &std::path::Path,
    file: &SessionFile,
) -> std::result::Result<(Arc<Vec<u8>>, String), String> {
    if file.size > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the {MAX_FILE_BYTES} a session may have",
            file.size
        ));
    }
    let path = root.join(&file.path);
    tokio::task::spawn_blocking(move || {
        let content = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
        let sha256 = format!("{:x}", Sha256::digest(&content));
        Ok((Arc::new(content), sha256))
    })
    .await
    .map_err(|e| format!("read crashed: {e}"))?
}
