//! `Clients::claim` and `ClaimGuard` against the real server (see
//! `server/mod.rs` for where the binary comes from): the claim makes the agent
//! BUSY under its holder, the lease is renewed in the background, release
//! (and a dropped guard, also on an error or a panic) gives the agent back,
//! two claimers never get the same agent, finish_work ends the claim, a claim
//! ended behind the guard's back is reported lost, and a repeated request_id
//! is the same claim.

mod server;

use std::future::Future;
use std::time::Duration;

use fleetcare_client::{ClaimOptions, Clients, ConnectOptions, error_reason, pb};
use server::{AuthFile, Server, token_new};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

async fn connect(server: &Server) -> Clients {
    Clients::connect(&server.address).await.unwrap()
}

/// Registers `size` IDLE agents with a label of their own: options selecting
/// them, and their ids.
async fn pool(clients: &Clients, name: &str, size: usize) -> (ClaimOptions, Vec<String>) {
    let mut agents = clients.agents.clone();
    let ids: Vec<String> = (0..size).map(|i| format!("{name}-{i}")).collect();
    for agent_id in &ids {
        agents
            .register_agent(pb::RegisterAgentRequest {
                agent_id: agent_id.clone(),
                labels: [("pool".to_string(), name.to_string())].into(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
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

fn ms(ts: &Option<prost_types::Timestamp>) -> i64 {
    let ts = ts.as_ref().unwrap();
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
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

async fn idle(clients: &Clients, agent_id: &str) -> bool {
    let a = agent(clients, agent_id).await;
    a.status == pb::AgentStatus::Idle as i32 && a.claim.is_none()
}

#[tokio::test]
async fn a_claim_holds_the_agent_renews_its_lease_and_release_gives_it_back() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-hold", 1).await;
    let lease = Duration::from_secs(1);

    let guard = clients.claim(options.lease(lease)).await.unwrap();
    assert_eq!(guard.agent_id(), ids[0]);
    assert_eq!(guard.agent().status, pb::AgentStatus::Busy as i32);
    let claimed = guard.transition().expect("the CLAIMED transition");
    assert_eq!(claimed.cause, pb::TransitionCause::Claimed as i32);
    assert_eq!(guard.fencing_token(), claimed.revision);
    let first = guard.claim();
    assert_eq!(first.holder, "anonymous");
    assert_eq!(first.request_id, guard.request_id());
    assert!(!guard.request_id().is_empty());
    let held = agent(&clients, &ids[0]).await;
    assert_eq!(held.status, pb::AgentStatus::Busy as i32);
    assert_eq!(held.claim.as_ref().unwrap().claim_id, first.claim_id);

    // Renewed in the background: still held after several leases, the
    // server's expiry moving forward with each renewal.
    let mut renewed = guard.subscribe();
    tokio::time::timeout(WAIT, async {
        while !(guard.renewals() >= 4
            && ms(&renewed.borrow().lease_expires_at) > ms(&first.claimed_at) + 3000)
        {
            renewed.changed().await.unwrap();
        }
    })
    .await
    .expect("renewals past three leases");
    let still = agent(&clients, &ids[0]).await;
    assert_eq!(still.status, pb::AgentStatus::Busy as i32);
    let still_claim = still.claim.unwrap();
    assert_eq!(still_claim.claim_id, first.claim_id);
    assert!(ms(&still_claim.lease_expires_at) > ms(&first.lease_expires_at) + 1000);
    assert!(guard.is_active() && guard.lost().is_none());

    let released = guard.release().await.unwrap().expect("released");
    assert_eq!(released.agent.unwrap().status, pb::AgentStatus::Idle as i32);
    assert!(idle(&clients, &ids[0]).await);
    let last = last_transition(&clients, &ids[0]).await;
    assert_eq!(last.cause, pb::TransitionCause::ClaimReleased as i32);
    let listed = clients
        .dispatch
        .clone()
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.claims.iter().all(|c| c.claim_id != first.claim_id));
}

#[tokio::test]
async fn a_dropped_guard_releases_on_an_error_and_on_a_panic() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-drop", 1).await;
    let options = options.lease(Duration::from_secs(30));

    async fn work(clients: &Clients, options: ClaimOptions) -> Result<(), String> {
        let guard = clients.claim(options).await.map_err(|e| e.to_string())?;
        assert_eq!(
            agent(clients, guard.agent_id()).await.status,
            pb::AgentStatus::Busy as i32
        );
        Err("the work failed".into()) // `?`-style early exit: the guard drops here
    }
    assert_eq!(
        work(&clients, options.clone()).await,
        Err("the work failed".into())
    );
    eventually("the dropped guard's release", || idle(&clients, &ids[0])).await;

    let (held, hold) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let clients = clients.clone();
        async move {
            let _guard = clients.claim(options).await.unwrap();
            held.send(()).unwrap();
            panic!("the work panicked");
        }
    });
    hold.await.unwrap();
    assert!(task.await.unwrap_err().is_panic());
    eventually("the release of a guard dropped by a panic", || {
        idle(&clients, &ids[0])
    })
    .await;
    assert_eq!(
        last_transition(&clients, &ids[0]).await.cause,
        pb::TransitionCause::ClaimReleased as i32
    );
}

#[tokio::test]
async fn two_claimers_of_one_idle_agent_one_gets_it_the_other_no_agent_available() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-race", 1).await;
    let options = options.lease(Duration::from_secs(10));
    let (a, b) = tokio::join!(clients.claim(options.clone()), clients.claim(options));
    let (won, refused) = match (a, b) {
        (Ok(won), Err(refused)) | (Err(refused), Ok(won)) => (won, refused),
        (a, b) => panic!("one claim must win and one lose: {a:?} {b:?}"),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        error_reason(&refused).as_deref(),
        Some("NO_AGENT_AVAILABLE")
    );
    assert_eq!(won.agent_id(), ids[0]);
    won.release().await.unwrap();
    assert!(idle(&clients, &ids[0]).await);
}

