//! Registers an agent, gives it work, and follows its transitions with the
//! resuming watch. Run a server first (`cargo run --release -- serve` in the
//! repository), then: `cargo run -p fleetcare-client --example quickstart`
//! (FLEETCARE_SERVER overrides the address).

use fleetcare_client::{Clients, ResumingWatch, pb};
use pb::watch_transitions_response::Event;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("FLEETCARE_SERVER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let mut clients = Clients::connect(&server).await?;

    let registered = clients
        .agents
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "quickstart-rs".into(),
            labels: [("team".to_string(), "docs".to_string())].into(),
            quota_pools: Vec::new(),
        })
        .await?
        .into_inner();
    let agent = registered.agent.unwrap_or_default();
    println!(
        "registered {} at revision {}",
        agent.agent_id, agent.revision
    );

    // Follow this agent from here on; the watch reconnects by itself.
    let mut watch = ResumingWatch::new(
        clients.agents.clone(),
        pb::WatchTransitionsRequest {
            since_revision: agent.revision,
            agent_ids: vec![agent.agent_id.clone()],
            ..Default::default()
        },
    );

    let work = pb::StartWorkRequest {
        agent_id: agent.agent_id.clone(),
        slot_type: pb::SlotType::Work as i32,
    };
    clients.agents.start_work(work).await?;
    let done = pb::FinishWorkRequest {
        agent_id: agent.agent_id.clone(),
        fencing_token: 0,
    };
    clients.agents.finish_work(done).await?;

    let mut transitions = 0;
    while transitions < 2 {
        if let Event::Transition(t) = watch.next().await? {
            let from = pb::AgentStatus::try_from(t.from_status)?.as_str_name();
            let to = pb::AgentStatus::try_from(t.to_status)?.as_str_name();
            println!("revision {}: {from} -> {to}", t.revision);
            transitions += 1;
        }
    }
    Ok(())
}
