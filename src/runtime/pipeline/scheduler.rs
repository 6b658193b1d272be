//! Runs each processor on its own cadence, in its own task: a slow processor
//! never delays another, and a processor still running is never relaunched
//! (its task awaits the run; a run started meanwhile by an RPC or another
//! server makes the tick's attempt ABORTED, which is fine).

use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
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
                match pipeline.run(name).await {
                    Ok(_) => {}
                    Err(Error::Aborted(reason)) => {
                        tracing::debug!(processor = name, %reason, "scheduled run skipped")
                    }
                    Err(error) => tracing::warn!(processor = name, %error, "scheduled run failed"),
                }
            }
        });
    }
}
