//! Claims through the generated client (`DispatchService.ClaimAgent`,
//! `RenewClaim`, `ReleaseClaim`, `ListClaims`, `DeleteAgent`), on both
//! stores: the longest-idle matching agent is claimed once, with a fencing
//! token fleetcare enforces on `FinishWork` and `ReportExhausted`; leases
//! end by release, renewal or expiry; idempotent request ids; cordons
//! skipped; waiting claims woken by the fan-out; deletion and offline
//! expiry. Several replicas (Postgres) at the end.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
use pb::AgentStatus as S;
use pb::TransitionCause as C;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, eventually, manual_clock, reason, status, test_args};

const WAIT: Duration = Duration::from_secs(10);

fn dispatch(app: &TestApp) -> DispatchServiceClient<Channel> {
    DispatchServiceClient::new(app.channel.clone())
}

fn secs(s: f64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s.trunc() as i64,
        nanos: (s.fract() * 1e9) as i32,
    }
}

fn selector(labels: &[(&str, &str)]) -> pb::LabelSelector {
    pb::LabelSelector {
        match_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

fn claim_request(labels: &[(&str, &str)], lease: f64) -> pb::ClaimAgentRequest {
    pb::ClaimAgentRequest {
        selector: Some(selector(labels)),
        slot_type: pb::SlotType::Work as i32,
        lease_duration: Some(secs(lease)),
        wait_timeout: None,
        request_id: String::new(),
    }
}

async fn claim(
    app: &TestApp,
    request: pb::ClaimAgentRequest,
) -> Result<pb::ClaimAgentResponse, tonic::Status> {
    dispatch(app)
        .claim_agent(request)
        .await
        .map(|r| r.into_inner())
}

async fn register(app: &TestApp, agent_id: &str, labels: &[(&str, &str)]) -> pb::Agent {
    app.agents
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            quota_pools: Vec::new(),
            agent_id: agent_id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
        .expect("register")
        .into_inner()
        .agent
        .unwrap()
}

async fn finish(
    app: &TestApp,
    agent_id: &str,
    token: i64,
) -> Result<pb::FinishWorkResponse, tonic::Status> {
    app.agents
        .clone()
        .finish_work(pb::FinishWorkRequest {
            agent_id: agent_id.into(),
            fencing_token: token,
        })
        .await
        .map(|r| r.into_inner())
}

async fn release(app: &TestApp, c: &pb::Claim) -> Result<pb::ReleaseClaimResponse, tonic::Status> {
    dispatch(app)
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: c.claim_id.clone(),
            fencing_token: c.fencing_token,
        })
        .await
        .map(|r| r.into_inner())
}

async fn renew(app: &TestApp, c: &pb::Claim, lease: f64) -> Result<pb::Claim, tonic::Status> {
    dispatch(app)
        .renew_claim(pb::RenewClaimRequest {
            claim_id: c.claim_id.clone(),
            fencing_token: c.fencing_token,
            lease_duration: Some(secs(lease)),
        })
        .await
        .map(|r| r.into_inner().claim.unwrap())
}

fn time(t: &Option<prost_types::Timestamp>) -> (i64, i32) {
    let t = t.as_ref().expect("a time");
    (t.seconds, t.nanos)
}

fn stale(error: &tonic::Status) {
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert_eq!(reason(error), "STALE_FENCING_TOKEN", "{error:?}");
}

