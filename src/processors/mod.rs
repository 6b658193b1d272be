//! Session processors: each reads one session file at a time and writes what it
//! extracts through a [`SessionSink`]; the pipeline commits that with the
//! file's state, in one transaction.
//!
//! Adding a processor: a new module here implementing [`SessionProcessor`], and
//! one line in [`registry`] (plus its default interval there).

mod errors;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::pipeline::SessionFile;
use crate::error::Error;
use crate::storage::SessionSink;

/// Why processing one session failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The session itself is bad: recorded on it, retried with backoff, then dead.
    #[error("{0}")]
    Session(String),
    /// The store failed: not the session's fault.
    #[error(transparent)]
    Store(#[from] Error),
}

#[async_trait]
pub trait SessionProcessor: Send + Sync + 'static {
    /// The name used in RPCs, flags and state.
    fn name(&self) -> &'static str;

    /// Bump it when the processor's output changes (a parser fix): every session
    /// is then reprocessed.
    fn version(&self) -> i32;

    /// Processes one whole file; returns what it extracted. Replaces
    /// whatever earlier processing of the same file wrote.
    async fn process(
        &self,
        file: &SessionFile,
        content: Arc<Vec<u8>>,
        sink: &mut dyn SessionSink,
    ) -> Result<Processed, ProcessError>;
}

/// What processing one file extracted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    /// Items written (usage entries, error events).
    pub items: i64,
    /// Lines that could not be read (NUL bytes, invalid UTF-8, bad JSON) or
    /// whose used fields were invalid: skipped, the rest of the file read.
    pub lines_skipped: i64,
}

/// A processor and its default schedule.
pub struct Registration {
    pub processor: Arc<dyn SessionProcessor>,
    pub default_interval: Duration,
}

/// Every built-in processor.
pub fn registry() -> Vec<Registration> {
    vec![
        Registration {
            processor: Arc::new(usage::UsageProcessor),
            default_interval: Duration::from_secs(5 * 60),
        },
        Registration {
            processor: Arc::new(errors::ErrorsProcessor),
            default_interval: Duration::from_secs(15 * 60),
        },
    ]
}

/// Runs CPU-bound parsing off the async threads.
pub(crate) async fn parse_off_thread<T: Send + 'static>(
    content: Arc<Vec<u8>>,
    parse: fn(&[u8]) -> T,
) -> Result<T, ProcessError> {
    tokio::task::spawn_blocking(move || parse(&content))
        .await
        .map_err(|e| ProcessError::Session(format!("parser crashed: {e}")))
}
