//! Runs session processors: one run scans the root, skips unchanged files
//! cheaply, processes changed ones in parallel and commits what they produced
//! in batches (each session's items with its state), isolates and retries
//! failing ones, and never runs a processor twice at once.

#[cfg(test)]
mod run_history_tests;
mod scan;
pub mod scheduler;
#[cfg(test)]
mod testing;

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::pipeline::{
    self, ContentVerdict, RetryPolicy, RunStats, SessionFile, SessionState, SessionStatus,
    StatVerdict,
};
use crate::domain::pipeline_runs::{self, NewRun, RunTrigger};
use crate::domain::usage::{self, UsageQuery, UsageRow};
use crate::error::{Error, Result};
use crate::processors::{ProcessError, Processed, Registration, SessionProcessor};
use crate::runtime::clock::Clock;
use crate::storage::{PipelineStore, ProcessorLock, SessionOutput, SessionWrite};

/// A batch whose transaction keeps conflicting with others is tried this often
/// before the run stops with the conflict.
const MAX_CONFLICT_RETRIES: u64 = 10;

/// At most this many sessions commit in one transaction (and so many wait
/// for a commit slot before no more files are started).
const MAX_BATCH_FILES: usize = 256;

/// Batches committed at once, each in its own transaction: while one waits
/// for its locks or its WAL flush, the other works.
const COMMITS_IN_FLIGHT: usize = 2;

/// Files larger than this are not read (a session transcript is far smaller).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub root: PathBuf,
    pub retry: RetryPolicy,
    /// Per processor; zero disables scheduling.
    pub intervals: HashMap<String, Duration>,
    /// How many files a run processes at once.
    pub parallelism: usize,
    /// Runs that started longer ago are pruned from the history after each
    /// recorded run (each processor's newest run is always kept).
    pub run_retention: Duration,
    /// When runs start and finish, and what the retention counts from.
    pub clock: Clock,
}

/// The default of `--run-retention`: 30 days.
pub const DEFAULT_RUN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// One file per core.
pub fn default_parallelism() -> usize {
    4 * std::thread::available_parallelism().map_or(2, |n| n.get())
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
    metrics: Arc<crate::metrics::Metrics>,
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

/// What a written session counts for in the run's stats.
enum FileOutcome {
    Processed { processed: Processed },
    Failed { dead: bool, error: String },
}

/// What handling one file left to do.
enum Handled {
    Skipped {
        dead: bool,
    },
    /// Commit this with the next batch.
    Write(Box<Ready>),
}

/// A session waiting for its batch's commit.
struct Ready {
    write: SessionWrite,
    outcome: FileOutcome,
    /// Digests of the messages it shares with other files, sorted.
    keys: Vec<u64>,
}

impl Ready {
    fn new(write: SessionWrite, outcome: FileOutcome) -> Box<Ready> {
        let mut keys: Vec<u64> = write.output.shared_keys().collect();
        keys.sort_unstable();
        keys.dedup();
        Box::new(Ready {
            write,
            outcome,
            keys,
        })
    }
}

/// A batch of sessions (what each writes, and what it counts for once
/// committed), and which attempt at committing it this is.
struct Batch {
    writes: Vec<SessionWrite>,
    outcomes: Vec<FileOutcome>,
    attempt: u64,
    /// Digests of the messages its sessions share with other files.
    keys: Vec<u64>,
}

impl Batch {
    fn of(sessions: impl Iterator<Item = Ready>) -> Batch {
        let mut keys = Vec::new();
        let (writes, outcomes) = sessions
            .map(|r| {
                keys.extend(r.keys);
                (r.write, r.outcome)
            })
            .unzip();
        keys.sort_unstable();
        keys.dedup();
        Batch {
            writes,
            outcomes,
            attempt: 1,
            keys,
        }
    }
}

/// The shared messages of the batches being committed. A session sharing one
/// waits for the next batch: two transactions writing the same message wait
/// for each other's commit (or deadlock), so batches committed side by side
/// are kept apart. Only an optimisation: digests may collide, and a retried
/// batch or a changed file's old copies may still meet another batch, which
/// the store's lock order and retries handle.
#[derive(Default)]
struct InFlight(HashMap<u64, u32>);

impl InFlight {
    fn claim(&mut self, batch: &Batch) {
        for &k in &batch.keys {
            *self.0.entry(k).or_default() += 1;
        }
    }

    fn release(&mut self, batch: &Batch) {
        for k in &batch.keys {
            if let Some(n) = self.0.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.0.remove(k);
                }
            }
        }
    }

    fn touches(&self, ready: &Ready) -> bool {
        !self.0.is_empty() && ready.keys.iter().any(|k| self.0.contains_key(k))
    }

    /// Up to `max` of `ready` that share no message with a batch in flight,
    /// in order; the others stay in `ready`.
    fn take(&self, ready: &mut Vec<Ready>, max: usize) -> Vec<Ready> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for r in ready.drain(..) {
            if taken.len() < max && !self.touches(&r) {
                taken.push(r);
            } else {
                kept.push(r);
            }
        }
        *ready = kept;
        taken
    }
}

