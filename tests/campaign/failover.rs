//! Failover (issue 25, part 3): a throwaway primary with a synchronous
//! streaming standby, fleetcare reaching the primary through a proxy that
//! follows the primary as HAProxy does with a role-aware health check (a
//! backend is up only while it answers as primary; sessions to a backend
//! marked down are shut). Under load: kill -9 the primary, see health go
//! NOT_SERVING, promote the standby, see the proxy switch and health come
//! back; then nothing acknowledged is lost, revisions stay gap-free and the
//! watchers resumed without a gap or a repeat.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::pg::Cluster;
use crate::procs::{Server, health};
use crate::proxy::Proxy;
use crate::runs::{Load, Scratch, Settings, postgres_binaries, postgres_head, postgres_table};
use crate::runs::{report, server_args, verify};
use crate::workload::Outcome;

/// Whether the Postgres at `addr` answers, and as a primary.
async fn is_primary(addr: SocketAddr) -> Option<bool> {
    let url = format!("postgres://postgres@{addr}/postgres?connect_timeout=1");
    let probe = async {
        let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
        let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        let _ = conn.close().await;
        Some(!in_recovery)
    };
    tokio::time::timeout(Duration::from_millis(800), probe)
        .await
        .ok()
        .flatten()
}

/// When the proxy changed backend, and to which (None: no primary, refusing).
type Switch = (Instant, Option<SocketAddr>);

/// A proxy in front of the candidates that sends new connections to the one
/// answering as primary (checked every 100 ms), shuts the sessions of one
/// that stops being it, and refuses connections while none is.
pub struct FollowPrimary {
    pub proxy: Arc<Proxy>,
    /// Each change of backend, and when (None: no primary, refusing).
    pub switches: Arc<Mutex<Vec<Switch>>>,
    task: JoinHandle<()>,
}

impl FollowPrimary {
    pub async fn start(candidates: Vec<SocketAddr>) -> FollowPrimary {
        let first = candidates[0];
        let proxy = Arc::new(Proxy::start(first).await);
        let switches = Arc::new(Mutex::new(vec![(Instant::now(), Some(first))]));
        let task = tokio::spawn({
            let (proxy, switches) = (proxy.clone(), switches.clone());
            async move {
                let mut current = Some(first);
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut primary = None;
                    for &candidate in &candidates {
                        if is_primary(candidate).await == Some(true) {
                            primary = Some(candidate);
                            break;
                        }
                    }
                    if primary == current {
                        continue;
                    }
                    // on-marked-down shutdown-sessions
                    proxy.drop_connections();
                    match primary {
                        Some(addr) => {
                            proxy.redirect(addr);
                            proxy.restore();
                        }
                        None => proxy.cut(),
                    }
                    current = primary;
                    switches.lock().unwrap().push((Instant::now(), primary));
                }
            }
        });
        FollowPrimary {
            proxy,
            switches,
            task,
        }
    }
}

