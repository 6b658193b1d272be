//! Health: SERVING while the store answers, NOT_SERVING while it does not, and
//! NOT_SERVING for good once shutdown starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::proto::v1 as pb;
use crate::storage::AgentStore;

/// Whether the store answers, as the probe last saw it: consulted before each
/// call (`grpc::guard`) so that calls fail at once while it is down. Starts
/// down: the store is not open until `startup` says so.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth(Arc<AtomicBool>);

impl StoreHealth {
    pub fn set_up(&self, up: bool) {
        self.0.store(up, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The names health is reported under: "" for the whole server, then each
/// service, as the generated servers name themselves.
pub fn service_names() -> Vec<&'static str> {
    vec![
        "",
        pb::agent_status_service_server::SERVICE_NAME,
        pb::healing_service_server::SERVICE_NAME,
        pb::post_healing_service_server::SERVICE_NAME,
        pb::session_pipeline_service_server::SERVICE_NAME,
        pb::dispatch_service_server::SERVICE_NAME,
        pb::quota_service_server::SERVICE_NAME,
    ]
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in service_names() {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes the store every `interval` and reports what it finds, to the health
/// service and to `store_health`.
pub fn spawn_monitor(
    store: Arc<dyn AgentStore>,
    reporter: HealthReporter,
    store_health: StoreHealth,
    interval: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut last: Option<ServingStatus> = None;
        let mut slow_probes = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let probe = tokio::time::timeout(interval.max(Duration::from_secs(1)), store.ping());
            let status = match probe.await {
                Ok(Ok(())) => {
                    slow_probes = 0;
                    ServingStatus::Serving
                }
                Ok(Err(error)) => {
                    if last != Some(ServingStatus::NotServing) {
                        tracing::warn!(%error, "store unreachable, health NOT_SERVING");
                    }
                    ServingStatus::NotServing
                }
                // One slow probe on a busy machine is not an outage; two in a
                // row (a database that stopped answering) are.
                Err(_) => {
                    slow_probes += 1;
                    if slow_probes < 2 && last == Some(ServingStatus::Serving) {
                        continue;
                    }
                    if last != Some(ServingStatus::NotServing) {
                        tracing::warn!("store probe timed out twice, health NOT_SERVING");
                    }
                    ServingStatus::NotServing
                }
            };
            // Calls fail fast from the first failed probe to the first good one.
            store_health.set_up(status == ServingStatus::Serving);
            // Shutdown owns the status from here on (see startup).
            if shutdown.is_cancelled() {
                break;
            }
            if last != Some(status) {
                if status == ServingStatus::Serving && last.is_some() {
                    tracing::info!("store reachable again, health SERVING");
                }
                set_all(&reporter, status).await;
                last = Some(status);
            }
        }
    });
}
