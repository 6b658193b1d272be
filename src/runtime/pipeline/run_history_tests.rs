//! The run history as the runtime keeps it: every run recorded with what
//! started it, and old runs pruned after each recorded run by the pipeline's
//! clock, each processor's newest kept.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use tokio_util::sync::CancellationToken;

use super::PipelineConfig;
use super::testing::{Held, Root, pipeline_config};
use crate::domain::pipeline::RetryPolicy;
use crate::domain::pipeline_runs::{RunTrigger, StartedBy};
use crate::runtime::clock::Clock;
use crate::storage::memory::MemoryPipelineStore;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Waits (yielding, bounded) until the background prune has left `n` runs.
async fn runs_left(store: &MemoryPipelineStore, n: usize) -> Vec<(String, i64)> {
    for _ in 0..1000 {
        let runs = store.records();
        if runs.len() == n {
            return runs.into_iter().map(|r| (r.processor, r.id)).collect();
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "{} runs left, expected {n}: {:?}",
        store.records().len(),
        store.records()
    );
}

#[tokio::test]
async fn every_run_is_recorded_with_its_trigger_and_old_ones_are_pruned_by_the_clock() {
    let root = Root::with_sessions(2);
    let store = Arc::new(MemoryPipelineStore::default());
    let start = chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
    let (clock, hand) = Clock::manual(start);
    let p = pipeline_config(
        store.clone(),
        vec![
            (Arc::new(Held::new("usage", 100)), Duration::ZERO),
            (Arc::new(Held::new("errors", 100)), Duration::ZERO),
        ],
        CancellationToken::new(),
        PipelineConfig {
            root: root.0.clone(),
            retry: RetryPolicy::default(),
            intervals: Default::default(),
            parallelism: 2,
            run_retention: 7 * DAY,
            clock,
        },
    );
    p.run("usage", RunTrigger::scheduler()).await.unwrap();
    p.run("errors", RunTrigger::call("alice")).await.unwrap();
    hand.advance(chrono::Duration::days(1));
    p.run("usage", RunTrigger::call("bob")).await.unwrap();
    let runs = store.records();
    assert_eq!(runs.len(), 3, "every run is kept: {runs:?}");
    assert_eq!(runs[0].trigger.started_by, StartedBy::Scheduler);
    assert_eq!(runs[0].trigger.actor, "scheduler");
    assert_eq!(runs[1].trigger, RunTrigger::call("alice"));
    assert_eq!(runs[2].trigger, RunTrigger::call("bob"));
    assert_eq!(runs[0].started_at, start, "times are the pipeline's clock");
    assert_eq!(runs[2].started_at, start + chrono::Duration::days(1));
    assert_eq!((runs[0].stats.processed, runs[2].stats.processed), (2, 0));

    // Seven days and a second after the first runs: the first usage run is
    // past the retention and goes; errors' only run is as old but is its
    // processor's newest, so it stays; bob's run is within the retention.
    hand.advance(chrono::Duration::days(6) + chrono::Duration::seconds(1));
    p.run("usage", RunTrigger::scheduler()).await.unwrap();
    let left = runs_left(&store, 3).await;
    let ids: Vec<i64> = left.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [2, 3, 4], "{left:?}");

    // Much later: only each processor's newest is left.
    hand.advance(chrono::Duration::days(30));
    p.run("usage", RunTrigger::scheduler()).await.unwrap();
    let left = runs_left(&store, 2).await;
    assert_eq!(left, [("errors".to_string(), 2), ("usage".to_string(), 5)]);
}
