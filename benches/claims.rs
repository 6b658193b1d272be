//! Claims (`DispatchService.ClaimAgent`, issue 22) against baselines measured
//! in the same run, over real gRPC against a real store (Postgres by default, a
//! fresh database per section; the embedded store with
//! FLEETCARE_TEST_BACKEND=sqlite). The machines are shared and noisy, so every
//! figure is set beside one taken minutes apart at most, on the same server,
//! client and concurrency:
//!
//! - `ratios`: 64 claimers in flight, each looping ClaimAgent then ReleaseClaim
//!   (so agents cycle) over 256 agents, against durable transitions
//!   (StartWork/FinishWork pairs, 64 in flight) on the same server, measured
//!   before and after in each round. A ClaimAgent and a ReleaseClaim are one
//!   durable transition each: "claim transitions/s" counts both and is what is
//!   set against transitions/s (the target: at least 0.8); "claims/s" (the
//!   ClaimAgents alone) is printed beside it. Two selectors: one label every
//!   agent of the pool carries (one distinct selector per batch), and one label
//!   in four values (up to four per batch; each its own SKIP LOCKED read when
//!   the batch reads its candidates from the table rather than taking them
//!   from the server's memory of the claimable agents); and the first again
//!   with the claim ended by FinishWork(agent, fencing token), as the claimed
//!   agent ends it, instead of ReleaseClaim. Every run starts from the same
//!   table: `VACUUM (ANALYZE) agents` before each (see `Server::vacuum`). Then
//!   single-statement autocommit UPDATEs, `pgbench -N`'s transaction and the
//!   health check at the same concurrency, each with its CPU per call, and the
//!   index reads on `agents` the section made.
//! - `scale`: 100,000 registered agents labelled on two keys (`zone` and
//!   `model`, ten values each), all but 1,000 of them BUSY; ClaimAgent with a
//!   selector on both labels paced at 500/s (open loop: one claim every 2 ms
//!   whatever the completions), each released as soon as it is made, for 20 s
//!   after 2 s at the same rate reported apart (the warm-up), the bulk
//!   steps' dirty pages checkpointed and synced first: claim latency
//!   p50/p99/max, when the claims over 25 ms were sent (a stall shows as a
//!   run of them) and NO_AGENT_AVAILABLE refusals, beside the
//!   health check's p99 probed on the same server at the same time, and the
//!   index reads on `agents` during the load (which index the server's own
//!   cached plan used, and how many entries per claim). Then the
//!   plan of the selection query the server runs (its text captured from
//!   pg_stat_activity while the load ran, checked against the bench's copy of
//!   `PgClaimReads::claimable`), `EXPLAIN (ANALYZE, BUFFERS)` with the batch
//!   connections' settings (generic plan, no sequential scan) and with the
//!   defaults, in transactions rolled back; the bench fails if the plan scans
//!   `agents` sequentially or examines more than a tenth of the fleet.
//!
//! Run:
//!
//!     cargo bench --bench claims
//!     BENCH_SECTIONS=ratios cargo bench --bench claims
//!     FLEETCARE_TEST_BACKEND=sqlite cargo bench --bench claims
//!
//! Knobs (env): BENCH_SECTIONS (ratios, scale), BENCH_CALLS (durable
//! transitions per measured run), BENCH_CONCURRENCY, BENCH_ROUNDS,
//! BENCH_CLAIM_AGENTS, BENCH_FLEET, BENCH_IDLE, BENCH_CLAIM_RATE,
//! BENCH_SCALE_SECS, BENCH_WARMUP_SECS, BENCH_CHECKPOINT (0: no
//! checkpoint before the load), BENCH_VACUUM (0: never vacuum, to see the plans a
//! server makes on a table without statistics).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

mod common;

use common::measure::{CpuMeter, CpuPerCall, drive, pct, rate, report, set_quiet};
use common::{baselines, env_usize, helpers};

type Dispatch = DispatchServiceClient<Channel>;

/// The columns the server reads an agent with (`AGENT_COLUMNS` in
/// src/storage/agents.rs).
const AGENT_COLUMNS: &str = "agent_id, status, labels, registered_at, \
     last_heartbeat_at, last_transition_at, revision, exhaustion_reason, recovery_at, \
     recovery_source, recovery_hint, cordon_reason, claim_id, claim_holder, claim_token, \
     claim_request_id, claimed_at, lease_expires_at, quota_pools, pool_holds";

/// The selection query of a batch with claims whose selector has two
/// `match_labels`, as the server builds it: `PgClaimReads::claimable` in
/// src/storage/postgres/agents.rs (or `SqliteClaimReads::claimable`), with
/// `claimable_condition` and `selector_sql` of src/storage/claims.rs.
fn claimable_query(sqlite: bool) -> String {
    if sqlite {
        format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE status = 'IDLE' AND cordon_reason IS NULL AND json_extract(labels, ?1) = ?2 AND json_extract(labels, ?3) = ?4
             ORDER BY last_transition_at, agent_id
             LIMIT ?5"
        )
    } else {
        format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE status = 'IDLE' AND cordon_reason IS NULL AND (labels ->> $1) = $2 AND (labels ->> $3) = $4
             ORDER BY last_transition_at, agent_id
             LIMIT $5
             FOR UPDATE SKIP LOCKED"
        )
    }
}

