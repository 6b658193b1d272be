//! Remediation brakes (issue 24): PlanRecovery with the brakes on against
//! off, on one server and one store, over real gRPC: Postgres (a fresh
//! database), then the embedded store; one backend with
//! FLEETCARE_TEST_BACKEND=sqlite or BENCH_BACKENDS=postgres.
//!
//! BENCH_HEALING_AGENTS (1,000) agents registered in 10 groups
//! (`team=t0..t9`); the server runs with `--healing-policy` pointing at a
//! file this bench rewrites between rounds: `brakes = true` (group_by team,
//! every limit out of reach so nothing is braked: every plan takes its lock
//! slot and reads the rates, the agent's budget and the fleet's and the
//! group's census) or `brakes = false` (nothing counted, no lock).
//! Each round reports an error for BENCH_HEALING_PLANS (200) agents, then
//! times their PlanRecovery calls, BENCH_HEALING_CONCURRENCY (8) in flight,
//! then reports each outcome (success), untimed. Rounds alternate off and
//! on (BENCH_HEALING_ROUNDS pairs, 3); printed: each round's rate and CPU per
//! call, the health check's rate on the same server as the floor of a
//! call's cost, and the median ratio on/off (the target: at least 0.8).
//!
//! Run:
//!
//!     cargo bench --bench healing

use std::time::Duration;

use fleetcare::config::{DatabaseArgs, ServeArgs};
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::healing_service_client::HealingServiceClient;

mod common;

use common::measure::{CpuMeter, drive, report};
use common::{baselines, env_usize, helpers};

fn agent(i: usize) -> String {
    format!("heal-{i:05}")
}

fn policy_text(brakes: bool) -> String {
    format!(
        "brakes = {brakes}\ngroup_by = \"team\"\nmax_unhealthy_percent = 100\n\
         max_plans_per_minute = 1000000\nmax_group_plans_per_minute = 1000000\n\
         retry_budget = 1000\n"
    )
}

/// Rewrites the policy file and waits until the server took it.
async fn set_brakes(
    path: &std::path::Path,
    healing: &mut HealingServiceClient<tonic::transport::Channel>,
    brakes: bool,
) {
    std::fs::write(path, policy_text(brakes)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let policy = healing
            .get_healing_policy(pb::GetHealingPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap();
        if policy.brakes == brakes {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "policy not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(backend: &str, agents: usize, plans: usize, concurrency: usize, rounds: usize) {
    println!(
        "\n{backend}: {agents} agents in 10 groups, {plans} PlanRecovery per round, {concurrency} in flight"
    );
    let db = if backend == "sqlite" {
        helpers::TestDb::sqlite()
    } else {
        helpers::TestDb::postgres()
    };
    let dir = std::env::temp_dir().join(format!("fleetcare-bench-healing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("healing.toml");
    std::fs::write(&path, policy_text(false)).unwrap();
    let mut args = ServeArgs {
        database: DatabaseArgs {
            database_url: Some(db.url.clone()),
            data_dir: Default::default(),
            db_max_connections: 20,
            db_acquire_timeout: Duration::from_secs(5),
        },
        heartbeat_timeout: Duration::from_secs(3600),
        ..ServeArgs::default()
    };
    args.healing.healing_policy = Some(path.clone());
    args.healing.healing_seed = Some(7);
    let app = helpers::TestApp::spawn_with(args).await;
    let healing = HealingServiceClient::new(app.channel.clone());
    drive(agents, 32, |i| {
        let mut c = app.agents.clone();
        async move {
            c.register_agent(pb::RegisterAgentRequest {
                agent_id: agent(i),
                labels: [("team".to_owned(), format!("t{}", i % 10))].into(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
        }
    })
    .await;

    let mut ratios = Vec::new();
    let mut next = 0;
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds * 2 {
        let brakes = round % 2 == 1;
        set_brakes(&path, &mut healing.clone(), brakes).await;
        let ids: Vec<String> = (0..plans).map(|k| agent((next + k) % agents)).collect();
        next += plans;
        let events: Vec<i64> = {
            let mut events = Vec::with_capacity(plans);
            for id in &ids {
                let event = healing
                    .clone()
                    .report_error(pb::ReportErrorRequest {
                        agent_id: id.clone(),
                        message: "tool call failed: connection reset".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .event
                    .unwrap();
                events.push(event.id);
            }
            events
        };
        let actions = std::sync::Mutex::new(Vec::new());
        let cpu = CpuMeter::start();
        let timed = drive(plans, concurrency, |i| {
            let mut c = healing.clone();
            let event = events[i];
            let actions = &actions;
            async move {
                let action = c
                    .plan_recovery(pb::PlanRecoveryRequest {
                        error_event_id: event,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .action
                    .unwrap();
                actions.lock().unwrap().push(action.id);
            }
        })
        .await;
        let what = if brakes {
            "PlanRecovery, brakes on"
        } else {
            "PlanRecovery, brakes off"
        };
        let rate = report(what, plans, &timed);
        cpu.report("plan", plans);
        rates[usize::from(brakes)].push(rate);
        if brakes {
            let off = rates[0].last().copied().unwrap();
            ratios.push(rate / off);
        }
        for id in actions.into_inner().unwrap() {
            healing
                .clone()
                .report_recovery_outcome(pb::ReportRecoveryOutcomeRequest {
                    action_id: id,
                    success: true,
                    duration: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    details: String::new(),
                })
                .await
                .unwrap();
        }
    }
    let health = baselines::health_checks(&app.channel, plans * 4, concurrency).await;
    report("health check (same server)", plans * 4, &health);
    ratios.sort_by(f64::total_cmp);
    println!(
        "  brakes on / off, per pair: {:?}; median {:.2} (target >= 0.80)",
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
        ratios[ratios.len() / 2]
    );
    app.stop().await;
}

#[tokio::main]
async fn main() {
    let agents = env_usize("BENCH_HEALING_AGENTS", 1000).max(10);
    let plans = env_usize("BENCH_HEALING_PLANS", 200).clamp(1, agents);
    let concurrency = env_usize("BENCH_HEALING_CONCURRENCY", 8).max(1);
    let rounds = env_usize("BENCH_HEALING_ROUNDS", 3).max(1);
    println!(
        "fleetcare healing bench: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for backend in common::backends() {
        run(&backend, agents, plans, concurrency, rounds).await;
    }
}
