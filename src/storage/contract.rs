//! The store contract: the guarantees every backend keeps, as one set of test
//! bodies run against each store (below gRPC, through the store traits only).
//!
//! Each contract is an `async fn` taking a [`Subject`]; [`contract!`] makes
//! one test per backend it runs on (`storage::contract::<contract>::memory`,
//! `::sqlite`, `::postgres`). The memory store implements `AgentStore` and
//! `PipelineStore` only, so the healing and post-healing contracts run on
//! SQLite and Postgres. SQLite runs in a temporary file; Postgres in a fresh
//! database `fleetcare_test_<uuid>` on the server `FLEETCARE_TEST_DATABASE_URL`
//! names (dropped afterwards), and is skipped with a printed line when it is
//! unset, unless `FLEETCARE_REQUIRE_POSTGRES=1` (CI), which fails instead.
//! Every store runs on a manual clock: expiry is tested by advancing it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::agent::{AgentStatus, Cause, Event, SlotType};
use crate::domain::batch::{Command, Refusal};
use crate::domain::brakes::HealingPolicy;
use crate::domain::dispatch::{
    self, Candidate, ClaimRequest, LabelSelector, NoAgentAvailable, Operator, Requirement,
};
use crate::domain::healing::{Context, ErrorType, Evidence, Plan, Strategy};
use crate::domain::healing_records::{ErrorEvent, NewErrorEvent, RecoveryStatus};
use crate::domain::liveness::sweep_query;
use crate::domain::pipeline::{self, SessionFile};
use crate::domain::post_healing::{
    self, ActionRecord, ActionStatus, ActionType, Evaluation, Ineligible, Stagnation, Tier,
    effective,
};
use crate::domain::quota::{self, PoolName};
use crate::domain::transcript::UsageEntry;
use crate::domain::transition::{RevisionBounds, WatchFilter};
use crate::domain::usage::{self, MessageCopy, UsageGrouping, UsageQuery};
use crate::error::Error;
use crate::storage::clock::{Clock, ManualClock};
use crate::storage::memory::{MemoryPipelineStore, MemoryStore};
use crate::storage::{
    AgentQuery, AgentStore, ClaimQuery, HealingStore, PipelineStore, Planner, PostEvaluator,
    PostHealingStore, RecoveryActionQuery, SessionOutput, SessionWrite, StoreLocation,
    StoreOptions, Stores,
};

/// One store under test, behind its traits, on a manual clock.
struct Subject {
    agents: Arc<dyn AgentStore>,
    pipeline: Arc<dyn PipelineStore>,
    /// `None` for the memory store, which has no healing part.
    healing: Option<Arc<dyn HealingStore>>,
    posts: Option<Arc<dyn PostHealingStore>>,
    /// Moves the store's clock.
    clock: ManualClock,
    now: Clock,
    _cleanup: Cleanup,
}

impl Subject {
    fn healing(&self) -> &dyn HealingStore {
        self.healing
            .as_deref()
            .expect("a store with a healing part")
    }

    fn posts(&self) -> &dyn PostHealingStore {
        self.posts
            .as_deref()
            .expect("a store with a post-healing part")
    }
}

