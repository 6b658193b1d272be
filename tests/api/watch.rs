//! WatchTransitions: replay, live, resume, snapshot, filters, two servers,
//! concurrent writers, slow subscribers, progress and retention.

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use pb::AgentStatus as S;
use pb::watch_transitions_response::Event;
use tonic::{Code, Streaming};

use crate::helpers::{TcpProxy, TestApp, TestDb, eventually, status, test_args};

const WAIT: Duration = Duration::from_secs(20);

async fn watch(
    app: &TestApp,
    request: pb::WatchTransitionsRequest,
) -> Streaming<pb::WatchTransitionsResponse> {
    app.agents
        .clone()
        .watch_transitions(request)
        .await
        .expect("watch opens")
        .into_inner()
}

fn since(revision: i64) -> pb::WatchTransitionsRequest {
    pb::WatchTransitionsRequest {
        since_revision: revision,
        ..Default::default()
    }
}

async fn next_event(stream: &mut Streaming<pb::WatchTransitionsResponse>) -> Event {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event within the wait")
        .expect("stream ok")
        .expect("stream still open")
        .event
        .expect("event set")
}

/// The next transition, skipping progress messages.
async fn next_transition(stream: &mut Streaming<pb::WatchTransitionsResponse>) -> pb::Transition {
    loop {
        match next_event(stream).await {
            Event::Transition(t) => return t,
            Event::Progress(_) => continue,
            other => panic!("expected a transition, got {other:?}"),
        }
    }
}

async fn take_transitions(
    stream: &mut Streaming<pb::WatchTransitionsResponse>,
    n: usize,
) -> Vec<pb::Transition> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_transition(stream).await);
    }
    out
}

fn revisions(ts: &[pb::Transition]) -> Vec<i64> {
    ts.iter().map(|t| t.revision).collect()
}

#[tokio::test]
async fn replay_then_live_in_revision_order() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await; // 1
    app.start_work("a").await.unwrap(); // 2
    app.finish_work("a").await.unwrap(); // 3

    let mut from_start = watch(&app, since(0 /* now */)).await;
    let mut replay = watch(&app, since(1)).await;
    let got = take_transitions(&mut replay, 2).await;
    assert_eq!(revisions(&got), [2, 3]);
    assert_eq!(got[0].to_status, status(S::Busy));

    app.start_work("a").await.unwrap(); // 4
    assert_eq!(next_transition(&mut replay).await.revision, 4);
    // "From now on" skipped 1..3 and sees 4 first.
    assert_eq!(next_transition(&mut from_start).await.revision, 4);
}

#[tokio::test]
async fn a_resumed_watch_has_no_gaps_and_no_duplicates() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    let mut stream = watch(&app, since(0)).await;
    for _ in 0..3 {
        app.start_work("a").await.unwrap();
        app.finish_work("a").await.unwrap();
    }
    let first = take_transitions(&mut stream, 4).await;
    assert_eq!(revisions(&first), [2, 3, 4, 5]);
    drop(stream); // the connection drops mid-way
    for _ in 0..2 {
        app.start_work("a").await.unwrap();
        app.finish_work("a").await.unwrap();
    }
    let mut resumed = watch(&app, since(5)).await;
    let rest = take_transitions(&mut resumed, 5).await;
    assert_eq!(revisions(&rest), [6, 7, 8, 9, 10]);
}