enum Event<'f> {
    Handled((&'f SessionFile, Result<(Handled, Option<i64>)>)),
    Committed((Batch, Result<()>)),
}

/// One transaction for every session of the batch (after a backoff when it
/// is a retry); hands the batch back with the outcome.
async fn commit_batch(store: Arc<dyn PipelineStore>, batch: Batch) -> (Batch, Result<()>) {
    if batch.attempt > 1 {
        tokio::time::sleep(Duration::from_millis(5 * (batch.attempt - 1))).await;
    }
    let span = tracing::info_span!(
        "pipeline_commit",
        sessions = batch.writes.len() as i64,
        attempt = batch.attempt as i64,
        elapsed_ms = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let committed = store
        .commit_sessions(&batch.writes)
        .instrument(span.clone())
        .await;
    span.record("elapsed_ms", started.elapsed().as_secs_f64() * 1000.0);
    (batch, committed)
}

/// Runs the processor into an in-memory sink. `Ok(Err(_))` is the session's
/// own failure, a panic included: it fails the session, not the run.
async fn process(
    processor: &dyn SessionProcessor,
    file: &SessionFile,
    content: Arc<Vec<u8>>,
) -> Result<std::result::Result<(Processed, SessionOutput), String>> {
    let mut output = SessionOutput::default();
    let processed = AssertUnwindSafe(processor.process(file, content, &mut output))
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
        Ok(processed) => Ok(Ok((processed, output))),
        Err(ProcessError::Store(error)) => Err(error),
        Err(ProcessError::Session(error)) => Ok(Err(error)),
    }
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
            metrics: crate::metrics::Metrics::new(),
        })
    }

    /// Records runs and sessions into these metrics (before the pipeline is shared).
    pub fn with_metrics(mut self: Arc<Self>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        for entry in &self.entries {
            metrics.processor(entry.processor.name());
        }
        if let Some(pipeline) = Arc::get_mut(&mut self) {
            pipeline.metrics = metrics;
        }
        self
    }

    fn count_sessions(&self, processor: &'static str, result: &'static str, n: i64) {
        if n > 0 {
            self.metrics
                .pipeline_sessions
                .get_or_create(&crate::metrics::ProcessorLabels { processor, result })
                .inc_by(n as u64);
        }
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

    /// Runs a processor now and returns its stats; the run is recorded in
    /// the history with `trigger` (who or what started it). ABORTED when it
    /// is already running, here or on another server. The run goes on to its
    /// end even if the caller goes away.
    pub async fn run(self: &Arc<Self>, name: &str, trigger: RunTrigger) -> Result<RunStats> {
        let entry = self.entry(name)?;
        let name = entry.processor.name();
        let local =
            LocalGuard::acquire(&self.running, name).ok_or_else(|| Error::ProcessorRunning {
                processor: name.to_owned(),
                location: "on this server",
            })?;
        let lock =
            self.store
                .try_lock_processor(name)
                .await?
                .ok_or_else(|| Error::ProcessorRunning {
                    processor: name.to_owned(),
                    location: "on another server",
                })?;
        let this = self.clone();
        // The run's span: a child of the call that started it (RunProcessor),
        // a root of its own for the scheduler's runs.
        let span = tracing::info_span!(
            "pipeline_run",
            processor = name,
            run_id = tracing::field::Empty,
            scanned = tracing::field::Empty,
            processed = tracing::field::Empty,
            skipped = tracing::field::Empty,
            failed = tracing::field::Empty,
            dead = tracing::field::Empty,
            items = tracing::field::Empty,
            bytes_hashed = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            elapsed_ms = tracing::field::Empty,
        );
        let run = tokio::spawn(
            async move {
                let _local = local;
                this.run_locked(name, lock, trigger).await
            }
            .instrument(span),
        );
        run.await
            .map_err(|e| Error::Internal(format!("processor {name} run crashed: {e}")))
    }

    async fn run_locked(
        &self,
        name: &'static str,
        lock: Box<dyn ProcessorLock>,
        trigger: RunTrigger,
    ) -> RunStats {
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
            started_at: Some(self.config.clock.now()),
            ..RunStats::default()
        };
        if let Err(error) = self
            .scan_and_process(&*processor, progress, &mut stats)
            .await
        {
            stats.root_error = Some(error.to_string());
        }
        stats.finished_at = Some(self.config.clock.now());
        let result = if stats.root_error.is_some() {
            "error"
        } else {
            "ok"
        };
        self.metrics
            .pipeline_runs
            .get_or_create(&crate::metrics::ProcessorLabels {
                processor: name,
                result,
            })
            .inc();
        self.count_sessions(name, "processed", stats.processed);
        self.count_sessions(name, "failed", stats.failed);
        let run = NewRun::new(name, trigger, &stats, self.config.clock.now());
        // The caller, the watchers and the history see the same times (kept
        // at the stores' microseconds).
        stats.started_at = Some(run.started_at);
        stats.finished_at = Some(run.finished_at);
        match self.store.record_run(&run).await {
            Ok(id) => {
                tracing::Span::current().record("run_id", id);
                self.prune_runs_in_background();
            }
            Err(error) => tracing::warn!(%error, processor = name, "cannot record the run"),
        }
        lock.release().await;
        let span = tracing::Span::current();
        span.record("scanned", stats.scanned);
        span.record("processed", stats.processed);
        span.record("skipped", stats.skipped);
        span.record("failed", stats.failed);
        span.record("dead", stats.dead);
        span.record("items", stats.items_extracted);
        span.record("bytes_hashed", stats.bytes_hashed);
        span.record("outcome", result);
        if let Some(error) = &stats.root_error {
            span.record("error", error.as_str());
            span.record("otel.status_code", "ERROR");
        }
        if let (Some(started), Some(finished)) = (stats.started_at, stats.finished_at) {
            let elapsed = (finished - started).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            span.record("elapsed_ms", elapsed);
        }
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

    /// Prunes the run history past the retention, in a task of its own (the
    /// run's caller does not wait for it): after every recorded run, so the
    /// history is trimmed as often as runs are added, on whichever server
    /// ran. Each processor's newest run is kept whatever its age.
    fn prune_runs_in_background(&self) {
        let store = self.store.clone();
        let before =
            pipeline_runs::prune_before(self.config.clock.now(), self.config.run_retention);
        tokio::spawn(async move {
            match store.prune_runs(before).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned run history"),
                Err(error) => tracing::warn!(%error, "pruning run history failed"),
            }
        });
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
        // Files are read, hashed and processed in parallel (each read once);
        // what they produced waits in `ready` until a commit slot is free,
        // then everything ready goes in one transaction (group commit: no
        // waiting for a batch to fill, so a lone file goes at once, and
        // batches grow by themselves while the commits under way take time).
        let mut files = scan.files.iter();
        let mut running = FuturesUnordered::new();
        let mut ready: Vec<Ready> = Vec::new();
        let mut retries: VecDeque<Batch> = VecDeque::new();
        let mut committing = FuturesUnordered::new();
        let mut in_flight = InFlight::default();
        let report = |stats: &RunStats| {
            let (done, bytes) = (stats.scanned, stats.bytes_hashed);
            progress.send_modify(|p| {
                p.files_done = done;
                p.bytes_hashed = bytes;
            });
        };
        // Set by shutdown: no new files or batches, but the commits under way
        // are awaited and counted (a COMMIT already sent may land whether or
        // not its caller still listens, so the run reports what it kept).
        let mut stopping = false;
        loop {
            while !stopping
                && running.len() < self.config.parallelism.max(1)
                && ready.len() < MAX_BATCH_FILES
            {
                let Some(file) = files.next() else { break };
                running.push(self.handle_tagged(processor, file, states.get(&file.path), now));
            }
            while !stopping && committing.len() < COMMITS_IN_FLIGHT {
                let batch = match retries.pop_front() {
                    Some(batch) => batch,
                    None => {
                        let sessions = in_flight.take(&mut ready, MAX_BATCH_FILES);
                        if sessions.is_empty() {
                            break;
                        }
                        Batch::of(sessions.into_iter())
                    }
                };
                in_flight.claim(&batch);
                committing.push(commit_batch(self.store.clone(), batch));
            }
            if running.is_empty() && committing.is_empty() {
                break;
            }
            // Shutdown interrupts the files under way (they wrote nothing);
            // the commits under way finish.
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if !stopping => None,
                Some(done) = committing.next(), if !committing.is_empty() => Some(Event::Committed(done)),
                Some(done) = running.next(), if !running.is_empty() => Some(Event::Handled(done)),
            };
            if let Some(Event::Committed((batch, _))) = &event {
                in_flight.release(batch);
            }
            match event {
                None => {
                    stats.root_error = Some("interrupted by shutdown".into());
                    stopping = true;
                    running.clear();
                    ready.clear();
                    retries.clear();
                }
                Some(Event::Handled((_, handled))) => {
                    // A store error is not the session's fault: the run stops.
                    let (handled, read) = handled?;
                    if let Some(bytes) = read {
                        stats.files_hashed += 1;
                        stats.bytes_hashed += bytes;
                    }
                    match handled {
                        Handled::Skipped { dead } => {
                            stats.scanned += 1;
                            stats.skipped += 1;
                            stats.dead += i64::from(dead);
                            report(stats);
                        }
                        Handled::Write(session) => ready.push(*session),
                    }
                }
                Some(Event::Committed((batch, Ok(())))) => {
                    for (write, outcome) in batch.writes.iter().zip(batch.outcomes) {
                        stats.scanned += 1;
                        match outcome {
                            FileOutcome::Processed { processed } => {
                                stats.processed += 1;
                                stats.items_extracted += processed.items;
                                stats.lines_skipped += processed.lines_skipped;
                            }
                            FileOutcome::Failed { dead, error } => {
                                stats.failed += 1;
                                stats.dead += i64::from(dead);
                                self.count_sessions(processor.name(), "dead", i64::from(dead));
                                tracing::warn!(processor = processor.name(), session = %write.file.path, %error, "session failed");
                                stats.record_error(&write.file.path, error);
                            }
                        }
                    }
                    report(stats);
                }
                // Another transaction touched the same rows: nothing of the
                // batch was kept, so commit it again.
                Some(Event::Committed((mut batch, Err(Error::Conflict(_)))))
                    if batch.attempt < MAX_CONFLICT_RETRIES && !stopping =>
                {
                    tracing::debug!(
                        files = batch.writes.len(),
                        attempt = batch.attempt as i64,
                        "conflict, retrying the batch"
                    );
                    batch.attempt += 1;
                    retries.push_back(batch);
                }
                // Stopping: the batch was not kept, and is not retried.
                Some(Event::Committed((_, Err(Error::Conflict(_))))) if stopping => {}
                Some(Event::Committed((_, Err(error)))) => return Err(error),
            }
        }
        Ok(())
    }

    async fn handle_tagged<'f>(
        &self,
        processor: &dyn SessionProcessor,
        file: &'f SessionFile,
        state: Option<&SessionState>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> (&'f SessionFile, Result<(Handled, Option<i64>)>) {
        (file, self.handle_file(processor, file, state, now).await)
    }

    /// One file: decide from the stat, then from the hash, then process it.
    /// Returns what to commit (or that it was skipped) and, when the file was
    /// read, its size. Errors returned are the store's (the run stops); the
    /// session's own failures become its failed state.
    async fn handle_file(
        &self,
        processor: &dyn SessionProcessor,
        file: &SessionFile,
        state: Option<&SessionState>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Handled, Option<i64>)> {
        let name = processor.name();
        let version = processor.version();
        let is_dead = |s: Option<&SessionState>| s.is_some_and(|s| s.status == SessionStatus::Dead);
        match pipeline::stat_verdict(state, file, version, now) {
            StatVerdict::Skip => {
                let dead = is_dead(state);
                return Ok((Handled::Skipped { dead }, None));
            }
            StatVerdict::Wait => return Ok((Handled::Skipped { dead: false }, None)),
            StatVerdict::Read => {}
        }
        let (content, sha256) = match read_and_hash(&self.config.root, file).await {
            Ok(read) => read,
            Err(error) => {
                // Unreadable now (vanished, permissions, too large): a session failure.
                return Ok((self.fail(processor, file, state, "", error, now), None));
            }
        };
        let read = Some(content.len() as i64);
        match pipeline::content_verdict(state, &sha256, version, now) {
            ContentVerdict::Unchanged | ContentVerdict::StillDead => {
                self.store.refresh_stat(name, file).await?;
                let dead = is_dead(state);
                return Ok((Handled::Skipped { dead }, read));
            }
            ContentVerdict::Wait => return Ok((Handled::Skipped { dead: false }, read)),
            ContentVerdict::Process => {}
        }
        let handled = match process(processor, file, content).await? {
            Ok((processed, output)) => {
                let state = pipeline::processed(name, file, &sha256, version, processed.items, now);
                Handled::Write(Ready::new(
                    SessionWrite {
                        file: file.clone(),
                        output,
                        state,
                    },
                    FileOutcome::Processed { processed },
                ))
            }
            Err(error) => self.fail(processor, file, state, &sha256, error, now),
        };
        Ok((handled, read))
    }

    /// A failed attempt: the state the domain decides, written with the batch
    /// (the session's earlier items stay).
    fn fail(
        &self,
        processor: &dyn SessionProcessor,
        file: &SessionFile,
        state: Option<&SessionState>,
        sha256: &str,
        error: String,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Handled {
        let failed = pipeline::failed(
            state,
            processor.name(),
            file,
            sha256,
            processor.version(),
            &error,
            &self.config.retry,
            now,
        );
        let dead = failed.status == SessionStatus::Dead;
        Handled::Write(Ready::new(
            SessionWrite {
                file: file.clone(),
                output: SessionOutput::default(),
                state: failed,
            },
            FileOutcome::Failed { dead, error },
        ))
    }

    /// RetrySession: a FAILED or DEAD session requeued (the rule is the domain's).
    pub async fn retry_session(&self, processor: &str, path: &str) -> Result<SessionState> {
        self.store
            .update_session_state(
                processor,
                path,
                Box::new(|state, now| {
                    pipeline::requeue(state, now)
                        .map_err(|refused| Error::FailedPrecondition(refused.to_string()))
                }),
            )
            .await
    }

    /// A usage report and its totals.
    pub async fn usage(&self, query: &UsageQuery) -> Result<(Vec<UsageRow>, Option<UsageRow>)> {
        let rows = self.store.usage(query).await?;
        let totals = usage::totals(&rows);
        Ok((rows, totals))
    }

    /// Follows the run under way, or else the next one to start: its progress
    /// as it changes, ending with the finished run. Which run is decided now,
    /// so a run the caller starts afterwards is the one followed.
    pub fn follow_run(
        &self,
        name: &str,
        shutdown: CancellationToken,
    ) -> Result<mpsc::Receiver<RunProgress>> {
        let mut progress = self.progress(name)?;
        let current = progress.borrow_and_update().clone();
        let target_run = if current.running {
            current.run
        } else {
            current.run + 1
        };
        let (tx, rx) = mpsc::channel(64);
        // Counted as an open WatchRun stream until the follower stops: at the
        // run's end, or when the client drops the stream.
        let open = self.metrics.stream_open(crate::metrics::RUN_STREAM);
        tokio::spawn(async move {
            let _open = open;
            let mut last = current;
            loop {
                if last.run == target_run {
                    let finished = !last.running && last.stats.is_some();
                    if tx.send(last).await.is_err() || finished {
                        return;
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = progress.changed() => if changed.is_err() { return },
                }
                last = progress.borrow_and_update().clone();
                if last.run > target_run {
                    // A later run already started: the one followed is over.
                    return;
                }
            }
        });
        Ok(rx)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    use super::MAX_CONFLICT_RETRIES;
    use super::testing::{Held, Root, pipeline, pipeline_with};
    use crate::domain::pipeline::{SessionFile, SessionStatus};
    use crate::domain::pipeline_runs::RunTrigger;
    use crate::domain::transcript::extract_usage;
    use crate::domain::usage::{UsageGrouping, UsageQuery};
    use crate::error::Error;
    use crate::processors::{ProcessError, Processed, SessionProcessor};
    use crate::storage::PipelineStore;
    use crate::storage::SessionSink;
    use crate::storage::memory::MemoryPipelineStore;

    fn by_user() -> UsageQuery {
        UsageQuery {
            group_by: UsageGrouping::User,
            since: None,
            until: None,
            user: None,
        }
    }

    #[tokio::test]
    async fn a_conflicting_commit_is_retried_and_counted_once() {
        let root = Root::with_sessions(3);
        let store = Arc::new(MemoryPipelineStore::default());
        store.conflicting_commits.store(2, Ordering::SeqCst);
        let p = pipeline(
            store.clone(),
            &root,
            vec![(Arc::new(Held::new("usage", 100)), Duration::ZERO)],
            CancellationToken::new(),
        );
        let stats = p.run("usage", RunTrigger::scheduler()).await.unwrap();
        assert_eq!((stats.processed, stats.failed), (3, 0), "{stats:?}");
        assert!(stats.root_error.is_none());
        let rows = store.usage(&by_user()).await.unwrap();
        assert_eq!(rows[0].messages, 3);
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_commit_under_way_and_counts_what_it_kept() {
        let root = Root::with_sessions(1);
        let hold = Arc::new(Semaphore::new(0));
        let store = Arc::new(MemoryPipelineStore::holding_commits(hold.clone()));
        let shutdown = CancellationToken::new();
        let p = pipeline(
            store.clone(),
            &root,
            vec![(Arc::new(Held::new("usage", 100)), Duration::ZERO)],
            shutdown.clone(),
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("usage", RunTrigger::scheduler()).await }
        });
        // The commit has started and is held: shut down, then let it finish.
        store
            .commits_started
            .acquire()
            .await
            .expect("never closed")
            .forget();
        shutdown.cancel();
        hold.add_permits(1);
        let stats = run.await.unwrap().unwrap();
        assert_eq!(stats.processed, 1, "{stats:?}");
        assert_eq!(stats.root_error.as_deref(), Some("interrupted by shutdown"));
        assert_eq!(store.usage(&by_user()).await.unwrap()[0].messages, 1);
    }

    #[tokio::test]
    async fn conflicts_that_never_end_stop_the_run_as_themselves() {
        let root = Root::with_sessions(1);
        let store = Arc::new(MemoryPipelineStore::default());
        store
            .conflicting_commits
            .store(MAX_CONFLICT_RETRIES as usize, Ordering::SeqCst);
        let p = pipeline(
            store.clone(),
            &root,
            vec![(Arc::new(Held::new("usage", 100)), Duration::ZERO)],
            CancellationToken::new(),
        );
        let stats = p.run("usage", RunTrigger::scheduler()).await.unwrap();
        assert_eq!(stats.processed, 0);
        assert_eq!(
            stats.root_error.as_deref(),
            Some(
                Error::Conflict("serialization failure".into())
                    .to_string()
                    .as_str()
            )
        );
        // Not the session's fault: no failure recorded on it.
        assert!(store.session_states("usage").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_second_start_is_refused_as_processor_running_while_one_is_held() {
        let root = Root::with_sessions(1);
        let store = Arc::new(MemoryPipelineStore::default());
        let held = Arc::new(Held::new("held", 0));
        let (gate, entered) = (held.gate.clone(), held.entered.clone());
        let p = pipeline(
            store.clone(),
            &root,
            vec![(held, Duration::ZERO)],
            CancellationToken::new(),
        );
        let first = tokio::spawn({
            let p = p.clone();
            async move { p.run("held", RunTrigger::scheduler()).await }
        });
        entered.acquire().await.unwrap().forget();
        assert!(p.is_running_here("held"));
        match p.run("held", RunTrigger::scheduler()).await {
            Err(Error::ProcessorRunning {
                processor,
                location,
            }) => {
                assert_eq!((processor.as_str(), location), ("held", "on this server"))
            }
            other => panic!("expected ProcessorRunning, got {other:?}"),
        }
        gate.add_permits(1);
        assert_eq!(first.await.unwrap().unwrap().processed, 1);
        assert!(!store.processor_locked("held").await.unwrap());
    }

    #[tokio::test]
    async fn files_are_processed_in_parallel_up_to_the_configured_parallelism() {
        let root = Root::with_sessions(5);
        let store = Arc::new(MemoryPipelineStore::default());
        let held = Arc::new(Held::new("held", 0));
        let (gate, entered) = (held.gate.clone(), held.entered.clone());
        let p = pipeline(
            store.clone(),
            &root,
            vec![(held, Duration::ZERO)],
            CancellationToken::new(),
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("held", RunTrigger::scheduler()).await }
        });
        // Two files (the parallelism) reach the gate before any is let through.
        entered.acquire_many(2).await.unwrap().forget();
        tokio::task::yield_now().await;
        assert_eq!(entered.available_permits(), 0, "no third file started");
        gate.add_permits(100);
        assert_eq!(run.await.unwrap().unwrap().processed, 5);
    }

    #[tokio::test]
    async fn files_ready_while_commits_are_under_way_commit_together_in_the_next_one() {
        let root = Root::with_sessions(5);
        let hold = Arc::new(Semaphore::new(0));
        let store = Arc::new(MemoryPipelineStore::holding_commits(hold.clone()));
        let held = Arc::new(Held::new("held", 0));
        let (gate, entered, left) = (held.gate.clone(), held.entered.clone(), held.left.clone());
        let p = pipeline_with(
            store.clone(),
            &root,
            vec![(held, Duration::ZERO)],
            CancellationToken::new(),
            5,
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("held", RunTrigger::scheduler()).await }
        });
        entered.acquire_many(5).await.unwrap().forget();
        // A lone file is committed at once, without waiting for company.
        gate.add_permits(1);
        store.commits_started.acquire().await.unwrap().forget();
        // The next takes the second commit slot; the other three wait for one.
        gate.add_permits(4);
        store.commits_started.acquire().await.unwrap().forget();
        left.acquire_many(5).await.unwrap().forget();
        hold.add_permits(100);
        let stats = run.await.unwrap().unwrap();
        assert_eq!((stats.processed, stats.scanned), (5, 5), "{stats:?}");
        let mut sizes: Vec<usize> = store.batches().iter().map(Vec::len).collect();
        sizes.sort();
        assert_eq!(sizes, [1, 1, 3], "{:?}", store.batches());
        let rows = store.usage(&by_user()).await.unwrap();
        assert_eq!(rows[0].messages, 5);
    }

    #[tokio::test]
    async fn a_session_sharing_a_message_with_a_commit_under_way_waits_for_the_next_batch() {
        // s1 is a resumed copy of s0 (the same message); s2 shares nothing.
        let root = Root::with_sessions(3);
        let s0 = std::fs::read_to_string(root.0.join("alice/s0.jsonl")).unwrap();
        let s1 = root.0.join("alice/s1.jsonl");
        std::fs::write(&s1, &s0).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&s1)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let hold = Arc::new(Semaphore::new(0));
        let store = Arc::new(MemoryPipelineStore::holding_commits(hold.clone()));
        let mut held = Held::new("held", 0);
        held.by_name = ["s0", "s1", "s2"]
            .into_iter()
            .map(|n| (n, Arc::new(Semaphore::new(0))))
            .collect();
        let (gates, left) = (held.by_name.clone(), held.left.clone());
        let p = pipeline_with(
            store.clone(),
            &root,
            vec![(Arc::new(held), Duration::ZERO)],
            CancellationToken::new(),
            3,
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("held", RunTrigger::scheduler()).await }
        });
        // s0 alone in the first commit, which the store holds.
        gates["s0"].add_permits(1);
        store.commits_started.acquire().await.unwrap().forget();
        // s1 is ready while s0's batch commits: it shares s0's message, so the
        // free slot goes to s2 alone.
        gates["s1"].add_permits(1);
        left.acquire_many(2).await.unwrap().forget();
        gates["s2"].add_permits(1);
        store.commits_started.acquire().await.unwrap().forget();
        hold.add_permits(100);
        let stats = run.await.unwrap().unwrap();
        assert_eq!((stats.processed, stats.scanned), (3, 3), "{stats:?}");
        let names: Vec<Vec<String>> = store
            .batches()
            .iter()
            .map(|b| {
                b.iter()
                    .map(|p| p.rsplit('/').next().unwrap().to_owned())
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            [["s0.jsonl"], ["s2.jsonl"], ["s1.jsonl"]],
            "s1 committed beside the batch holding its message"
        );
        let rows = store.usage(&by_user()).await.unwrap();
        assert_eq!(rows[0].messages, 2, "m0 counted once, m2 once");
    }

    /// Fails the sessions of user `bad`, panics on those of `boom`, counts the rest.
    struct Picky;

    #[async_trait]
    impl SessionProcessor for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }

        fn version(&self) -> i32 {
            1
        }

        async fn process(
            &self,
            file: &SessionFile,
            content: Arc<Vec<u8>>,
            sink: &mut dyn SessionSink,
        ) -> Result<Processed, ProcessError> {
            match file.user.as_str() {
                "bad" => Err(ProcessError::Session("bad session".into())),
                "boom" => panic!("processor bug on {}", file.path),
                _ => {
                    let entries = extract_usage(&content).entries;
                    let items = entries.len() as i64;
                    sink.replace_usage(file, entries).await?;
                    Ok(Processed {
                        items,
                        lines_skipped: 0,
                    })
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failing_or_panicking_session_fails_alone_and_the_batch_commits_the_rest() {
        let root = Root::with_sessions(4);
        for user in ["bad", "boom"] {
            std::fs::create_dir_all(root.0.join(user)).unwrap();
            std::fs::copy(
                root.0.join("alice/s0.jsonl"),
                root.0.join(format!("{user}/s.jsonl")),
            )
            .unwrap();
        }
        let hold = Arc::new(Semaphore::new(0));
        let store = Arc::new(MemoryPipelineStore::holding_commits(hold.clone()));
        let p = pipeline_with(
            store.clone(),
            &root,
            vec![(Arc::new(Picky), Duration::ZERO)],
            CancellationToken::new(),
            6,
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("picky", RunTrigger::scheduler()).await }
        });
        // Two commits held: whatever else is ready by then shares a batch.
        store
            .commits_started
            .acquire_many(2)
            .await
            .unwrap()
            .forget();
        hold.add_permits(100);
        let stats = run.await.unwrap().unwrap();
        assert_eq!((stats.processed, stats.failed), (4, 2), "{stats:?}");
        let mut errors: Vec<_> = stats.errors.clone();
        errors.sort();
        assert_eq!(errors[0].0, "bad/s.jsonl");
        assert_eq!(errors[0].1, "bad session");
        assert_eq!(errors[1].0, "boom/s.jsonl");
        assert!(
            errors[1].1.contains("processor bug on boom/s.jsonl"),
            "{errors:?}"
        );
        let states = store.session_states("picky").await.unwrap();
        assert_eq!(states.len(), 6);
        for s in &states {
            let failed = s.user == "bad" || s.user == "boom";
            let expected = if failed {
                SessionStatus::Failed
            } else {
                SessionStatus::Processed
            };
            assert_eq!(s.status, expected, "{s:?}");
            assert_eq!(s.last_error.is_some(), failed, "{s:?}");
        }
        // Every session committed once, the failed ones beside the others.
        let mut committed: Vec<String> = store.batches().concat();
        committed.sort();
        assert_eq!(committed.len(), 6, "{:?}", store.batches());
        committed.dedup();
        assert_eq!(committed.len(), 6, "{:?}", store.batches());
        let rows = store.usage(&by_user()).await.unwrap();
        assert_eq!((rows.len(), rows[0].messages), (1, 4), "{rows:?}");
    }

    #[tokio::test]
    async fn a_batch_that_conflicts_is_retried_whole_and_counted_once() {
        let root = Root::with_sessions(6);
        let hold = Arc::new(Semaphore::new(0));
        let store = Arc::new(MemoryPipelineStore::holding_commits(hold.clone()));
        store.conflicting_commits.store(3, Ordering::SeqCst);
        let p = pipeline_with(
            store.clone(),
            &root,
            vec![(Arc::new(Held::new("usage", 100)), Duration::ZERO)],
            CancellationToken::new(),
            6,
        );
        let run = tokio::spawn({
            let p = p.clone();
            async move { p.run("usage", RunTrigger::scheduler()).await }
        });
        store
            .commits_started
            .acquire_many(2)
            .await
            .unwrap()
            .forget();
        hold.add_permits(100);
        let stats = run.await.unwrap().unwrap();
        assert_eq!((stats.processed, stats.failed), (6, 0), "{stats:?}");
        assert!(stats.root_error.is_none(), "{stats:?}");
        assert_eq!(store.conflicting_commits.load(Ordering::SeqCst), 0);
        let committed: usize = store.batches().iter().map(Vec::len).sum();
        assert_eq!(committed, 6, "{:?}", store.batches());
        let rows = store.usage(&by_user()).await.unwrap();
        assert_eq!(rows[0].messages, 6);
    }
}
