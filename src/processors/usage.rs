//! `usage`: token usage per assistant message, counted the way ccusage counts it.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ProcessError, Processed, SessionProcessor, parse_off_thread};
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::extract_usage;
use crate::domain::usage;
use crate::storage::SessionSink;

pub struct UsageProcessor;

#[async_trait]
impl SessionProcessor for UsageProcessor {
    fn name(&self) -> &'static str {
        "usage"
    }

    /// 2: ccusage 20's rules (the most complete copy, sidechains, progress
    /// lines, offsets; no byte fails a file).
    fn version(&self) -> i32 {
        2
    }

    async fn process(
        &self,
        file: &SessionFile,
        content: Arc<Vec<u8>>,
        sink: &mut dyn SessionSink,
    ) -> Result<Processed, ProcessError> {
        let extract = parse_off_thread(content, extract_usage).await?;
        let lines_skipped = extract.counts.malformed as i64;
        if lines_skipped > 0 {
            tracing::debug!(session = %file.path, lines_skipped, "skipped unreadable lines");
        }
        // Messages, each once (its copies are one item).
        let items = usage::message_count(&extract.entries) as i64;
        sink.replace_usage(file, extract.entries).await?;
        Ok(Processed {
            items,
            lines_skipped,
        })
    }
}
