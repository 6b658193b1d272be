//! The Rust client's heartbeat loop (`fleetcare_client::Heartbeater`): it
//! keeps to the interval the server gives, stops promptly when asked (also in
//! the middle of a long wait), retries a dropped connection, ends with
//! NOT_FOUND for an agent nobody registered, and shows an agent coming back
//! from OFFLINE.

use std::time::{Duration, Instant};

use fleetcare::proto::v1 as pb;
use fleetcare_client::{Clients, Heartbeater};
use tokio::sync::mpsc;
use tonic::Code;

use crate::helpers::{TcpProxy, TestApp, TestDb, status, test_args};

const WAIT: Duration = Duration::from_secs(20);
/// Timer and scheduling noise allowed when comparing an observed spacing
/// with the interval the server asked for.
const TOLERANCE: Duration = Duration::from_millis(20);

/// A server that tells agents to heartbeat every 200 ms (a handful of agents
/// at the default rate stays far under the minimum).
async fn paced_server(db: &TestDb) -> TestApp {
    let mut args = test_args(&db.url);
    args.min_heartbeat_interval = Duration::from_millis(200);
    TestApp::spawn_with(args).await
}

fn clients(app: &TestApp) -> Clients {
    Clients::new(app.channel.clone())
}

/// Each response with the moment it arrived, through the `on_response` hook.
fn recorded(
    heartbeater: Heartbeater,
) -> (
    Heartbeater,
    mpsc::UnboundedReceiver<(Instant, pb::HeartbeatResponse)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let heartbeater = heartbeater.on_response(move |response| {
        let _ = tx.send((Instant::now(), response.clone()));
    });
    (heartbeater, rx)
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<(Instant, pb::HeartbeatResponse)>,
) -> (Instant, pb::HeartbeatResponse) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a heartbeat within the wait")
        .expect("the loop is still running")
}

fn heartbeat_at(agent: &pb::Agent) -> (i64, i32) {
    let t = agent.last_heartbeat_at.expect("last_heartbeat_at set");
    (t.seconds, t.nanos)
}

fn interval_of(response: &pb::HeartbeatResponse) -> Duration {
    let given = response
        .next_heartbeat_interval
        .expect("the server sends next_heartbeat_interval");
    Duration::try_from(given).unwrap()
}

#[tokio::test]
async fn heartbeats_keep_to_the_servers_interval_and_stop_when_asked() {
    let db = TestDb::new();
    let app = paced_server(&db).await;
    let registered = app.register("hb-paced").await;
    let (heartbeater, mut rx) = recorded(clients(&app).heartbeats("hb-paced"));
    let handle = heartbeater.spawn();

    let mut beats = Vec::new();
    for _ in 0..4 {
        beats.push(next(&mut rx).await);
    }
    for pair in beats.windows(2) {
        let ((earlier, response), (later, _)) = (&pair[0], &pair[1]);
        let asked = interval_of(response);
        assert_eq!(asked, Duration::from_millis(200), "the server's pacing");
        let spacing = *later - *earlier;
        assert!(
            spacing + TOLERANCE >= asked,
            "heartbeat after {spacing:?}, sooner than the {asked:?} the server asked for"
        );
        // Not a fixed 5 s fallback either: the loop uses what the server says.
        assert!(
            spacing < Duration::from_secs(4),
            "heartbeat after {spacing:?}"
        );
    }
    for (_, response) in &beats {
        let agent = response.agent.as_ref().unwrap();
        assert_eq!(agent.agent_id, "hb-paced");
        assert!(
            response.transition.is_none(),
            "an online agent's heartbeat changes nothing"
        );
    }
    let latest = handle
        .subscribe()
        .borrow()
        .clone()
        .expect("the handle shows a response");
    assert!(
        heartbeat_at(&latest.agent.unwrap()) >= heartbeat_at(beats[3].1.agent.as_ref().unwrap()),
        "the handle's watch holds the newest response"
    );

    let asked_to_stop = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), handle.stop())
        .await
        .expect("stop returns promptly")
        .expect("a cancelled loop ends with Ok");
    let stopped = Instant::now();
    assert!(stopped - asked_to_stop < Duration::from_secs(1));
    // The loop, and the hook holding the sender, are gone once stop() returns:
    // the channel holds at most what came before and then closes.
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some((at, _)) = rx.recv().await {
            assert!(at <= stopped, "a heartbeat after stop() returned");
        }
    })
    .await;
    assert!(drained.is_ok(), "the loop still runs after stop()");
    let agent = app.get("hb-paced").await;
    assert!(
        heartbeat_at(&agent) > heartbeat_at(&registered),
        "the server recorded the heartbeats"
    );
    app.stop().await;
}

