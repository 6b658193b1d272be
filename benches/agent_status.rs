//! The agent write path against baselines measured in the same run, over real
//! gRPC against a real Postgres (a fresh database, dropped afterwards). The
//! machines are shared and noisy, so every figure is a ratio against a baseline
//! taken minutes apart at most, on the same server, client and concurrency:
//!
//! - heartbeats/s against `grpc.health.v1.Health/Check`/s (64 in flight; 16
//!   agents, then 5,000);
//! - the same from outside: the `fleetcare` binary in its own process with its
//!   default logging, h2load as the client (one process per agent, 16 x 4 in
//!   flight), heartbeats against health checks alternated on that server;
//! - durable transitions/s against single-statement autocommit UPDATEs on 64
//!   connections, against `pgbench -N`'s transaction (the figure the issue
//!   measured) and against the health check (the gRPC ceiling), each with the
//!   CPU it took per call (this process and Postgres, from /proc) and what all
//!   cores would sustain at that cost; and at 1 in flight against the previous design's
//!   transaction (lock the agent, take the revision row, insert, update,
//!   commit) run straight on the database, with the store alone beside it;
//! - 1,000 watchers while 1,000 transitions/s are committed: every watcher gets
//!   every transition once and in order, delivery latency, server memory (the
//!   watchers run in a child process, this binary with `BENCH_ROLE=watchers`,
//!   so that decoding their streams does not share the server's process);
//! - 100,000 registered agents with 20,000 heartbeating every 5 s: CPU used,
//!   the sweeper's candidate query, memory.
//!
//! Run:
//!
//!     cargo bench --bench agent_status
//!     BENCH_SECTIONS=ratios cargo bench --bench agent_status   # ratios only
//!     BENCH_SECTIONS=outside cargo bench --bench agent_status  # from outside only (h2load)
//!     FLEETCARE_TEST_BACKEND=sqlite cargo bench --bench agent_status   # on the embedded store
//!
//! On the embedded store the baselines are the same single-statement
//! autocommit UPDATEs on an SQLite file with the server's settings (WAL,
//! synchronous=FULL) at the same concurrency, and through one connection; the
//! previous design's transaction is a Postgres baseline only.
//!
//! Knobs (env): BENCH_CALLS, BENCH_CONCURRENCY, BENCH_WATCHERS, BENCH_WATCH_RATE,
//! BENCH_WATCH_SECS, BENCH_FLEET, BENCH_HEARTBEATING, BENCH_SCALE_SECS,
//! BENCH_OUTSIDE_AGENTS, BENCH_OUTSIDE_STREAMS, BENCH_OUTSIDE_CALLS, BENCH_OUTSIDE_BIN.

use std::time::{Duration, Instant};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

mod common;

use common::measure::{CpuMeter, drive, pct, rate, report, rss_mib, set_quiet};
use common::{baselines, cpu_time, env_usize, helpers, outside};
use std::path::Path;

fn id(i: usize) -> String {
    format!("bench-agent-{i:06}")
}

struct Bench {
    app: helpers::TestApp,
    db: helpers::TestDb,
    concurrency: usize,
    calls: usize,
}

impl Bench {
    fn agents(
        &self,
    ) -> pb::agent_status_service_client::AgentStatusServiceClient<tonic::transport::Channel> {
        self.app.agents.clone()
    }

