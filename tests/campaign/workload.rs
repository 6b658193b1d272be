//! The campaign's clients and watchers, through the generated gRPC client.
//! Each client makes one call at a time on a shared set of agents (so calls
//! contend), through a replica chosen at random, and records every call: its
//! start and end on one clock, and its outcome: the reply, or the error's
//! code (the history checker tells a refusal that proves nothing happened,
//! such as FAILED_PRECONDITION, from one that may have committed, such as
//! UNAVAILABLE or a deadline: `history::Outcome::from_code`). Watchers resume from the last revision they saw, each stream
//! recorded as a session with the revision it resumed from.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::agent_status_service_client::AgentStatusServiceClient;
use pb::watch_transitions_response::Event;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// A transition as the table stores it (statuses and causes spelled as there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tr {
    pub revision: i64,
    pub agent_id: String,
    pub from: Option<String>,
    pub to: String,
    pub cause: String,
    pub actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Register,
    Heartbeat,
    StartWork,
    StartOnCall,
    FinishWork,
    ReportExhausted,
    MarkOffline,
    /// StartWork without a slot type: always INVALID_ARGUMENT.
    InvalidStartWork,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The reply: the transition it reports (if any), the agent it shows
    /// (its status and revision), and for a registration whether it created
    /// the agent.
    Ok {
        transition: Option<Tr>,
        status: String,
        revision: i64,
        created: Option<bool>,
    },
    /// An error; what it proves is the history checker's to say
    /// (`history::Outcome::from_code`).
    Failed(Code),
}

#[derive(Debug, Clone)]
pub struct Call {
    pub client: usize,
    pub op: Op,
    pub agent_id: String,
    /// Positions in the global order of call starts and ends.
    pub start: u64,
    pub end: u64,
    pub outcome: Outcome,
}

/// One watch stream: the revision it resumed from, what it delivered, and
/// the highest revision it vouched for (its last transition or progress).
#[derive(Debug, Clone)]
pub struct Session {
    pub watcher: usize,
    pub resume_from: i64,
    pub received: Vec<Tr>,
    pub position: i64,
}

/// What the clients and watchers recorded, on one clock: nanoseconds since
/// the recorder was made (monotonic, shared by every thread), read just
/// before a call is sent and just after its answer (or its failure) came.
pub struct Recorder {
    started: Instant,
    pub calls: Mutex<Vec<Call>>,
    pub sessions: Mutex<Vec<Session>>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder {
            started: Instant::now(),
            calls: Mutex::default(),
            sessions: Mutex::default(),
        }
    }
}

impl Recorder {
    fn tick(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

fn status_name(value: i32) -> String {
    pb::AgentStatus::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("AGENT_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("?{value}"))
}

fn cause_name(value: i32) -> String {
    pb::TransitionCause::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TRANSITION_CAUSE_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("?{value}"))
}

pub fn transition(t: &pb::Transition) -> Tr {
    Tr {
        revision: t.revision,
        agent_id: t.agent_id.clone(),
        from: (t.from_status != 0).then(|| status_name(t.from_status)),
        to: status_name(t.to_status),
        cause: cause_name(t.cause),
        actor: t.actor.clone(),
    }
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect_lazy()
}

pub fn agent_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("agent-{i}")).collect()
}