/// A query's text with its whitespace runs as one space.
fn normalized(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A server on a fresh store, with a metrics listener (the batch sizes).
struct Server {
    app: helpers::TestApp,
    db: helpers::TestDb,
}

impl Server {
    async fn start() -> Server {
        let db = helpers::TestDb::new();
        let args = ServeArgs {
            http_listen: fleetcare::config::HttpListen::at("127.0.0.1:0".parse().unwrap()),
            database: DatabaseArgs {
                database_url: Some(db.url.clone()),
                data_dir: Default::default(),
                db_max_connections: 20,
                db_acquire_timeout: Duration::from_secs(5),
            },
            // The agents never heartbeat: none goes OFFLINE during the bench.
            heartbeat_timeout: Duration::from_secs(3600),
            ..ServeArgs::default()
        };
        let app = helpers::TestApp::spawn_with(args).await;
        Server { app, db }
    }

    fn agents(&self) -> baselines::AgentClient {
        self.app.agents.clone()
    }

    fn dispatch(&self) -> Dispatch {
        DispatchServiceClient::new(self.app.channel.clone())
    }

    /// Registers `ids` with their labels, `concurrency` in flight.
    async fn register(
        &self,
        what: &str,
        count: usize,
        concurrency: usize,
        agent: impl Fn(usize) -> (String, Vec<(&'static str, String)>),
    ) {
        let agent = &agent;
        let r = drive(count, concurrency, |i| {
            let mut c = self.agents();
            async move {
                let (agent_id, labels) = agent(i);
                c.register_agent(pb::RegisterAgentRequest {
                    agent_id,
                    labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    quota_pools: Vec::new(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        report(&format!("RegisterAgent ({what})"), count, &r);
    }

    /// The health check, `calls` of them at `concurrency` in flight, with
    /// its CPU per call; returns the rate.
    async fn health(&self, calls: usize, concurrency: usize) -> (f64, CpuPerCall) {
        let cpu = CpuMeter::start();
        let r = baselines::health_checks(&self.app.channel, calls, concurrency).await;
        let per_sec = report("grpc.health.v1.Health/Check", calls, &r);
        cpu.report("health check", calls);
        (per_sec, cpu.per_call(calls))
    }

    /// `VACUUM (ANALYZE) agents`, as autovacuum would have done by now on a
    /// server that runs it (this machine's CI Postgres runs with
    /// `autovacuum = off`): dead row versions gone, and statistics, whose
    /// change also makes the server's connections plan their cached
    /// statements again. `BENCH_VACUUM=0` leaves the table as the load left it.
    async fn vacuum(&self, when: &str) {
        if helpers::sqlite_backend() || env_usize("BENCH_VACUUM", 1) == 0 {
            return;
        }
        let pg = self.pg().await;
        let t = Instant::now();
        sqlx::query("VACUUM (ANALYZE) agents")
            .execute(&pg)
            .await
            .unwrap();
        println!("  VACUUM (ANALYZE) agents {when}: {:.2?}", t.elapsed());
        pg.close().await;
    }

    /// `CHECKPOINT` (Postgres), then `sync`: the data pages the bulk steps
    /// dirtied are on disk before the load. Otherwise the kernel writes
    /// them back some 30 s later, in the load's first seconds, and a
    /// commit's WAL flush waits behind that writeback: single `WRITE_BATCH`
    /// statements of 85 to 130 ms in Postgres's log (`log_min_duration_statement`),
    /// one stall of 0.1 to 0.25 s per run (docs/benchmarks.md, Claims).
    /// `BENCH_CHECKPOINT=0` leaves it out.
    async fn checkpoint(&self) {
        if helpers::sqlite_backend() || env_usize("BENCH_CHECKPOINT", 1) == 0 {
            return;
        }
        let pg = self.pg().await;
        let t = Instant::now();
        sqlx::query("CHECKPOINT").execute(&pg).await.unwrap();
        let _ = std::process::Command::new("sync").status();
        println!("  CHECKPOINT and sync before the load: {:.2?}", t.elapsed());
        pg.close().await;
    }

    /// A small pool of the bench's own on the server's database.
    async fn pg(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.db.url)
            .await
            .unwrap()
    }

    /// Postgres: every index of `agents` with how often it was scanned and
    /// how many entries those scans read, since the database was made.
    /// Backends report their counts when idle, within 10 s: wait that long.
    async fn index_reads(&self) -> Vec<(String, i64, i64)> {
        if helpers::sqlite_backend() {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        let pg = self.pg().await;
        let rows = sqlx::query_as(
            "SELECT indexrelname::text, idx_scan, idx_tup_read FROM pg_stat_user_indexes
             WHERE relname = 'agents' ORDER BY indexrelname",
        )
        .fetch_all(&pg)
        .await
        .unwrap();
        pg.close().await;
        rows
    }

    /// The server's metrics now, by series (name and labels as exposed).
    async fn metrics(&self) -> HashMap<String, f64> {
        let Some(addr) = self.app.http_addr else {
            return HashMap::new();
        };
        scrape(addr).await
    }
}

/// One GET of /metrics: every sample by its series.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    baselines::scrape(addr).await
}

/// The index reads on `agents` between two [`Server::index_reads`].
fn print_index_reads(what: &str, before: &[(String, i64, i64)], after: &[(String, i64, i64)]) {
    if after.is_empty() {
        return;
    }
    println!("  index reads on agents {what} (scans, entries read):");
    for (name, scans, read) in after {
        let (s0, r0) = before
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or((0, 0), |(_, s, r)| (*s, *r));
        let (scans, read) = (scans - s0, read - r0);
        if scans > 0 {
            println!(
                "    {name:<28} {scans:>9} scans {read:>12} entries ({:.1} per scan)",
                read as f64 / scans as f64
            );
        }
    }
}

/// The group committer's batches between two scrapes: how many, their mean
/// size and their mean commit time.
fn batches(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> String {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let count = d("fleetcare_commit_batch_size_count");
    if count == 0.0 {
        return "batches: none seen (no metrics listener)".into();
    }
    format!(
        "batches: {count:.0}, mean {:.1} calls, mean commit {:.2} ms",
        d("fleetcare_commit_batch_size_sum") / count,
        d("fleetcare_commit_duration_seconds_sum") / d("fleetcare_commit_duration_seconds_count")
            * 1000.0,
    )
}

fn secs(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    }
}

fn selector(labels: &[(&str, String)]) -> pb::LabelSelector {
    pb::LabelSelector {
        match_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        match_expressions: vec![],
    }
}

fn claim_request(selector: pb::LabelSelector) -> pb::ClaimAgentRequest {
    pb::ClaimAgentRequest {
        selector: Some(selector),
        slot_type: pb::SlotType::Work as i32,
        lease_duration: Some(secs(60)),
        wait_timeout: None,
        request_id: String::new(),
    }
}

/// A fixed scramble of `i` (as the pgbench baseline draws its rows).
fn scramble(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11
}

/// What one run of claim loops measured.
struct ClaimRun {
    claims_per_sec: f64,
    /// ClaimAgents and ReleaseClaims (each one durable transition) per second.
    transitions_per_sec: f64,
    cpu: CpuPerCall,
}

/// How a claim loop gives its agent back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// ReleaseClaim(claim_id, fencing_token): the handler first reads the
    /// claim to find its agent.
    Release,
    /// FinishWork(agent_id, fencing_token), as the claimed agent would when
    /// its work is done: no read before the commit.
    FinishWork,
}

/// `loops` loops of ClaimAgent then `end`, `concurrency` in flight, the
/// claim of loop `i` with `selector(i)`; a refused claim is counted and its
/// loop ends.
async fn claim_loops(
    server: &Server,
    what: &str,
    end: End,
    loops: usize,
    concurrency: usize,
    selector: impl Fn(usize) -> pb::LabelSelector,
) -> ClaimRun {
    let claims = Mutex::new(Vec::with_capacity(loops));
    let releases = Mutex::new(Vec::with_capacity(loops));
    let refused = Mutex::new(0usize);
    let (claims_ref, releases_ref, refused_ref, selector) =
        (&claims, &releases, &refused, &selector);
    server.vacuum("before the run").await;
    let before = server.metrics().await;
    let cpu = CpuMeter::start();
    let r = drive(loops, concurrency, |i| {
        let mut c = server.dispatch();
        let mut agents = server.agents();
        async move {
            let t = Instant::now();
            let made = c.claim_agent(claim_request(selector(i))).await;
            let claim = match made {
                Ok(r) => r.into_inner().claim.expect("a claim"),
                Err(e) if helpers::reason(&e) == "NO_AGENT_AVAILABLE" => {
                    *refused_ref.lock().unwrap() += 1;
                    return;
                }
                Err(e) => panic!("ClaimAgent failed: {e:?}"),
            };
            claims_ref.lock().unwrap().push(t.elapsed());
            let t = Instant::now();
            match end {
                End::Release => {
                    c.release_claim(pb::ReleaseClaimRequest {
                        claim_id: claim.claim_id,
                        fencing_token: claim.fencing_token,
                    })
                    .await
                    .expect("ReleaseClaim");
                }
                End::FinishWork => {
                    agents
                        .finish_work(pb::FinishWorkRequest {
                            agent_id: claim.agent_id,
                            fencing_token: claim.fencing_token,
                        })
                        .await
                        .expect("FinishWork with the claim's token");
                }
            }
            releases_ref.lock().unwrap().push(t.elapsed());
        }
    })
    .await;
    let mut claims = claims.into_inner().unwrap();
    let mut releases = releases.into_inner().unwrap();
    claims.sort();
    releases.sort();
    let made = claims.len();
    let transitions = made + releases.len();
    let per_call = cpu.per_call(transitions);
    let after = server.metrics().await;
    let ending = match end {
        End::Release => "ReleaseClaim",
        End::FinishWork => "FinishWork",
    };
    report(&format!("ClaimAgent+{ending}, {what}"), loops, &r);
    let claims_per_sec = rate(made, r.0);
    let transitions_per_sec = rate(transitions, r.0);
    println!(
        "    claims {claims_per_sec:.0}/s (p50 {:.2?}, p99 {:.2?}), {ending} p50 {:.2?}, p99 {:.2?}; \
         claim transitions {transitions_per_sec:.0}/s; refused {}",
        pct(&claims, 0.5),
        pct(&claims, 0.99),
        pct(&releases, 0.5),
        pct(&releases, 0.99),
        refused.into_inner().unwrap(),
    );
    cpu.report("claim transition", transitions);
    println!("    {}", batches(&before, &after));
    ClaimRun {
        claims_per_sec,
        transitions_per_sec,
        cpu: per_call,
    }
}

/// StartWork/FinishWork pairs on the transitions' agents, with CPU per
/// transition and the batches they made.
async fn transitions(server: &Server, pairs: usize, concurrency: usize) -> (f64, CpuPerCall) {
    server.vacuum("before the run").await;
    let before = server.metrics().await;
    let cpu = CpuMeter::start();
    let per_sec =
        baselines::transitions(&server.agents(), transition_agent, pairs, concurrency, 0).await;
    let per_call = cpu.per_call(2 * pairs);
    cpu.report("transition", 2 * pairs);
    println!("    {}", batches(&before, &server.metrics().await));
    (per_sec, per_call)
}

fn transition_agent(i: usize) -> String {
    format!("bench-agent-{i:06}")
}

fn pool_agent(i: usize) -> String {
    format!("claim-agent-{i:06}")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn us(c: &CpuPerCall) -> String {
    format!("{:.1} + {:.1} µs", c.own * 1e6, c.postgres * 1e6)
}

/// A claim loop's name, and per round its claim transitions and its claims
/// against durable transitions, and its claim transitions/s.
type Variant = (&'static str, Vec<f64>, Vec<f64>, Vec<f64>);

/// Claim transitions against durable transitions, rounds of: transitions,
/// claims with one selector, claims with four, transitions again.
async fn ratios(calls: usize, concurrency: usize, rounds: usize) {
    let pool = env_usize("BENCH_CLAIM_AGENTS", 256);
    println!(
        "\nclaims against durable transitions: {concurrency} in flight, {pool} agents to claim, \
         {calls} durable transitions per run, {rounds} rounds"
    );
    let server = Server::start().await;
    server
        .register("transitions' agents", concurrency, concurrency, |i| {
            (transition_agent(i), vec![("team", "bench".to_owned())])
        })
        .await;
    server
        .register("agents to claim", pool, concurrency, |i| {
            (
                pool_agent(i),
                vec![
                    ("pool", "claims".to_owned()),
                    ("shard", format!("s{}", i % 4)),
                ],
            )
        })
        .await;
    let one = |_: usize| selector(&[("pool", "claims".to_owned())]);
    let four = |i: usize| selector(&[("shard", format!("s{}", i % 4))]);
    let pairs = calls / 2;
    let loops = calls / 2;

    // Warm-up: connections, caches, plans.
    set_quiet(true);
    baselines::transitions(
        &server.agents(),
        transition_agent,
        pairs / 10,
        concurrency,
        0,
    )
    .await;
    set_quiet(false);
    println!("  (warm-up)");
    claim_loops(
        &server,
        "warm-up",
        End::Release,
        loops / 10,
        concurrency,
        one,
    )
    .await;

    // Per loop, per round: claim transitions and claims against durable
    // transitions, and claim transitions/s.
    let mut variants: Vec<Variant> = [
        "ReleaseClaim, 1 selector",
        "ReleaseClaim, 4 selectors",
        "FinishWork, 1 selector",
    ]
    .into_iter()
    .map(|name| (name, vec![], vec![], vec![]))
    .collect();
    let mut t_rates = Vec::new();
    let mut cpu_rows: Vec<(String, CpuPerCall)> = Vec::new();
    let reads_before = server.index_reads().await;
    for round in 1..=rounds {
        println!("  round {round}");
        let (before, before_cpu) = transitions(&server, pairs, concurrency).await;
        let runs = [
            claim_loops(
                &server,
                "one label, 1 selector",
                End::Release,
                loops,
                concurrency,
                one,
            )
            .await,
            claim_loops(
                &server,
                "one label in 4 values",
                End::Release,
                loops,
                concurrency,
                four,
            )
            .await,
            claim_loops(
                &server,
                "one label, 1 selector",
                End::FinishWork,
                loops,
                concurrency,
                one,
            )
            .await,
        ];
        let (after, after_cpu) = transitions(&server, pairs, concurrency).await;
        let baseline = before.max(after);
        t_rates.push(baseline);
        cpu_rows.push((format!("round {round} transition (before)"), before_cpu));
        for ((name, ratios, claims, rates), run) in variants.iter_mut().zip(&runs) {
            println!(
                "  => round {round}, ClaimAgent+{name}: claim transitions / durable transitions {:.2} (target >= 0.8), claims / durable transitions {:.2}",
                run.transitions_per_sec / baseline,
                run.claims_per_sec / baseline,
            );
            ratios.push(run.transitions_per_sec / baseline);
            claims.push(run.claims_per_sec / baseline);
            rates.push(run.transitions_per_sec);
            cpu_rows.push((format!("round {round} claim transition, {name}"), run.cpu));
        }
        cpu_rows.push((format!("round {round} transition (after)"), after_cpu));
    }
    for (name, ratios, claims, _) in &variants {
        println!(
            "  => median over {rounds} rounds, ClaimAgent+{name}: claim transitions / durable transitions {:.2} (target >= 0.8); claims / durable transitions {:.2}",
            median(ratios.clone()),
            median(claims.clone()),
        );
    }
    let claim_tps = median(variants[0].3.clone());

    println!("\n  baselines at {concurrency}, same run");
    let transitions_tps = median(t_rates);
    let updates = baselines::updates(&server.db, calls, concurrency).await;
    println!(
        "  => claim transitions (1 selector) / 1-row autocommit UPDATEs: {:.2}; durable transitions / the same: {:.2}",
        claim_tps / updates,
        transitions_tps / updates,
    );
    if !helpers::sqlite_backend() {
        let pgbench = baselines::pgbench_n(&server.db, calls / 2, concurrency).await;
        println!(
            "  => claim transitions (1 selector) / pgbench -N transactions: {:.2}; durable transitions / the same: {:.2}",
            claim_tps / pgbench,
            transitions_tps / pgbench,
        );
    }
    let (health, health_cpu) = server.health(2 * calls, concurrency).await;
    println!(
        "  => claim transitions (1 selector) / health checks: {:.2}; durable transitions / health checks: {:.2}",
        claim_tps / health,
        transitions_tps / health,
    );
    cpu_rows.push(("health check".into(), health_cpu));
    print_index_reads(
        "over the rounds and baselines",
        &reads_before,
        &server.index_reads().await,
    );
    println!("\n  CPU per call (server+client + Postgres), cores busy:");
    for (what, c) in &cpu_rows {
        println!("    {what:<56} {}  {:>3.0} %", us(c), c.busy * 100.0);
    }
    server.app.stop().await;
}

/// The fleet of the scale section: agent `i`'s id and labels, and whether it
/// stays idle (one in each block of `every`, its place moving along the
/// blocks, so that the idle agents cover every zone and model alike and are
/// spread over the registration order).
fn fleet_agent(i: usize) -> (String, Vec<(&'static str, String)>) {
    (
        format!("fleet-{i:06}"),
        vec![
            ("zone", format!("z{}", i % 10)),
            ("model", format!("m{}", (i / 10) % 10)),
        ],
    )
}

fn stays_idle(i: usize, every: usize) -> bool {
    i % every == (i / every) % every
}

/// Latencies in ms: p50, p99, max.
fn spread(v: &mut [Duration]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort();
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(v, 0.5).as_secs_f64() * 1e3,
        pct(v, 0.99).as_secs_f64() * 1e3,
        v.last().unwrap().as_secs_f64() * 1e3,
    )
}

async fn scale() {
    let fleet = env_usize("BENCH_FLEET", 100_000);
    let idle = env_usize("BENCH_IDLE", 1000).max(1);
    let per_sec = env_usize("BENCH_CLAIM_RATE", 500).max(1);
    let secs = env_usize("BENCH_SCALE_SECS", 20);
    // Claims at the same rate before the measured window, reported apart
    // (first statements on each connection after the bulk steps; the stall
    // the bulk steps' writeback caused is `Server::checkpoint`'s).
    let warmup_secs = env_usize("BENCH_WARMUP_SECS", 2);
    let every = (fleet / idle).max(1);
    println!(
        "\nscale: {fleet} agents (zone and model, 10 values each), all but one in {every} BUSY; \
         ClaimAgent on both labels at {per_sec}/s for {secs} s, each released at once"
    );
    let server = Server::start().await;
    server
        .register(&format!("{fleet} agents"), fleet, 256, fleet_agent)
        .await;
    server.vacuum("after registering").await;
    let busy: Vec<usize> = (0..fleet).filter(|&i| !stays_idle(i, every)).collect();
    let busy_ref = &busy;
    let r = drive(busy.len(), 256, |k| {
        let mut c = server.agents();
        async move {
            c.start_work(pb::StartWorkRequest {
                agent_id: fleet_agent(busy_ref[k]).0,
                slot_type: pb::SlotType::Work as i32,
            })
            .await
            .unwrap();
        }
    })
    .await;
    report(
        &format!("StartWork ({} agents)", busy.len()),
        busy.len(),
        &r,
    );
    server.vacuum("after StartWork").await;
    server.checkpoint().await;
    let m = server.metrics().await;
    let idle_now = m
        .get("fleetcare_agents{status=\"IDLE\"}")
        .copied()
        .unwrap_or(f64::NAN);
    println!("  idle agents now: {idle_now:.0} of {fleet}");
    let pg = if helpers::sqlite_backend() {
        None
    } else {
        Some(server.pg().await)
    };
    if let Some(pg) = &pg {
        println!("  agents table before the load: {}", table_state(pg).await);
    }
    let reads_before = server.index_reads().await;

    // The selection query's text as the server sends it, from pg_stat_activity.
    let seen_query = std::sync::Arc::new(Mutex::new(None::<String>));
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = pg.clone().map(|pg| {
        let seen = seen_query.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() && seen.lock().unwrap().is_none() {
                let q: Option<String> = sqlx::query_scalar(
                    "SELECT query FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND query LIKE 'SELECT % FROM agents%FOR UPDATE SKIP LOCKED' LIMIT 1",
                )
                .fetch_optional(&pg)
                .await
                .unwrap();
                if q.is_some() {
                    *seen.lock().unwrap() = q;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });

    // The health check probed beside the claims, every 4 ms.
    let health = {
        let channel = server.app.channel.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = HealthClient::new(channel);
            let mut ticks = tokio::time::interval(Duration::from_millis(4));
            let mut calls = Vec::new();
            while !stop.is_cancelled() {
                ticks.tick().await;
                let mut h = client.clone();
                calls.push(tokio::spawn(async move {
                    let t = Instant::now();
                    h.check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|_| t.elapsed())
                    .ok()
                }));
            }
            let mut latencies = Vec::with_capacity(calls.len());
            for c in calls {
                latencies.extend(c.await.unwrap());
            }
            latencies
        })
    };

    // The claims: open loop, one every period, each released once made.
    #[derive(Default)]
    struct Outcome {
        claim: Option<Duration>,
        release: Option<Duration>,
        refused: bool,
        /// A failure other than NO_AGENT_AVAILABLE (of the claim or of its release).
        error: Option<String>,
        late: Duration,
    }
    let failed = |what: &str, e: tonic::Status| {
        format!(
            "{what} {:?}: {}",
            e.code(),
            e.message().chars().take(60).collect::<String>()
        )
    };
    let period = Duration::from_secs_f64(1.0 / per_sec as f64);
    let warmup = per_sec * warmup_secs;
    let total = per_sec * secs + warmup;
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut most_in_flight = 0;
    let cpu = CpuMeter::start();
    let started = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(started, period);
    let mut calls = Vec::with_capacity(total);
    for k in 0..total {
        ticks.tick().await;
        let late = started.elapsed().saturating_sub(period * k as u32);
        let mut c = server.dispatch();
        let h = scramble(k);
        let wanted = selector(&[
            ("zone", format!("z{}", h % 10)),
            ("model", format!("m{}", (h / 10) % 10)),
        ]);
        let in_flight = in_flight.clone();
        most_in_flight =
            most_in_flight.max(in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let made = c.claim_agent(claim_request(wanted)).await;
            let claimed = t.elapsed();
            let mut outcome = Outcome {
                claim: Some(claimed),
                late,
                ..Outcome::default()
            };
            match made {
                Ok(r) => {
                    let claim = r.into_inner().claim.expect("a claim");
                    let t = Instant::now();
                    match c
                        .release_claim(pb::ReleaseClaimRequest {
                            claim_id: claim.claim_id,
                            fencing_token: claim.fencing_token,
                        })
                        .await
                    {
                        Ok(_) => outcome.release = Some(t.elapsed()),
                        Err(e) => outcome.error = Some(failed("ReleaseClaim", e)),
                    }
                }
                Err(e) if helpers::reason(&e) == "NO_AGENT_AVAILABLE" => outcome.refused = true,
                Err(e) => {
                    outcome.claim = None;
                    outcome.error = Some(failed("ClaimAgent", e));
                }
            }
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            outcome
        }));
    }
    let issued = started.elapsed();
    let mut outcomes = Vec::with_capacity(total);
    for c in calls {
        outcomes.push(c.await.unwrap());
    }
    let elapsed = started.elapsed();
    let per_call = cpu.per_call(total);
    stop.cancel();
    let mut health = health.await.unwrap();
    if let Some(w) = watcher {
        w.await.unwrap();
    }

    let warmed: Vec<Outcome> = outcomes.drain(..warmup).collect();
    let total = total - warmup;
    if !warmed.is_empty() {
        let mut first: Vec<Duration> = warmed.iter().filter_map(|o| o.claim).collect();
        println!(
            "  warm-up, the first {warmup_secs} s ({warmup} claims, not counted below): ClaimAgent {}",
            spread(&mut first),
        );
    }
    let refused = outcomes.iter().filter(|o| o.refused).count();
    let mut errors: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in warmed
        .iter()
        .chain(&outcomes)
        .filter_map(|o| o.error.as_deref())
    {
        *errors.entry(e).or_default() += 1;
    }
    let mut claims: Vec<Duration> = outcomes
        .iter()
        .filter(|o| !o.refused)
        .filter_map(|o| o.claim)
        .collect();
    let mut releases: Vec<Duration> = outcomes.iter().filter_map(|o| o.release).collect();
    let mut late: Vec<Duration> = outcomes.iter().map(|o| o.late).collect();
    println!(
        "  {} claims issued in {issued:.2?} ({:.0}/s; warm-up included), all answered after {elapsed:.2?}; \
         at most {most_in_flight} in flight; sends behind schedule: {}",
        total + warmup,
        rate(total + warmup, issued),
        spread(&mut late),
    );
    println!(
        "  ClaimAgent (two labels), {} made: {} (target p99 < 50 ms); NO_AGENT_AVAILABLE: {refused}",
        claims.len(),
        spread(&mut claims),
    );
    println!("  ReleaseClaim: {}", spread(&mut releases));
    // When the slow claims were sent: a stall shows as a run of them.
    let slow = Duration::from_millis(25);
    let mut runs: Vec<(usize, usize, Duration, usize)> = Vec::new();
    for (k, o) in outcomes.iter().enumerate() {
        let Some(took) = o.claim.filter(|t| *t > slow) else {
            continue;
        };
        match runs.last_mut() {
            Some((_, last, most, n)) if k - *last <= 25 => {
                *last = k;
                *most = (*most).max(took);
                *n += 1;
            }
            _ => runs.push((k, k, took, 1)),
        }
    }
    for (first, last, most, n) in runs.iter().filter(|r| r.3 >= 5) {
        println!(
            "    {n} claims over {slow:?} sent from {:.2?} to {:.2?} of the measured window, the slowest {most:.1?}",
            period * *first as u32,
            period * *last as u32,
        );
    }
    for (error, n) in &errors {
        println!("  FAILED {n} times: {error}");
    }
    println!(
        "  health check beside them, {} calls: {}",
        health.len(),
        spread(&mut health),
    );
    if !claims.is_empty() && !health.is_empty() {
        println!(
            "  => claim p99 / health check p99 under the same load: {:.1}",
            pct(&claims, 0.99).as_secs_f64() / pct(&health, 0.99).as_secs_f64()
        );
    }
    println!(
        "    cpu per claim (with its release and {:.1} health checks): {} server+client + Postgres; cores {:.0} % busy",
        health.len() as f64 / (total + warmup) as f64,
        us(&per_call),
        per_call.busy * 100.0,
    );
    if errors.is_empty() {
        // Every claim was released: the pool is whole again.
        let m = server.metrics().await;
        println!(
            "  idle agents after: {:.0}",
            m.get("fleetcare_agents{status=\"IDLE\"}")
                .copied()
                .unwrap_or(f64::NAN)
        );
    }
    print_index_reads(
        &format!(
            "during the load ({} claims, {} releases, warm-up included)",
            total + warmup,
            releases.len() + warmed.iter().filter(|o| o.release.is_some()).count()
        ),
        &reads_before,
        &server.index_reads().await,
    );

    match &pg {
        Some(pg) => {
            println!("  agents table after the load: {}", table_state(pg).await);
            let seen = seen_query.lock().unwrap().clone();
            plans_postgres(&server.db.url, seen, fleet).await;
        }
        None => plan_sqlite(&server.db).await,
    }
    if let Some(pg) = pg {
        pg.close().await;
    }
    assert!(
        errors.is_empty(),
        "claims or releases failed under the paced load: {errors:?}"
    );
    server.app.stop().await;
}

/// The agents table's size and what autovacuum has done to it.
async fn table_state(pg: &sqlx::PgPool) -> String {
    let (live, dead, vacuumed, analyzed): (
        i64,
        i64,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as(
        "SELECT n_live_tup, n_dead_tup, last_autovacuum, last_autoanalyze
             FROM pg_stat_user_tables WHERE relname = 'agents'",
    )
    .fetch_one(pg)
    .await
    .unwrap();
    let (pages, index_pages): (i64, i64) = sqlx::query_as(
        "SELECT pg_relation_size('agents') / 8192, pg_relation_size('agents_claimable_idx') / 8192",
    )
    .fetch_one(pg)
    .await
    .unwrap();
    let ago = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("never".to_owned(), |t| {
            format!("{} s ago", (chrono::Utc::now() - t).num_seconds())
        })
    };
    format!(
        "{live} live and {dead} dead rows, {pages} pages (agents_claimable_idx {index_pages}); \
         autovacuum {}, autoanalyze {}",
        ago(vacuumed),
        ago(analyzed),
    )
}

/// Per plan node on `agents`: the scan, and the rows it examined (returned
/// plus removed by a filter or a recheck, times its loops).
fn agents_nodes(plan: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    if plan["Relation Name"].as_str() == Some("agents") {
        let n = |k: &str| plan[k].as_f64().unwrap_or(0.0);
        let examined =
            (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
                * n("Actual Loops").max(1.0);
        let scan = format!(
            "{}{}",
            plan["Node Type"].as_str().unwrap_or("?"),
            plan["Index Name"]
                .as_str()
                .map(|i| format!(" using {i}"))
                .unwrap_or_default()
        );
        out.push((scan, examined));
    }
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            agents_nodes(child, out);
        }
    }
}

/// The selection query's plan: as the server's batch connections run it
/// (generic plan, no sequential scan: set on the session as the server sets
/// them), and with the defaults; each on a connection of its own, prepared
/// with the parameter types the server binds, executed (EXPLAIN ANALYZE locks
/// the rows it selects) in a transaction rolled back.
async fn plans_postgres(url: &str, seen: Option<String>, fleet: usize) {
    use sqlx::Connection;
    let ours = claimable_query(false);
    let query = match seen {
        Some(seen) => {
            assert_eq!(
                normalized(&seen),
                normalized(&ours),
                "the server's selection query (from pg_stat_activity) is not the bench's copy \
                 of PgClaimReads::claimable: update claimable_query in benches/claims.rs"
            );
            println!("\n  the selection query, as the server sent it (seen in pg_stat_activity):");
            seen
        }
        None => {
            println!(
                "\n  the selection query (NOT seen in pg_stat_activity during the load; the bench's copy of PgClaimReads::claimable):"
            );
            ours
        }
    };
    println!("    {}", normalized(&query));
    let params = "'model', 'm3', 'zone', 'z7', 1";
    for (settings, set) in [
        (
            "the batch connections' settings (plan_cache_mode = force_generic_plan, enable_seqscan = off)",
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off",
        ),
        ("default settings", ""),
        (
            "the batch connections' settings and enable_sort = off (for comparison: the plan \
             agents_claimable_idx was made for, idle longest first until enough match)",
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET enable_sort = off",
        ),
    ] {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        if !set.is_empty() {
            sqlx::raw_sql(set).execute(&mut conn).await.unwrap();
        }
        sqlx::raw_sql(&format!(
            "PREPARE bench_claimable(text, text, text, text, bigint) AS {query}"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        let explain = |format: &str| {
            format!("EXPLAIN (ANALYZE, BUFFERS{format}) EXECUTE bench_claimable({params})")
        };
        sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
        let text: Vec<String> = sqlx::query_scalar(&explain(""))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
        let json: serde_json::Value = sqlx::query_scalar(&explain(", FORMAT JSON"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        println!(
            "\n  EXPLAIN (ANALYZE, BUFFERS) with {settings}, selector zone=z7, model=m3, LIMIT 1:"
        );
        for line in &text {
            println!("    {line}");
        }
        let mut nodes = Vec::new();
        agents_nodes(&json[0]["Plan"], &mut nodes);
        let examined: f64 = nodes.iter().map(|(_, n)| n).sum();
        let scans: Vec<&str> = nodes.iter().map(|(s, _)| s.as_str()).collect();
        let top = &json[0]["Plan"];
        let buffers = top["Shared Hit Blocks"].as_f64().unwrap_or(0.0)
            + top["Shared Read Blocks"].as_f64().unwrap_or(0.0);
        // The first execution (the text above) also visits the index entries
        // the load left dead, and marks them so that the next one skips them.
        let first_buffers = text
            .first()
            .and(text.get(1))
            .and_then(|l| l.split("shared hit=").nth(1))
            .and_then(|n| n.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        let first_ms = text
            .iter()
            .find_map(|l| l.trim().strip_prefix("Execution Time: "))
            .and_then(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        println!(
            "  => scans of agents: {}; rows examined {examined:.0} of {fleet}; \
             first execution {first_buffers:.0} buffers, {first_ms:.2} ms; again {buffers:.0} buffers, {:.2} ms",
            scans.join(", "),
            json[0]["Execution Time"].as_f64().unwrap_or(f64::NAN),
        );
        assert!(
            !text.iter().any(|l| l.contains("Seq Scan on agents")),
            "the selection query's plan with {settings} scans every agent (Seq Scan on agents)"
        );
        assert!(
            !nodes.is_empty(),
            "no plan node reads agents: the plan was not understood"
        );
        assert!(
            examined < fleet as f64 / 10.0,
            "the selection query's plan with {settings} examined {examined} rows of {fleet} agents \
             (more than a tenth of the fleet)"
        );
    }
}

/// On the embedded store: SQLite's plan of the same query, on a read-only
/// connection to the server's file.
async fn plan_sqlite(db: &helpers::TestDb) {
    use sqlx::sqlite::SqliteConnectOptions;
    let dir = db.dir.as_ref().expect("sqlite test db");
    let options = SqliteConnectOptions::new()
        .filename(dir.join("fleetcare.db"))
        .read_only(true);
    let mut conn: sqlx::SqliteConnection = sqlx::Connection::connect_with(&options).await.unwrap();
    let rows: Vec<(i64, i64, i64, String)> =
        sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", claimable_query(true)))
            .bind("$.\"model\"")
            .bind("m3")
            .bind("$.\"zone\"")
            .bind("z7")
            .bind(1i64)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    println!("\n  EXPLAIN QUERY PLAN (SQLite), selector zone=z7, model=m3, LIMIT 1:");
    for (_, _, _, detail) in &rows {
        println!("    {detail}");
    }
    // SEARCH: a range of an index; SCAN: every row of the table or index.
    assert!(
        rows.iter()
            .all(|(_, _, _, d)| !d.starts_with("SCAN agents")),
        "SQLite's plan of the selection query scans every agent"
    );
}

#[tokio::main]
async fn main() {
    let calls = env_usize("BENCH_CALLS", 20_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let sections = std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "all".into());
    let all = sections == "all";
    println!(
        "fleetcare claims bench on {}: {} cores",
        if helpers::sqlite_backend() {
            "the embedded store (SQLite)"
        } else {
            "Postgres"
        },
        cores(),
    );
    if all || sections.contains("ratios") {
        ratios(calls, concurrency, rounds).await;
    }
    if all || sections.contains("scale") {
        scale().await;
    }
}