#[tokio::test]
async fn finish_work_ends_the_claim_and_leaves_nothing_to_release() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-finish", 1).await;
    let mut guard = clients
        .claim(options.lease(Duration::from_secs(5)))
        .await
        .unwrap();
    let finished = guard.finish_work().await.unwrap();
    let after = finished.agent.unwrap();
    assert_eq!(after.status, pb::AgentStatus::Idle as i32);
    assert!(after.claim.is_none());
    assert!(!guard.is_active());
    assert_eq!(
        guard.release().await.unwrap(),
        None,
        "nothing left to release"
    );
    assert_eq!(
        last_transition(&clients, &ids[0]).await.revision,
        finished.transition.unwrap().revision,
        "no release after FinishWork"
    );

    // ReportExhausted with the token ends a claim too.
    let (options, ids) = pool(&clients, "rs-exhausted", 1).await;
    let mut guard = clients.claim(options).await.unwrap();
    let report = guard
        .report_exhausted(pb::ReportExhaustedRequest {
            reason: pb::ExhaustionReason::RateLimit as i32,
            message: "Claude AI usage limit reached|4102444800".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        report.agent.unwrap().status,
        pb::AgentStatus::Exhausted as i32
    );
    drop(guard);
    let exhausted = agent(&clients, &ids[0]).await;
    assert_eq!(exhausted.status, pb::AgentStatus::Exhausted as i32);
    assert!(exhausted.claim.is_none());
}

#[tokio::test]
async fn a_claim_ended_behind_the_guards_back_is_lost() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-lost", 1).await;
    let guard = clients
        .claim(options.lease(Duration::from_secs(1)))
        .await
        .unwrap();
    clients
        .dispatch
        .clone()
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: guard.claim_id().into(),
            fencing_token: guard.fencing_token(),
        })
        .await
        .unwrap();
    let lost = tokio::time::timeout(WAIT, guard.until_lost())
        .await
        .expect("the renewal task did not notice");
    assert_eq!(lost.reason, "STALE_FENCING_TOKEN");
    assert_eq!(lost.claim_id, guard.claim_id());
    assert_eq!(guard.lost().unwrap().reason, "STALE_FENCING_TOKEN");
    assert!(!guard.is_active());
    // The release is answered STALE_FENCING_TOKEN: nothing to release, not an error.
    assert_eq!(guard.release().await.unwrap(), None);
    assert!(idle(&clients, &ids[0]).await);
}

#[tokio::test]
async fn a_repeated_request_id_is_the_same_claim_and_a_claim_can_wait() {
    let server = Server::start();
    let clients = connect(&server).await;
    let (options, ids) = pool(&clients, "rs-idempotent", 2).await;
    let options = options
        .lease(Duration::from_secs(10))
        .request_id("rs-retry-1");
    let first = clients.claim(options.clone()).await.unwrap();
    let again = clients.claim(options).await.unwrap();
    assert_eq!(again.claim_id(), first.claim_id());
    assert_eq!(again.fencing_token(), first.fencing_token());
    assert!(again.transition().is_none(), "no second transition");
    let mut held = Vec::new();
    for id in &ids {
        if agent(&clients, id).await.claim.is_some() {
            held.push(id.clone());
        }
    }
    assert_eq!(held, [first.agent_id()]);
    first.release().await.unwrap();
    assert_eq!(again.release().await.unwrap(), None, "released already");

    // With wait, a claim on a busy pool gets the agent once it comes free.
    let (options, ids) = pool(&clients, "rs-wait", 1).await;
    let holder = clients.claim(options.clone()).await.unwrap();
    let waiting = tokio::spawn({
        let clients = clients.clone();
        let options = options.clone().wait(WAIT);
        async move { clients.claim(options).await }
    });
    let refused = clients.claim(options).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let token = holder.fencing_token();
    holder.release().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(second.agent_id(), ids[0]);
    assert!(second.fencing_token() > token);
    second.release().await.unwrap();
}

#[tokio::test]
async fn the_holder_is_the_authenticated_caller() {
    let (ops_token, ops) = token_new("ops", "operator");
    let (scheduler_token, scheduler) = token_new("scheduler-eu", "scheduler");
    let callers = AuthFile::new(&[ops, scheduler]);
    let server = Server::start_with(&["--auth-file", callers.path.to_str().unwrap()]);
    let as_ops =
        Clients::connect_with(&server.address, &ConnectOptions::default().token(ops_token))
            .await
            .unwrap();
    let as_scheduler = Clients::connect_with(
        &server.address,
        &ConnectOptions::default().token(scheduler_token),
    )
    .await
    .unwrap();
    let (options, ids) = pool(&as_ops, "rs-holder", 1).await;
    let guard = as_scheduler.claim(options).await.unwrap();
    assert_eq!(guard.claim().holder, "scheduler-eu");
    let held = agent(&as_ops, &ids[0]).await;
    assert_eq!(held.claim.unwrap().holder, "scheduler-eu");
    guard.release().await.unwrap();
    assert!(idle(&as_ops, &ids[0]).await);
}
