//! The write path: group commit (one winner per agent in a batch, a refusal that
//! refuses only itself, two replicas' batches interleaving into one gap-free
//! history) and heartbeats acknowledged from memory (never marked OFFLINE while
//! they keep coming, across replicas, flush delays and a kill -9).

use std::time::Duration;

use fleetcare::proto::v1 as pb;
use tonic::Code;

use crate::helpers::{TestApp, TestDb, reason, status, test_args};

use pb::AgentStatus as S;

postgres_only! {
    use std::collections::BTreeSet;

    use fleetcare::proto::v1::agent_status_service_client::AgentStatusServiceClient;
    use pb::TransitionCause as C;
    use pb::watch_transitions_response::Event;
    use tonic::transport::Channel;

    use crate::helpers::{ServerProcess, eventually};
}

/// A timestamp as something ordered.
fn key(ts: prost_types::Timestamp) -> (i64, i32) {
    (ts.seconds, ts.nanos)
}

#[tokio::test]
async fn concurrent_start_work_on_one_agent_has_exactly_one_winner() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("contested").await;
    let calls = (0..32).map(|_| app.start_work("contested"));
    let results = futures::future::join_all(calls).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one StartWork wins");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(reason(refused), "TRANSITION_REFUSED");
        assert!(refused.message().contains("BUSY"), "{}", refused.message());
    }
    let history = app.history("contested").await;
    assert_eq!(
        history.len(),
        2,
        "REGISTERED and one WORK_STARTED: {history:?}"
    );
    assert_eq!(app.get("contested").await.status, status(S::Busy));
}

#[tokio::test]
async fn a_refused_call_in_a_batch_refuses_only_itself() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    for id in ["a", "b", "c"] {
        app.register(id).await;
    }
    // Sent together so that they share batches: a refusal for "b" (idle, cannot
    // finish), an unknown agent, and two good calls.
    let (a, b, ghost, c) = tokio::join!(
        app.start_work("a"),
        app.finish_work("b"),
        app.start_work("ghost"),
        app.start_work("c"),
    );
    assert_eq!(a.unwrap().agent.unwrap().status, status(S::Busy));
    assert_eq!(b.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(ghost.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.unwrap().agent.unwrap().status, status(S::Busy));
    assert_eq!(app.get("b").await.status, status(S::Idle));
    assert_eq!(app.history("b").await.len(), 1);
}

