//! Runs each processor on its own cadence, in its own task: a slow processor
//! never delays another, and a processor still running is never relaunched
//! (its task awaits the run; a run started meanwhile by an RPC or another
//! server makes the tick's attempt `ProcessorRunning`: skipped, which is fine).
//! Any other error (a database conflict, an unreachable store) is reported.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use crate::domain::pipeline_runs::RunTrigger;
use crate::error::Error;

pub fn spawn(pipeline: Arc<Pipeline>, shutdown: CancellationToken) {
    for (name, _, interval) in pipeline.processors() {
        if interval.is_zero() {
            tracing::info!(processor = name, "not scheduled (interval 0)");
            continue;
        }
        let pipeline = pipeline.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            // Missed ticks (a run longer than the interval) are skipped, not burst.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                match pipeline.run(name, RunTrigger::scheduler()).await {
                    Ok(_) => {}
                    Err(Error::ProcessorRunning { location, .. }) => {
                        tracing::debug!(processor = name, location, "scheduled run skipped")
                    }
                    Err(error) => tracing::warn!(processor = name, %error, "scheduled run failed"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::spawn;
    use crate::runtime::pipeline::testing::{Held, Root, pipeline};
    use crate::storage::memory::MemoryPipelineStore;

    const INTERVAL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn runs_at_once_then_once_per_interval_and_never_an_unscheduled_one() {
        let root = Root::with_sessions(1);
        let store = Arc::new(MemoryPipelineStore::default());
        let shutdown = CancellationToken::new();
        let p = pipeline(
            store.clone(),
            &root,
            vec![
                (Arc::new(Held::new("ticking", 100)), INTERVAL),
                (Arc::new(Held::new("idle", 100)), Duration::ZERO),
            ],
            shutdown.clone(),
        );
        spawn(p, shutdown.clone());
        // t = 0, 10, 20, 30.
        tokio::time::sleep(Duration::from_secs(35)).await;
        shutdown.cancel();
        let runs = store.runs("ticking");
        assert_eq!(runs.len(), 4, "{runs:?}");
        assert_eq!(runs[0].processed, 1);
        assert!(runs[1..].iter().all(|r| r.processed == 0 && r.skipped == 1));
        assert!(
            store.runs("idle").is_empty(),
            "interval 0 is never scheduled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_that_find_the_processor_running_are_skipped_not_queued() {
        let root = Root::with_sessions(1);
        let store = Arc::new(MemoryPipelineStore::default());
        let shutdown = CancellationToken::new();
        let held = Arc::new(Held::new("held", 0));
        let (gate, entered) = (held.gate.clone(), held.entered.clone());
        let p = pipeline(
            store.clone(),
            &root,
            vec![(held, INTERVAL)],
            shutdown.clone(),
        );
        // A run started by hand (an RPC) holds the processor.
        let manual = tokio::spawn({
            let p = p.clone();
            async move {
                p.run("held", crate::domain::pipeline_runs::RunTrigger::call("op"))
                    .await
            }
        });
        entered.acquire().await.unwrap().forget();
        spawn(p.clone(), shutdown.clone());
        // Four ticks pass while it is held: each finds it running and does nothing.
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(store.runs("held").is_empty());
        gate.add_permits(100);
        let stats = manual.await.unwrap().unwrap();
        assert_eq!(stats.processed, 1);
        // No burst of the missed ticks: the next tick on the cadence runs once.
        tokio::time::sleep(Duration::from_secs(10)).await;
        shutdown.cancel();
        assert_eq!(store.runs("held").len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_error_is_reported_and_the_next_tick_tries_again() {
        let root = Root::with_sessions(2);
        let store = Arc::new(MemoryPipelineStore::default());
        store.fail_locks.store(1, Ordering::SeqCst);
        let shutdown = CancellationToken::new();
        let p = pipeline(
            store.clone(),
            &root,
            vec![(Arc::new(Held::new("flaky", 100)), INTERVAL)],
            shutdown.clone(),
        );
        spawn(p, shutdown.clone());
        tokio::time::sleep(Duration::from_secs(15)).await;
        shutdown.cancel();
        let runs = store.runs("flaky");
        assert_eq!(runs.len(), 1, "t = 0 failed to lock, t = 10 ran");
        assert_eq!(runs[0].processed, 2);
    }
}
