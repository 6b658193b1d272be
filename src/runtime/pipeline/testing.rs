//! What the runtime's unit tests share: a session root on disk, processors a
//! test controls, and a pipeline over the in-memory store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, PipelineConfig};
use crate::domain::pipeline::{RetryPolicy, SessionFile};
use crate::domain::transcript::extract_usage;
use crate::processors::{ProcessError, Processed, Registration, SessionProcessor};
use crate::runtime::clock::Clock;
use crate::storage::SessionSink;
use crate::storage::memory::MemoryPipelineStore;

/// A temporary session root, removed on drop.
pub struct Root(pub PathBuf);

impl Root {
    /// `files` sessions of user alice, one usage line each, an hour old.
    pub fn with_sessions(files: usize) -> Root {
        let path = std::env::temp_dir().join(format!(
            "fleetcare-runtime-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(path.join("alice")).unwrap();
        for i in 0..files {
            let file = path.join(format!("alice/s{i}.jsonl"));
            std::fs::write(
                &file,
                format!(
                    r#"{{"type":"assistant","timestamp":"2026-03-14T10:00:00Z","requestId":"r{i}","message":{{"id":"m{i}","model":"m","usage":{{"input_tokens":1,"output_tokens":2}}}}}}"#
                ) + "\n",
            )
            .unwrap();
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
        }
        Root(path)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A usage processor whose files each wait for a permit of its gate (or of
/// their own, for the files named in `by_name`).
pub struct Held {
    pub name: &'static str,
    pub gate: Arc<Semaphore>,
    /// Gates of single files, by file stem (`s1` for `alice/s1.jsonl`).
    pub by_name: HashMap<&'static str, Arc<Semaphore>>,
    /// One permit added per file that reached the gate.
    pub entered: Arc<Semaphore>,
    /// One permit added per file whose processing returned.
    pub left: Arc<Semaphore>,
}

impl Held {
    pub fn new(name: &'static str, permits: usize) -> Held {
        Held {
            name,
            gate: Arc::new(Semaphore::new(permits)),
            by_name: HashMap::new(),
            entered: Arc::new(Semaphore::new(0)),
            left: Arc::new(Semaphore::new(0)),
        }
    }
}

#[async_trait]
impl SessionProcessor for Held {
    fn name(&self) -> &'static str {
        self.name
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
        self.entered.add_permits(1);
        let stem = file.path.rsplit('/').next().unwrap_or_default();
        let stem = stem.trim_end_matches(".jsonl");
        let gate = self.by_name.get(stem).unwrap_or(&self.gate);
        gate.acquire().await.unwrap().forget();
        let entries = extract_usage(&content).entries;
        let items = entries.len() as i64;
        sink.replace_usage(file, entries).await?;
        self.left.add_permits(1);
        Ok(Processed {
            items,
            lines_skipped: 0,
        })
    }
}

/// A pipeline over `store` running `processors` (name, interval), two files
/// at once.
pub fn pipeline(
    store: Arc<MemoryPipelineStore>,
    root: &Root,
    processors: Vec<(Arc<dyn SessionProcessor>, Duration)>,
    shutdown: CancellationToken,
) -> Arc<Pipeline> {
    pipeline_with(store, root, processors, shutdown, 2)
}

/// A pipeline processing `parallelism` files at once.
pub fn pipeline_with(
    store: Arc<MemoryPipelineStore>,
    root: &Root,
    processors: Vec<(Arc<dyn SessionProcessor>, Duration)>,
    shutdown: CancellationToken,
    parallelism: usize,
) -> Arc<Pipeline> {
    pipeline_config(
        store,
        processors,
        shutdown,
        PipelineConfig {
            root: root.0.clone(),
            retry: RetryPolicy::default(),
            intervals: Default::default(),
            parallelism,
            run_retention: super::DEFAULT_RUN_RETENTION,
            clock: Clock::system(),
        },
    )
}

/// A pipeline with this configuration (a clock a test moves, a retention).
pub fn pipeline_config(
    store: Arc<MemoryPipelineStore>,
    processors: Vec<(Arc<dyn SessionProcessor>, Duration)>,
    shutdown: CancellationToken,
    config: PipelineConfig,
) -> Arc<Pipeline> {
    Pipeline::new(
        store,
        config,
        processors
            .into_iter()
            .map(|(processor, default_interval)| Registration {
                processor,
                default_interval,
            })
            .collect(),
        shutdown,
    )
}