    async fn register(&self, from: usize, to: usize) -> f64 {
        let r = drive(to - from, self.concurrency, |i| {
            let mut c = self.agents();
            async move {
                c.register_agent(pb::RegisterAgentRequest {
                    agent_id: id(from + i),
                    labels: [("team".to_string(), "bench".to_string())].into(),
                    quota_pools: Vec::new(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        report(
            &format!("RegisterAgent ({} agents)", to - from),
            to - from,
            &r,
        )
    }

    async fn health(&self) -> f64 {
        let r = baselines::health_checks(&self.app.channel, self.calls, self.concurrency).await;
        report("grpc.health.v1.Health/Check", self.calls, &r)
    }

    async fn heartbeats(&self, agents: usize) -> f64 {
        let r = drive(self.calls, self.concurrency, |i| {
            let mut c = self.agents();
            async move {
                c.heartbeat(pb::HeartbeatRequest {
                    agent_id: id(i % agents),
                })
                .await
                .unwrap();
            }
        })
        .await;
        report(&format!("Heartbeat ({agents} agents)"), self.calls, &r)
    }

    /// StartWork + FinishWork pairs, each in-flight caller on its own agent.
    async fn transitions(&self, pairs: usize, concurrency: usize, offset: usize) -> f64 {
        baselines::transitions(&self.agents(), id, pairs, concurrency, offset).await
    }

    /// See `baselines::updates`.
    async fn baseline_updates(&self, total: usize, connections: usize) -> f64 {
        baselines::updates(&self.db, total, connections).await
    }

    /// See `baselines::pgbench_n`.
    async fn baseline_pgbench_n(&self, total: usize, connections: usize) -> f64 {
        baselines::pgbench_n(&self.db, total, connections).await
    }

    /// Lone transitions straight on the server's store, as the committer makes
    /// them (decided on the agent as last committed), without gRPC or the
    /// committer's queue: what the store itself costs per transition.
    async fn store_transitions(&self, total: usize, agent_id: &str) -> f64 {
        use fleetcare::domain::agent::{Event, SlotType};
        use fleetcare::domain::batch::Command;
        let store = self.app.stores.agents.clone();
        let mut agent = store.get_agent(agent_id).await.unwrap();
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(total);
        for i in 0..total {
            let event = if i % 2 == 0 {
                Event::StartWork(SlotType::Work)
            } else {
                Event::FinishWork
            };
            let command = Command::Apply {
                agent_id: agent_id.to_owned(),
                event,
                fencing_token: None,
                actor: "bench".into(),
            };
            let t = Instant::now();
            let mut outcomes = store
                .commit_batch_known(&[command], Some(vec![agent.clone()]), chrono::Utc::now())
                .await
                .unwrap();
            latencies.push(t.elapsed());
            agent = outcomes.pop().unwrap().unwrap().agent;
        }
        latencies.sort();
        report(
            "lone transition on the store, 1 in flight",
            total,
            &(started.elapsed(), latencies),
        )
    }

    /// The previous design's transaction for one transition, on one connection:
    /// BEGIN, lock the agent, read the clock, NOTIFY, take the revision row and
    /// insert the transition, update the agent, COMMIT.
    async fn baseline_old_transaction(&self, total: usize, agent_id: &str) -> f64 {
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&self.db.url).await.unwrap();
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(total);
        for i in 0..total {
            let t = Instant::now();
            let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
            let status: String =
                sqlx::query_scalar("SELECT status FROM agents WHERE agent_id = $1 FOR UPDATE")
                    .bind(agent_id)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            let _now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            sqlx::query("SELECT pg_notify('fleetcare_transitions', '')")
                .execute(&mut *tx)
                .await
                .unwrap();
            let to = if i % 2 == 0 { "BUSY" } else { "IDLE" };
            let revision: i64 = sqlx::query_scalar(
                "WITH next AS (UPDATE revision_head SET head_revision = head_revision + 1
                               WHERE singleton RETURNING head_revision)
                 INSERT INTO transitions (revision, agent_id, from_status, to_status, cause, occurred_at)
                 SELECT head_revision, $1, $2, $3, 'WORK_STARTED', now() FROM next
                 RETURNING revision",
            )
            .bind(agent_id)
            .bind(&status)
            .bind(to)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            sqlx::query("UPDATE agents SET status = $2, revision = $3 WHERE agent_id = $1")
                .bind(agent_id)
                .bind(to)
                .bind(revision)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            latencies.push(t.elapsed());
        }
        latencies.sort();
        report(
            "baseline: previous design's transaction, 1 conn",
            total,
            &(started.elapsed(), latencies),
        )
    }
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("watchers") {
        watchers_role().await;
        return;
    }
    let calls = env_usize("BENCH_CALLS", 40_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let sections = std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "all".into());
    let all = sections == "all";

    let db = helpers::TestDb::new();
    let args = ServeArgs {
        http_listen: fleetcare::config::HttpListen::off(),
        database: DatabaseArgs {
            database_url: Some(db.url.clone()),
            data_dir: Default::default(),
            db_max_connections: 20,
            db_acquire_timeout: Duration::from_secs(5),
        },
        // Registering the large fleet takes minutes here: a timeout longer than
        // the whole bench keeps the agents not yet heartbeating online, so the
        // scale section measures the steady state, not a wave of sweeps.
        heartbeat_timeout: Duration::from_secs(3600),
        ..ServeArgs::default()
    };
    // The watch section's watchers all come from this host, and each open
    // stream is a call in progress.
    let mut args = args;
    let watchers = env_usize("BENCH_WATCHERS", 1000);
    args.limits.max_watches_per_caller = args.limits.max_watches_per_caller.max(watchers + 8);
    args.limits.max_concurrent_calls += watchers;
    let app = helpers::TestApp::spawn_with(args).await;
    let bench = Bench {
        app,
        db,
        concurrency,
        calls,
    };
    println!(
        "fleetcare agent-status bench: {calls} calls per run, {concurrency} in flight, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if sections == "outside" {
        outside(&bench.db).await;
        bench.app.stop().await;
        return;
    }

    println!("\nheartbeats against the health check (same server, client, concurrency)");
    bench.register(0, 5000).await;
    let mut ratios = Vec::new();
    for agents in [16, 5000] {
        let health = bench.health().await;
        let beats = bench.heartbeats(agents).await;
        let health_after = bench.health().await;
        let ratio = beats / health.max(health_after);
        println!("  => heartbeats / health checks, {agents} agents: {ratio:.2} (target >= 0.8)");
        ratios.push(ratio);
    }

    outside(&bench.db).await;

    println!("\ndurable transitions against single-statement autocommit transactions");
    let pairs = calls / 4;
    let baseline = bench.baseline_updates(calls / 2, concurrency).await;
    let cpu = CpuMeter::start();
    let transitions = bench.transitions(pairs, concurrency, 0).await;
    let transitions_ceiling = cpu.report("transition", 2 * pairs);
    let baseline_after = bench.baseline_updates(calls / 2, concurrency).await;
    let baseline = baseline.max(baseline_after);
    println!(
        "  => transitions / 1-row autocommit UPDATEs at {concurrency}: {:.2} (target >= 3)",
        transitions / baseline
    );
    if !helpers::sqlite_backend() {
        let pgbench = bench.baseline_pgbench_n(calls / 4, concurrency).await;
        println!(
            "  => transitions / pgbench -N transactions at {concurrency}: {:.2} (the issue's own reference figure, 4,100 TPS where it was measured)",
            transitions / pgbench
        );
    }
    // The gRPC ceiling here: the cheapest call on the same server and client.
    let cpu = CpuMeter::start();
    let ceiling = bench.health().await;
    let health_ceiling = cpu.report("health check", calls);
    println!(
        "  => transitions / health checks at {concurrency} (each transition is one call): {:.2}",
        transitions / ceiling
    );
    // What the cores allow, whatever the scheduling: no design doing a
    // transition's work of today can go past cores / its CPU per call, and
    // reaching 3x needs every core busy at no more than the budget below.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "  => CPU-bound ceiling of today's transitions / 1-row autocommit UPDATEs: {:.2}; 3x would take every core busy at {:.0} µs of CPU per transition (today {:.0} µs; a health check alone {:.0} µs)",
        transitions_ceiling / baseline,
        cores / (3.0 * baseline) * 1e6,
        cores / transitions_ceiling * 1e6,
        cores / health_ceiling * 1e6,
    );
    if helpers::sqlite_backend() {
        // SQLite has one writer: the same UPDATEs through one connection, the
        // callers queued on it, is the other fair baseline.
        let serial = bench.baseline_updates(calls / 2, 1).await;
        println!(
            "  => transitions / SQLite 1-row autocommit UPDATEs through one connection: {:.2}",
            transitions / serial
        );
    }
    let single = (calls / 40).max(200);
    {
        let health = HealthClient::new(bench.app.channel.clone());
        let r = drive(single, 1, |_| {
            let mut h = health.clone();
            async move {
                h.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        report("lone call: health check, 1 in flight", single, &r);
        let r = drive(single, 1, |_| {
            let mut c = bench.agents();
            async move {
                c.get_agent(pb::GetAgentRequest { agent_id: id(1) })
                    .await
                    .unwrap();
            }
        })
        .await;
        report("lone call: GetAgent, 1 in flight", single, &r);
    }
    if helpers::sqlite_backend() {
        let lone = bench.baseline_updates(single, 1).await;
        let one = bench.transitions(single / 2, 1, 0).await;
        println!(
            "  => transitions at 1 in flight (with gRPC) / SQLite 1-row autocommit UPDATEs at 1: {:.2}",
            one / lone
        );
    } else {
        // Lone commits wait for the disk, whose latency here moves with the
        // other builds' writes: the three are measured in alternating slices
        // and each figure is the total over its slices.
        let slices = 10;
        let (mut old, mut one, mut store) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let n = (single / slices).max(2) & !1;
        let took = |count: usize, per_sec: f64| Duration::from_secs_f64(count as f64 / per_sec);
        set_quiet(true);
        for _ in 0..slices {
            old += took(n, bench.baseline_old_transaction(n, &id(4999)).await);
            one += took(n, bench.transitions(n / 2, 1, 0).await);
            store += took(n, bench.store_transitions(n, &id(4998)).await);
        }
        set_quiet(false);
        let total = n * slices;
        let old = rate(total, old);
        let one = rate(total, one);
        let store = rate(total, store);
        println!(
            "  over {slices} alternating slices of {n}: previous design's transaction {old:.0}/s, transitions with gRPC {one:.0}/s, on the store alone {store:.0}/s"
        );
        println!(
            "  => transitions at 1 in flight (with gRPC) / previous design's transaction (without): {:.2} (target >= 1)",
            one / old
        );
        println!(
            "  => the same straight on the store (no gRPC, no committer) / previous design's transaction: {:.2}",
            store / old
        );
    }

    if all || sections.contains("watch") {
        watch_fanout(&bench).await;
    }
    if all || sections.contains("scale") {
        scale(&bench).await;
    }
    bench.app.stop().await;
}

/// Heartbeats against the health check measured from outside: the server
/// binary in its own process with its default logging, h2load as the client
/// (16 processes, one per agent, each 4 calls in flight: 64 in all), the two
/// alternated three times each on the same server; the ratio is the total
/// over the runs. See `common::outside`.
async fn outside(db: &helpers::TestDb) {
    println!("\nheartbeats against the health check, from outside (the fleetcare binary, h2load)");
    if !outside::h2load_available() {
        println!("  SKIPPED: h2load not found (Debian: apt-get install nghttp2-client)");
        return;
    }
    let processes = env_usize("BENCH_OUTSIDE_AGENTS", 16);
    let shape = outside::Shape {
        processes,
        streams: env_usize("BENCH_OUTSIDE_STREAMS", 4),
        calls: env_usize("BENCH_OUTSIDE_CALLS", 2500),
    };
    let store_args: Vec<String> = match &db.dir {
        // The in-process server holds the embedded store's file: a store of
        // its own (the default data directory, in the bench's directory).
        Some(_) => Vec::new(),
        None => vec!["--database-url".into(), db.url.clone()],
    };
    // BENCH_OUTSIDE_BIN: another build of the server (an earlier commit's,
    // to set before against after on the same machine in the same minute).
    let binary = std::env::var("BENCH_OUTSIDE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fleetcare").to_owned());
    println!("  server: {binary}");
    let server = outside::Server::start(Path::new(&binary), &store_args).await;
    let mut agents = pb::agent_status_service_client::AgentStatusServiceClient::new(
        server.endpoint().connect().await.expect("connects"),
    );
    let ids: Vec<String> = (0..processes)
        .map(|i| format!("outside-agent-{i:02}"))
        .collect();
    for id in &ids {
        agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                labels: [("team".to_string(), "bench".to_string())].into(),
                quota_pools: Vec::new(),
            })
            .await
            .expect("registers");
    }
    let (beats, health) = outside::bodies(&server, &ids);
    // Connections warmed and the agent cache filled before the first figure.
    server.h2load("/grpc.health.v1.Health/Check", &health[..1], shape);
    server.h2load("/fleetcare.v1.AgentStatusService/Heartbeat", &beats, shape);
    let (mut health_total, mut beats_total) = (Duration::ZERO, Duration::ZERO);
    let (mut health_cpu, mut beats_cpu) = (Duration::ZERO, Duration::ZERO);
    let mut calls = 0;
    for _ in 0..3 {
        let h = server.h2load("/grpc.health.v1.Health/Check", &health, shape);
        println!("{}", h.describe("grpc.health.v1.Health/Check (h2load)"));
        let b = server.h2load("/fleetcare.v1.AgentStatusService/Heartbeat", &beats, shape);
        println!(
            "{}",
            b.describe(&format!("Heartbeat ({processes} agents, h2load)"))
        );
        health_total += h.elapsed;
        beats_total += b.elapsed;
        health_cpu += h.server_cpu;
        beats_cpu += b.server_cpu;
        calls += b.calls;
    }
    println!(
        "  => heartbeats / health checks from outside, {processes} x {} in flight: {:.2} (target >= 0.8); server CPU per call {:.1} µs / {:.1} µs",
        shape.streams,
        health_total.as_secs_f64() / beats_total.as_secs_f64(),
        beats_cpu.as_secs_f64() / calls as f64 * 1e6,
        health_cpu.as_secs_f64() / calls as f64 * 1e6,
    );
}

/// 1,000 watchers while transitions are committed at a fixed rate. The
/// watchers run in a child process (this binary again, `BENCH_ROLE=watchers`),
/// so that decoding 10 million messages does not share this process with the
/// server: the figures are the server's.
async fn watch_fanout(bench: &Bench) {
    let watchers = env_usize("BENCH_WATCHERS", 1000);
    let per_sec = env_usize("BENCH_WATCH_RATE", 1000);
    let secs = env_usize("BENCH_WATCH_SECS", 10);
    println!(
        "\nwatch fan-out: {watchers} watchers (in a child process), {per_sec} transitions/s for {secs} s"
    );
    let head = bench
        .agents()
        .list_transitions(pb::ListTransitionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .head_revision;
    let expected = per_sec * secs;
    let rss_before = rss_mib();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_ROLE", "watchers")
        .env("BENCH_WATCH_ADDR", bench.app.addr.to_string())
        .env("BENCH_WATCH_SINCE", head.to_string())
        .env("BENCH_WATCH_EXPECTED", expected.to_string())
        .env("BENCH_WATCHERS", watchers.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the watchers' process starts");
    // The child's stdout, line by line: "ready" once every stream is open, then
    // one JSON line with what the watchers saw.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = lines.recv().await;
    assert_eq!(
        ready.as_deref(),
        Some("ready"),
        "the watchers did not start"
    );
    let rss_open = rss_mib();

    // The writer: per_sec transitions a second, paced every 10 ms.
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (per_sec / 100).max(2) / 2; // pairs
    let mut sent = 0;
    let mut tick = 0usize;
    let mut writes = Vec::new();
    while sent < expected {
        ticks.tick().await;
        let n = per_tick.min((expected - sent) / 2).max(1);
        let calls = (0..n).map(|k| {
            let mut c = bench.agents();
            let agent_id = id(100 + (tick * n + k) % 4000);
            async move {
                c.start_work(pb::StartWorkRequest {
                    agent_id: agent_id.clone(),
                    slot_type: pb::SlotType::Work as i32,
                })
                .await
                .unwrap();
                c.finish_work(pb::FinishWorkRequest {
                    agent_id,
                    fencing_token: 0,
                })
                .await
                .unwrap();
            }
        });
        writes.push(tokio::spawn(futures::future::join_all(
            calls.collect::<Vec<_>>(),
        )));
        sent += 2 * n;
        tick += 1;
    }
    for w in writes {
        w.await.unwrap();
    }
    let written = started.elapsed();
    let rss_streaming = rss_mib();
    let result = lines.recv().await.expect("the watchers' result line");
    let delivered = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    let status = child.wait().unwrap();
    let r: serde_json::Value = serde_json::from_str(&result).unwrap();
    let ms = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  {expected} transitions written in {written:.2?}; {} of {watchers} watchers had every one, once, in order ({}), after {delivered:.2?}",
        r["complete"],
        r["verdict"].as_str().unwrap_or("?"),
    );
    println!(
        "  delivery latency (transition time to arrival in the watchers' process, every 10th sampled): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms (target p99 < 100 ms)",
        ms("p50_ms"),
        ms("p99_ms"),
        ms("max_ms"),
    );
    println!(
        "  server memory (this process: server and writer, no watchers): {rss_before:.0} MiB before, {rss_open:.0} MiB with the streams open, {rss_streaming:.0} MiB after streaming, {:.0} MiB after they closed; watchers' process peak {:.0} MiB",
        rss_mib(),
        ms("peak_rss_mib"),
    );
    println!(
        "  CPU while streaming ({delivered:.2?} of 2 cores): this process (server, writer) {:.2} s, the watchers' process {:.2} s",
        cpu.as_secs_f64(),
        ms("cpu_s"),
    );
    assert!(status.success(), "the watchers' process failed: {status}");
    assert_eq!(
        r["verdict"].as_str(),
        Some("ok"),
        "a watcher skipped, repeated or missed a revision"
    );
}

/// `BENCH_ROLE=watchers`: opens `BENCH_WATCHERS` streams to `BENCH_WATCH_ADDR`
/// from `BENCH_WATCH_SINCE`, prints "ready", waits for `BENCH_WATCH_EXPECTED`
/// transitions on each, checks that each watcher got every revision once and
/// in order, and prints one JSON line: how many watchers were complete, the
/// verdict, delivery latency percentiles (arrival here minus the transition's
/// time, every 10th transition of every watcher) and this process's peak RSS.
async fn watchers_role() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set"));
    let addr = var("BENCH_WATCH_ADDR");
    let since: i64 = var("BENCH_WATCH_SINCE").parse().unwrap();
    let expected = env_usize("BENCH_WATCH_EXPECTED", 0);
    let watchers = env_usize("BENCH_WATCHERS", 1000);
    // Watchers spread over a few connections, as dashboards on several hosts would be.
    let channels: Vec<_> = (0..8)
        .map(|_| {
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy()
        })
        .collect();
    let mut streams = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let mut client = pb::agent_status_service_client::AgentStatusServiceClient::new(
            channels[w % channels.len()].clone(),
        );
        let stream = client
            .watch_transitions(pb::WatchTransitionsRequest {
                since_revision: since,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready").unwrap();
        out.flush().unwrap();
    }
    let cpu_before = cpu_time();
    // Generous: the writer paces itself, a stuck watcher must not hang the bench.
    let deadline = Duration::from_secs(60 + 3 * (expected as u64 / 100).max(1));
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut last = since;
                let mut seen = 0;
                let mut in_order = true;
                let mut lags = Vec::with_capacity(expected / 10 + 1);
                let receiving = async {
                    while seen < expected {
                        let Ok(Some(msg)) = stream.message().await else {
                            break;
                        };
                        if let Some(pb::watch_transitions_response::Event::Transition(t)) =
                            msg.event
                        {
                            in_order &= t.revision == last + 1;
                            last = t.revision;
                            seen += 1;
                            if seen % 10 == 0
                                && let Some(at) = t.occurred_at
                            {
                                let at =
                                    chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32)
                                        .unwrap();
                                let lag = chrono::Utc::now() - at;
                                lags.push(lag.to_std().unwrap_or_default());
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(deadline, receiving).await;
                (seen == expected && in_order, in_order, lags)
            })
        })
        .collect();
    let mut complete = 0;
    let mut ordered = true;
    let mut lat = Vec::new();
    for task in tasks {
        let (done, in_order, lags) = task.await.unwrap();
        complete += usize::from(done);
        ordered &= in_order;
        lat.extend(lags);
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let verdict = if !ordered {
        "out of order"
    } else if complete < watchers {
        "incomplete"
    } else {
        "ok"
    };
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0);
    let result = serde_json::json!({
        "watchers": watchers,
        "complete": complete,
        "verdict": verdict,
        "samples": lat.len(),
        "p50_ms": lat.get(lat.len() / 2).map(|d| ms(*d)),
        "p99_ms": (!lat.is_empty()).then(|| ms(pct(&lat, 0.99))),
        "max_ms": lat.last().map(|d| ms(*d)),
        "peak_rss_mib": peak,
        "cpu_s": (cpu_time() - cpu_before).as_secs_f64(),
    });
    println!("{result}");
}

/// A large fleet: registered agents, a share of them heartbeating on a cadence.
async fn scale(bench: &Bench) {
    let fleet = env_usize("BENCH_FLEET", 100_000);
    let heartbeating = env_usize("BENCH_HEARTBEATING", 20_000);
    let secs = env_usize("BENCH_SCALE_SECS", 20);
    let period = Duration::from_secs(5);
    println!(
        "\nscale: {fleet} registered agents, {heartbeating} heartbeating every {period:?} for {secs} s"
    );
    let rss_before = rss_mib();
    bench.register(5000, fleet.max(5000)).await;
    println!(
        "  memory after registering: {rss_before:.0} MiB -> {:.0} MiB",
        rss_mib()
    );

    // Every agent heartbeats once per period, spread evenly: one slice every 10 ms.
    let slices = (period.as_millis() / 10) as usize;
    let per_slice = heartbeating.div_ceil(slices);
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let mut tick = 0usize;
    let mut late = 0usize;
    let mut handles = Vec::new();
    while started.elapsed() < Duration::from_secs(secs as u64) {
        ticks.tick().await;
        let first = (tick % slices) * per_slice;
        let calls: Vec<_> = (first..(first + per_slice).min(heartbeating))
            .map(|i| {
                let mut c = bench.agents();
                async move {
                    let t = Instant::now();
                    c.heartbeat(pb::HeartbeatRequest { agent_id: id(i) })
                        .await
                        .unwrap();
                    t.elapsed()
                }
            })
            .collect();
        handles.push(tokio::spawn(futures::future::join_all(calls)));
        tick += 1;
    }
    let mut latencies = Vec::new();
    for h in handles {
        for l in h.await.unwrap() {
            if l > period {
                late += 1;
            }
            latencies.push(l);
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    latencies.sort();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "  {} heartbeats in {elapsed:.2?} ({:.0}/s), p50 {:.2?}, p99 {:.2?}, {late} slower than the period",
        latencies.len(),
        rate(latencies.len(), elapsed),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99)
    );
    println!(
        "  CPU used by server and client together: {:.0} % of {cores} cores",
        100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64() / cores as f64
    );

    // What one sweeper tick costs with this fleet: the candidate query (agents
    // registered longer ago than the timeout and not heartbeating are due).
    let store = bench.app.stores.agents.clone();
    let silence = fleetcare::domain::liveness::silence_timeout(
        chrono::Duration::seconds(120),
        chrono::Duration::seconds(1),
    );
    let mut costs = Vec::new();
    let mut due = 0;
    for _ in 0..20 {
        let query = fleetcare::domain::liveness::sweep_query(chrono::Utc::now(), silence, true);
        let t = Instant::now();
        let found = store.sweep_candidates(&query, 1000).await.unwrap();
        costs.push(t.elapsed());
        due = found.len();
    }
    costs.sort();
    println!(
        "  sweeper tick (candidate query over {fleet} agents, {due} due): p50 {:.2?}, max {:.2?}",
        pct(&costs, 0.5),
        costs.last().copied().unwrap_or_default()
    );
    println!("  memory at the end: {:.0} MiB", rss_mib());
}