#[tokio::test]
async fn snapshot_then_marker_then_changes() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("a").await;
    app.register("b").await;
    app.start_work("b").await.unwrap();

    let mut stream = watch(
        &app,
        pb::WatchTransitionsRequest {
            include_snapshot: true,
            ..Default::default()
        },
    )
    .await;
    let mut snapshot = Vec::new();
    let marker = loop {
        match next_event(&mut stream).await {
            Event::SnapshotAgent(a) => snapshot.push(a),
            Event::SnapshotComplete(m) => break m,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(marker.revision, 3);
    assert_eq!(marker.agent_count, 2);
    let states: Vec<_> = snapshot
        .iter()
        .map(|a| (a.agent_id.as_str(), a.status))
        .collect();
    assert_eq!(states, [("a", status(S::Idle)), ("b", status(S::Busy))]);
    app.finish_work("b").await.unwrap();
    assert_eq!(next_transition(&mut stream).await.revision, 4);

    let err = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            include_snapshot: true,
            since_revision: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn filters_by_agent_and_by_status() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let mut by_agent = watch(
        &app,
        pb::WatchTransitionsRequest {
            agent_ids: vec!["b".into()],
            ..Default::default()
        },
    )
    .await;
    let mut by_status = watch(
        &app,
        pb::WatchTransitionsRequest {
            statuses: vec![status(S::Busy)],
            ..Default::default()
        },
    )
    .await;
    app.register("a").await;
    app.register("b").await;
    app.start_work("a").await.unwrap();
    app.finish_work("a").await.unwrap();
    app.start_work("b").await.unwrap();

    let b = take_transitions(&mut by_agent, 2).await;
    assert!(b.iter().all(|t| t.agent_id == "b"));
    assert_eq!(revisions(&b), [2, 5]);
    let busy = take_transitions(&mut by_status, 3).await;
    assert_eq!(revisions(&busy), [3, 4, 5], "entering and leaving BUSY");

    let snapshot_err = app
        .agents
        .clone()
        .watch_transitions(pb::WatchTransitionsRequest {
            statuses: vec![42],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(snapshot_err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn idle_streams_get_progress_with_the_latest_revision() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.watch_progress_interval = Duration::from_millis(200);
    let app = TestApp::spawn_with(args).await;
    app.register("a").await;
    app.register("b").await;
    // Filtered to an agent that never changes: progress still advances.
    let mut stream = watch(
        &app,
        pb::WatchTransitionsRequest {
            agent_ids: vec!["zzz".into()],
            ..Default::default()
        },
    )
    .await;
    app.start_work("a").await.unwrap(); // revision 3
    // Each progress says how far the stream got; it reaches revision 3 without
    // any transition being delivered.
    let progress = loop {
        match next_event(&mut stream).await {
            Event::Progress(p) if p.revision == 3 => break p,
            Event::Progress(p) => assert!(p.revision <= 3),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(progress.revision, 3);
}

postgres_only! {
    #[tokio::test]
    async fn transitions_committed_on_another_server_reach_this_ones_watchers() {
        let db = TestDb::new();
        let writer = TestApp::spawn(&db).await;
        let reader = TestApp::spawn(&db).await;
        let mut stream = watch(&reader, since(0)).await;
        writer.register("a").await;
        writer.start_work("a").await.unwrap();
        let got = take_transitions(&mut stream, 2).await;
        assert_eq!(revisions(&got), [1, 2]);
        assert_eq!(got[1].to_status, status(S::Busy));
    }
}

postgres_only! {
    /// Many writers on two servers commit concurrently (so revisions are allocated
    /// and committed interleaved); every watcher on either server sees 1..=N exactly.
    #[tokio::test]
    async fn concurrent_writers_every_watcher_sees_the_full_contiguous_sequence() {
        let db = TestDb::new();
        let one = TestApp::spawn(&db).await;
        let two = TestApp::spawn(&db).await;
        let mut watchers = Vec::new();
        for app in [&one, &two, &one, &two] {
            watchers.push(watch(app, since(0)).await);
        }
        let writers = 16;
        let cycles = 10;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let app_client = if w % 2 == 0 {
                one.agents.clone()
            } else {
                two.agents.clone()
            };
            tasks.push(tokio::spawn(async move {
                let mut c = app_client;
                let id = format!("writer-{w}");
                c.register_agent(pb::RegisterAgentRequest {
                    agent_id: id.clone(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                })
                .await
                .unwrap();
                for _ in 0..cycles {
                    c.start_work(pb::StartWorkRequest {
                        agent_id: id.clone(),
                        slot_type: 1,
                    })
                    .await
                    .unwrap();
                    c.finish_work(pb::FinishWorkRequest {
                        agent_id: id.clone(),
                        fencing_token: 0,
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let total = writers * (1 + 2 * cycles);
        let expected: Vec<i64> = (1..=total as i64).collect();
        for (i, stream) in watchers.iter_mut().enumerate() {
            let got = take_transitions(stream, total).await;
            assert_eq!(revisions(&got), expected, "watcher {i}");
        }
        // And per agent, the statuses alternate correctly.
        let history = one.history("writer-3").await;
        assert_eq!(history.len(), 1 + 2 * cycles);
    }
}

#[tokio::test]
async fn a_slow_subscriber_is_caught_up_not_dropped() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.watch_buffer = 8;
    let app = TestApp::spawn_with(args).await;
    let mut slow = watch(&app, since(0)).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = app.agents.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("w{w}");
            c.register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
            for _ in 0..100 {
                c.start_work(pb::StartWorkRequest {
                    agent_id: id.clone(),
                    slot_type: 1,
                })
                .await
                .unwrap();
                c.finish_work(pb::FinishWorkRequest {
                    agent_id: id.clone(),
                    fencing_token: 0,
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Only now does the subscriber read: it fell far behind an 8-item buffer.
    let total = 8 * 201;
    let got = take_transitions(&mut slow, total).await;
    assert_eq!(revisions(&got), (1..=total as i64).collect::<Vec<_>>());
}

#[tokio::test]
async fn pruned_history_cannot_be_resumed_from() {
    let db = TestDb::new();
    let mut args = test_args(&db.url);
    args.transition_retention = Duration::from_secs(3);
    let app = TestApp::spawn_with(args).await;
    app.register("a").await;
    app.start_work("a").await.unwrap();
    app.finish_work("a").await.unwrap();
    // The sweeper prunes everything older than the retention.
    let listed = eventually(WAIT, "history pruned", || async {
        let page = app
            .agents
            .clone()
            .list_transitions(pb::ListTransitionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        page.transitions.is_empty().then_some(page)
    })
    .await;
    assert_eq!(listed.head_revision, 3);
    app.start_work("a").await.unwrap(); // revision 4, fresh
    let err = app
        .agents
        .clone()
        .watch_transitions(since(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("oldest retained revision 4"),
        "{}",
        err.message()
    );
    // Resuming from the last pruned revision still works: nothing after it is lost.
    let mut ok = watch(&app, since(3)).await;
    assert_eq!(next_transition(&mut ok).await.revision, 4);
    // A revision from the future is out of range too.
    let err = app
        .agents
        .clone()
        .watch_transitions(since(99))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = app
        .agents
        .clone()
        .watch_transitions(since(-1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// The Rust client's resuming watch follows a server restart: the old server
/// ends the stream cleanly, the watch reconnects (here, through a proxy now
/// pointing at the new server on the same database) and resumes after the
/// last revision it saw.
#[tokio::test]
async fn the_client_watch_resumes_across_a_server_restart() {
    use fleetcare_client::{Clients, ResumingWatch};

    let db = TestDb::new();
    let first = TestApp::spawn(&db).await;
    let proxy = TcpProxy::start(first.addr).await;
    let registered = first.register("rw-1").await;
    let clients = Clients::connect_lazy(&proxy.addr.to_string()).unwrap();
    let disconnects = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = disconnects.clone();
    let mut watch = ResumingWatch::new(
        clients.agents,
        pb::WatchTransitionsRequest {
            since_revision: registered.revision,
            agent_ids: vec!["rw-1".into()],
            ..Default::default()
        },
    )
    .with_max_backoff(Duration::from_millis(200))
    .on_disconnect(move |error, revision| {
        record
            .lock()
            .unwrap()
            .push((error.map(|e| e.code()), revision));
    });

    first.start_work("rw-1").await.unwrap();
    let mut seen = vec![next_client_transition(&mut watch).await];

    first.stop().await;
    let second = TestApp::spawn(&db).await;
    proxy.redirect(second.addr);
    second.finish_work("rw-1").await.unwrap();
    second.start_work("rw-1").await.unwrap();
    seen.push(next_client_transition(&mut watch).await);
    seen.push(next_client_transition(&mut watch).await);

    let expected: Vec<i64> = second.history("rw-1").await[1..]
        .iter()
        .map(|t| t.revision)
        .collect();
    assert_eq!(seen, expected);
    assert!(watch.reconnects() >= 1, "the stream was reopened");
    assert_eq!(watch.last_revision(), *expected.last().unwrap());
    // One disconnect reported, however many attempts the restart took: the
    // old server ended the stream cleanly, after the first transition.
    assert_eq!(*disconnects.lock().unwrap(), [(None, expected[0])]);
    second.stop().await;
}

async fn next_client_transition(watch: &mut fleetcare_client::ResumingWatch) -> i64 {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("an event within 30 s")
            .expect("the watch keeps going");
        if let Event::Transition(t) = event {
            return t.revision;
        }
    }
}

/// "From now on" on a server that has never recorded a transition: the client
/// watch pins revision 0, reads the (empty) history once the stream is open,
/// and delivers the first transitions exactly once.
#[tokio::test]
async fn the_client_watch_from_now_on_an_empty_history_misses_nothing() {
    use fleetcare_client::{Clients, ResumingWatch};

    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    let clients = Clients::connect(&app.addr.to_string()).await.unwrap();
    let mut watch = ResumingWatch::new(clients.agents, pb::WatchTransitionsRequest::default());
    watch.start().await.unwrap();
    assert_eq!(watch.last_revision(), 0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        loop {
            let revision = next_client_transition(&mut watch).await;
            if tx.send(revision).is_err() {
                return;
            }
        }
    });

    app.register("first-1").await;
    app.register("first-2").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let revision = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a transition within 30 s")
            .unwrap();
        seen.push(revision);
    }
    assert_eq!(seen, [1, 2]);
    follower.abort();
    app.stop().await;
}
