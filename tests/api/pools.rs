//! Quota pools through the generated clients: one member's `ReportExhausted`
//! parks the pool and every IDLE member in its commit (each transition naming
//! the pool, on the watch), a registration into a parked pool is parked at
//! once, claims never take a member; the release wakes a canary first, the
//! others after its work slot and spread, and a canary that hits the limit
//! again parks the pool again with nobody else woken; with two replicas every
//! member is released exactly once. `QuotaService` shows pools, parks and
//! releases them, and refuses what it must. Who may call it: `auth.rs`.

use std::time::Duration;

use chrono::Utc;
use fleetcare::proto::v1 as pb;
use fleetcare::proto::v1::dispatch_service_client::DispatchServiceClient;
use fleetcare::proto::v1::quota_service_client::QuotaServiceClient;
use pb::AgentStatus as S;
use pb::TransitionCause as C;
use tonic::Code;
use tonic::transport::Channel;

use crate::dispatch::next_transition;
use crate::helpers::{TestApp, TestDb, eventually, manual_clock, status, test_args};

const WAIT: Duration = Duration::from_secs(20);

pub fn quota(app: &TestApp) -> QuotaServiceClient<Channel> {
    QuotaServiceClient::new(app.channel.clone())
}

/// One pool as `GetQuotaPool` shows it.
async fn pool_of(app: &TestApp, name: &str) -> pb::QuotaPool {
    quota(app)
        .get_quota_pool(pb::GetQuotaPoolRequest { pool: name.into() })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap()
}

async fn register_in(app: &TestApp, agent_id: &str, pools: &[&str]) -> pb::Agent {
    app.agents
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            agent_id: agent_id.into(),
            labels: [("team".to_owned(), "pools".to_owned())].into(),
            quota_pools: pools.iter().map(|p| p.to_string()).collect(),
        })
        .await
        .expect("register")
        .into_inner()
        .agent
        .unwrap()
}

fn report(
    agent_id: &str,
    pool: &str,
    window: pb::QuotaWindow,
    recovery_at: chrono::DateTime<Utc>,
) -> pb::ReportExhaustedRequest {
    pb::ReportExhaustedRequest {
        agent_id: agent_id.into(),
        reason: pb::ExhaustionReason::RateLimit as i32,
        recovery_at: Some(fleetcare::proto::timestamp(recovery_at)),
        quota_pool: pool.into(),
        window: window as i32,
        ..Default::default()
    }
}

async fn report_exhausted(
    app: &TestApp,
    request: pb::ReportExhaustedRequest,
) -> Result<pb::ReportExhaustedResponse, tonic::Status> {
    app.agents
        .clone()
        .report_exhausted(request)
        .await
        .map(|r| r.into_inner())
}

/// Whether every one of `ids` is in `wanted`.
async fn all_are(app: &TestApp, ids: &[&str], wanted: S) -> bool {
    statuses(app, ids)
        .await
        .iter()
        .all(|s| *s == status(wanted))
}

async fn statuses(app: &TestApp, ids: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for id in ids {
        out.push(app.get(id).await.status);
    }
    out
}