impl Drop for FollowPrimary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls every replica's health until each says `want`, for at most `within`.
async fn all_health(servers: &[SocketAddr], want: ServingStatus, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let mut all = true;
        for &addr in servers {
            all &= health(addr).await == Some(want);
        }
        if all {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn acknowledged(load: &Load) -> usize {
    load.recorder
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Ok { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let Some(bin) = postgres_binaries("failover run") else {
        return;
    };
    let settings = Settings::from_env(8);
    let seed = settings.seed;
    report(&format!(
        "failover: CAMPAIGN_SEED={seed} CAMPAIGN_SECS={}",
        settings.secs
    ));
    let started = Instant::now();
    let scratch = Scratch::new("failover");

    // The primary, its standby, and only then synchronous replication (set on
    // the primary alone: a promoted standby that inherited it would wait for
    // a standby of its own and hang every commit).
    let mut primary = Cluster::init(&bin, &scratch.0, "primary")
        .await
        .expect("initdb");
    primary.start().await.expect("primary starts");
    let mut standby = Cluster::standby_of(&primary, &scratch.0, "standby1")
        .await
        .expect("pg_basebackup");
    standby.start().await.expect("standby starts");
    let mut admin = sqlx::PgConnection::connect(&primary.url("postgres"))
        .await
        .unwrap();
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        "ALTER SYSTEM SET synchronous_commit = 'on'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(statement).execute(&mut admin).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'",
        )
        .fetch_optional(&mut admin)
        .await
        .unwrap();
        if state.as_deref() == Some("sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standby not synchronous: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(admin);

    let follow = FollowPrimary::start(vec![primary.addr(), standby.addr()]).await;
    let url = format!("postgres://postgres@{}/fleetcare", follow.proxy.addr);
    let mut servers = Vec::new();
    for i in 0..2 {
        let mut server = Server::start(
            &format!("replica-{i}"),
            server_args(&["--database-url".into(), url.clone()], &scratch),
            scratch.path(&format!("replica-{i}.log")),
        );
        server
            .wait_serving(Duration::from_secs(60))
            .await
            .expect("replica serves");
        servers.push(server);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    // The table as the primary of the moment holds it (read directly).
    let standby_url = standby.url("fleetcare");
    let primary_head = async || postgres_head(&primary.url("fleetcare")).await;
    let mut load = Load::start(seed, addrs.clone(), 4, 2, &primary_head).await;

    // Load, then the primary dies.
    let phase = Duration::from_secs(settings.secs / 2);
    tokio::time::sleep(phase).await;
    let before_kill = acknowledged(&load);
    assert!(before_kill > 0, "calls acknowledged before the failover");
    let killed = Instant::now();
    primary.crash().await;
    let mut found = Vec::new();
    if !all_health(&addrs, ServingStatus::NotServing, Duration::from_secs(20)).await {
        found.push("health did not go NOT_SERVING on every replica after the primary died".into());
    }
    let not_serving = killed.elapsed();
    standby.promote().await.expect("promote the standby");
    let promoted = Instant::now();
    if !all_health(&addrs, ServingStatus::Serving, Duration::from_secs(30)).await {
        found.push("health did not come back SERVING after the promotion".into());
    }
    let serving_again = promoted.elapsed();
    let switched = follow
        .switches
        .lock()
        .unwrap()
        .last()
        .map(|(_, to)| *to == Some(standby.addr()));
    assert_eq!(switched, Some(true), "the proxy follows the new primary");
    let at_promotion = acknowledged(&load);
    let head_at_promotion = postgres_head(&standby_url).await;
    tokio::time::sleep(phase).await;
    let after = acknowledged(&load) - at_promotion;
    if after == 0 {
        found.push("no call acknowledged after the failover".into());
    }

    load.stop_clients().await;
    let standby_head = async || postgres_head(&standby_url).await;
    if let Err(e) = load.drain_watchers(&standby_head).await {
        found.push(e);
    }
    let table = postgres_table(&standby_url).await;
    report(&format!(
        "failover (seed {seed}): {before_kill} calls acknowledged before the kill, {after} after; \
         NOT_SERVING {:.2} s after the kill, SERVING {:.2} s after the promotion; {}; \
         {} transitions on the new primary; {:.1} s",
        not_serving.as_secs_f64(),
        serving_again.as_secs_f64(),
        load.figures(),
        table.len(),
        started.elapsed().as_secs_f64()
    ));
    // The watchers went on past the failover (on a stream that stayed open,
    // or resumed from their last revision), checked in full by `verify`.
    for (watcher, seen) in load.seen.iter().enumerate() {
        let seen = seen.load(std::sync::atomic::Ordering::SeqCst);
        if seen <= head_at_promotion {
            found.push(format!(
                "watcher {watcher} saw nothing after the failover (at {seen}, head then {head_at_promotion})"
            ));
        }
    }
    verify("the failover", seed, &load, &table, found);
    for mut server in servers {
        assert!(server.terminate().await, "a clean stop at the end");
    }
}

/// A proxy whose check only sees whether a server accepts logins (HAProxy's
/// `option pgsql-check`) sends fleetcare to a standby still in recovery when
/// the primary fails. fleetcare can read there and write nothing: it must say
/// so (health NOT_SERVING, calls UNAVAILABLE, which clients retry), not fail
/// calls as internal errors while reporting SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_in_recovery_behind_the_proxy_is_not_serving() {
    use fleetcare::proto::v1 as pb;
    let Some(bin) = postgres_binaries("standby-behind-the-proxy run") else {
        return;
    };
    let scratch = Scratch::new("standby");
    let mut primary = Cluster::init(&bin, &scratch.0, "primary")
        .await
        .expect("initdb");
    primary.start().await.expect("primary starts");
    let proxy = Proxy::start(primary.addr()).await;
    let url = format!("postgres://postgres@{}/fleetcare", proxy.addr);
    let mut server = Server::start(
        "replica",
        server_args(&["--database-url".into(), url], &scratch),
        scratch.path("replica.log"),
    );
    server
        .wait_serving(Duration::from_secs(60))
        .await
        .expect("serves");
    let mut client = pb::agent_status_service_client::AgentStatusServiceClient::connect(format!(
        "http://{}",
        server.addr
    ))
    .await
    .unwrap();
    client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "a".into(),
            ..Default::default()
        })
        .await
        .expect("registered on the primary");
    // The standby, made now, has the agent.
    let mut standby = Cluster::standby_of(&primary, &scratch.0, "standby1")
        .await
        .expect("pg_basebackup");
    standby.start().await.expect("standby starts");
    primary.crash().await;
    proxy.redirect(standby.addr());
    proxy.drop_connections();

    let mut found = Vec::new();
    if !all_health(
        &[server.addr],
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await
    {
        found.push(format!(
            "health stayed {:?} on a standby",
            health(server.addr).await
        ));
    }
    let mut request = tonic::Request::new(pb::StartWorkRequest {
        agent_id: "a".into(),
        slot_type: pb::SlotType::Work as i32,
    });
    request.set_timeout(Duration::from_secs(5));
    let asked = Instant::now();
    let start = client.start_work(request).await;
    match &start {
        Err(status) if status.code() == tonic::Code::Unavailable => {}
        other => found.push(format!(
            "StartWork on a standby, after {:?}: {other:?}",
            asked.elapsed()
        )),
    }
    // A server started now cannot migrate (nor check its migrations) on a
    // standby: it waits for its database, NOT_SERVING, instead of exiting.
    let late_url = format!("postgres://postgres@{}/fleetcare", proxy.addr);
    let mut late = Server::start(
        "late",
        server_args(&["--database-url".into(), late_url], &scratch),
        scratch.path("late.log"),
    );
    if !all_health(
        &[late.addr],
        ServingStatus::NotServing,
        Duration::from_secs(30),
    )
    .await
    {
        found.push("a server started on a standby did not answer NOT_SERVING".into());
    }
    // Promoted, it is the primary: both served.
    standby.promote().await.expect("promote");
    if let Err(e) = late.wait_serving(Duration::from_secs(30)).await {
        found.push(format!("{e} after the promotion"));
    }
    if !all_health(
        &[server.addr],
        ServingStatus::Serving,
        Duration::from_secs(30),
    )
    .await
    {
        found.push("not SERVING after the promotion".into());
    }
    assert!(found.is_empty(), "{found:#?}");
    // The committer's idle connections went to the old address: each may
    // fail one batch UNAVAILABLE (outcome unknown) before a new one is opened.
    let mut attempts = 0;
    let status = loop {
        attempts += 1;
        let reply = client
            .start_work(pb::StartWorkRequest {
                agent_id: "a".into(),
                slot_type: pb::SlotType::Work as i32,
            })
            .await;
        match reply {
            Ok(reply) => break reply.into_inner().agent.unwrap().status,
            Err(e) if e.code() == tonic::Code::Unavailable && attempts < 5 => {}
            // An earlier attempt committed after all.
            Err(e) if e.code() == tonic::Code::FailedPrecondition && attempts > 1 => {
                let agent = client
                    .get_agent(pb::GetAgentRequest {
                        agent_id: "a".into(),
                    })
                    .await
                    .expect("get agent");
                break agent.into_inner().agent.unwrap().status;
            }
            Err(e) => panic!("StartWork on the promoted standby, attempt {attempts}: {e:?}"),
        }
    };
    assert_eq!(status, pb::AgentStatus::Busy as i32);
    assert!(server.terminate().await, "a clean stop");
    assert!(late.terminate().await, "a clean stop");
}