/// With the default 5 s minimum interval the loop spends nearly all its time
/// waiting: stop() must end that wait, not sit it out.
#[tokio::test]
async fn stop_ends_a_long_wait_at_once() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("hb-long").await;
    let (heartbeater, mut rx) = recorded(clients(&app).heartbeats("hb-long"));
    let handle = heartbeater.spawn();
    let (_, first) = next(&mut rx).await;
    assert_eq!(interval_of(&first), Duration::from_secs(5));

    let asked_to_stop = Instant::now();
    handle.stop().await.expect("cancelled cleanly");
    assert!(
        asked_to_stop.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        asked_to_stop.elapsed()
    );
    assert!(
        rx.recv().await.is_none(),
        "nothing after the first heartbeat"
    );
    app.stop().await;
}

/// Dropping the handle cancels the loop too.
#[tokio::test]
async fn dropping_the_handle_ends_the_loop() {
    let db = TestDb::new();
    let app = paced_server(&db).await;
    app.register("hb-drop").await;
    let (heartbeater, mut rx) = recorded(clients(&app).heartbeats("hb-drop"));
    let handle = heartbeater.spawn();
    next(&mut rx).await;
    drop(handle);
    // The sender lives in the loop's hook: the channel closes when the loop ends.
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the loop kept running after its handle was dropped"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_agent_ends_the_loop_with_not_found() {
    let db = TestDb::new();
    let app = paced_server(&db).await;
    let (heartbeater, mut rx) = recorded(clients(&app).heartbeats("hb-nobody"));
    let error = tokio::time::timeout(WAIT, heartbeater.spawn().finished())
        .await
        .expect("the loop gives up")
        .expect_err("NOT_FOUND is returned");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(
        rx.recv().await.is_none(),
        "no response for an unknown agent"
    );

    // run() reports it the same way.
    let error = clients(&app)
        .heartbeats("hb-nobody")
        .run(Default::default())
        .await
        .expect_err("NOT_FOUND is returned");
    assert_eq!(error.code(), Code::NotFound);
    app.stop().await;
}

/// A connection cut under the loop is a transient failure: it backs off,
/// retries, and carries on once the server is reachable again.
#[tokio::test]
async fn a_dropped_connection_is_retried() {
    let db = TestDb::new();
    let app = paced_server(&db).await;
    app.register("hb-cut").await;
    let proxy = TcpProxy::start(app.addr).await;
    let through_proxy = Clients::connect_lazy(&proxy.addr.to_string()).unwrap();
    let (retries_tx, mut retries) = mpsc::unbounded_channel();
    let (heartbeater, mut rx) = recorded(
        through_proxy
            .heartbeats("hb-cut")
            .with_max_backoff(Duration::from_millis(200))
            .on_retry(move |status, delay| {
                let _ = retries_tx.send((status.code(), delay));
            }),
    );
    let handle = heartbeater.spawn();
    next(&mut rx).await;

    proxy.cut().await;
    // A cut connection fails as UNAVAILABLE or CANCELLED (the proxy accepts
    // and drops, so the handshake dies): either way the loop keeps retrying.
    for _ in 0..3 {
        let (code, delay) = tokio::time::timeout(WAIT, retries.recv())
            .await
            .expect("a failed heartbeat while cut")
            .unwrap();
        assert!(
            matches!(code, Code::Unavailable | Code::Cancelled),
            "{code:?} is not a failed connection"
        );
        assert!(
            delay <= Duration::from_millis(200),
            "backoff {delay:?} over its cap"
        );
    }
    assert!(
        !handle.is_finished(),
        "a transient failure does not end the loop"
    );

    // Responses queued so far came before the cut: only later ones count.
    while rx.try_recv().is_ok() {}
    proxy.restore();
    let (_, back) = next(&mut rx).await;
    assert_eq!(back.agent.unwrap().agent_id, "hb-cut");
    handle.stop().await.expect("cancelled cleanly");
    app.stop().await;
}

/// An agent marked OFFLINE comes back with its next heartbeat, and the
/// handle's watch shows it.
#[tokio::test]
async fn the_handle_shows_the_agent_coming_back_from_offline() {
    let db = TestDb::new();
    let app = paced_server(&db).await;
    app.register("hb-back").await;
    let handle = clients(&app).heartbeats("hb-back").spawn();
    let mut last = handle.subscribe();
    last.wait_for(|r| r.is_some()).await.unwrap();

    app.agents
        .clone()
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "hb-back".into(),
        })
        .await
        .unwrap();
    let resumed = tokio::time::timeout(
        WAIT,
        last.wait_for(|r| r.as_ref().is_some_and(|r| r.transition.is_some())),
    )
    .await
    .expect("a heartbeat after MarkOffline")
    .unwrap()
    .clone()
    .unwrap();
    let transition = resumed.transition.unwrap();
    assert_eq!(transition.from_status, status(pb::AgentStatus::Offline));
    assert_eq!(transition.to_status, status(pb::AgentStatus::Idle));
    assert_eq!(
        transition.cause,
        pb::TransitionCause::HeartbeatResumed as i32
    );
    assert_eq!(resumed.agent.unwrap().status, status(pb::AgentStatus::Idle));
    handle.stop().await.expect("cancelled cleanly");
    app.stop().await;
}