#[tokio::test]
async fn a_claim_takes_the_longest_idle_matching_agent_with_its_revision_as_token() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "a-1", &[("team", "x")]).await;
    register(&app, "a-2", &[("team", "x")]).await;
    register(&app, "b-1", &[("team", "y")]).await;

    let first = claim(&app, claim_request(&[("team", "x")], 60.0))
        .await
        .unwrap();
    let c = first.claim.clone().unwrap();
    let t = first.transition.clone().unwrap();
    assert_eq!(c.agent_id, "a-1", "registered first: idle longest");
    assert_eq!(c.holder, "anonymous");
    assert_eq!(c.fencing_token, t.revision);
    assert_eq!(c.slot_type, pb::SlotType::Work as i32);
    assert_eq!(
        (t.from_status, t.to_status),
        (status(S::Idle), status(S::Busy))
    );
    assert_eq!(t.cause, C::Claimed as i32);
    let agent = first.agent.unwrap();
    assert_eq!(agent.status, status(S::Busy));
    assert_eq!(
        agent.claim.as_ref().map(|c| c.claim_id.clone()),
        Some(c.claim_id.clone())
    );
    let lease = time(&c.lease_expires_at).0 - time(&c.claimed_at).0;
    assert!((59..=60).contains(&lease), "{lease}");

    let mut on_call = claim_request(&[("team", "x")], 60.0);
    on_call.slot_type = pb::SlotType::OnCall as i32;
    let second = claim(&app, on_call).await.unwrap();
    assert_eq!(second.claim.as_ref().unwrap().agent_id, "a-2");
    assert_eq!(second.agent.unwrap().status, status(S::OnCall));
    assert!(second.claim.unwrap().fencing_token > c.fencing_token);

    let none = claim(&app, claim_request(&[("team", "x")], 60.0))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted);
    assert_eq!(reason(&none), "NO_AGENT_AVAILABLE");
    assert_eq!(
        none.message(),
        "0 of 2 matching agents idle: 1 BUSY, 1 ON_CALL"
    );
    let nobody = claim(&app, claim_request(&[("team", "z")], 60.0))
        .await
        .unwrap_err();
    assert_eq!(
        nobody.message(),
        "0 of 0 matching agents idle: no agent matches the selector"
    );
    // An empty selector matches every agent: b-1 is the one left.
    let any = claim(&app, claim_request(&[], 60.0)).await.unwrap();
    assert_eq!(any.claim.unwrap().agent_id, "b-1");
    app.stop().await;
}