#[tokio::test]
async fn a_report_parks_every_idle_member_in_its_commit_and_claims_skip_the_pool() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["p-1", "p-2", "p-3"] {
        register_in(&app, id, &["anthropic/acct-42"]).await;
    }
    register_in(&app, "q-1", &["anthropic/acct-7"]).await;
    app.start_work("p-3").await.unwrap();
    let mut watch = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let until = Utc::now() + chrono::Duration::hours(2);
    let response = report_exhausted(
        &app,
        report("p-1", "anthropic/acct-42", pb::QuotaWindow::FiveHour, until),
    )
    .await
    .unwrap();
    let t = response.transition.unwrap();
    assert_eq!(t.cause, C::Exhausted as i32);
    assert_eq!(t.quota_pool, "anthropic/acct-42");
    assert_eq!(response.agent.unwrap().held_by_pools, ["anthropic/acct-42"]);
    // The watch sees the report and the idle sibling, consecutive, each
    // naming the pool; the busy one keeps its slot.
    let first = next_transition(&mut watch).await;
    let second = next_transition(&mut watch).await;
    assert_eq!(
        (first.agent_id.as_str(), first.cause),
        ("p-1", C::Exhausted as i32)
    );
    assert_eq!(
        (second.agent_id.as_str(), second.cause, second.revision),
        ("p-2", C::PoolExhausted as i32, first.revision + 1)
    );
    assert_eq!(second.quota_pool, "anthropic/acct-42");
    assert_eq!(
        statuses(&app, &["p-1", "p-2", "p-3", "q-1"]).await,
        [
            status(S::Exhausted),
            status(S::Exhausted),
            status(S::Busy),
            status(S::Idle)
        ]
    );

    // Claims never take a member of the parked pool: only q-1 is there.
    let mut dispatch = DispatchServiceClient::new(app.channel.clone());
    let claim = |d: &mut DispatchServiceClient<Channel>| {
        let mut d = d.clone();
        async move {
            d.claim_agent(pb::ClaimAgentRequest {
                selector: Some(pb::LabelSelector {
                    match_labels: [("team".to_owned(), "pools".to_owned())].into(),
                    match_expressions: Vec::new(),
                }),
                slot_type: pb::SlotType::Work as i32,
                lease_duration: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                wait_timeout: None,
                request_id: String::new(),
            })
            .await
        }
    };
    let taken = claim(&mut dispatch).await.unwrap().into_inner();
    assert_eq!(taken.claim.unwrap().agent_id, "q-1");
    let none = claim(&mut dispatch).await.unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted, "{none:?}");

    // The busy member lands parked when its slot ends; a new member is
    // parked as it registers.
    let finished = app.finish_work("p-3").await.unwrap();
    let t = finished.transition.unwrap();
    assert_eq!(
        (t.to_status, t.cause),
        (status(S::Exhausted), C::PoolExhausted as i32)
    );
    let joined = register_in(&app, "p-4", &["anthropic/acct-42"]).await;
    assert_eq!(joined.status, status(S::Exhausted));
    assert_eq!(joined.held_by_pools, ["anthropic/acct-42"]);

    // The operator's view: parked, its window, its members.
    let pool = quota(&app)
        .get_quota_pool(pb::GetQuotaPoolRequest {
            pool: "anthropic/acct-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let p = pool.pool.unwrap();
    assert_eq!(p.phase, pb::QuotaPoolPhase::Parked as i32);
    assert_eq!(p.held, 4);
    assert_eq!(p.windows.len(), 1);
    assert_eq!(p.windows[0].window, pb::QuotaWindow::FiveHour as i32);
    assert_eq!(p.windows[0].reported_by, "p-1");
    assert_eq!(pool.held_agent_ids, ["p-1", "p-2", "p-3", "p-4"]);
    let listed = quota(&app)
        .list_quota_pools(pb::ListQuotaPoolsRequest { parked_only: true })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["anthropic/acct-42"]);
}

