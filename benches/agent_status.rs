//! Agent-status throughput with thousands of agents, over real gRPC against a
//! real Postgres (a fresh database, dropped afterwards).
//!
//!     cargo bench --bench agent_status
//!     BENCH_AGENTS=10000 BENCH_HEARTBEATS=50000 cargo bench --bench agent_status
//!
//! Reports registrations/s, heartbeats/s with latency percentiles, transitions/s,
//! and how long a watcher takes to receive every transition.

use std::time::{Duration, Instant};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use futures::StreamExt;

mod common;

use common::{env_usize, helpers};

/// Runs `total` calls of `call(i)` with `concurrency` in flight; returns the
/// elapsed time and sorted per-call latencies.
async fn drive<F, Fut>(total: usize, concurrency: usize, call: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(0..total)
        .map(|i| {
            let fut = call(i);
            async move {
                let t = Instant::now();
                fut.await;
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    latencies.sort();
    (started.elapsed(), latencies)
}

fn report(what: &str, total: usize, (elapsed, latencies): &(Duration, Vec<Duration>)) {
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "{what:<28} {total:>7} in {:>7.2?}  {:>8.0}/s  p50 {:>8.2?}  p99 {:>8.2?}",
        elapsed,
        total as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    );
}

#[tokio::main]
async fn main() {
    let agents = env_usize("BENCH_AGENTS", 5000);
    let heartbeats = env_usize("BENCH_HEARTBEATS", 20000);
    let work_cycles = env_usize("BENCH_WORK_CYCLES", 2000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);

    // The integration tests' harness: a fresh database, dropped afterwards.
    let db = helpers::TestDb::new();
    let args = ServeArgs {
        database: DatabaseArgs {
            database_url: db.url.clone(),
            db_max_connections: 20,
            db_acquire_timeout: Duration::from_secs(5),
        },
        ..ServeArgs::default()
    };
    let app = helpers::TestApp::spawn_with(args).await;
    let client = app.agents.clone();

    println!(
        "fleetcare agent-status bench: {agents} agents, concurrency {concurrency}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let id = |i: usize| format!("bench-agent-{i:06}");

    let r = drive(agents, concurrency, |i| {
        let mut c = client.clone();
        async move {
            c.register_agent(pb::RegisterAgentRequest {
                agent_id: id(i),
                labels: Default::default(),
            })
            .await
            .unwrap();
        }
    })
    .await;
    report("RegisterAgent", agents, &r);

    let r = drive(heartbeats, concurrency, |i| {
        let mut c = client.clone();
        async move {
            c.heartbeat(pb::HeartbeatRequest {
                agent_id: id(i % agents),
            })
            .await
            .unwrap();
        }
    })
    .await;
    report("Heartbeat", heartbeats, &r);

    let r = drive(agents, concurrency, |i| {
        let mut c = client.clone();
        async move {
            c.get_agent(pb::GetAgentRequest { agent_id: id(i) })
                .await
                .unwrap();
        }
    })
    .await;
    report("GetAgent", agents, &r);

    // A watcher subscribed from the current head counts every transition.
    let head = client
        .clone()
        .list_transitions(pb::ListTransitionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .head_revision;
    let mut stream = client
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            since_revision: head,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected = 2 * work_cycles;
    let watcher = tokio::spawn(async move {
        let mut seen = 0;
        let mut last = head;
        while seen < expected {
            let msg = stream.message().await.unwrap().unwrap();
            if let Some(pb::watch_transitions_response::Event::Transition(t)) = msg.event {
                assert_eq!(t.revision, last + 1, "watch skipped or repeated a revision");
                last = t.revision;
                seen += 1;
            }
        }
        Instant::now()
    });
    let r = drive(work_cycles, concurrency.min(agents), |i| {
        let mut c = client.clone();
        async move {
            let agent_id = id(i % agents);
            // Distinct agents per in-flight call: index modulo agents never collides
            // while work_cycles <= agents.
            c.start_work(pb::StartWorkRequest {
                agent_id: agent_id.clone(),
                slot_type: 1,
            })
            .await
            .unwrap();
            c.finish_work(pb::FinishWorkRequest { agent_id })
                .await
                .unwrap();
        }
    })
    .await;
    let writes_done = Instant::now();
    report("StartWork+FinishWork pair", work_cycles, &r);
    println!(
        "{:<28} {expected:>7} transitions  {:>8.0}/s",
        "transitions committed",
        expected as f64 / r.0.as_secs_f64()
    );
    let watcher_done = watcher.await.unwrap();
    // The stream often delivers the last transition before the last writer
    // has its response back: say so rather than print a clamped zero.
    let lag = match watcher_done.checked_duration_since(writes_done) {
        Some(after) => format!("{after:?} after the last write returned"),
        None => format!(
            "{:?} before the last write returned",
            writes_done - watcher_done
        ),
    };
    println!(
        "{:<28} every transition in order, the last one {lag}",
        "watcher"
    );

    app.stop().await;
}