#[tokio::test]
async fn fleetcare_enforces_the_fencing_token_and_a_claim_ends_with_its_work() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "f-1", &[]).await;
    let c = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();

    for token in [0, c.fencing_token - 1, c.fencing_token + 1] {
        let refused = finish(&app, "f-1", token).await.unwrap_err();
        stale(&refused);
        assert_eq!(
            app.get("f-1").await.status,
            status(S::Busy),
            "changed nothing"
        );
    }
    let missing = finish(&app, "f-1", 0).await.unwrap_err();
    assert!(
        missing
            .message()
            .contains("the claim's fencing token is required"),
        "{}",
        missing.message()
    );
    let done = finish(&app, "f-1", c.fencing_token).await.unwrap();
    assert_eq!(done.agent.as_ref().unwrap().status, status(S::Idle));
    assert!(
        done.agent.unwrap().claim.is_none(),
        "the claim ended with its work"
    );
    // The claim is over: its token no longer renews, releases or finishes.
    stale(&renew(&app, &c, 60.0).await.unwrap_err());
    stale(&release(&app, &c).await.unwrap_err());
    app.start_work("f-1").await.unwrap();
    stale(&finish(&app, "f-1", c.fencing_token).await.unwrap_err());
    app.finish_work("f-1")
        .await
        .expect("an unclaimed agent finishes without a token");

    // ReportExhausted carries the token, and ends the claim.
    let c = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    let report = |token| pb::ReportExhaustedRequest {
        agent_id: "f-1".into(),
        reason: pb::ExhaustionReason::RateLimit as i32,
        fencing_token: token,
        ..Default::default()
    };
    stale(
        &app.agents
            .clone()
            .report_exhausted(report(0))
            .await
            .unwrap_err(),
    );
    let parked = app
        .agents
        .clone()
        .report_exhausted(report(c.fencing_token))
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert_eq!(parked.status, status(S::Exhausted));
    assert!(parked.claim.is_none());

    // MarkOffline ends a claim without a token.
    dispatch(&app)
        .resume_agent(pb::ResumeAgentRequest {
            agent_id: "f-1".into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let c = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    let offline = app
        .agents
        .clone()
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "f-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert!(offline.claim.is_none());
    stale(&renew(&app, &c, 60.0).await.unwrap_err());

    let unknown = dispatch(&app)
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: "no-such-claim".into(),
            fencing_token: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    // A claim id names its agent (`<agent>/<unique>`), and the agent's row
    // decides; one never made, on an agent that exists or on none, is
    // NOT_FOUND naming the claim, and the ended claim above stays stale.
    assert!(c.claim_id.starts_with("f-1/"), "{}", c.claim_id);
    for forged in ["f-1/00000000000000000000000000000000", "ghost/1"] {
        let unknown = dispatch(&app)
            .renew_claim(pb::RenewClaimRequest {
                claim_id: forged.into(),
                fencing_token: c.fencing_token,
                lease_duration: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound, "{forged}: {unknown:?}");
        assert!(unknown.message().contains("claim"), "{unknown:?}");
    }
    assert_eq!(
        app.get("f-1").await.revision,
        offline.revision,
        "refusals change nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn renew_extends_release_frees_and_list_claims_pages_active_claims() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["l-1", "l-2", "l-3"] {
        register(&app, id, &[]).await;
    }
    let mut claims = Vec::new();
    for _ in 0..3 {
        claims.push(
            claim(&app, claim_request(&[], 30.0))
                .await
                .unwrap()
                .claim
                .unwrap(),
        );
    }
    let renewed = renew(&app, &claims[0], 600.0).await.unwrap();
    assert!(time(&renewed.lease_expires_at) > time(&claims[0].lease_expires_at));
    // A shorter renewal never cuts the lease.
    let again = renew(&app, &claims[0], 5.0).await.unwrap();
    assert_eq!(
        time(&again.lease_expires_at),
        time(&renewed.lease_expires_at)
    );

    let released = release(&app, &claims[1]).await.unwrap();
    assert_eq!(released.agent.unwrap().status, status(S::Idle));
    let t = released.transition.unwrap();
    assert_eq!(
        (t.cause, t.to_status),
        (C::ClaimReleased as i32, status(S::Idle))
    );

    let page = dispatch(&app)
        .list_claims(pb::ListClaimsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.claims.len(), 1);
    assert_eq!(page.claims[0].agent_id, "l-1");
    assert_eq!(
        time(&page.claims[0].lease_expires_at),
        time(&renewed.lease_expires_at)
    );
    let rest = dispatch(&app)
        .list_claims(pb::ListClaimsRequest {
            page_size: 10,
            page_token: page.next_page_token,
            holder: "anonymous".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = rest.claims.iter().map(|c| c.agent_id.as_str()).collect();
    assert_eq!(ids, ["l-3"], "l-2 was released");
    assert!(rest.next_page_token.is_empty());
    let others = dispatch(&app)
        .list_claims(pb::ListClaimsRequest {
            holder: "someone-else".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(others.claims.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_same_claim_never_a_second() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["i-1", "i-2", "i-3"] {
        register(&app, id, &[]).await;
    }
    let mut request = claim_request(&[], 60.0);
    request.request_id = "job-42".into();
    // Sent twice at once, as a retry after a cut connection may be.
    let second_channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    let mut second_client = DispatchServiceClient::new(second_channel);
    let (a, b) = tokio::join!(
        claim(&app, request.clone()),
        second_client.claim_agent(request.clone())
    );
    let (a, b) = (a.unwrap(), b.unwrap().into_inner());
    assert_eq!(a.claim, b.claim, "one claim");
    assert_eq!(
        [&a, &b].iter().filter(|r| r.transition.is_some()).count(),
        1,
        "one CLAIMED transition"
    );
    let c = a.claim.unwrap();
    assert_eq!(c.request_id, "job-42");
    // Later, even after the claim ended, the id still names it.
    release(&app, &c).await.unwrap();
    let replay = claim(&app, request).await.unwrap();
    assert_eq!(replay.claim.as_ref().unwrap().claim_id, c.claim_id);
    assert!(replay.transition.is_none());
    assert_eq!(
        replay.agent.unwrap().status,
        status(S::Idle),
        "not claimed again"
    );
    let claimed: usize = {
        let mut n = 0;
        for id in ["i-1", "i-2", "i-3"] {
            n += app
                .history(id)
                .await
                .iter()
                .filter(|t| t.cause == C::Claimed as i32)
                .count();
        }
        n
    };
    assert_eq!(claimed, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_expired_lease_frees_the_agent_and_its_token_is_refused_after_a_new_claim() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    let hand = manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    register(&app, "e-1", &[]).await;
    let old = claim(&app, claim_request(&[], 2.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    hand.advance(chrono::Duration::seconds(1));
    stale(
        &finish(&app, "e-1", old.fencing_token + 1)
            .await
            .unwrap_err(),
    );
    hand.advance(chrono::Duration::seconds(2));
    // Expired at its instant, even before the sweeper frees the agent.
    let expired = eventually(WAIT, "the sweeper frees the agent", || async {
        let h = app.history("e-1").await;
        h.last()
            .filter(|t| t.cause == C::ClaimExpired as i32)
            .cloned()
    })
    .await;
    assert_eq!(
        (expired.from_status, expired.to_status),
        (status(S::Busy), status(S::Idle))
    );
    assert_eq!(expired.actor, "sweeper");
    let new = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    assert_eq!(new.agent_id, "e-1");
    assert!(new.fencing_token > old.fencing_token);
    stale(&finish(&app, "e-1", old.fencing_token).await.unwrap_err());
    stale(&renew(&app, &old, 60.0).await.unwrap_err());
    finish(&app, "e-1", new.fencing_token).await.unwrap();
    let expirations = app
        .history("e-1")
        .await
        .iter()
        .filter(|t| t.cause == C::ClaimExpired as i32)
        .count();
    assert_eq!(expirations, 1);
    app.stop().await;
}

#[tokio::test]
async fn cordoned_agents_are_never_claimed_and_are_counted() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "c-1", &[("pool", "gpu")]).await;
    register(&app, "c-2", &[("pool", "gpu")]).await;
    dispatch(&app)
        .cordon_agent(pb::CordonAgentRequest {
            agent_id: "c-1".into(),
            reason: "disk".into(),
        })
        .await
        .unwrap();
    let c = claim(&app, claim_request(&[("pool", "gpu")], 60.0))
        .await
        .unwrap();
    assert_eq!(
        c.claim.unwrap().agent_id,
        "c-2",
        "c-1 is idle longest but cordoned"
    );
    let none = claim(&app, claim_request(&[("pool", "gpu")], 60.0))
        .await
        .unwrap_err();
    assert_eq!(
        none.message(),
        "0 of 2 matching agents idle: 1 BUSY, 1 cordoned"
    );
    dispatch(&app)
        .uncordon_agent(pb::UncordonAgentRequest {
            agent_id: "c-1".into(),
        })
        .await
        .unwrap();
    let c = claim(&app, claim_request(&[("pool", "gpu")], 60.0))
        .await
        .unwrap();
    assert_eq!(c.claim.unwrap().agent_id, "c-1");
    app.stop().await;
}

#[tokio::test]
async fn selectors_follow_kubernetes_semantics_and_bad_requests_name_the_field() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "s-1", &[("zone", "eu"), ("gpu", "a100")]).await;
    register(&app, "s-2", &[("zone", "us")]).await;
    register(&app, "s-3", &[("zone", "eu"), ("spot", "yes")]).await;
    let expr =
        |key: &str, op: pb::SelectorOperator, values: &[&str]| pb::LabelSelectorRequirement {
            key: key.into(),
            operator: op as i32,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
    let with = |exprs: Vec<pb::LabelSelectorRequirement>| pb::ClaimAgentRequest {
        selector: Some(pb::LabelSelector {
            match_labels: Default::default(),
            match_expressions: exprs,
        }),
        ..claim_request(&[], 60.0)
    };
    use pb::SelectorOperator as Op;
    let got = claim(
        &app,
        with(vec![
            expr("zone", Op::In, &["eu"]),
            expr("spot", Op::DoesNotExist, &[]),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(got.claim.unwrap().agent_id, "s-1");
    let got = claim(
        &app,
        with(vec![
            expr("gpu", Op::NotIn, &["a100"]),
            expr("zone", Op::Exists, &[]),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(
        got.claim.unwrap().agent_id,
        "s-2",
        "NOT_IN matches agents without the key"
    );

    let refusals: Vec<(pb::ClaimAgentRequest, &str)> = vec![
        (
            with(vec![expr("", Op::Exists, &[])]),
            "selector.match_expressions[0].key",
        ),
        (
            with(vec![expr("zone", Op::Unspecified, &[])]),
            "selector.match_expressions[0].operator",
        ),
        (
            with(vec![expr("zone", Op::Exists, &["eu"])]),
            "selector.match_expressions[0].values",
        ),
        (
            with(vec![expr("zone", Op::In, &[])]),
            "selector.match_expressions[0].values",
        ),
        (
            pb::ClaimAgentRequest {
                lease_duration: Some(secs(0.5)),
                ..claim_request(&[], 1.0)
            },
            "lease_duration",
        ),
        (
            pb::ClaimAgentRequest {
                lease_duration: Some(secs(7200.0)),
                ..claim_request(&[], 1.0)
            },
            "lease_duration",
        ),
        (
            pb::ClaimAgentRequest {
                lease_duration: None,
                ..claim_request(&[], 1.0)
            },
            "lease_duration",
        ),
        (
            pb::ClaimAgentRequest {
                request_id: "x".repeat(129),
                ..claim_request(&[], 60.0)
            },
            "request_id",
        ),
        (
            pb::ClaimAgentRequest {
                slot_type: 0,
                ..claim_request(&[], 60.0)
            },
            "slot_type",
        ),
    ];
    let refused_count = refusals.len() as f64;
    for (request, field) in refusals {
        let refused = claim(&app, request).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{field}: {refused:?}"
        );
        assert!(
            refused.message().starts_with(field),
            "{field}: {}",
            refused.message()
        );
    }
    assert_eq!(
        app.get("s-3").await.status,
        status(S::Idle),
        "no refusal claimed anything"
    );
    assert_eq!(
        metric_with(&app, "fleetcare_claims_refused_total", "INVALID_ARGUMENT").await,
        Some(refused_count),
        "each refusal counted by its reason"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_waiting_claim_is_woken_by_a_finish_and_waiters_are_served_in_arrival_order() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "w-1", &[]).await;
    let held = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    let waiting = |id: &str| pb::ClaimAgentRequest {
        wait_timeout: Some(secs(20.0)),
        request_id: id.into(),
        ..claim_request(&[], 60.0)
    };
    let first = tokio::spawn({
        let mut client = dispatch(&app);
        let request = waiting("first");
        async move { client.claim_agent(request).await }
    });
    eventually(WAIT, "the first claim waits", || async {
        metric(&app, "fleetcare_claims_waiting")
            .await
            .filter(|n| *n == 1.0)
    })
    .await;
    let second = tokio::spawn({
        let mut client = dispatch(&app);
        let request = waiting("second");
        async move { client.claim_agent(request).await }
    });
    eventually(WAIT, "both claims wait", || async {
        metric(&app, "fleetcare_claims_waiting")
            .await
            .filter(|n| *n == 2.0)
    })
    .await;
    finish(&app, "w-1", held.fencing_token).await.unwrap();
    let got = first
        .await
        .unwrap()
        .expect("the first waiter gets the agent")
        .into_inner();
    assert_eq!(got.claim.as_ref().unwrap().agent_id, "w-1");
    assert!(!second.is_finished(), "the second waits on");
    release(&app, got.claim.as_ref().unwrap()).await.unwrap();
    let got = second.await.unwrap().expect("then the second").into_inner();
    assert_eq!(got.claim.unwrap().agent_id, "w-1");

    // A wait that runs out is NO_AGENT_AVAILABLE, saying so.
    let timed_out = claim(
        &app,
        pb::ClaimAgentRequest {
            wait_timeout: Some(secs(0.3)),
            ..claim_request(&[], 60.0)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&timed_out), "NO_AGENT_AVAILABLE");
    assert!(
        timed_out.message().contains("waited"),
        "{}",
        timed_out.message()
    );
    assert_eq!(metric(&app, "fleetcare_claims_waiting").await, Some(0.0));
    let refused = metric_with(&app, "fleetcare_claims_refused_total", "NO_AGENT_AVAILABLE").await;
    assert!(refused >= Some(1.0), "{refused:?}");
    app.stop().await;
}

#[tokio::test]
async fn delete_is_refused_while_claimed_and_ends_the_agent_on_the_watch() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "d-1", &[("team", "x")]).await;
    let c = claim(&app, claim_request(&[], 60.0))
        .await
        .unwrap()
        .claim
        .unwrap();
    let delete = || async {
        dispatch(&app)
            .delete_agent(pb::DeleteAgentRequest {
                agent_id: "d-1".into(),
            })
            .await
    };
    let held = delete().await.unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition);
    assert_eq!(reason(&held), "CLAIM_HELD");
    assert!(
        held.message().contains("release the claim first"),
        "{}",
        held.message()
    );
    release(&app, &c).await.unwrap();

    let mut watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let t = delete().await.unwrap().into_inner().transition.unwrap();
    assert_eq!(t.cause, C::Deleted as i32);
    assert_eq!(
        (t.from_status, t.to_status),
        (status(S::Idle), status(S::Idle))
    );
    let seen = next_transition(&mut watch).await;
    assert_eq!((seen.revision, seen.cause), (t.revision, C::Deleted as i32));
    let gone = app
        .agents
        .clone()
        .get_agent(pb::GetAgentRequest {
            agent_id: "d-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let beat = app
        .agents
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "d-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        beat.code(),
        Code::NotFound,
        "a deleted agent's heartbeat is not acknowledged"
    );
    assert_eq!(delete().await.unwrap_err().code(), Code::NotFound);
    // Registered again, it starts afresh.
    let again = register(&app, "d-1", &[]).await;
    assert_eq!(again.status, status(S::Idle));
    assert!(again.labels.is_empty());
    let last = app.history("d-1").await.pop().unwrap();
    assert_eq!((last.cause, last.from_status), (C::Registered as i32, 0));
    app.stop().await;
}

#[tokio::test]
async fn agents_offline_past_retention_are_deleted_once_by_the_sweeper() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.offline_agent_retention = Duration::from_secs(3600);
    let hand = manual_clock(&mut args);
    let app = TestApp::spawn_with(args).await;
    register(&app, "o-1", &[]).await;
    register(&app, "o-2", &[]).await;
    app.agents
        .clone()
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "o-1".into(),
        })
        .await
        .unwrap();
    // o-2 goes silent at the same time: the sweeper marks it OFFLINE now,
    // so it has been OFFLINE for less than the retention.
    hand.advance(chrono::Duration::minutes(61));
    let expired = eventually(WAIT, "the sweeper deletes o-1", || async {
        app.history("o-1")
            .await
            .into_iter()
            .find(|t| t.cause == C::Expired as i32)
    })
    .await;
    assert_eq!(
        (expired.from_status, expired.to_status),
        (status(S::Offline), status(S::Offline))
    );
    assert_eq!(expired.actor, "sweeper");
    let gone = app
        .agents
        .clone()
        .get_agent(pb::GetAgentRequest {
            agent_id: "o-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let kept = app.get("o-2").await;
    assert_eq!(
        kept.status,
        status(S::Offline),
        "offline, not for long enough"
    );
    app.stop().await;
}

async fn next_transition(
    stream: &mut tonic::Streaming<pb::WatchTransitionsResponse>,
) -> pb::Transition {
    use pb::watch_transitions_response::Event;
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event within the wait")
            .expect("stream ok")
            .expect("stream still open")
            .event;
        if let Some(Event::Transition(t)) = event {
            return t;
        }
    }
}

/// A sample of the server's /metrics without labels.
async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    Some(crate::metrics::scrape(app).await.value(name, &[]))
}

/// A sample with `reason="..."`.
async fn metric_with(app: &TestApp, name: &str, reason: &str) -> Option<f64> {
    Some(
        crate::metrics::scrape(app)
            .await
            .value(name, &[("reason", reason)]),
    )
}

postgres_only! {
    /// Two replicas, 64 claimers, 10 idle agents: exactly 10 claims, each
    /// agent once; the rest are NO_AGENT_AVAILABLE.
    #[tokio::test]
    async fn sixty_four_claimers_on_two_replicas_claim_ten_agents_once_each() {
        let db = TestDb::postgres();
        let a = TestApp::spawn(&db).await;
        let b = TestApp::spawn(&db).await;
        for i in 0..10 {
            register(&a, &format!("r-{i}"), &[("pool", "p")]).await;
        }
        let mut calls = Vec::new();
        for n in 0..64 {
            let mut client = dispatch(if n % 2 == 0 { &a } else { &b });
            calls.push(tokio::spawn(async move {
                client.claim_agent(claim_request(&[("pool", "p")], 60.0)).await
            }));
        }
        let mut won = std::collections::BTreeSet::new();
        let mut refused = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(r) => assert!(won.insert(r.into_inner().claim.unwrap().agent_id), "an agent claimed twice"),
                Err(e) => {
                    assert_eq!(reason(&e), "NO_AGENT_AVAILABLE", "{e:?}");
                    refused += 1;
                }
            }
        }
        assert_eq!((won.len(), refused), (10, 54));
        a.stop().await;
        b.stop().await;
    }

    /// A claim waiting on one replica is woken by a FinishWork on the other.
    #[tokio::test]
    async fn a_claim_waiting_on_one_replica_is_woken_by_a_finish_on_the_other() {
        let db = TestDb::postgres();
        let a = TestApp::spawn(&db).await;
        let b = TestApp::spawn(&db).await;
        register(&a, "x-1", &[]).await;
        let held = claim(&a, claim_request(&[], 60.0)).await.unwrap().claim.unwrap();
        let waiter = tokio::spawn({
            let mut client = dispatch(&b);
            async move {
                client
                    .claim_agent(pb::ClaimAgentRequest {
                        wait_timeout: Some(secs(20.0)),
                        ..claim_request(&[], 60.0)
                    })
                    .await
            }
        });
        eventually(WAIT, "the claim waits on b", || async {
            metric(&b, "fleetcare_claims_waiting").await.filter(|n| *n == 1.0)
        })
        .await;
        finish(&a, "x-1", held.fencing_token).await.unwrap();
        let got = waiter.await.unwrap().expect("woken and claimed").into_inner();
        let c = got.claim.unwrap();
        assert_eq!(c.agent_id, "x-1");
        assert!(c.fencing_token > held.fencing_token);
        a.stop().await;
        b.stop().await;
    }

    /// Two replicas sweeping one expired lease free it once.
    #[tokio::test]
    async fn an_expired_lease_is_freed_once_with_two_replicas_sweeping() {
        let db = TestDb::postgres();
        let mut args = test_args(&db.url);
        let hand = manual_clock(&mut args);
        let a = TestApp::spawn_with(args.clone()).await;
        let b = TestApp::spawn_with(args).await;
        for i in 0..5 {
            register(&a, &format!("x-{i}"), &[]).await;
        }
        for _ in 0..5 {
            claim(&a, claim_request(&[], 1.0)).await.unwrap();
        }
        hand.advance(chrono::Duration::seconds(2));
        for i in 0..5 {
            let id = format!("x-{i}");
            eventually(WAIT, "freed", || async {
                (b.get(&id).await.status == status(S::Idle)).then_some(())
            })
            .await;
        }
        // Both sweepers have had rounds since; still one expiry each.
        let before = metric(&a, "fleetcare_sweeper_runs_total").await.unwrap();
        eventually(WAIT, "more sweeps", || async {
            metric(&a, "fleetcare_sweeper_runs_total").await.filter(|n| *n >= before + 3.0)
        })
        .await;
        for i in 0..5 {
            let h = a.history(&format!("x-{i}")).await;
            let expired = h.iter().filter(|t| t.cause == C::ClaimExpired as i32).count();
            assert_eq!(expired, 1, "x-{i}: {h:?}");
        }
        a.stop().await;
        b.stop().await;
    }
}

/// A `--max-claim-lease` under the shortest lease stops the server at start,
/// naming the flag.
#[tokio::test]
async fn a_max_claim_lease_under_a_second_stops_the_server() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.max_claim_lease = Duration::from_millis(500);
    let refused = fleetcare::startup::Application::build(
        args,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    match refused {
        Err(fleetcare::error::Error::InvalidArgument(message)) => {
            assert_eq!(message, "--max-claim-lease must be at least 1 s")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("the server must not start"),
    }
}

/// A proxy whose answers to the client can be swallowed: the request gets
/// through, the response never comes back, as on a connection cut after the
/// server committed.
struct SwallowingProxy {
    addr: std::net::SocketAddr,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SwallowingProxy {
    async fn start(upstream: std::net::SocketAddr) -> SwallowingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = swallow.clone();
        let task = tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if !flag.load(Ordering::SeqCst) && client_write.write_all(&buf[..n]).await.is_err()
                {
                    break;
                }
            }
            up.abort();
        });
        SwallowingProxy {
            addr,
            swallow,
            task,
        }
    }
}

/// The claim commits but its answer is lost with the connection; the
/// scheduler retries with the same `request_id` and gets that claim, and the
/// agent was claimed once.
#[tokio::test]
async fn a_request_id_retried_after_a_cut_connection_gives_one_claim() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register(&app, "cut-1", &[]).await;
    register(&app, "cut-2", &[]).await;
    let proxy = SwallowingProxy::start(app.addr).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut through_proxy = DispatchServiceClient::new(channel);
    through_proxy
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .expect("the connection works");
    proxy
        .swallow
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut request = claim_request(&[], 60.0);
    request.request_id = "after-the-cut".into();
    let lost = tokio::spawn({
        let request = request.clone();
        async move { through_proxy.claim_agent(request).await }
    });
    let claimed = eventually(WAIT, "the claim commits", || async {
        let page = dispatch(&app)
            .list_claims(pb::ListClaimsRequest::default())
            .await
            .unwrap()
            .into_inner();
        page.claims.into_iter().next()
    })
    .await;
    // The connection is cut before any answer came back.
    proxy.task.abort();
    assert!(lost.await.unwrap().is_err(), "the first answer was lost");
    let retried = claim(&app, request).await.unwrap();
    assert_eq!(retried.claim.as_ref(), Some(&claimed));
    assert!(retried.transition.is_none(), "no second CLAIMED transition");
    let mut made = 0;
    for id in ["cut-1", "cut-2"] {
        made += app
            .history(id)
            .await
            .iter()
            .filter(|t| t.cause == C::Claimed as i32)
            .count();
    }
    assert_eq!(made, 1);
    app.stop().await;
}