/// What a subject leaves behind: removed when the test passes, kept for
/// inspection when it fails.
enum Cleanup {
    Nothing,
    Dir(PathBuf),
    Postgres {
        admin_url: String,
        name: String,
        shutdown: CancellationToken,
    },
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match self {
            Cleanup::Nothing => {}
            Cleanup::Dir(dir) => {
                if std::thread::panicking() {
                    eprintln!("keeping {} for inspection", dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Cleanup::Postgres {
                admin_url,
                name,
                shutdown,
            } => {
                shutdown.cancel();
                if std::thread::panicking() {
                    eprintln!("keeping database {name} for inspection");
                    return;
                }
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop runs inside the test's runtime: a thread with its own.
                let _ = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async {
                        use sqlx::Connection;
                        if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .execute(&mut conn)
                            .await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

fn manual_clock() -> (Clock, ManualClock) {
    Clock::manual(Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap())
}

async fn memory() -> Option<Subject> {
    let (now, clock) = manual_clock();
    let mut pipeline = MemoryPipelineStore::default();
    pipeline.clock = now.clone();
    Some(Subject {
        agents: Arc::new(MemoryStore::new()),
        pipeline: Arc::new(pipeline),
        healing: None,
        posts: None,
        clock,
        now,
        _cleanup: Cleanup::Nothing,
    })
}

fn of_stores(stores: Stores, clock: ManualClock, cleanup: Cleanup) -> Subject {
    Subject {
        agents: stores.agents,
        pipeline: stores.pipeline,
        healing: Some(stores.healing),
        posts: Some(stores.posts),
        clock,
        now: stores.clock,
        _cleanup: cleanup,
    }
}

async fn sqlite() -> Option<Subject> {
    let (now, clock) = manual_clock();
    let dir = std::env::temp_dir().join(format!(
        "fleetcare-contract-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let options =
        StoreOptions::new(StoreLocation::Sqlite(dir.join("fleetcare.db"))).with_clock(now);
    let stores = Stores::open(&options, CancellationToken::new())
        .await
        .expect("sqlite store opens");
    Some(of_stores(stores, clock, Cleanup::Dir(dir)))
}

async fn postgres() -> Option<Subject> {
    let Ok(admin_url) = std::env::var("FLEETCARE_TEST_DATABASE_URL") else {
        if std::env::var("FLEETCARE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("FLEETCARE_REQUIRE_POSTGRES=1 but FLEETCARE_TEST_DATABASE_URL is not set");
        }
        // Past the test harness's capture, so the skip is seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "fleetcare: store contract on Postgres SKIPPED: FLEETCARE_TEST_DATABASE_URL is not set"
        );
        return None;
    };
    let name = format!("fleetcare_test_{}", uuid::Uuid::new_v4().simple());
    let (now, clock) = manual_clock();
    let options = StoreOptions::new(StoreLocation::Postgres(with_database(&admin_url, &name)))
        .with_clock(now);
    let shutdown = CancellationToken::new();
    let stores = Stores::open(&options, shutdown.clone())
        .await
        .expect("postgres store opens");
    Some(of_stores(
        stores,
        clock,
        Cleanup::Postgres {
            admin_url,
            name,
            shutdown,
        },
    ))
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    format!("{server}/{name}{query}")
}

/// One test per backend for the contract `$name`.
macro_rules! contract {
    ($name:ident on $($backend:ident),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $backend() {
                    if let Some(subject) = super::$backend().await {
                        super::$name(&subject).await;
                    }
                }
            )+
        }
    };
}

fn register(agent_id: &str) -> Command {
    Command::Register {
        agent_id: agent_id.into(),
        labels: Default::default(),
        quota_pools: Vec::new(),
        actor: "contract".into(),
    }
}

fn apply(agent_id: &str, event: Event) -> Command {
    Command::Apply {
        agent_id: agent_id.into(),
        event,
        fencing_token: None,
        actor: "contract".into(),
    }
}

// ---------------------------------------------------------------- agents

contract!(one_winner_per_agent_in_a_batch on memory, sqlite, postgres);

/// In one batch, commands on one agent are decided in arrival order, each on
/// the state the earlier ones left: of two StartWork, the first wins and the
/// second is refused; of two registrations, one creates.
async fn one_winner_per_agent_in_a_batch(s: &Subject) {
    let now = s.now.now();
    let setup = s
        .agents
        .commit_batch(&[register("a"), register("b")], now)
        .await
        .unwrap();
    assert!(setup.iter().all(|r| r.as_ref().is_ok_and(|a| a.created)));
    let batch = [
        apply("a", Event::StartWork(SlotType::Work)),
        apply("a", Event::StartWork(SlotType::Work)),
        apply("b", Event::StartWork(SlotType::Work)),
        register("c"),
        register("c"),
        apply("ghost", Event::FinishWork),
    ];
    let results = s.agents.commit_batch(&batch, now).await.unwrap();
    assert_eq!(results.len(), batch.len());
    let first = results[0].as_ref().expect("the first StartWork wins");
    assert_eq!(first.agent.state.status, AgentStatus::Busy);
    assert!(first.transition.is_some());
    assert!(
        matches!(results[1], Err(Refusal::Transition(_))),
        "the second StartWork of the batch sees the first: {:?}",
        results[1]
    );
    assert_eq!(
        results[2].as_ref().unwrap().agent.state.status,
        AgentStatus::Busy
    );
    let created: Vec<bool> = results[3..5]
        .iter()
        .map(|r| r.as_ref().unwrap().created)
        .collect();
    assert_eq!(created, [true, false], "one registration creates");
    assert!(matches!(results[5], Err(Refusal::UnknownAgent(_))));
    // What was committed is what was answered.
    let a = s.agents.get_agent("a").await.unwrap();
    assert_eq!(a.state.status, AgentStatus::Busy);
    assert_eq!(a.revision, first.transition.as_ref().unwrap().revision);
    let history = s.agents.transitions_after(0, Some("a"), 100).await.unwrap();
    assert_eq!(history.len(), 2, "registered, then busy once: {history:?}");
}

contract!(revisions_are_gap_free_in_commit_order on memory, sqlite, postgres);

/// Batches committing at once (never two naming one agent) get consecutive
/// revisions each, in command order, and together every revision from 1 to
/// the head, none twice.
async fn revisions_are_gap_free_in_commit_order(s: &Subject) {
    const WRITERS: usize = 8;
    const BATCHES: usize = 5;
    let now = s.now.now();
    let writers = (0..WRITERS).map(|w| {
        let agents = s.agents.clone();
        tokio::spawn(async move {
            let mut ranges = Vec::new();
            for b in 0..BATCHES {
                let batch: Vec<Command> = (0..3)
                    .map(|i| register(&format!("w{w}-b{b}-{i}")))
                    .collect();
                let results = agents.commit_batch(&batch, now).await.unwrap();
                let revisions: Vec<i64> = results
                    .iter()
                    .map(|r| r.as_ref().unwrap().transition.as_ref().unwrap().revision)
                    .collect();
                ranges.push(revisions);
            }
            ranges
        })
    });
    let mut all = Vec::new();
    for writer in writers.collect::<Vec<_>>() {
        let ranges = writer.await.unwrap();
        // One writer's batches commit one after another: increasing ranges.
        for pair in ranges.windows(2) {
            assert!(pair[0].last() < pair[1].first(), "{ranges:?}");
        }
        for range in ranges {
            assert!(
                range.windows(2).all(|p| p[1] == p[0] + 1),
                "a batch's revisions are consecutive, in command order: {range:?}"
            );
            all.extend(range);
        }
    }
    let total = (WRITERS * BATCHES * 3) as i64;
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "no revision twice");
    assert_eq!(distinct, (1..=total).collect(), "no gap");
    let history = s.agents.transitions_after(0, None, 10_000).await.unwrap();
    let revisions: Vec<i64> = history.iter().map(|t| t.revision).collect();
    assert_eq!(revisions, (1..=total).collect::<Vec<_>>());
    assert_eq!(s.agents.revision_bounds().await.unwrap().head, total);
}

contract!(quota_pools_are_stored_replaced_and_checked on memory, sqlite, postgres);

/// An agent's quota pools are stored as registered, in order, replaced by a
/// later registration, and read back by every read; a batch decided on a
/// remembered agent whose pools changed since is decided again on the
/// stored row (the pools are part of what the store checks).
async fn quota_pools_are_stored_replaced_and_checked(s: &Subject) {
    let store = &s.agents;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let pools = |names: &[&str]| -> Vec<PoolName> {
        quota::pool_names("quota_pools", names).expect("well formed")
    };
    let register_in = |names: &[&str]| Command::Register {
        agent_id: "p".into(),
        labels: Default::default(),
        quota_pools: pools(names),
        actor: "contract".into(),
    };
    let made = store
        .commit_batch(&[register_in(&["acct-42/opus", "acct-42"])], t0)
        .await
        .unwrap();
    let made = made[0].clone().unwrap().agent;
    assert_eq!(made.quota_pools, pools(&["acct-42/opus", "acct-42"]));
    assert_eq!(store.get_agent("p").await.unwrap(), made);

    store
        .commit_batch(&[register_in(&["org-7"])], t0)
        .await
        .unwrap();
    let replaced = store.get_agent("p").await.unwrap();
    assert_eq!(replaced.quota_pools, pools(&["org-7"]));
    assert_eq!(replaced.revision, made.revision, "no transition");
    let listed = store
        .list_agents(&AgentQuery {
            limit: 10,
            ..AgentQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(listed[0].quota_pools, pools(&["org-7"]));

    // Decided on the agent as first made (its pools since replaced): the
    // write checks them and the batch is decided on the stored row.
    let outcomes = store
        .commit_batch_known(
            &[apply("p", Event::StartWork(SlotType::Work))],
            Some(vec![made]),
            t0,
        )
        .await
        .unwrap();
    let busy = outcomes[0].clone().unwrap().agent;
    assert_eq!(busy.quota_pools, pools(&["org-7"]));
    assert_eq!(store.get_agent("p").await.unwrap(), busy);
}

contract!(a_pool_report_parks_its_members_and_the_release_lets_them_go_one_by_one on memory, sqlite, postgres);

fn register_in(agent_id: &str, pools: &[&str]) -> Command {
    Command::Register {
        agent_id: agent_id.into(),
        labels: Default::default(),
        quota_pools: quota::pool_names("quota_pools", pools).expect("well formed"),
        actor: "contract".into(),
    }
}

fn pool_report(
    agent_id: &str,
    pool: Option<&str>,
    window: Option<quota::Window>,
    recovery_at: chrono::DateTime<Utc>,
) -> Command {
    let Event::ReportExhausted(report) = exhausted(recovery_at) else {
        unreachable!()
    };
    Command::ReportExhausted {
        agent_id: agent_id.into(),
        report,
        quota_pool: pool.map(|p| quota::pool_name("quota_pool", p).unwrap()),
        window,
        fencing_token: None,
        actor: "contract".into(),
    }
}

fn pool(name: &str) -> PoolName {
    quota::pool_name("pool", name).unwrap()
}

/// One member's report parks its pool: in the same commit the reporter
/// (EXHAUSTED) and every IDLE member (POOL_EXHAUSTED), each transition
/// naming the pool, with consecutive revisions; a BUSY member is parked when
/// its slot ends, an OFFLINE one when it returns, a new member when it
/// registers; other pools' agents are untouched. A later shorter report
/// keeps the window; a weekly one outlasts the 5-hour one. A held agent is
/// neither resumed by hand nor woken by the sweeper; once the pool lifts the
/// release lets go of the canary first, each member exactly once.
async fn a_pool_report_parks_its_members_and_the_release_lets_them_go_one_by_one(s: &Subject) {
    let store = &s.agents;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let commit = |commands: Vec<Command>, at: chrono::DateTime<Utc>| {
        let store = store.clone();
        async move { store.commit_batch(&commands, at).await.unwrap() }
    };
    commit(
        vec![
            register_in("a", &["acct"]),
            register_in("b", &["acct"]),
            register_in("c", &["acct"]),
            register_in("d", &["acct"]),
            register_in("e", &["other"]),
            register("x"),
        ],
        t0,
    )
    .await;
    commit(
        vec![
            apply("b", Event::StartWork(SlotType::Work)),
            apply("d", Event::MarkOffline),
        ],
        t0,
    )
    .await;
    let head = store.revision_bounds().await.unwrap().head;

    // The report names no pool: the agent's only one.
    let one_hour = t0 + Duration::hours(1);
    let outcome = commit(
        vec![pool_report(
            "a",
            None,
            Some(quota::Window::FiveHour),
            one_hour,
        )],
        t0,
    )
    .await;
    let applied = outcome[0].clone().unwrap();
    let t = applied.transition.clone().unwrap();
    assert_eq!(
        (t.cause, t.to, t.quota_pool.clone()),
        (Cause::Exhausted, AgentStatus::Exhausted, Some(pool("acct")))
    );
    assert_eq!(t.revision, head + 1);
    let parked: Vec<(&str, Cause, Option<i64>)> = applied
        .other_transitions
        .iter()
        .map(|t| (t.agent_id.as_str(), t.cause, Some(t.revision)))
        .collect();
    assert_eq!(parked, [("c", Cause::PoolExhausted, Some(head + 2))]);
    assert_eq!(applied.other_transitions[0].quota_pool, Some(pool("acct")));
    let c = store.get_agent("c").await.unwrap();
    assert_eq!(c.state.status, AgentStatus::Exhausted);
    assert_eq!(
        c.state.exhaustion.as_ref().unwrap().recovery.recovery_at,
        one_hour
    );
    assert!(c.pool_holds.held_by(&pool("acct")));
    for (id, status) in [
        ("b", AgentStatus::Busy),
        ("d", AgentStatus::Offline),
        ("e", AgentStatus::Idle),
        ("x", AgentStatus::Idle),
    ] {
        assert_eq!(
            store.get_agent(id).await.unwrap().state.status,
            status,
            "{id}"
        );
    }
    let history = store.transitions_after(head, None, 100).await.unwrap();
    assert_eq!(history.len(), 2, "one commit, two transitions");
    assert!(history.iter().all(|t| t.quota_pool == Some(pool("acct"))));
    let states = store.quota_pool_states().await.unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1.parked_until(t0), Some(one_hour));

    // The busy member lands EXHAUSTED at the end of its slot, the offline
    // one when it returns, a new member as it registers.
    let finished = commit(vec![apply("b", Event::FinishWork)], t0).await;
    let t = finished[0].clone().unwrap().transition.unwrap();
    assert_eq!(
        (t.from, t.to, t.cause),
        (
            Some(AgentStatus::Busy),
            AgentStatus::Exhausted,
            Cause::PoolExhausted
        )
    );
    let back = commit(vec![apply("d", Event::Heartbeat)], t0).await;
    let t = back[0].clone().unwrap().transition.unwrap();
    assert_eq!(
        (t.to, t.cause),
        (AgentStatus::Exhausted, Cause::PoolExhausted)
    );
    let joined = commit(vec![register_in("f", &["acct"])], t0).await;
    let joined = joined[0].clone().unwrap();
    assert_eq!(joined.transition.unwrap().cause, Cause::Registered);
    assert_eq!(joined.agent.state.status, AgentStatus::Exhausted);
    assert_eq!(joined.other_transitions[0].cause, Cause::PoolExhausted);

    // A later, shorter report keeps the 5-hour window; a weekly one is kept
    // apart and outlasts it.
    commit(
        vec![pool_report(
            "c",
            Some("acct"),
            Some(quota::Window::FiveHour),
            t0 + Duration::minutes(30),
        )],
        t0,
    )
    .await;
    let three_hours = t0 + Duration::hours(3);
    commit(
        vec![pool_report(
            "c",
            Some("acct"),
            Some(quota::Window::Weekly),
            three_hours,
        )],
        t0,
    )
    .await;
    let state = store.quota_pool_states().await.unwrap().remove(0).1;
    assert_eq!(state.windows[&quota::Window::FiveHour].until, one_hour);
    assert_eq!(state.windows[&quota::Window::Weekly].until, three_hours);
    let after_five_hour = t0 + Duration::hours(2);
    assert!(state.is_parked(after_five_hour));

    // A report naming a pool the agent is not in is refused, naming its pools.
    let refused = commit(vec![pool_report("e", Some("acct"), None, one_hour)], t0).await;
    assert!(matches!(&refused[0], Err(Refusal::NotPoolMember(m)) if m.pools == [pool("other")]));
    // A held agent is not resumed by hand, nor woken by the sweeper.
    let resumed = commit(
        vec![Command::Resume {
            agent_id: "c".into(),
            actor: "contract".into(),
        }],
        t0,
    )
    .await;
    assert!(
        matches!(&resumed[0], Err(Refusal::HeldByPool { pools, .. }) if pools == &[pool("acct")])
    );
    let query = sweep_query(three_hours + Duration::seconds(1), Duration::days(1), true);
    let due = store.sweep_candidates(&query, 100).await.unwrap();
    assert!(due.is_empty(), "held agents are the release's: {due:?}");

    // The pool lifts: the canary (parked longest, online) goes first, alone.
    let settings =
        quota::ReleaseSettings::new(Duration::seconds(60), Duration::seconds(30), 10).unwrap();
    let at = three_hours + Duration::seconds(1);
    let due_at = |at: chrono::DateTime<Utc>| {
        let store = store.clone();
        async move {
            let state = store.quota_pool_states().await.unwrap().remove(0).1;
            let agents = store.pool_agents(&pool("acct")).await.unwrap();
            let members = crate::domain::batch::held_members(&pool("acct"), &state, &agents);
            quota::due_releases(&state, &members, &settings, at)
        }
    };
    let release = |id: &str| Command::PoolRelease {
        pool: pool("acct"),
        agent_id: id.into(),
        actor: "sweeper".into(),
    };
    assert_eq!(due_at(at).await, ["a"]);
    let released = commit(vec![release("a"), release("a")], at).await;
    let t = released[0].clone().unwrap().transition.unwrap();
    assert_eq!(
        (t.from, t.to, t.cause, t.quota_pool),
        (
            Some(AgentStatus::Exhausted),
            AgentStatus::Idle,
            Cause::PoolReleased,
            Some(pool("acct"))
        )
    );
    assert_eq!(
        released[1].clone().unwrap().transition,
        None,
        "exactly once"
    );
    assert!(
        due_at(at).await.is_empty(),
        "the others wait for the canary"
    );

    // The canary completes a work slot: the others follow, each once.
    commit(vec![apply("a", Event::StartWork(SlotType::Work))], at).await;
    commit(vec![apply("a", Event::FinishWork)], at).await;
    let state = store.quota_pool_states().await.unwrap().remove(0).1;
    assert_eq!(state.canary.unwrap().completed_at, Some(at));
    let later = at + Duration::seconds(31);
    let mut rest = due_at(later).await;
    rest.sort();
    assert_eq!(rest, ["b", "c", "d", "f"]);
    let commands: Vec<Command> = rest.iter().map(|id| release(id)).collect();
    let released = commit(commands, later).await;
    for outcome in &released {
        let applied = outcome.clone().unwrap();
        assert_eq!(applied.agent.state.status, AgentStatus::Idle);
        assert!(!applied.agent.pool_holds.is_held());
    }
    assert!(due_at(later).await.is_empty());
}

contract!(agent_reads_and_maintenance on memory, sqlite, postgres);

/// Heartbeats move forward only (an agent's latest beat wins, whatever the
/// order); a snapshot and the counts carry the revision they were read at;
/// what a batch answers is what a read returns (times at the store's
/// precision); a negative limit reads nothing; pruning removes a prefix
/// through the newest expired revision and keeps the head.
async fn agent_reads_and_maintenance(s: &Subject) {
    let store = &s.agents;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let at = |secs: i64| t0 + Duration::seconds(secs);
    let commit = |commands: Vec<Command>, now| async move {
        let outcomes = store.commit_batch(&commands, now).await.unwrap();
        outcomes.into_iter().map(|o| o.unwrap()).collect::<Vec<_>>()
    };
    commit(vec![register("a"), register("b")], t0).await;
    store
        .record_heartbeats(&[
            ("a".into(), at(10)),
            ("a".into(), at(3)),
            ("ghost".into(), at(10)),
        ])
        .await
        .unwrap();
    store
        .record_heartbeats(&[("a".into(), at(5))])
        .await
        .unwrap();
    store.record_heartbeats(&[]).await.unwrap();
    assert_eq!(
        store.get_agent("a").await.unwrap().state.last_heartbeat_at,
        at(10)
    );
    assert!(matches!(
        store.get_agent("ghost").await,
        Err(Error::NotFound { .. })
    ));

    commit(vec![apply("b", Event::StartWork(SlotType::Work))], at(600)).await;
    let filter = WatchFilter {
        agent_ids: ["a".to_string(), "b".to_string()].into(),
        statuses: [AgentStatus::Busy].into(),
    };
    let (head, agents) = store.snapshot(&filter).await.unwrap();
    assert_eq!(head, 3);
    let ids: Vec<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["b"]);
    assert_eq!(
        store
            .snapshot(&WatchFilter::default())
            .await
            .unwrap()
            .1
            .len(),
        2
    );
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts.revision, 3);
    assert_eq!(counts.of(AgentStatus::Idle), 1);
    assert_eq!(counts.of(AgentStatus::Busy), 1);

    let recovery_at = at(1800) + Duration::nanoseconds(1_234_567);
    let answered = commit(vec![apply("a", exhausted(recovery_at))], at(900)).await;
    let history = store.transitions_after(3, Some("a"), 10).await.unwrap();
    assert_eq!(history, [answered[0].transition.clone().unwrap()]);
    assert_eq!(store.get_agent("a").await.unwrap().revision, 4);

    let none = AgentQuery {
        limit: -1,
        ..Default::default()
    };
    assert!(store.list_agents(&none).await.unwrap().is_empty());
    assert!(
        store
            .transitions_after(0, None, -1)
            .await
            .unwrap()
            .is_empty()
    );
    let sweep = sweep_query(at(7200), Duration::minutes(1), true);
    assert!(store.sweep_candidates(&sweep, -1).await.unwrap().is_empty());
    let found = store.sweep_candidates(&sweep, 10).await.unwrap();
    let all = AgentQuery {
        limit: 10,
        ..Default::default()
    };
    for agent in store.list_agents(&all).await.unwrap() {
        let selected = sweep.selects(&agent.state);
        assert_eq!(selected, found.contains(&agent.agent_id), "{agent:?}");
    }

    // The registrations (revisions 1 and 2) occurred before a minute.
    assert_eq!(store.prune_transitions(at(60)).await.unwrap(), 2);
    let bounds = |pruned_through, head| RevisionBounds {
        pruned_through,
        head,
    };
    assert_eq!(store.revision_bounds().await.unwrap(), bounds(2, 4));
    assert_eq!(store.prune_transitions(at(60)).await.unwrap(), 0);
    assert_eq!(store.prune_transitions(at(3600)).await.unwrap(), 2);
    assert_eq!(store.revision_bounds().await.unwrap(), bounds(4, 4));
    assert!(
        store
            .transitions_after(0, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The next revision continues from the head, not from the (empty) history.
    let next = commit(vec![apply("b", Event::FinishWork)], at(60)).await;
    assert_eq!(next[0].agent.revision, 5);
}

// ---------------------------------------------------------------- claims

fn labelled(agent_id: &str, labels: &[(&str, &str)]) -> Command {
    Command::Register {
        quota_pools: Vec::new(),
        agent_id: agent_id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        actor: "contract".into(),
    }
}

fn claim_of(selector: LabelSelector, request_id: &str) -> Command {
    Command::Claim {
        unique: uuid::Uuid::new_v4().simple().to_string(),
        request: ClaimRequest {
            selector,
            slot_type: SlotType::Work,
            lease_duration: Duration::seconds(30),
            wait_timeout: Duration::zero(),
            request_id: request_id.into(),
        },
        actor: "sched".into(),
    }
}

fn requirement(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

contract!(claims_offered_stale_candidates_are_decided_on_stored_rows on memory, sqlite, postgres);

/// A batch's claims offered candidates from memory (what the committer does
/// when its cache knows enough claimable agents) take one that is still
/// claimable as stored; offered only stale ones (claimed since), they are
/// decided on what is stored, never on the stale rows.
async fn claims_offered_stale_candidates_are_decided_on_stored_rows(s: &Subject) {
    let store = &s.agents;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let at = |secs: i64| t0 + Duration::seconds(secs);
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        store
            .commit_batch(&[register(id)], at(i as i64))
            .await
            .unwrap();
    }
    let idle_a = store.get_agent("a").await.unwrap();
    let claim = |request_id: &str| claim_of(LabelSelector::default(), request_id);

    // Offered "c", which is claimable: taken, though "a" is idle longer
    // (the offer is the server's choice; the store checks it, it does not
    // choose again unless it must).
    let offered_c = store.get_agent("c").await.unwrap();
    let took = store
        .commit_batch_known(&[claim("")], Some(vec![offered_c]), at(10))
        .await
        .unwrap();
    let took = took[0].clone().unwrap().claim.unwrap();
    let stored_c = store.get_agent("c").await.unwrap();
    if stored_c.claim.is_some() {
        assert_eq!(took.agent_id, "c");
    } else {
        // A store that ignores what is offered chose on its own rows.
        assert_eq!(took.agent_id, "a");
    }

    // "a" claimed meanwhile (by another replica, say), then offered as the
    // idle agent it was: the store decides on the stored row and takes
    // another claimable agent, or refuses if none is left.
    store
        .commit_batch(&[claim("elsewhere")], at(11))
        .await
        .unwrap()
        .into_iter()
        .for_each(|o| {
            o.unwrap();
        });
    let mut claimed = Vec::new();
    for id in ["a", "b", "c"] {
        if store.get_agent(id).await.unwrap().claim.is_some() {
            claimed.push(id.to_owned());
        }
    }
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    let outcome = store
        .commit_batch_known(&[claim("")], Some(vec![idle_a.clone()]), at(12))
        .await
        .unwrap();
    let third = outcome[0].clone().unwrap().claim.unwrap();
    assert!(!claimed.contains(&third.agent_id), "{third:?}");
    let outcome = store
        .commit_batch_known(&[claim("")], Some(vec![idle_a]), at(13))
        .await
        .unwrap();
    assert_eq!(outcome[0], Err(Refusal::NoAgentAvailable));
    for id in ["a", "b", "c"] {
        let agent = store.get_agent(id).await.unwrap();
        assert_eq!(agent.state.status, AgentStatus::Busy, "{id}");
    }
}

contract!(a_claim_takes_what_the_selector_matches on memory, sqlite, postgres);

/// The store reads candidates with the selector in SQL; what it picks is
/// exactly the domain's choice (`dispatch::choose` over every agent), and
/// its count of why none is free is the domain's count.
async fn a_claim_takes_what_the_selector_matches(s: &Subject) {
    let store = &s.agents;
    let t0 = s.now.now();
    let agents: [(&str, &[(&str, &str)]); 8] = [
        ("a", &[("zone", "eu"), ("gpu", "a100")]),
        ("b", &[("zone", "us"), ("gpu", "h100")]),
        ("c", &[("zone", "eu")]),
        ("d", &[("zone", "eu"), ("spot", "yes")]),
        ("e", &[("team.io/name", "x-1"), ("zone", "ap")]),
        ("f", &[("zone", "eu"), ("gpu", "a100")]),
        ("g", &[]),
        ("h", &[("zone", "us")]),
    ];
    // One at a time, a second apart: the idle-longest order is a, b, c, ...
    for (i, (id, labels)) in agents.iter().enumerate() {
        let at = t0 + Duration::seconds(i as i64);
        store
            .commit_batch(&[labelled(id, labels)], at)
            .await
            .unwrap();
    }
    let now = t0 + Duration::seconds(100);
    store
        .commit_batch(
            &[
                apply("h", Event::StartWork(SlotType::Work)),
                Command::Cordon {
                    agent_id: "f".into(),
                    reason: "disk".into(),
                    actor: "contract".into(),
                },
            ],
            now,
        )
        .await
        .unwrap();
    let selectors = vec![
        LabelSelector::default(),
        LabelSelector {
            match_labels: [("zone".to_string(), "eu".to_string())].into(),
            match_expressions: vec![],
        },
        LabelSelector {
            match_labels: [("zone".to_string(), "eu".to_string())].into(),
            match_expressions: vec![requirement("gpu", Operator::NotIn, &["a100"])],
        },
        LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![
                requirement("zone", Operator::In, &["us", "ap"]),
                requirement("spot", Operator::DoesNotExist, &[]),
            ],
        },
        LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![requirement("team.io/name", Operator::Exists, &[])],
        },
        LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![requirement("gpu", Operator::Exists, &[])],
        },
        LabelSelector {
            match_labels: [("zone".to_string(), "mars".to_string())].into(),
            match_expressions: vec![],
        },
    ];
    let everyone = AgentQuery {
        limit: 100,
        ..Default::default()
    };
    for selector in selectors {
        let all = store.list_agents(&everyone).await.unwrap();
        let candidates: Vec<Candidate<'_>> = all
            .iter()
            .map(|agent| Candidate {
                agent,
                cordoned: agent.cordon_reason.is_some(),
            })
            .collect();
        let expected = dispatch::choose(&selector, &candidates).map(|a| a.agent_id.clone());
        let counted = NoAgentAvailable::count(&selector, &candidates);
        assert_eq!(
            store.no_agent_available(&selector).await.unwrap(),
            counted,
            "{selector:?}"
        );
        let outcome = store
            .commit_batch(&[claim_of(selector.clone(), "")], now)
            .await
            .unwrap()
            .remove(0);
        match (expected, outcome) {
            (Ok(id), Ok(applied)) => {
                let claim = applied.claim.expect("the claim");
                assert_eq!(claim.agent_id, id, "{selector:?}");
                assert_eq!(claim.fencing_token, applied.transition.unwrap().revision);
                // Back to idle, as it was (its idle-since time moves: fine,
                // each selector is checked against the agents as they are).
                let released = store
                    .commit_batch(
                        &[Command::ReleaseClaim {
                            agent_id: id.clone(),
                            claim_id: claim.claim_id.clone(),
                            fencing_token: claim.fencing_token,
                            actor: "sched".into(),
                        }],
                        now,
                    )
                    .await
                    .unwrap()
                    .remove(0)
                    .unwrap();
                assert_eq!(released.agent.state.status, AgentStatus::Idle);
                assert_eq!(released.agent.claim, None);
            }
            (Err(_), Err(Refusal::NoAgentAvailable)) => {}
            (expected, got) => panic!("{selector:?}: expected {expected:?}, got {got:?}"),
        }
    }
    // Two claims of one batch take two agents.
    let two = store
        .commit_batch(
            &[
                claim_of(LabelSelector::default(), ""),
                claim_of(LabelSelector::default(), ""),
            ],
            now,
        )
        .await
        .unwrap();
    let ids: BTreeSet<String> = two
        .into_iter()
        .map(|o| o.unwrap().claim.unwrap().agent_id)
        .collect();
    assert_eq!(ids.len(), 2);
}

contract!(claims_are_recorded_replayed_listed_and_pruned on memory, sqlite, postgres);

/// A claim is on its agent and in the record of claims; its idempotency
/// key returns it again (in another batch, and in the same one); it is
/// listed while active; its record goes with the history of its time once
/// it has ended.
async fn claims_are_recorded_replayed_listed_and_pruned(s: &Subject) {
    let store = &s.agents;
    let t0 = s.now.now();
    store
        .commit_batch(&[register("p"), register("q")], t0)
        .await
        .unwrap();
    let made = store
        .commit_batch(
            &[
                claim_of(LabelSelector::default(), "job-1"),
                claim_of(LabelSelector::default(), "job-1"),
            ],
            t0,
        )
        .await
        .unwrap();
    let first = made[0].as_ref().unwrap().claim.clone().unwrap();
    let again = made[1].as_ref().unwrap();
    assert_eq!(
        again.claim.as_ref(),
        Some(&first),
        "the same claim in one batch"
    );
    assert!(again.transition.is_none());
    let stored = store.get_agent(&first.agent_id).await.unwrap();
    assert_eq!(stored.claim.as_ref(), Some(&first));
    assert_eq!(
        store.find_claim(&first.claim_id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.find_claim("nope").await.unwrap(), None);
    let replay = store
        .commit_batch(&[claim_of(LabelSelector::default(), "job-1")], t0)
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(replay.claim, Some(first.clone()));
    assert!(replay.transition.is_none());
    // Another holder's equal id is another claim.
    let mut other = claim_of(LabelSelector::default(), "job-1");
    if let Command::Claim { actor, .. } = &mut other {
        *actor = "other".into();
    }
    let second = store
        .commit_batch(&[other], t0)
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let second = second.claim.unwrap();
    assert_ne!(second.agent_id, first.agent_id);
    let listed = store
        .list_claims(&ClaimQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed, [first.clone(), second.clone()]);
    let mine = store
        .list_claims(&ClaimQuery {
            holder: Some("other".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine, std::slice::from_ref(&second));
    // The first claim ends; an hour later its record is pruned with its
    // history, the active one's is kept.
    store
        .commit_batch(
            &[Command::ReleaseClaim {
                agent_id: first.agent_id.clone(),
                claim_id: first.claim_id.clone(),
                fencing_token: first.fencing_token,
                actor: "sched".into(),
            }],
            t0,
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    store
        .prune_transitions(t0 + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(store.find_claim(&first.claim_id).await.unwrap(), None);
    assert_eq!(
        store.find_claim(&second.claim_id).await.unwrap(),
        Some(second)
    );
}

contract!(the_sweeper_finds_expired_leases_and_long_offline_agents on memory, sqlite, postgres);

/// The sweep's query selects agents whose lease ran out and agents OFFLINE
/// past the retention; the sweep command then ends the claim (CLAIM_EXPIRED)
/// or deletes the agent (EXPIRED), once.
async fn the_sweeper_finds_expired_leases_and_long_offline_agents(s: &Subject) {
    let store = &s.agents;
    let t0 = s.now.now();
    // "held" idle longest: the claim takes it.
    store
        .commit_batch(&[register("held")], t0 - Duration::seconds(1))
        .await
        .unwrap();
    store
        .commit_batch(&[register("gone"), register("kept")], t0)
        .await
        .unwrap();
    let claimed = store
        .commit_batch(&[claim_of(LabelSelector::default(), "")], t0)
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(claimed.agent.agent_id, "held");
    store
        .commit_batch(&[apply("gone", Event::MarkOffline)], t0)
        .await
        .unwrap();
    let later = t0 + Duration::hours(2);
    store
        .commit_batch(&[apply("kept", Event::MarkOffline)], later)
        .await
        .unwrap();
    let query = sweep_query(later, Duration::hours(10), false)
        .with_offline_retention(Duration::hours(1), later);
    let found: BTreeSet<String> = store
        .sweep_candidates(&query, 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(found, ["gone".to_string(), "held".to_string()].into());
    let sweep = |agent_id: &str| Command::Sweep {
        agent_id: agent_id.into(),
        heartbeat_timeout: Duration::hours(10),
        offline_allowed: false,
        offline_retention: Duration::hours(1),
        actor: "sweeper".into(),
    };
    let swept = store
        .commit_batch(
            &[sweep("held"), sweep("gone"), sweep("kept"), sweep("held")],
            later,
        )
        .await
        .unwrap();
    let causes: Vec<Option<Cause>> = swept
        .iter()
        .map(|o| o.as_ref().unwrap().transition.as_ref().map(|t| t.cause))
        .collect();
    assert_eq!(
        causes,
        [Some(Cause::ClaimExpired), Some(Cause::Expired), None, None],
        "each once"
    );
    assert!(matches!(
        store.get_agent("gone").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(store.get_agent("held").await.unwrap().claim, None);
    assert!(store.sweep_candidates(&query, 10).await.unwrap().is_empty());
}

fn exhausted(recovery_at: chrono::DateTime<Utc>) -> Event {
    Event::ReportExhausted(crate::domain::agent::ExhaustionReport {
        reason: crate::domain::agent::ExhaustionReason::RateLimit,
        explicit_recovery_at: Some(recovery_at),
        headers: vec![],
        message: String::new(),
        time_zone: None,
        default_recovery: Duration::hours(1),
        default_billing_recovery: Duration::hours(5),
    })
}

// ---------------------------------------------------------------- healing

fn error(agent_id: &str) -> NewErrorEvent {
    NewErrorEvent {
        agent_id: agent_id.into(),
        message: "tool call failed".into(),
        context: Context::from([("tool".to_owned(), "bash".to_owned())]),
        error_type: ErrorType::ExecutionFailure,
        severity: 0.5,
        actor: "contract".into(),
    }
}

fn planner() -> Planner<'static> {
    Box::new(
        |_event: &ErrorEvent, _evidence: &[Evidence], _closed_off: &[Strategy]| Plan {
            strategy: Strategy::Retry,
            chosen: Strategy::Retry,
            parameters: Context::new(),
            estimated_duration: Duration::seconds(30),
            success_probability: 0.7,
            risk: 0.1,
            escalated: false,
            reason: "contract".into(),
        },
    )
}

contract!(one_active_recovery_per_agent on sqlite, postgres);

/// Of many plans for one agent at once, exactly one is stored ACTIVE; the
/// others are refused naming it. Another agent is not held up.
async fn one_active_recovery_per_agent(s: &Subject) {
    let healing = s.healing.clone().unwrap();
    let event = healing.record_error(error("a")).await.unwrap();
    let plans = (0..8).map(|_| {
        let healing = healing.clone();
        tokio::spawn(async move {
            healing
                .plan_recovery(
                    event.id,
                    Duration::minutes(5),
                    "contract",
                    &HealingPolicy::unbraked(),
                    planner(),
                )
                .await
        })
    });
    let mut won = Vec::new();
    let mut refused = Vec::new();
    for plan in plans.collect::<Vec<_>>() {
        match plan.await.unwrap() {
            Ok(action) => won.push(action),
            Err(Error::RecoveryAlreadyActive(active)) => refused.push(active.action_id),
            Err(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one plan wins");
    assert_eq!(won[0].status, RecoveryStatus::Active);
    assert!(refused.iter().all(|id| *id == won[0].id), "{refused:?}");
    let active = s
        .healing()
        .list_recovery_actions(&RecoveryActionQuery {
            agent_id: Some("a".into()),
            status: Some(RecoveryStatus::Active),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(active.len(), 1);
    let other = s.healing().record_error(error("b")).await.unwrap();
    s.healing()
        .plan_recovery(
            other.id,
            Duration::minutes(5),
            "contract",
            &HealingPolicy::unbraked(),
            planner(),
        )
        .await
        .expect("another agent plans freely");
}

contract!(the_brakes_decide_on_the_kept_census_and_the_agent_s_budget on sqlite, postgres);

/// The brakes through the store's flows, on its clock: the census of the
/// fleet and of the agent's group as the agents were written (an OFFLINE one
/// unhealthy, an EXHAUSTED one not counted and never planned), the share
/// braked exactly at its limit, each decision recorded with the numbers it
/// was taken on; an agent's retry budget spent, and free again once its
/// window has passed.
async fn the_brakes_decide_on_the_kept_census_and_the_agent_s_budget(s: &Subject) {
    use crate::domain::brakes::{self, Census, Verdict};
    use crate::domain::healing_records::RecoveryOutcome;
    use crate::storage::DecisionQuery;

    let now = s.now.now();
    let mut commands: Vec<Command> = (0..10)
        .map(|i| labelled(&format!("x{i}"), &[("team", "x")]))
        .collect();
    commands.extend((0..5).map(|i| labelled(&format!("y{i}"), &[("team", "y")])));
    for outcome in s.agents.commit_batch(&commands, now).await.unwrap() {
        outcome.unwrap();
    }
    let offline_and_exhausted = [
        apply("x9", Event::MarkOffline),
        apply("x8", exhausted(now + Duration::hours(2))),
    ];
    for outcome in s
        .agents
        .commit_batch(&offline_and_exhausted, now)
        .await
        .unwrap()
    {
        outcome.unwrap();
    }
    let policy = HealingPolicy {
        group_by: Some("team".into()),
        max_unhealthy_percent: 30,
        min_unhealthy: 0,
        max_plans_per_minute: 1000,
        max_group_plans_per_minute: 1000,
        retry_budget: 2,
        retry_window: Duration::hours(1),
        ..HealingPolicy::default()
    };
    let plan = |agent: &'static str| {
        let policy = policy.clone();
        async move {
            let event = s.healing().record_error(error(agent)).await.unwrap();
            s.healing()
                .plan_recovery(
                    event.id,
                    Duration::minutes(5),
                    "contract",
                    &policy,
                    planner(),
                )
                .await
        }
    };
    let reason = |planned: crate::error::Result<_>| match planned {
        Err(Error::NotPlanned(not)) => not.reason,
        other => panic!("expected a braked plan, got {other:?}"),
    };

    // Team x counts 9 (x8 is EXHAUSTED), x9 OFFLINE among them.
    let allowed = brakes::allowed_unhealthy(&policy, 9);
    assert!(allowed >= 2 && allowed < brakes::allowed_unhealthy(&policy, 14));
    assert_eq!(reason(plan("x8").await), "HEALING_AGENT_EXHAUSTED");
    let agents = ["x0", "x1", "x2", "x3", "x4", "x5"];
    for agent in &agents[..allowed as usize - 1] {
        plan(agent).await.expect("room in the group");
    }
    let braked = agents[allowed as usize - 1];
    assert_eq!(reason(plan(braked).await), "HEALING_BRAKE_UNHEALTHY_SHARE");
    let decisions = s
        .healing()
        .list_healing_decisions(&DecisionQuery {
            agent_id: Some(braked.into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(decisions.len(), 1);
    let numbers = &decisions[0].numbers;
    assert_eq!(decisions[0].verdict, Verdict::Braked);
    assert_eq!(numbers.group.as_deref(), Some("x"));
    assert_eq!(
        (numbers.group_census, numbers.fleet),
        (
            Census {
                counted: 9,
                unhealthy: allowed
            },
            Census {
                counted: 14,
                unhealthy: allowed
            }
        )
    );
    // Team y has room for one; y0's recovery ends.
    let y0 = plan("y0").await.expect("another group plans");
    s.healing()
        .record_recovery_outcome(
            y0.id,
            RecoveryOutcome {
                success: true,
                duration: Duration::seconds(5),
                details: String::new(),
                actor: "contract".into(),
            },
            &policy,
        )
        .await
        .unwrap();

    // y1's budget: two plans in the window, the third braked; free again
    // once the window has passed.
    for _ in 0..2 {
        let action = plan("y1").await.expect("within the budget");
        s.healing()
            .record_recovery_outcome(
                action.id,
                RecoveryOutcome {
                    success: false,
                    duration: Duration::seconds(5),
                    details: String::new(),
                    actor: "contract".into(),
                },
                &policy,
            )
            .await
            .unwrap();
    }
    assert_eq!(reason(plan("y1").await), "RETRY_BUDGET_SPENT");
    s.clock.advance(Duration::hours(1) + Duration::seconds(1));
    plan("y1").await.expect("the window has passed");
}

contract!(a_recovery_lease_expires_on_the_store_clock on sqlite, postgres);

/// An ACTIVE recovery holds its agent until its lease ends on the store's
/// clock, not a moment sooner; then it is EXPIRED and a new plan is admitted.
async fn a_recovery_lease_expires_on_the_store_clock(s: &Subject) {
    let lease = Duration::minutes(5);
    let event = s.healing().record_error(error("a")).await.unwrap();
    let first = s
        .healing()
        .plan_recovery(
            event.id,
            lease,
            "contract",
            &HealingPolicy::unbraked(),
            planner(),
        )
        .await
        .unwrap();
    assert_eq!(
        first.created_at,
        s.now.now(),
        "planned at the store's clock"
    );
    assert_eq!(first.lease_expires_at, first.created_at + lease);
    s.clock.advance(lease - Duration::seconds(1));
    assert!(matches!(
        s.healing()
            .plan_recovery(
                event.id,
                lease,
                "contract",
                &HealingPolicy::unbraked(),
                planner()
            )
            .await,
        Err(Error::RecoveryAlreadyActive(_))
    ));
    s.clock.advance(Duration::seconds(2));
    let second = s
        .healing()
        .plan_recovery(
            event.id,
            lease,
            "contract",
            &HealingPolicy::unbraked(),
            planner(),
        )
        .await
        .expect("the expired recovery no longer holds the agent");
    assert_ne!(second.id, first.id);
    let expired = s
        .healing()
        .list_recovery_actions(&RecoveryActionQuery {
            agent_id: Some("a".into()),
            status: Some(RecoveryStatus::Expired),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(expired.iter().map(|a| a.id).collect::<Vec<_>>(), [first.id]);
}

contract!(healing_records_older_than_the_retention_are_pruned_and_actions_listed_by_event on sqlite, postgres);

/// Pruning deletes the recovery actions created before the cutoff that
/// ended (an outcome, or a lease that ran out before it) and then the error
/// events before it that no action refers to; an ACTIVE recovery within its
/// lease keeps itself and its event; what the planner learned stays.
/// Actions are listed by the event they were planned for.
async fn healing_records_older_than_the_retention_are_pruned_and_actions_listed_by_event(
    s: &Subject,
) {
    let h = s.healing();
    let lease = Duration::minutes(10);
    let outcome = |success| crate::domain::healing_records::RecoveryOutcome {
        success,
        duration: Duration::seconds(5),
        details: String::new(),
        actor: "contract".into(),
    };
    // Day 0: an event with a finished recovery, one without any.
    let finished_event = h.record_error(error("old-1")).await.unwrap();
    let finished = h
        .plan_recovery(
            finished_event.id,
            lease,
            "contract",
            &HealingPolicy::unbraked(),
            planner(),
        )
        .await
        .unwrap();
    h.record_recovery_outcome(finished.id, outcome(true), &HealingPolicy::unbraked())
        .await
        .unwrap();
    let lone = h.record_error(error("old-2")).await.unwrap();
    // Day 2: an event whose recovery is still within its lease at the cutoff.
    s.clock.advance(Duration::days(2));
    let recent_event = h.record_error(error("new-1")).await.unwrap();
    let active = h
        .plan_recovery(
            recent_event.id,
            lease,
            "contract",
            &HealingPolicy::unbraked(),
            planner(),
        )
        .await
        .unwrap();
    let by_event = h
        .list_recovery_actions(&RecoveryActionQuery {
            error_event_id: Some(recent_event.id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_event.iter().map(|a| a.id).collect::<Vec<_>>(),
        [active.id]
    );
    let learned_before = h.healing_statistics().await.unwrap().patterns;
    // Each event shows its latest recovery as a reader sees it.
    let shown: Vec<(i64, Option<(i64, RecoveryStatus)>)> = h
        .list_error_events(&crate::storage::ErrorEventQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.recovery))
        .collect();
    assert_eq!(
        shown,
        [
            (recent_event.id, Some((active.id, RecoveryStatus::Active))),
            (lone.id, None),
            (
                finished_event.id,
                Some((finished.id, RecoveryStatus::Succeeded))
            ),
        ]
    );

    // Cut off a day ago: day 0 goes, day 2 stays.
    let (events, actions) = h
        .prune_healing(s.now.now() - Duration::days(1))
        .await
        .unwrap();
    assert_eq!((events, actions), (2, 1));
    let left = h
        .list_error_events(&crate::storage::ErrorEventQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|e| e.id).collect::<Vec<_>>(),
        [recent_event.id]
    );
    assert!(!left.iter().any(|e| e.id == lone.id));
    let actions_left = h
        .list_recovery_actions(&RecoveryActionQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        actions_left.iter().map(|a| a.id).collect::<Vec<_>>(),
        [active.id]
    );
    assert_eq!(
        h.healing_statistics().await.unwrap().patterns,
        learned_before,
        "what was learned is kept"
    );
    // A cutoff past the active recovery's creation but within its lease
    // keeps it, and its event.
    let (events, actions) = h
        .prune_healing(s.now.now() + Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!((events, actions), (0, 0));
    // Once its lease ran out before the cutoff, it goes with its event.
    let (events, actions) = h
        .prune_healing(s.now.now() + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!((events, actions), (1, 1));
}

// ---------------------------------------------------------------- posts

const STAGNATION: Stagnation = Stagnation {
    samples: 5,
    impressions: 1000,
    engagement_rate: 0.0,
    score: 0.3,
    tier: Tier::Tier1,
    action: ActionType::Comment,
};

/// The duplicate guard of `post_healing::evaluate`, on a fixed stagnation:
/// eligible unless the key is RUNNING or SUCCEEDED as of `now`.
fn evaluator(post_id: &str) -> PostEvaluator<'static> {
    let key = post_healing::idempotency_key(post_id, STAGNATION.action, STAGNATION.tier);
    Box::new(move |now, history: &[ActionRecord]| {
        let duplicate = history.iter().any(|r| {
            r.idempotency_key == key
                && matches!(
                    effective(r, now).0,
                    ActionStatus::Running | ActionStatus::Succeeded
                )
        });
        Evaluation {
            eligible: !duplicate,
            reason: duplicate.then_some(Ineligible::DuplicateAction),
            stagnation: Some(STAGNATION),
            idempotency_key: Some(key),
            samples: STAGNATION.samples,
            impressions: STAGNATION.impressions,
        }
    })
}

contract!(exactly_one_claim_of_a_post_action on sqlite, postgres);

/// Of many evaluators claiming one post's action at once, exactly one
/// records it RUNNING; the others see it as a duplicate.
async fn exactly_one_claim_of_a_post_action(s: &Subject) {
    let posts = s.posts.clone().unwrap();
    let claims = (0..8).map(|_| {
        let posts = posts.clone();
        tokio::spawn(async move {
            posts
                .evaluate_post(
                    "p1",
                    None,
                    Some(Duration::minutes(5)),
                    "contract",
                    evaluator("p1"),
                )
                .await
        })
    });
    let mut winners = Vec::new();
    for claim in claims.collect::<Vec<_>>() {
        let verdict = claim.await.unwrap().unwrap();
        match verdict.claimed {
            Some(claimed) => winners.push(claimed),
            None => assert_eq!(verdict.evaluation.reason, Some(Ineligible::DuplicateAction)),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim");
    let record = &winners[0].record;
    assert_eq!(record.status, ActionStatus::Running);
    let listed = s.posts().list_actions("p1", None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(&listed[0].record, record);
}

contract!(a_post_claim_expires_on_the_store_clock on sqlite, postgres);

/// A claim holds until its lease ends on the store's clock; then it reads as
/// a timed-out attempt and the action may be claimed again.
async fn a_post_claim_expires_on_the_store_clock(s: &Subject) {
    let lease = Duration::minutes(5);
    let first = s
        .posts()
        .evaluate_post("p1", None, Some(lease), "contract", evaluator("p1"))
        .await
        .unwrap()
        .claimed
        .expect("claimed");
    let key = first.record.idempotency_key.clone();
    assert_eq!(
        first.record.lease_expires_at,
        Some(s.now.now() + lease),
        "the lease runs from the store's clock"
    );
    s.clock.advance(lease - Duration::seconds(1));
    let (held, at) = s.posts().get_action(&key).await.unwrap();
    assert_eq!(at, s.now.now());
    assert_eq!(effective(&held.record, at).0, ActionStatus::Running);
    let early = s
        .posts()
        .evaluate_post("p1", None, Some(lease), "contract", evaluator("p1"))
        .await
        .unwrap();
    assert!(early.claimed.is_none(), "the claim still holds");
    s.clock.advance(Duration::seconds(2));
    let (lapsed, at) = s.posts().get_action(&key).await.unwrap();
    assert_ne!(effective(&lapsed.record, at).0, ActionStatus::Running);
    let again = s
        .posts()
        .evaluate_post("p1", None, Some(lease), "contract", evaluator("p1"))
        .await
        .unwrap();
    let again = again.claimed.expect("claimed again after the lease");
    assert_eq!(again.record.status, ActionStatus::Running);
    assert_eq!(again.record.attempts, 1, "the lapsed claim was an attempt");
    assert_eq!(again.record.created_at, first.record.created_at);
    let (timed_out, _) = s.posts().get_action(&key).await.unwrap();
    assert_eq!(timed_out.record.attempts, 1);
    // Without a lease the verdict is given and nothing is written.
    let verdict = s
        .posts()
        .evaluate_post("p2", None, None, "contract", evaluator("p2"))
        .await
        .unwrap();
    assert!(verdict.evaluation.eligible && verdict.claimed.is_none());
    assert!(
        s.posts()
            .list_actions("p2", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------- pipeline

contract!(the_pipeline_lock_has_one_holder on memory, sqlite, postgres);

/// Of many takers of one processor's lock at once, exactly one gets it; it
/// is free again once released, and other processors' locks are separate.
async fn the_pipeline_lock_has_one_holder(s: &Subject) {
    let takers = (0..8).map(|_| {
        let pipeline = s.pipeline.clone();
        tokio::spawn(async move { pipeline.try_lock_processor("usage").await })
    });
    let mut held = Vec::new();
    for taker in takers.collect::<Vec<_>>() {
        if let Some(lock) = taker.await.unwrap().unwrap() {
            held.push(lock);
        }
    }
    assert_eq!(held.len(), 1, "one holder");
    assert!(s.pipeline.processor_locked("usage").await.unwrap());
    assert!(
        s.pipeline
            .try_lock_processor("usage")
            .await
            .unwrap()
            .is_none()
    );
    let other = s
        .pipeline
        .try_lock_processor("errors")
        .await
        .unwrap()
        .expect("another processor's lock is separate");
    held.pop().unwrap().release().await;
    assert!(!s.pipeline.processor_locked("usage").await.unwrap());
    let again = s
        .pipeline
        .try_lock_processor("usage")
        .await
        .unwrap()
        .expect("free once released");
    again.release().await;
    other.release().await;
}

contract!(the_store_clock_is_the_pipeline_s_now on memory, sqlite, postgres);

/// The pipeline decides with the store's clock: it reads what the clock
/// reads, and moves when the clock does.
async fn the_store_clock_is_the_pipeline_s_now(s: &Subject) {
    assert_eq!(s.pipeline.now().await.unwrap(), s.now.now());
    s.clock.advance(Duration::hours(3));
    assert_eq!(s.pipeline.now().await.unwrap(), s.now.now());
}

contract!(a_refreshed_stat_is_observed_at_the_store_clock on memory, sqlite, postgres);

/// `refresh_stat` stamps `observed_at` with the store's clock (what
/// `PipelineStore::now` reads), at the store's precision, and changes only
/// the stat; an unknown session is left unknown.
async fn a_refreshed_stat_is_observed_at_the_store_clock(s: &Subject) {
    let processed_at = s.pipeline.now().await.unwrap();
    let write = usage_write("u0/a.jsonl", &[(Some("m1"), false, 1, 5)], processed_at);
    s.pipeline
        .commit_sessions(std::slice::from_ref(&write))
        .await
        .unwrap();
    s.clock
        .advance(Duration::minutes(90) + Duration::microseconds(7));
    let mut touched = write.file.clone();
    touched.size = 99;
    touched.mtime_ns = 1_234;
    s.pipeline.refresh_stat("usage", &touched).await.unwrap();
    let mut unknown = touched.clone();
    unknown.path = "u0/unknown.jsonl".into();
    s.pipeline.refresh_stat("usage", &unknown).await.unwrap();

    let states = s.pipeline.session_states("usage").await.unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    let now = s.pipeline.now().await.unwrap();
    assert_eq!(now, s.now.now());
    let expected = pipeline::SessionState {
        size: 99,
        mtime_ns: 1_234,
        observed_at: now,
        ..write.state.clone()
    };
    assert_eq!(states[0], expected);
    assert_eq!(states[0].processed_at, Some(processed_at));
}

// ---------------------------------------------------------------- usage

contract!(usage_rollups_equal_a_recount on memory, sqlite, postgres);

/// One transcript line: message id (or none), sidechain, hour of the day,
/// output tokens.
type Line = (Option<&'static str>, bool, u32, u64);

fn usage_write(path: &str, lines: &[Line], now: chrono::DateTime<Utc>) -> SessionWrite {
    let (user, rest) = path.split_once('/').unwrap();
    let file = SessionFile {
        user: user.into(),
        session: rest.trim_end_matches(".jsonl").into(),
        path: path.into(),
        size: 1,
        mtime_ns: 1,
    };
    let entries: Vec<UsageEntry> = lines
        .iter()
        .enumerate()
        .map(|(i, &(message, sidechain, hour, output))| UsageEntry {
            line_no: i as u32 + 1,
            timestamp: Utc.with_ymd_and_hms(2026, 3, 14, 0, 0, 0).unwrap()
                + Duration::hours(i64::from(hour)),
            message_id: message.map(Into::into),
            model: (output % 3 != 0).then(|| format!("model-{}", output % 2)),
            sidechain,
            input_tokens: 1,
            output_tokens: output,
            cache_creation_tokens: 0,
            cache_read_tokens: output * 10,
        })
        .collect();
    let state = pipeline::processed("usage", &file, "sha", 1, entries.len() as i64, now);
    SessionWrite {
        file,
        output: SessionOutput {
            usage: Some(entries),
            transcript_errors: None,
        },
        state,
    }
}

/// After every commit (a new file, a stream grown in place, a resumed
/// session's copies, a sidechain's replays, a file rewritten without its
/// messages), every report equals the recount from what each file last
/// holds: the most complete copy outside a sidechain counts, once.
async fn usage_rollups_equal_a_recount(s: &Subject) {
    let steps: Vec<(&str, Vec<Line>)> = vec![
        (
            "u0/a.jsonl",
            vec![
                (Some("m1"), false, 1, 5),
                (Some("m2"), false, 2, 7),
                (None, false, 3, 1),
            ],
        ),
        // The stream of m2 completed in a later run: its larger copy replaces it.
        (
            "u0/a.jsonl",
            vec![
                (Some("m1"), false, 1, 5),
                (Some("m2"), false, 2, 7),
                (None, false, 3, 1),
                (Some("m2"), false, 2, 40),
            ],
        ),
        // A resumed session: m1 copied, a message of its own, across midnight.
        (
            "u0/b.jsonl",
            vec![(Some("m1"), false, 1, 5), (Some("m3"), false, 25, 9)],
        ),
        // A sidechain replays m1 with a larger copy (it must not win) and has
        // a message of its own.
        (
            "u0/b/subagents/agent-1.jsonl",
            vec![(Some("m1"), true, 4, 500), (Some("m4"), true, 5, 11)],
        ),
        // Another user's file holds m3's larger copy.
        ("u1/c.jsonl", vec![(Some("m3"), false, 26, 90)]),
        // a is rewritten without its messages: b's copy of m1 counts now.
        ("u0/a.jsonl", vec![]),
        // c is rewritten with a smaller m3: b's copy counts again.
        ("u1/c.jsonl", vec![(Some("m3"), false, 26, 2)]),
    ];
    let mut last: std::collections::BTreeMap<String, SessionWrite> = Default::default();
    for (step, (path, lines)) in steps.into_iter().enumerate() {
        let now = s.now.now();
        let write = usage_write(path, &lines, now);
        s.pipeline
            .commit_sessions(std::slice::from_ref(&write))
            .await
            .unwrap();
        last.insert(path.to_owned(), write);
        let copies: Vec<MessageCopy> = last
            .values()
            .flat_map(|w| {
                MessageCopy::from_file(
                    &w.file.path,
                    &w.file.user,
                    &w.file.session,
                    w.output.usage.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        for group_by in [
            UsageGrouping::Day,
            UsageGrouping::Session,
            UsageGrouping::Model,
            UsageGrouping::User,
        ] {
            let query = UsageQuery {
                group_by,
                since: None,
                until: None,
                user: None,
            };
            assert_eq!(
                s.pipeline.usage(&query).await.unwrap(),
                usage::recount(&copies, &query),
                "step {step}, {group_by:?}"
            );
        }
        s.clock.advance(Duration::seconds(1));
    }
    // What the steps left: m1 from b (5), m2 gone with a, m3 from b (9, the
    // larger copy in c was rewritten), m4 from the sidechain (11).
    let totals = s
        .pipeline
        .usage(&UsageQuery {
            group_by: UsageGrouping::User,
            since: None,
            until: None,
            user: None,
        })
        .await
        .unwrap();
    let outputs: Vec<(&str, i64, i64)> = totals
        .iter()
        .map(|r| (r.key.as_str(), r.output_tokens, r.messages))
        .collect();
    // u1's only file (c) now holds a smaller copy of m3, which loses to b's.
    assert_eq!(outputs, [("u0", 5 + 9 + 11, 3)]);
}