postgres_only! {
    /// Reads `count` transitions from a watch opened after revision `since`.
    async fn collect(
        mut client: AgentStatusServiceClient<Channel>,
        since: i64,
        count: usize,
    ) -> Vec<pb::Transition> {
        let mut stream = client
            .watch_transitions(pb::WatchTransitionsRequest {
                since_revision: since,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::with_capacity(count);
        while seen.len() < count {
            let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("transitions keep coming")
                .unwrap()
                .expect("stream open");
            if let Some(Event::Transition(t)) = msg.event {
                seen.push(t);
            }
        }
        seen
    }
}

postgres_only! {
    #[tokio::test]
    async fn batches_from_two_replicas_interleave_into_one_contiguous_history() {
        let db = TestDb::new();
        let one = TestApp::spawn(&db).await;
        let two = TestApp::spawn(&db).await;
        let agents = 16;
        let cycles = 10;
        for i in 0..agents {
            one.register(&format!("r-{i}")).await;
        }
        let head = one
            .history("r-0")
            .await
            .last()
            .unwrap()
            .revision
            .max(agents as i64);
        let expected = agents * cycles * 2;
        let watch_one = tokio::spawn(collect(one.agents.clone(), head, expected));
        let watch_two = tokio::spawn(collect(two.agents.clone(), head, expected));
        // Each agent is driven through one replica or the other, all at once.
        let writers = (0..agents).map(|i| {
            let app = if i % 2 == 0 { &one } else { &two };
            let id = format!("r-{i}");
            async move {
                for _ in 0..cycles {
                    app.start_work(&id).await.unwrap();
                    app.finish_work(&id).await.unwrap();
                }
            }
        });
        futures::future::join_all(writers).await;
        let seen_one = watch_one.await.unwrap();
        let seen_two = watch_two.await.unwrap();
        let revisions: Vec<i64> = seen_one.iter().map(|t| t.revision).collect();
        let contiguous: Vec<i64> = (head + 1..=head + expected as i64).collect();
        assert_eq!(revisions, contiguous, "one gap-free sequence");
        assert_eq!(
            seen_one, seen_two,
            "both replicas' watchers see the same history"
        );
        // Per agent, the transitions alternate as the calls were made.
        for i in 0..agents {
            let id = format!("r-{i}");
            let causes: Vec<i32> = seen_one
                .iter()
                .filter(|t| t.agent_id == id)
                .map(|t| t.cause)
                .collect();
            let alternating: Vec<i32> = (0..2 * cycles)
                .map(|k| if k % 2 == 0 { C::WorkStarted } else { C::WorkFinished } as i32)
                .collect();
            assert_eq!(causes, alternating, "{id}");
        }
    }
}

postgres_only! {
    /// A replica decides a batch on the agent as it last committed it only
    /// while the row is unchanged: a label change made through another replica
    /// (no transition, so nothing marks the agent stale on the first) is kept,
    /// and the call still commits, on the row as it now is.
    #[tokio::test]
    async fn a_call_decided_on_a_remembered_agent_keeps_another_replicas_change() {
        let db = TestDb::new();
        let one = TestApp::spawn(&db).await;
        let two = TestApp::spawn(&db).await;
        one.register("relabelled").await;
        two.agents
            .clone()
            .register_agent(pb::RegisterAgentRequest {
                agent_id: "relabelled".into(),
                labels: [("team".to_string(), "infra".to_string())].into(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
        let agent = one.start_work("relabelled").await.unwrap().agent.unwrap();
        assert_eq!(agent.status, status(S::Busy));
        let team = |a: &pb::Agent| a.labels.get("team").cloned();
        assert_eq!(team(&agent).as_deref(), Some("infra"), "labels overwritten");
        let stored = two.get("relabelled").await;
        assert_eq!(stored.status, status(S::Busy));
        assert_eq!(team(&stored).as_deref(), Some("infra"), "labels overwritten");
        // And the next call on the first replica, now knowing the row, too.
        let idle = one.finish_work("relabelled").await.unwrap().agent.unwrap();
        assert_eq!(team(&idle).as_deref(), Some("infra"));
    }
}

fn quick_liveness(db: &TestDb, timeout: Duration, flush: Duration) -> fleetcare::config::ServeArgs {
    let mut args = test_args(&db.url);
    args.heartbeat_timeout = timeout;
    args.heartbeat_flush_interval = flush;
    args.sweep_interval = Duration::from_millis(50);
    args
}

postgres_only! {
    /// Every HEARTBEAT_TIMEOUT transition in the agent's history.
    async fn timeouts(app: &TestApp, agent_id: &str) -> Vec<pb::Transition> {
        app.history(agent_id)
            .await
            .into_iter()
            .filter(|t| t.cause == C::HeartbeatTimeout as i32)
            .collect()
    }
}

postgres_only! {
    #[tokio::test]
    async fn heartbeats_on_one_replica_keep_the_agent_online_while_another_sweeps() {
        let db = TestDb::new();
        let timeout = Duration::from_millis(1500);
        // Replica two only sweeps; its flush is slow, replica one's is the largest the
        // timeout allows here: heartbeats sit in memory for up to a second.
        let sweeper = TestApp::spawn_with(quick_liveness(&db, timeout, Duration::from_secs(1))).await;
        let front = TestApp::spawn_with(quick_liveness(&db, timeout, Duration::from_secs(1))).await;
        front.register("alive").await;
        front.register("silent").await;
        // The sweeper's start-up grace is one timeout: run well past it.
        let mut client = front.agents.clone();
        let until = tokio::time::Instant::now() + 3 * timeout;
        let mut acknowledged = 0;
        while tokio::time::Instant::now() < until {
            let response = client
                .heartbeat(pb::HeartbeatRequest {
                    agent_id: "alive".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.agent.unwrap().status, status(S::Idle));
            let next = response
                .next_heartbeat_interval
                .expect("an interval to heartbeat at");
            assert!(next.seconds >= 0 && next.seconds * 1000 <= timeout.as_millis() as i64 / 3 + 1000);
            acknowledged += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(acknowledged >= 10);
        // The sweeper did run: the silent agent went offline, once.
        eventually(Duration::from_secs(10), "silent agent offline", || async {
            (sweeper.get("silent").await.status == status(S::Offline)).then_some(())
        })
        .await;
        assert_eq!(timeouts(&sweeper, "silent").await.len(), 1);
        assert!(
            timeouts(&sweeper, "alive").await.is_empty(),
            "a heartbeating agent was swept"
        );
        assert_eq!(sweeper.get("alive").await.status, status(S::Idle));
    }
}

#[tokio::test]
async fn an_offline_agent_s_heartbeat_returns_it_at_once_with_the_transition() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("back").await;
    let mut client = app.agents.clone();
    client
        .mark_offline(pb::MarkOfflineRequest {
            agent_id: "back".into(),
        })
        .await
        .unwrap();
    let response = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "back".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = response
        .transition
        .expect("the transition is in the response");
    assert_eq!(
        (t.from_status, t.to_status),
        (status(S::Offline), status(S::Idle))
    );
    // Durable at once, not at the next flush.
    assert_eq!(
        app.history("back").await.last().unwrap().revision,
        t.revision
    );
    let unknown = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn get_agent_shows_a_heartbeat_before_it_is_flushed() {
    let db = TestDb::new();
    let app = TestApp::spawn_with(quick_liveness(
        &db,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ))
    .await;
    let registered = app.register("hb").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut client = app.agents.clone();
    let beat = client
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "hb".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    let at = beat.last_heartbeat_at.unwrap();
    assert!(key(at) > key(registered.last_heartbeat_at.unwrap()));
    assert_eq!(app.get("hb").await.last_heartbeat_at.unwrap(), at);
}

postgres_only! {
    /// A `fleetcare serve` process on `db` with quick liveness settings.
    async fn serve_process(db: &TestDb, timeout: Duration, flush: Duration) -> ServerProcess {
        ServerProcess::start(&[
            "--database-url",
            &db.url,
            "--heartbeat-timeout",
            &format!("{}ms", timeout.as_millis()),
            "--heartbeat-flush-interval",
            &format!("{}ms", flush.as_millis()),
            "--sweep-interval",
            "50ms",
        ])
        .await
    }
}

postgres_only! {
    #[tokio::test]
    async fn kill_9_between_acknowledgement_and_flush_loses_liveness_not_the_agent() {
        let db = TestDb::new();
        let timeout = Duration::from_secs(4);
        let flush = Duration::from_secs(2);
        // An in-process replica that sweeps, already past its start-up grace when the
        // process replica dies.
        let sweeper = TestApp::spawn_with(quick_liveness(&db, timeout, flush)).await;
        let front = serve_process(&db, timeout, flush).await;
        let mut client = front.client().await;
        client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: "survivor".into(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
        let stored_before = sweeper.get("survivor").await.last_heartbeat_at.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let acked = client
            .heartbeat(pb::HeartbeatRequest {
                agent_id: "survivor".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .agent
            .unwrap()
            .last_heartbeat_at
            .unwrap();
        assert!(key(acked) > key(stored_before));
        front.kill();
        // The acknowledged heartbeat was in memory only: that much liveness is lost.
        assert_eq!(
            sweeper.get("survivor").await.last_heartbeat_at.unwrap(),
            stored_before
        );

        // The agent keeps heartbeating, to a restarted process, for two timeouts.
        let front = serve_process(&db, timeout, flush).await;
        let mut client = front.client().await;
        let until = tokio::time::Instant::now() + 2 * timeout;
        while tokio::time::Instant::now() < until {
            let agent = client
                .heartbeat(pb::HeartbeatRequest {
                    agent_id: "survivor".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .agent
                .unwrap();
            assert_ne!(agent.status, status(S::Offline));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            timeouts(&sweeper, "survivor").await.is_empty(),
            "swept while heartbeating"
        );
        let causes: BTreeSet<i32> = sweeper
            .history("survivor")
            .await
            .iter()
            .map(|t| t.cause)
            .collect();
        assert_eq!(causes, BTreeSet::from([C::Registered as i32]));
        // And its heartbeats are stored again.
        eventually(
            Duration::from_secs(10),
            "heartbeats flushed after the restart",
            || async {
                (key(sweeper.get("survivor").await.last_heartbeat_at.unwrap()) > key(acked))
                    .then_some(())
            },
        )
        .await;
    }
}

postgres_only! {
    /// Two batches of one server in flight at once: while the revision row is
    /// held elsewhere, both batches' statements wait for it in the database
    /// (each on its own connection), and once it is free both commit, with
    /// consecutive revisions.
    #[tokio::test]
    async fn a_second_batch_waits_for_the_revision_row_in_the_database_not_for_the_first() {
        use sqlx::Connection;

        let db = TestDb::new();
        let app = TestApp::spawn(&db).await;
        app.register("a").await;
        app.register("b").await;
        let mut blocker = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
        sqlx::query("UPDATE revision_head SET head_revision = head_revision WHERE singleton")
            .execute(&mut blocker)
            .await
            .unwrap();
        let first = tokio::spawn({
            let mut c = app.agents.clone();
            async move {
                c.start_work(pb::StartWorkRequest { agent_id: "a".into(), slot_type: 1 })
                    .await
            }
        });
        let waiting = |n: i64| {
            let url = db.url.clone();
            move || {
                let url = url.clone();
                async move {
                    let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&mut conn)
                    .await
                    .ok()?;
                    (waiting >= n).then_some(())
                }
            }
        };
        eventually(Duration::from_secs(10), "the first batch waiting", waiting(1)).await;
        let second = tokio::spawn({
            let mut c = app.agents.clone();
            async move {
                c.start_work(pb::StartWorkRequest { agent_id: "b".into(), slot_type: 1 })
                    .await
            }
        });
        eventually(Duration::from_secs(10), "both batches waiting", waiting(2)).await;
        sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
        let mut revisions: Vec<i64> = Vec::new();
        for call in [first, second] {
            let t = call.await.unwrap().unwrap().into_inner().transition.unwrap();
            revisions.push(t.revision);
        }
        revisions.sort_unstable();
        assert_eq!(revisions, [3, 4]);
        assert_eq!(app.get("a").await.status, status(S::Busy));
        assert_eq!(app.get("b").await.status, status(S::Busy));
    }
}

/// The agent in a heartbeat's reply.
async fn heartbeat_of(app: &TestApp, agent_id: &str) -> pb::Agent {
    app.agents
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: agent_id.into(),
        })
        .await
        .expect("heartbeat")
        .into_inner()
        .agent
        .unwrap()
}

/// A heartbeat's reply reflects every transition acknowledged before it began
/// (here on the same server; across replicas below).
#[tokio::test]
async fn a_heartbeat_reply_shows_the_transition_acknowledged_just_before() {
    let db = TestDb::new();
    let app = TestApp::spawn(&db).await;
    app.register("moving").await;
    heartbeat_of(&app, "moving").await;
    for round in 0..20 {
        let started = app.start_work("moving").await.unwrap().transition.unwrap();
        let agent = heartbeat_of(&app, "moving").await;
        assert_eq!(
            (agent.status, agent.revision),
            (status(S::Busy), started.revision),
            "round {round}"
        );
        let finished = app.finish_work("moving").await.unwrap().transition.unwrap();
        let agent = heartbeat_of(&app, "moving").await;
        assert_eq!(
            (agent.status, agent.revision),
            (status(S::Idle), finished.revision),
            "round {round}"
        );
    }
}

postgres_only! {
    /// The campaign's finding: IDLE answered by one replica after a StartWork
    /// to BUSY was acknowledged by another. A heartbeat on the second replica
    /// right after each acknowledgement on the first shows it, every time,
    /// though the second learns of the transitions only through NOTIFY.
    #[tokio::test]
    async fn a_heartbeat_reply_reflects_a_transition_acknowledged_on_another_replica() {
        let db = TestDb::new();
        let fresh = || {
            let mut args = crate::helpers::test_args(&db.url);
            args.heartbeat_fresh_replies = true;
            args
        };
        let one = TestApp::spawn_with(fresh()).await;
        let two = TestApp::spawn_with(fresh()).await;
        one.register("moving").await;
        // Known and fresh on the second replica: answered from its memory.
        heartbeat_of(&two, "moving").await;
        for round in 0..40 {
            let started = one.start_work("moving").await.unwrap().transition.unwrap();
            let agent = heartbeat_of(&two, "moving").await;
            assert_eq!(
                (agent.status, agent.revision),
                (status(S::Busy), started.revision),
                "round {round}: the reply is older than an acknowledged StartWork"
            );
            let finished = one.finish_work("moving").await.unwrap().transition.unwrap();
            let agent = heartbeat_of(&two, "moving").await;
            assert_eq!(
                (agent.status, agent.revision),
                (status(S::Idle), finished.revision),
                "round {round}: the reply is older than an acknowledged FinishWork"
            );
        }
    }

    /// The campaign's other finding: a heartbeat acknowledged just before its
    /// replica's link to the database went silent, lost, and the agent marked
    /// OFFLINE by another replica soon after. The bound: the replica answers
    /// no heartbeat later than one flush interval after the link stalls, and
    /// the agent is marked OFFLINE no sooner than the timeout minus its
    /// heartbeat spacing after the last heartbeat it had answered.
    #[tokio::test]
    async fn a_replica_whose_database_link_stalls_stops_answering_heartbeats_within_a_flush_interval() {
        let db = TestDb::new();
        let timeout = Duration::from_millis(1500);
        let flush = Duration::from_millis(300);
        let spacing = Duration::from_millis(100);
        let proxy = crate::helpers::TcpProxy::to_postgres().await;
        let mut front_args = quick_liveness(&db, timeout, flush);
        front_args.database.database_url = Some(db.url_via(&proxy));
        // Health would refuse every call once it saw the outage: the point
        // is what the heartbeats themselves do.
        front_args.health_check_interval = Duration::from_secs(3600);
        let front = TestApp::spawn_with(front_args).await;
        let sweeper = TestApp::spawn_with(quick_liveness(&db, timeout, flush)).await;
        front.register("cut-off").await;
        let mut client = front.agents.clone();
        let heartbeat = || {
            let mut request = tonic::Request::new(pb::HeartbeatRequest {
                agent_id: "cut-off".into(),
            });
            request.set_timeout(Duration::from_secs(1));
            request
        };
        let answered_at = |reply: tonic::Response<pb::HeartbeatResponse>| {
            let at = reply.into_inner().agent.unwrap().last_heartbeat_at.unwrap();
            chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).unwrap()
        };
        // Past the sweeper's start-up grace (one timeout), heartbeating; the
        // times the server answered them at, for the spacing they really had.
        let mut answered = Vec::new();
        let warm_until = tokio::time::Instant::now() + timeout + flush;
        while tokio::time::Instant::now() < warm_until {
            answered.push(answered_at(client.heartbeat(heartbeat()).await.unwrap()));
            tokio::time::sleep(spacing).await;
        }
        answered.push(answered_at(client.heartbeat(heartbeat()).await.unwrap()));
        proxy.stall();
        let stalled_at = chrono::Utc::now();
        // Heartbeats go on at the same spacing until one fails (or long
        // after the timeout, which the assertion below then reports).
        let give_up = tokio::time::Instant::now() + 3 * timeout;
        while tokio::time::Instant::now() < give_up {
            tokio::time::sleep(spacing).await;
            match client.heartbeat(heartbeat()).await {
                Ok(reply) => answered.push(answered_at(reply)),
                Err(refused) => {
                    assert!(
                        matches!(
                            refused.code(),
                            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
                        ),
                        "{refused:?}"
                    );
                    break;
                }
            }
        }
        let last = *answered.last().unwrap();
        assert!(
            last < stalled_at + chrono::Duration::from_std(flush).unwrap(),
            "a heartbeat answered at {last}, more than a flush interval after the link \
             stalled at {stalled_at}"
        );
        eventually(Duration::from_secs(20), "marked offline", || async {
            (sweeper.get("cut-off").await.status == status(S::Offline)).then_some(())
        })
        .await;
        let offline = timeouts(&sweeper, "cut-off").await.remove(0);
        let offline_at = offline.occurred_at.unwrap();
        let offline_at =
            chrono::DateTime::from_timestamp(offline_at.seconds, offline_at.nanos as u32).unwrap();
        // The spacing the heartbeats had (a loaded machine stretches it).
        let gap = answered.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        let bound = last + chrono::Duration::from_std(timeout).unwrap() - gap;
        assert!(
            offline_at >= bound,
            "marked OFFLINE at {offline_at}, {} ms after the last heartbeat answered ({last}): \
             sooner than the timeout minus the spacing ({} ms)",
            (offline_at - last).num_milliseconds(),
            gap.num_milliseconds()
        );
        proxy.restore();
    }
}
