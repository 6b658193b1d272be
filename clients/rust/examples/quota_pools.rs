//! Agents sharing one Claude Code subscription: registers them in its quota
//! pool, reports a 429 from one of them, and shows the whole pool parked.
//! Run a server first (`cargo run --release -- serve` in the repository),
//! then: `cargo run -p fleetcare-client --example quota_pools`
//! (FLEETCARE_SERVER overrides the address).

use fleetcare_client::{Clients, pb};

/// The subscription: its 5-hour and weekly limits bind every agent on it.
const ACCOUNT: &str = "anthropic/acct-42";
/// A per-model limit within it.
const OPUS: &str = "anthropic/acct-42/opus";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("FLEETCARE_SERVER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let mut clients = Clients::connect(&server).await?;

    let members: [(&str, &[&str]); 3] = [
        ("claude-opus-1", &[ACCOUNT, OPUS]),
        ("claude-sonnet-1", &[ACCOUNT]),
        ("claude-sonnet-2", &[ACCOUNT]),
    ];
    for (agent_id, pools) in members {
        let registered = clients
            .agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: agent_id.into(),
                labels: [("provider".to_string(), "anthropic".to_string())].into(),
                quota_pools: pools.iter().map(|p| p.to_string()).collect(),
            })
            .await?
            .into_inner();
        let agent = registered.agent.unwrap_or_default();
        println!("registered {agent_id} in {}", agent.quota_pools.join(", "));
    }

    // claude-sonnet-1's run got a 429: the subscription's 5-hour limit.
    // Reported for the pool, it parks every IDLE agent on the account in the
    // same commit.
    let report = clients
        .agents
        .report_exhausted(pb::ReportExhaustedRequest {
            agent_id: "claude-sonnet-1".into(),
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "You've hit your session limit · resets 12:50am (America/Los_Angeles)".into(),
            quota_pool: ACCOUNT.into(),
            window: pb::QuotaWindow::FiveHour as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let status = report.agent.unwrap_or_default().status();
    let pool = report.transition.unwrap_or_default().quota_pool;
    println!("claude-sonnet-1 reported {pool}: {}", status.as_str_name());

    for (agent_id, _) in members {
        let request = pb::GetAgentRequest {
            agent_id: agent_id.into(),
        };
        let agent = clients.agents.get_agent(request).await?.into_inner();
        let agent = agent.agent.unwrap_or_default();
        println!(
            "{agent_id} is {}, held by {}",
            agent.status().as_str_name(),
            agent.held_by_pools.join(", ")
        );
    }

    // The operator's view: every pool, parked or not.
    let request = pb::ListQuotaPoolsRequest { parked_only: false };
    let pools = clients.quota.list_quota_pools(request).await?.into_inner();
    for pool in pools.pools {
        let mut windows = String::new();
        for window in pool.windows.iter().filter(|w| w.in_force) {
            let until = window.until.unwrap_or_default();
            windows += &format!(", {} until {until}", window.window().as_str_name());
        }
        println!(
            "pool {}: {}, {} held{windows}",
            pool.name,
            pool.phase().as_str_name(),
            pool.held
        );
    }
    Ok(())
}
