//! Quota pools through the crate against the real server (see
//! `server/mod.rs` for where the binary comes from): agents registered with
//! `quota_pools`, one member's report (`ClaimGuard::report_exhausted` with
//! `quota_pool` and `window`) parking its IDLE sibling, `Clients::quota`
//! (QuotaService) showing the pool PARKED, and an operator's ParkPool and
//! ReleasePool (the canary first, the rest after its work slot).

mod server;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcare_client::{ClaimOptions, Clients, pb};
use server::Server;

const WAIT: Duration = Duration::from_secs(30);

async fn connect(server: &Server) -> Clients {
    Clients::connect(&server.address).await.unwrap()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Registers two IDLE agents with a label of their own, members of `pool`:
/// options selecting them, and their ids.
async fn members(clients: &Clients, name: &str, pool: &str) -> (ClaimOptions, Vec<String>) {
    let mut agents = clients.agents.clone();
    let ids: Vec<String> = (0..2).map(|i| format!("{name}-{i}")).collect();
    for agent_id in &ids {
        let registered = agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: agent_id.clone(),
                labels: [("pool".to_string(), name.to_string())].into(),
                quota_pools: vec![pool.to_string()],
            })
            .await
            .unwrap()
            .into_inner()
            .agent
            .unwrap();
        assert_eq!(registered.quota_pools, [pool]);
        assert_eq!(registered.status, pb::AgentStatus::Idle as i32);
    }
    (ClaimOptions::new().match_label("pool", name), ids)
}

async fn agent(clients: &Clients, agent_id: &str) -> pb::Agent {
    let request = pb::GetAgentRequest {
        agent_id: agent_id.into(),
    };
    let response = clients.agents.clone().get_agent(request).await.unwrap();
    response.into_inner().agent.unwrap()
}

async fn last_transition(clients: &Clients, agent_id: &str) -> pb::Transition {
    let request = pb::ListTransitionsRequest {
        agent_id: agent_id.into(),
        page_size: 1000,
        ..Default::default()
    };
    let page = clients.agents.clone().list_transitions(request).await;
    page.unwrap().into_inner().transitions.pop().unwrap()
}

async fn quota_pool(clients: &Clients, pool: &str) -> pb::GetQuotaPoolResponse {
    let request = pb::GetQuotaPoolRequest { pool: pool.into() };
    let response = clients.quota.clone().get_quota_pool(request).await;
    response.unwrap().into_inner()
}