/// Registers `agents` through `addr` before the run (retrying until each is
/// acknowledged), recorded as calls of client `usize::MAX`.
pub async fn register_all(addr: SocketAddr, agents: &[String], recorder: &Recorder) {
    let mut client = AgentStatusServiceClient::new(channel(addr));
    for agent in agents {
        for attempt in 0.. {
            assert!(attempt < 100, "could not register {agent}");
            let start = recorder.tick();
            let result = client
                .register_agent(pb::RegisterAgentRequest {
                    agent_id: agent.clone(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                })
                .await;
            let ok = result.is_ok();
            let outcome = outcome_of(result.map(|r| {
                let r = r.into_inner();
                (None, r.agent.unwrap_or_default(), Some(r.created))
            }));
            recorder.calls.lock().unwrap().push(Call {
                client: usize::MAX,
                op: Op::Register,
                agent_id: agent.clone(),
                start,
                end: recorder.tick(),
                outcome,
            });
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn outcome_of(
    result: Result<(Option<pb::Transition>, pb::Agent, Option<bool>), tonic::Status>,
) -> Outcome {
    match result {
        Ok((transition_made, agent, created)) => Outcome::Ok {
            transition: transition_made.as_ref().map(transition),
            status: status_name(agent.status),
            revision: agent.revision,
            created,
        },
        Err(status) => Outcome::Failed(status.code()),
    }
}

/// One client: calls until `stop`, each on a random agent through a random
/// replica (`targets`, read at each call).
pub async fn client(
    id: usize,
    seed: u64,
    targets: Vec<SocketAddr>,
    agents: Vec<String>,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
) {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id as u64 + 1)));
    let clients: Vec<_> = targets
        .iter()
        .map(|&a| AgentStatusServiceClient::new(channel(a)))
        .collect();
    while !stop.is_cancelled() {
        let mut c = clients[rng.random_range(0..clients.len())].clone();
        let agent_id = agents[rng.random_range(0..agents.len())].clone();
        let op = match rng.random_range(0..100) {
            0..5 => Op::Register,
            5..40 => Op::Heartbeat,
            40..58 => Op::StartWork,
            58..63 => Op::StartOnCall,
            63..85 => Op::FinishWork,
            85..91 => Op::ReportExhausted,
            91..96 => Op::MarkOffline,
            _ => Op::InvalidStartWork,
        };
        let a = agent_id.clone();
        let start = recorder.tick();
        let result = match op {
            Op::Register => c
                .register_agent(pb::RegisterAgentRequest {
                    agent_id: a,
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (None, r.agent.unwrap_or_default(), Some(r.created))
                }),
            Op::Heartbeat => c
                .heartbeat(pb::HeartbeatRequest { agent_id: a })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.transition, r.agent.unwrap_or_default(), None)
                }),
            Op::StartWork | Op::StartOnCall | Op::InvalidStartWork => c
                .start_work(pb::StartWorkRequest {
                    agent_id: a,
                    slot_type: match op {
                        Op::StartWork => pb::SlotType::Work as i32,
                        Op::StartOnCall => pb::SlotType::OnCall as i32,
                        _ => 0,
                    },
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.transition, r.agent.unwrap_or_default(), None)
                }),
            Op::FinishWork => c
                .finish_work(pb::FinishWorkRequest {
                    agent_id: a,
                    fencing_token: 0,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.transition, r.agent.unwrap_or_default(), None)
                }),
            Op::ReportExhausted => {
                // Recovers a second or two later: the sweeper's RECOVERED.
                let at = std::time::SystemTime::now()
                    + Duration::from_millis(rng.random_range(500..2000));
                c.report_exhausted(pb::ReportExhaustedRequest {
                    agent_id: a,
                    reason: pb::ExhaustionReason::RateLimit as i32,
                    recovery_at: Some(at.into()),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.transition, r.agent.unwrap_or_default(), None)
                })
            }
            Op::MarkOffline => c
                .mark_offline(pb::MarkOfflineRequest { agent_id: a })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.transition, r.agent.unwrap_or_default(), None)
                }),
        };
        let failed = result.is_err();
        let call = Call {
            client: id,
            op,
            agent_id,
            start,
            end: recorder.tick(),
            outcome: outcome_of(result),
        };
        recorder.calls.lock().unwrap().push(call);
        if failed {
            // A client backs off a little after an error, as real ones do.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        }
    }
}

/// One resuming watcher: from `from`, through the replicas in turn, until
/// `stop`. `last` is the last revision it has seen (a transition or progress).
pub async fn watcher(
    id: usize,
    targets: Vec<SocketAddr>,
    from: i64,
    last: Arc<AtomicI64>,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
) {
    last.store(from, Ordering::SeqCst);
    let mut turn = id;
    while !stop.is_cancelled() {
        turn += 1;
        let target = targets[turn % targets.len()];
        let resume_from = last.load(Ordering::SeqCst);
        let channel = Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let mut client = AgentStatusServiceClient::new(channel);
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(
                Duration::from_secs(3),
                client.watch_transitions(pb::WatchTransitionsRequest {
                    since_revision: resume_from,
                    ..Default::default()
                }),
            ) => r,
        };
        let Ok(Ok(stream)) = opened else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let index = {
            let mut sessions = recorder.sessions.lock().unwrap();
            sessions.push(Session {
                watcher: id,
                resume_from,
                received: Vec::new(),
                position: resume_from,
            });
            sessions.len() - 1
        };
        loop {
            // Progress comes every second on an idle stream: three seconds of
            // silence is a stalled link.
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = tokio::time::timeout(Duration::from_secs(3), stream.message()) => n,
            };
            match next {
                Ok(Ok(Some(message))) => match message.event {
                    Some(Event::Transition(t)) => {
                        let t = transition(&t);
                        last.fetch_max(t.revision, Ordering::SeqCst);
                        let mut sessions = recorder.sessions.lock().unwrap();
                        let session = &mut sessions[index];
                        session.position = session.position.max(t.revision);
                        session.received.push(t);
                    }
                    Some(Event::Progress(p)) => {
                        last.fetch_max(p.revision, Ordering::SeqCst);
                        let mut sessions = recorder.sessions.lock().unwrap();
                        let session = &mut sessions[index];
                        session.position = session.position.max(p.revision);
                    }
                    _ => {}
                },
                _ => break,
            }
        }
    }
}