#[tokio::test]
async fn every_refusal_names_what_was_wrong_and_changes_nothing() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    register_in(&app, "r-1", &["acct-1", "acct-2"]).await;
    let until = Utc::now() + chrono::Duration::hours(1);

    let not_member = report_exhausted(
        &app,
        report("r-1", "acct-9", pb::QuotaWindow::Unspecified, until),
    )
    .await
    .unwrap_err();
    assert_eq!(not_member.code(), Code::FailedPrecondition);
    assert!(
        not_member.message().contains("\"acct-9\"")
            && not_member.message().contains("\"acct-1\", \"acct-2\""),
        "{not_member:?}"
    );
    let malformed = report_exhausted(
        &app,
        report("r-1", "acct 1", pb::QuotaWindow::Unspecified, until),
    )
    .await
    .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().contains("quota_pool"), "{malformed:?}");
    let mut bad_window = report("r-1", "acct-1", pb::QuotaWindow::Unspecified, until);
    bad_window.window = 99;
    let refused = report_exhausted(&app, bad_window).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("window"), "{refused:?}");
    assert_eq!(app.get("r-1").await.status, status(S::Idle));

    let mut q = quota(&app);
    let unknown = q
        .park_pool(pb::ParkPoolRequest {
            pool: "nobody-here".into(),
            until: Some(fleetcare::proto::timestamp(until)),
            window: pb::QuotaWindow::Other as i32,
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("nobody-here"), "{unknown:?}");
    let missing = q
        .park_pool(pb::ParkPoolRequest {
            pool: "acct-1".into(),
            until: None,
            window: 0,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("until"), "{missing:?}");
    let far = q
        .park_pool(pb::ParkPoolRequest {
            pool: "acct-1".into(),
            until: Some(fleetcare::proto::timestamp(
                Utc::now() + chrono::Duration::days(400),
            )),
            window: 0,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(far.code(), Code::InvalidArgument, "{far:?}");
    let unknown_get = q
        .get_quota_pool(pb::GetQuotaPoolRequest {
            pool: "nobody-here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_get.code(), Code::NotFound);
    let unknown_release = q
        .release_pool(pb::ReleasePoolRequest {
            pool: "nobody-here".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_release.code(), Code::NotFound);
    assert_eq!(app.get("r-1").await.status, status(S::Idle));
}

#[tokio::test]
async fn the_release_wakes_a_canary_then_the_rest_and_a_second_limit_parks_again() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    let clock = manual_clock(&mut args);
    args.pool_canary_timeout = Duration::from_secs(60);
    args.pool_release_spread = Duration::from_secs(30);
    args.pool_release_rate = 100;
    // The clock jumps minutes: nobody should go silent meanwhile.
    args.heartbeat_timeout = Duration::from_secs(3600);
    let app = TestApp::spawn_with(args).await;
    let ids = ["c-1", "c-2", "c-3", "c-4"];
    for id in ids {
        register_in(&app, id, &["acct"]).await;
    }
    let now = clock.now();
    report_exhausted(
        &app,
        report(
            "c-1",
            "",
            pb::QuotaWindow::Requests,
            now + chrono::Duration::seconds(60),
        ),
    )
    .await
    .unwrap();
    assert!(all_are(&app, &ids, S::Exhausted).await);

    // The window lifts: the canary (parked longest, then by id) goes alone.
    clock.advance(chrono::Duration::seconds(61));
    eventually(WAIT, "the canary released", || async {
        (app.get("c-1").await.status == status(S::Idle)).then_some(())
    })
    .await;
    let canary_release = app.history("c-1").await.pop().unwrap();
    assert_eq!(canary_release.cause, C::PoolReleased as i32);
    assert_eq!(canary_release.quota_pool, "acct");
    // Nobody else before the canary's work slot (the timeout is a minute away).
    let others = &ids[1..];
    let pool = pool_of(&app, "acct").await;
    assert_eq!(pool.phase, pb::QuotaPoolPhase::Releasing as i32);
    assert_eq!(pool.canary_agent_id, "c-1");
    assert!(all_are(&app, others, S::Exhausted).await);

    // The canary hits the limit again: parked again, nobody else woke.
    let now = clock.now();
    report_exhausted(
        &app,
        report(
            "c-1",
            "",
            pb::QuotaWindow::Requests,
            now + chrono::Duration::seconds(120),
        ),
    )
    .await
    .unwrap();
    clock.advance(chrono::Duration::seconds(90));
    // Past the first canary's timeout: still nobody released (parked again).
    let parked = pool_of(&app, "acct").await;
    assert_eq!(parked.phase, pb::QuotaPoolPhase::Parked as i32);
    assert!(all_are(&app, &ids, S::Exhausted).await);

    // It lifts again: a canary, whose completed work slot lets the rest go
    // over the spread.
    clock.advance(chrono::Duration::seconds(31));
    let canary = eventually(WAIT, "a canary released", || async {
        for id in ids {
            if app.get(id).await.status == status(S::Idle) {
                return Some(id);
            }
        }
        None
    })
    .await;
    app.start_work(canary).await.unwrap();
    app.finish_work(canary).await.unwrap();
    clock.advance(chrono::Duration::seconds(31));
    eventually(WAIT, "every member released", || async {
        all_are(&app, &ids, S::Idle).await.then_some(())
    })
    .await;
    for id in ids {
        let released = app
            .history(id)
            .await
            .iter()
            .filter(|t| t.cause == C::PoolReleased as i32)
            .count();
        let expected = if id == "c-1" { 2 } else { 1 };
        assert_eq!(
            released, expected,
            "{id}: one release per episode it was let go in"
        );
    }
}

#[tokio::test]
async fn an_operator_parks_a_pool_until_a_time_and_releases_it_early() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    let clock = manual_clock(&mut args);
    args.pool_canary_timeout = Duration::ZERO;
    args.pool_release_spread = Duration::ZERO;
    args.pool_release_rate = 1000;
    let app = TestApp::spawn_with(args).await;
    for id in ["o-1", "o-2"] {
        register_in(&app, id, &["key/7"]).await;
    }
    let until = clock.now() + chrono::Duration::hours(5);
    let parked = quota(&app)
        .park_pool(pb::ParkPoolRequest {
            pool: "key/7".into(),
            until: Some(fleetcare::proto::timestamp(until)),
            window: pb::QuotaWindow::Billing as i32,
            reason: "invoice unpaid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parked.members_parked, 2);
    let pool = parked.pool.unwrap();
    assert_eq!(pool.phase, pb::QuotaPoolPhase::Parked as i32);
    assert_eq!(pool.windows[0].source, "OPERATOR");
    assert!(pool.windows[0].hint.contains("invoice unpaid"));
    let agent = app.get("o-1").await;
    assert_eq!(agent.status, status(S::Exhausted));
    assert_eq!(
        agent.exhaustion_reason,
        pb::ExhaustionReason::Billing as i32
    );
    let history = app.history("o-2").await;
    let t = history.last().unwrap();
    assert_eq!(
        (t.cause, t.quota_pool.as_str()),
        (C::PoolExhausted as i32, "key/7")
    );

    quota(&app)
        .release_pool(pb::ReleasePoolRequest {
            pool: "key/7".into(),
            reason: "paid".into(),
        })
        .await
        .unwrap();
    // Released canary first, then the other a step later (no spread, no
    // timeout): the clock moves past it.
    eventually(WAIT, "the canary released", || async {
        (app.get("o-1").await.status == status(S::Idle)).then_some(())
    })
    .await;
    clock.advance(chrono::Duration::seconds(1));
    eventually(WAIT, "both released", || async {
        all_are(&app, &["o-1", "o-2"], S::Idle).await.then_some(())
    })
    .await;
    let open = pool_of(&app, "key/7").await;
    assert_eq!(open.phase, pb::QuotaPoolPhase::Open as i32);
    assert_eq!(open.held, 0);
}

postgres_only! {
    /// How many sweeps `app` has run.
    async fn sweeps(app: &TestApp) -> f64 {
        crate::metrics::scrape(app)
            .await
            .value("fleetcare_sweeper_runs_total", &[])
    }

    /// How many of `ids` are IDLE.
    async fn idle(app: &TestApp, ids: &[String]) -> usize {
        let mut n = 0;
        for id in ids {
            n += usize::from(app.get(id).await.status == status(S::Idle));
        }
        n
    }

    #[tokio::test]
    async fn two_replicas_release_each_member_exactly_once_never_faster_than_the_rate() {
        let db = TestDb::new();
        let mut args = test_args(&db.url);
        let clock = manual_clock(&mut args);
        args.pool_canary_timeout = Duration::ZERO;
        args.pool_release_spread = Duration::ZERO;
        args.pool_release_rate = 5;
        args.heartbeat_timeout = Duration::from_secs(3600);
        let one = TestApp::spawn_with(args.clone()).await;
        let two = TestApp::spawn_with(args).await;
        let ids: Vec<String> = (0..16).map(|i| format!("m-{i:02}")).collect();
        for id in &ids {
            register_in(&one, id, &["shared"]).await;
        }
        let now = clock.now();
        report_exhausted(
            &two,
            report("m-00", "shared", pb::QuotaWindow::Tokens, now + chrono::Duration::seconds(10)),
        )
        .await
        .unwrap();
        clock.advance(chrono::Duration::seconds(11));
        eventually(WAIT, "the canary", || async {
            (idle(&one, &ids).await == 1).then_some(())
        })
        .await;
        // A second later, one second's worth at the rate (5); the manual
        // clock then stands still, and however often both replicas sweep,
        // nobody else is due.
        clock.advance(chrono::Duration::seconds(1));
        eventually(WAIT, "the canary and a second's worth", || async {
            (idle(&one, &ids).await == 6).then_some(())
        })
        .await;
        for app in [&one, &two] {
            let before = sweeps(app).await;
            eventually(WAIT, "more sweeps", || async {
                (sweeps(app).await >= before + 3.0).then_some(())
            })
            .await;
        }
        assert_eq!(idle(&two, &ids).await, 6, "never faster than the rate");
        // Each further second, the rate's worth more.
        for expected in [11, 16] {
            clock.advance(chrono::Duration::seconds(1));
            eventually(WAIT, "a second's worth more", || async {
                (idle(&two, &ids).await == expected).then_some(())
            })
            .await;
        }
        for id in &ids {
            let releases = one
                .history(id)
                .await
                .iter()
                .filter(|t| t.cause == C::PoolReleased as i32)
                .count();
            assert_eq!(releases, 1, "{id} released exactly once");
        }
    }
}

/// A release setting out of its range stops the server at start, naming the flag.
#[tokio::test]
async fn a_release_setting_out_of_range_stops_the_server_naming_the_flag() {
    let db = TestDb::new();
    type Setting = fn(&mut fleetcare::config::ServeArgs);
    let cases: [(&str, Setting); 3] = [
        (
            "--pool-release-rate must be at least 1 agent per second",
            |a| a.pool_release_rate = 0,
        ),
        ("--pool-release-spread must be at most 1h", |a| {
            a.pool_release_spread = Duration::from_secs(7200)
        }),
        ("--pool-canary-timeout must be at most 1h", |a| {
            a.pool_canary_timeout = Duration::from_secs(3601)
        }),
    ];
    for (wanted, set) in cases {
        let mut args = test_args(&db.url);
        set(&mut args);
        let refused = fleetcare::startup::Application::build(
            args,
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        match refused {
            Err(fleetcare::error::Error::InvalidArgument(message)) => assert_eq!(message, wanted),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("the server must not start with {wanted:?}"),
        }
    }
}