/// Polls `check` until it holds; fails the test after `WAIT`.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_report_for_the_pool_parks_the_idle_sibling_and_quota_shows_it_parked() {
    let server = Server::start();
    let clients = connect(&server).await;
    let pool = "anthropic/acct-42";
    let (options, ids) = members(&clients, "rs-quota", pool).await;

    // One member's run hits the 5-hour limit: it reports for the pool, with
    // its claim's token.
    let resets = now_secs() + 2 * 3600;
    let mut guard = clients.claim(options).await.unwrap();
    let reporter = guard.agent_id().to_string();
    let report = guard
        .report_exhausted(pb::ReportExhaustedRequest {
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: format!("Claude AI usage limit reached|{resets}"),
            quota_pool: pool.into(),
            window: pb::QuotaWindow::FiveHour as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(guard.release().await.unwrap(), None, "the report ended it");
    let reported = report.agent.unwrap();
    assert_eq!(reported.status, pb::AgentStatus::Exhausted as i32);
    assert_eq!(reported.held_by_pools, [pool]);
    let t = report.transition.unwrap();
    assert_eq!(
        (t.cause, t.quota_pool.as_str()),
        (pb::TransitionCause::Exhausted as i32, pool)
    );

    // The sibling, IDLE, was parked in the same commit, held by the pool.
    let sibling = ids.iter().find(|id| **id != reporter).unwrap();
    let parked = agent(&clients, sibling).await;
    assert_eq!(parked.status, pb::AgentStatus::Exhausted as i32);
    assert_eq!(parked.held_by_pools, [pool]);
    let last = last_transition(&clients, sibling).await;
    assert_eq!(
        (last.cause, last.quota_pool.as_str(), last.revision),
        (
            pb::TransitionCause::PoolExhausted as i32,
            pool,
            t.revision + 1
        )
    );

    // The operator's view through Clients::quota.
    let got = quota_pool(&clients, pool).await;
    assert_eq!(got.held_agent_ids, ids);
    let p = got.pool.unwrap();
    assert_eq!(p.name, pool);
    assert_eq!(p.phase, pb::QuotaPoolPhase::Parked as i32);
    assert_eq!(p.held, 2);
    assert_eq!(p.parked_until.unwrap().seconds, resets);
    assert_eq!(p.windows.len(), 1);
    assert_eq!(p.windows[0].window, pb::QuotaWindow::FiveHour as i32);
    assert!(p.windows[0].in_force);
    assert_eq!(p.windows[0].reported_by, reporter);
    let counts: Vec<(i32, i64)> = p.members.iter().map(|m| (m.status, m.count)).collect();
    assert_eq!(counts, [(pb::AgentStatus::Exhausted as i32, 2)]);

    let mut quota = clients.quota.clone();
    let parked_only = quota
        .list_quota_pools(pb::ListQuotaPoolsRequest { parked_only: true })
        .await
        .unwrap()
        .into_inner()
        .pools;
    let listed: Vec<(&str, i32, i64)> = parked_only
        .iter()
        .map(|p| (p.name.as_str(), p.phase, p.held))
        .collect();
    assert_eq!(listed, [(pool, pb::QuotaPoolPhase::Parked as i32, 2)]);
}

#[tokio::test]
async fn an_operator_parks_and_releases_a_pool_canary_first() {
    // No spread: the members after the canary follow as soon as it completes
    // a work slot.
    let server = Server::start_with(&["--pool-release-spread", "0s"]);
    let clients = connect(&server).await;
    let pool = "key/7";
    let (_, ids) = members(&clients, "rs-quota-op", pool).await;
    let mut quota = clients.quota.clone();
    let parked = quota
        .park_pool(pb::ParkPoolRequest {
            pool: pool.into(),
            until: Some(prost_types::Timestamp {
                seconds: now_secs() + 3600,
                nanos: 0,
            }),
            window: pb::QuotaWindow::Billing as i32,
            reason: "invoice unpaid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parked.members_parked, 2);
    let p = parked.pool.unwrap();
    assert_eq!(p.phase, pb::QuotaPoolPhase::Parked as i32);
    assert_eq!(p.windows[0].source, "OPERATOR");
    for id in &ids {
        let a = agent(&clients, id).await;
        assert_eq!(a.status, pb::AgentStatus::Exhausted as i32);
        assert_eq!(a.held_by_pools, [pool]);
    }

    let released = quota
        .release_pool(pb::ReleasePoolRequest {
            pool: pool.into(),
            reason: "paid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!released.pool.unwrap().windows.iter().any(|w| w.in_force));
    eventually("the canary released", || async {
        let p = quota_pool(&clients, pool).await.pool.unwrap();
        !p.canary_agent_id.is_empty()
    })
    .await;
    let canary = quota_pool(&clients, pool)
        .await
        .pool
        .unwrap()
        .canary_agent_id;
    let back = agent(&clients, &canary).await;
    assert_eq!(back.status, pb::AgentStatus::Idle as i32);
    assert!(back.held_by_pools.is_empty());
    let last = last_transition(&clients, &canary).await;
    assert_eq!(
        (last.cause, last.quota_pool.as_str()),
        (pb::TransitionCause::PoolReleased as i32, pool)
    );

    let mut agents = clients.agents.clone();
    let work = pb::StartWorkRequest {
        agent_id: canary.clone(),
        slot_type: pb::SlotType::Work as i32,
    };
    agents.start_work(work).await.unwrap();
    let done = pb::FinishWorkRequest {
        agent_id: canary.clone(),
        fencing_token: 0,
    };
    agents.finish_work(done).await.unwrap();
    eventually("every member released", || async {
        let mut all = true;
        for id in &ids {
            all &= agent(&clients, id).await.status == pb::AgentStatus::Idle as i32;
        }
        all
    })
    .await;
    eventually("the pool open", || async {
        let p = quota_pool(&clients, pool).await.pool.unwrap();
        p.phase == pb::QuotaPoolPhase::Open as i32
    })
    .await;
}
