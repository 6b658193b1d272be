//! A history checker for fleetcare's agent-status guarantees: records in,
//! violations out. Pure (no I/O, no clock, no async), and independent of how
//! the history was produced: the deterministic simulation
//! (`tests/simulation`) feeds it what its in-process clients saw, and a
//! campaign against real `fleetcare serve` processes can feed it what its gRPC
//! clients recorded and what the `transitions` table holds.
//!
//! # Use
//!
//! ```ignore
//! #[path = "../support/history.rs"]
//! mod history;
//! use history::{Call, History, Op, Outcome, Reply, Stored, WatchStream};
//!
//! let mut h = History::default();
//! h.calls.push(Call {
//!     client: "c1".into(),
//!     op: Op::StartWork,
//!     agent_id: Some("a1".into()),
//!     actor: Some("c1".into()),   // the caller name the server records
//!     request_id: None,
//!     start: 10, end: 12,        // one clock for the whole history
//!     outcome: Outcome::Ok(Reply { revision: Some(7), agent_revision: Some(7),
//!                                  status: Some(AgentStatus::Busy), ..Reply::default() }),
//! });
//! h.stored.push(Stored { revision: 7, agent_id: "a1".into(), from: Some(AgentStatus::Idle),
//!                        to: AgentStatus::Busy, cause: Cause::WorkStarted, actor: "c1".into() });
//! h.watches.push(WatchStream { watcher: "w1".into(), since: 6, snapshot: false,
//!                              agent_ids: None, received: vec![/* Stored */], position: 7 });
//! let report = history::check(&h);
//! assert!(report.violations.is_empty(), "{report}");
//! ```
//!
//! # The records
//!
//! - [`Call`]: one client call, with the client's id, the [`Op`], the agent
//!   it names (if any), the caller name the server records as the actor of
//!   what the call changes (if known), its start and end on one clock shared
//!   by the whole history (any unit, e.g. nanoseconds since the run began; a
//!   call that never got an answer ends when its client gave up), and its
//!   [`Outcome`]: `Ok` with what the reply said, `Err(code)` (a definite
//!   refusal: nothing happened), or `Unknown` (it may or may not have taken
//!   effect: a timeout, a cut connection, UNAVAILABLE after the store was
//!   reached). [`Outcome::from_code`] classifies a gRPC code the way fleetcare
//!   documents them.
//! - [`Stored`]: the `transitions` table (or the store's history) after the
//!   run, one row per revision: `(revision, agent_id, from, to, cause,
//!   actor)`. Give every row the store holds; a pruned prefix is allowed (the
//!   first row may have any revision): acknowledgements and agents' paths
//!   are then checked from it on.
//! - [`WatchStream`]: one watch stream (one connection; a resuming watcher
//!   records one per resume, under the same `watcher` id): the revision it
//!   resumed after (`since`, exclusive; or the revision of the snapshot it
//!   began with, `snapshot`), its agent filter, the transitions it
//!   received in order, and `position`, the highest revision the stream
//!   vouched for (its last transition or a later `Progress` revision).
//!
//! # What [`check`] proves
//!
//! 1. `RevisionGap`/`RevisionRepeated`: stored revisions are contiguous.
//! 2. `AckMissing`/`AckMismatch`/`AckTwice`: every acknowledged call's
//!    transition is stored, is the call's kind of change on the call's agent,
//!    and belongs to that call only (calls repeating one `request_id` may
//!    share it).
//! 3. `Unexplained`: every stored transition is explained: by an
//!    acknowledged call, by a call whose outcome is unknown (each explains at
//!    most one, never one committed before the call started), or by the
//!    server itself (the sweeper's causes, and a pool's changes to its
//!    members). A refused call explains nothing (`RefusedTookEffect` when a
//!    transition of its agent and kind committed within it and nothing else
//!    explains it).
//! 4. `WatchMismatch`: each watch stream equals the stored sequence over
//!    `(since, position]`, filtered as it asked.
//! 5. `IllegalTransition`: each agent's transitions, in revision order, are
//!    a path of `agent::decide` (and of dispatch and pools, which reuse it):
//!    each starts where the previous one ended, registration first, nothing
//!    after a deletion but a new registration.
//! 6. `DoubleTake`: one winner per contended StartWork (and per claim): two
//!    acknowledged takes of one agent (StartWork, ClaimAgent) have a release
//!    of it (or its deletion) between their revisions.
//! 7. `RealTimeOrder`: a call acknowledged before another started has the
//!    lower revision.
//!
//! Replies older than what was acknowledged before the call began (an agent
//! revision below the last acknowledged transition of that agent) are not
//! violations of the transition guarantees; they are measured and returned as
//! [`StaleReply`] (a `Heartbeat` is answered from the replica's memory).
//!
//! Everything public here is the stable API; add, do not change.

// Each history source uses part of the API (the simulation records no pool
// calls, a gRPC campaign may record no claims).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use chrono::{Duration, TimeZone, Utc};
use fleetcare::domain::agent::{
    self, AgentState, AgentStatus, Cause, Event, ExhaustionReason, ExhaustionReport, SlotType,
};

/// What a client called. `Read` is any call that changes nothing (GetAgent,
/// ListAgents, ListTransitions, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Register,
    Heartbeat,
    StartWork,
    FinishWork,
    ReportExhausted,
    MarkOffline,
    ClaimAgent,
    RenewClaim,
    ReleaseClaim,
    CordonAgent,
    UncordonAgent,
    ResumeAgent,
    DeleteAgent,
    ParkPool,
    ReleasePool,
    Read,
}

impl Op {
    /// The causes a transition this call made may carry.
    pub fn causes(self) -> &'static [Cause] {
        match self {
            // An agent whose quota pool is parked is parked (POOL_EXHAUSTED)
            // where it would otherwise arrive, return, or end its slot.
            Op::Register => &[
                Cause::Registered,
                Cause::HeartbeatResumed,
                Cause::PoolExhausted,
            ],
            Op::Heartbeat => &[Cause::HeartbeatResumed, Cause::PoolExhausted],
            Op::StartWork => &[Cause::WorkStarted],
            Op::FinishWork => &[Cause::WorkFinished, Cause::PoolExhausted],
            Op::ReportExhausted => &[Cause::Exhausted],
            Op::MarkOffline => &[Cause::MarkedOffline],
            Op::ClaimAgent => &[Cause::Claimed],
            Op::RenewClaim => &[],
            Op::ReleaseClaim => &[Cause::ClaimReleased, Cause::PoolExhausted],
            Op::CordonAgent => &[Cause::Cordoned],
            Op::UncordonAgent => &[Cause::Uncordoned],
            Op::ResumeAgent => &[Cause::Resumed],
            Op::DeleteAgent => &[Cause::Deleted],
            Op::ParkPool | Op::ReleasePool | Op::Read => &[],
        }
    }

    /// Whether an acknowledged call of this kind takes an IDLE agent.
    fn takes(self) -> bool {
        matches!(self, Op::StartWork | Op::ClaimAgent)
    }
}

/// Causes the server produces by itself (the sweeper, a pool's release, a
/// pool parking its members as a side effect of a report): no client call
/// needs to explain them.
pub fn server_cause(cause: Cause) -> bool {
    matches!(
        cause,
        Cause::HeartbeatTimeout
            | Cause::Recovered
            | Cause::ClaimExpired
            | Cause::Expired
            | Cause::PoolExhausted
            | Cause::PoolReleased
    )
}

/// What an acknowledged call's reply said (fields the reply lacks: `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// The revision of the transition the reply reports (the call's own).
    pub revision: Option<i64>,
    /// The agent's revision as the reply shows it (its last transition's).
    pub agent_revision: Option<i64>,
    /// The agent's status as the reply shows it.
    pub status: Option<AgentStatus>,
    /// The agent a call that names none got (ClaimAgent).
    pub agent_id: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged.
    Ok(Reply),
    /// Refused: it took no effect. The gRPC code (`tonic::Code as i32`).
    Err(i32),
    /// It may or may not have taken effect (the code, if any).
    Unknown(Option<i32>),
}

impl Outcome {
    /// A failed call's outcome from its gRPC code (`tonic::Code as i32`), as
    /// fleetcare documents its codes: the refusals (INVALID_ARGUMENT,
    /// NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION,
    /// OUT_OF_RANGE, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNIMPLEMENTED) are
    /// definite; anything else (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED,
    /// INTERNAL, UNKNOWN, ABORTED, DATA_LOSS) may have committed.
    pub fn from_code(code: i32) -> Outcome {
        // tonic::Code's numbering (the gRPC spec's).
        const DEFINITE: [i32; 9] = [3, 5, 6, 7, 8, 9, 11, 12, 16];
        if DEFINITE.contains(&code) {
            Outcome::Err(code)
        } else {
            Outcome::Unknown(Some(code))
        }
    }
}

/// One client call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub client: String,
    pub op: Op,
    /// The agent the call names (`None` for ClaimAgent and pool calls).
    pub agent_id: Option<String>,
    /// The name the server records as the actor of what the call changes,
    /// when the recorder knows it (then only transitions with that actor are
    /// matched with the call).
    pub actor: Option<String>,
    /// An idempotency key: acknowledged calls with the same op and key may
    /// report the same transition.
    pub request_id: Option<String>,
    /// When it was sent and when its answer came (or its client gave up).
    pub start: u64,
    pub end: u64,
    pub outcome: Outcome,
}

/// One stored transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub revision: i64,
    pub agent_id: String,
    /// `None` for a registration.
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub cause: Cause,
    /// Who made it ("" when unknown).
    pub actor: String,
}

/// One watch stream (a resumed watcher records one per connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchStream {
    pub watcher: String,
    /// It asked for revisions after this one (with a snapshot: the
    /// snapshot's revision, from its `SnapshotComplete`).
    pub since: i64,
    /// It began with a snapshot: it need not continue where the watcher's
    /// previous stream ended.
    pub snapshot: bool,
    /// Its agent filter (`None`: every agent).
    pub agent_ids: Option<BTreeSet<String>>,
    /// What it delivered, in order.
    pub received: Vec<Stored>,
    /// The highest revision it vouched for: its last transition, or a later
    /// progress revision (`since` when it vouched for nothing).
    pub position: i64,
}

/// A whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub calls: Vec<Call>,
    pub stored: Vec<Stored>,
    pub watches: Vec<WatchStream>,
}

/// A broken guarantee. Calls are named by their index in `History::calls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    RevisionGap {
        after: i64,
        next: i64,
    },
    RevisionRepeated {
        revision: i64,
    },
    /// An acknowledged call's transition is not stored.
    AckMissing {
        call: usize,
        revision: i64,
    },
    /// An acknowledged call's transition is stored, but not as the reply said.
    AckMismatch {
        call: usize,
        revision: i64,
        why: String,
    },
    /// Two acknowledged calls report one transition.
    AckTwice {
        calls: (usize, usize),
        revision: i64,
    },
    /// A stored transition no call and no server rule explains.
    Unexplained {
        revision: i64,
    },
    /// A refused call whose change is stored all the same.
    RefusedTookEffect {
        call: usize,
        revision: i64,
    },
    WatchMismatch {
        watcher: String,
        stream: usize,
        why: String,
    },
    IllegalTransition {
        revision: i64,
        why: String,
    },
    /// Two acknowledged takes of one agent without a release between them.
    DoubleTake {
        agent_id: String,
        revisions: (i64, i64),
    },
    /// `earlier` was acknowledged before `later` started, yet has the higher revision.
    RealTimeOrder {
        earlier: usize,
        later: usize,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A reply older than what was acknowledged before its call began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleReply {
    pub call: usize,
    pub op: Op,
    /// The agent revision the reply showed, and the newer one acknowledged before.
    pub shown: i64,
    pub acknowledged: i64,
    /// How long before the stale call started the newer transition was
    /// acknowledged (on the history's clock).
    pub age: u64,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub stale_replies: Vec<StaleReply>,
    /// How many stored transitions were explained by calls of unknown outcome.
    pub unknown_explained: usize,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} violation(s):", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  {v}")?;
        }
        if self.violations.len() > 20 {
            writeln!(f, "  ... and {} more", self.violations.len() - 20)?;
        }
        Ok(())
    }
}

/// Checks every guarantee listed in the module's documentation.
pub fn check(history: &History) -> Report {
    let mut report = Report::default();
    let stored = by_revision(&history.stored, &mut report.violations);
    let owner = acknowledged(history, &stored, &mut report.violations);
    explain(history, &stored, &owner, &mut report);
    watches(history, &stored, &mut report.violations);
    paths(&stored, &mut report.violations);
    takes(history, &stored, &mut report.violations);
    real_time(history, &mut report.violations);
    report.stale_replies = stale_replies(history, &stored);
    report
}

/// The stored rows by revision; gaps and repeats.
fn by_revision<'a>(
    rows: &'a [Stored],
    violations: &mut Vec<Violation>,
) -> BTreeMap<i64, &'a Stored> {
    let mut map = BTreeMap::new();
    for row in rows {
        if map.insert(row.revision, row).is_some() {
            violations.push(Violation::RevisionRepeated {
                revision: row.revision,
            });
        }
    }
    let mut previous: Option<i64> = None;
    for &revision in map.keys() {
        if let Some(p) = previous
            && revision != p + 1
        {
            violations.push(Violation::RevisionGap {
                after: p,
                next: revision,
            });
        }
        previous = Some(revision);
    }
    map
}

fn agent_of(call: &Call) -> Option<&str> {
    match &call.outcome {
        Outcome::Ok(Reply {
            agent_id: Some(id), ..
        }) => Some(id),
        _ => call.agent_id.as_deref(),
    }
}

fn actor_matches(call: &Call, row: &Stored) -> bool {
    match &call.actor {
        Some(actor) => row.actor.is_empty() || *actor == row.actor,
        None => true,
    }
}

/// Checks acknowledged calls against the rows; returns which call owns each
/// revision an acknowledged call reported.
fn acknowledged(
    history: &History,
    stored: &BTreeMap<i64, &Stored>,
    violations: &mut Vec<Violation>,
) -> HashMap<i64, usize> {
    let mut owner: HashMap<i64, usize> = HashMap::new();
    // What was pruned cannot be compared.
    let first = stored.keys().next().copied().unwrap_or(1);
    for (i, call) in history.calls.iter().enumerate() {
        let Outcome::Ok(reply) = &call.outcome else {
            continue;
        };
        let Some(revision) = reply.revision else {
            continue;
        };
        let Some(row) = stored.get(&revision) else {
            if revision >= first {
                violations.push(Violation::AckMissing { call: i, revision });
            }
            continue;
        };
        let mut why = Vec::new();
        if agent_of(call).is_some_and(|a| a != row.agent_id) {
            why.push(format!("agent {} stored", row.agent_id));
        }
        if !call.op.causes().contains(&row.cause) {
            why.push(format!(
                "cause {} stored for {:?}",
                row.cause.as_str(),
                call.op
            ));
        }
        if reply.status.is_some_and(|s| s != row.to) {
            why.push(format!("status {} stored", row.to));
        }
        if !actor_matches(call, row) {
            why.push(format!("actor {:?} stored", row.actor));
        }
        if !why.is_empty() {
            violations.push(Violation::AckMismatch {
                call: i,
                revision,
                why: why.join(", "),
            });
        }
        match owner.get(&revision) {
            Some(&other) => {
                let a = &history.calls[other];
                let same_request =
                    a.op == call.op && a.request_id.is_some() && a.request_id == call.request_id;
                if !same_request {
                    violations.push(Violation::AckTwice {
                        calls: (other, i),
                        revision,
                    });
                }
            }
            None => {
                owner.insert(revision, i);
            }
        }
    }
    owner
}

/// The highest revision acknowledged by calls that ended strictly before
/// each time asked for: a step function over the calls' ends.
struct AckedBefore(Vec<(u64, i64)>);

impl AckedBefore {
    fn new(history: &History) -> Self {
        let mut ends: Vec<(u64, i64)> = history
            .calls
            .iter()
            .filter_map(|c| match &c.outcome {
                Outcome::Ok(Reply {
                    revision: Some(r), ..
                }) => Some((c.end, *r)),
                _ => None,
            })
            .collect();
        ends.sort_unstable();
        let mut high = i64::MIN;
        for e in &mut ends {
            high = high.max(e.1);
            e.1 = high;
        }
        AckedBefore(ends)
    }

    fn at(&self, time: u64) -> i64 {
        let n = self.0.partition_point(|(end, _)| *end < time);
        if n == 0 { i64::MIN } else { self.0[n - 1].1 }
    }
}

/// Every row not owned by an acknowledged call is explained by the server
/// or matched with a distinct call of unknown outcome (a bipartite matching).
fn explain(
    history: &History,
    stored: &BTreeMap<i64, &Stored>,
    owner: &HashMap<i64, usize>,
    report: &mut Report,
) {
    let acked_before = AckedBefore::new(history);
    let unknown: Vec<usize> = (0..history.calls.len())
        .filter(|&i| matches!(history.calls[i].outcome, Outcome::Unknown(_)))
        .collect();
    let mut unknown_by_agent: HashMap<Option<&str>, Vec<usize>> = HashMap::new();
    for &i in &unknown {
        unknown_by_agent
            .entry(history.calls[i].agent_id.as_deref())
            .or_default()
            .push(i);
    }
    let can_explain = |i: usize, row: &Stored| {
        let call = &history.calls[i];
        call.op.causes().contains(&row.cause)
            && call.agent_id.as_deref().is_none_or(|a| a == row.agent_id)
            && actor_matches(call, row)
            && row.revision > acked_before.at(call.start)
    };
    let rows: Vec<&Stored> = stored
        .values()
        .filter(|row| !owner.contains_key(&row.revision) && !server_cause(row.cause))
        .copied()
        .collect();
    // Candidates of each row, then Kuhn's augmenting paths.
    let candidates: Vec<Vec<usize>> = rows
        .iter()
        .map(|row| {
            let mut c: Vec<usize> = Vec::new();
            for key in [Some(row.agent_id.as_str()), None] {
                if let Some(list) = unknown_by_agent.get(&key) {
                    c.extend(list.iter().copied().filter(|&i| can_explain(i, row)));
                }
            }
            c
        })
        .collect();
    let mut matched: HashMap<usize, usize> = HashMap::new(); // call -> row index
    for (r, row) in rows.iter().enumerate() {
        let mut seen = BTreeSet::new();
        if !augment(r, &candidates, &mut matched, &mut seen) {
            // A refused call on that agent, of that kind, that was in flight
            // when it committed, is worth naming.
            let refused = history.calls.iter().position(|c| {
                matches!(c.outcome, Outcome::Err(_))
                    && c.op.causes().contains(&row.cause)
                    && c.agent_id.as_deref() == Some(row.agent_id.as_str())
                    && acked_before.at(c.start) < row.revision
            });
            report.violations.push(match refused {
                Some(call) => Violation::RefusedTookEffect {
                    call,
                    revision: row.revision,
                },
                None => Violation::Unexplained {
                    revision: row.revision,
                },
            });
        }
    }
    report.unknown_explained = matched.len();
}

fn augment(
    row: usize,
    candidates: &[Vec<usize>],
    matched: &mut HashMap<usize, usize>,
    seen: &mut BTreeSet<usize>,
) -> bool {
    for &call in &candidates[row] {
        if !seen.insert(call) {
            continue;
        }
        let free = match matched.get(&call) {
            None => true,
            Some(&other) => augment(other, candidates, matched, seen),
        };
        if free {
            matched.insert(call, row);
            return true;
        }
    }
    false
}

fn same_change(a: &Stored, b: &Stored) -> bool {
    a.revision == b.revision
        && a.agent_id == b.agent_id
        && a.from == b.from
        && a.to == b.to
        && a.cause == b.cause
}

/// Each stream equals the stored sequence over its range, filtered.
fn watches(history: &History, stored: &BTreeMap<i64, &Stored>, violations: &mut Vec<Violation>) {
    let pruned_through = stored.keys().next().map_or(0, |first| first - 1);
    for (n, w) in history.watches.iter().enumerate() {
        let fail = |why: String| Violation::WatchMismatch {
            watcher: w.watcher.clone(),
            stream: n,
            why,
        };
        let through = w
            .position
            .max(w.received.last().map_or(w.since, |t| t.revision));
        if w.since < pruned_through {
            // Its range starts in what the store no longer holds: only what
            // is still stored can be compared.
        }
        let low = w.since.max(pruned_through) + 1;
        let expected: Vec<&Stored> = stored
            .range(low..)
            .take_while(|(revision, _)| **revision <= through)
            .map(|(_, row)| *row)
            .filter(|row| {
                w.agent_ids
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&row.agent_id))
            })
            .collect();
        let received: Vec<&Stored> = w
            .received
            .iter()
            .filter(|t| t.revision > pruned_through)
            .collect();
        for pair in w.received.windows(2) {
            if pair[1].revision <= pair[0].revision {
                violations.push(fail(format!(
                    "revision {} after {}",
                    pair[1].revision, pair[0].revision
                )));
            }
        }
        let first_bad = expected
            .iter()
            .zip(&received)
            .position(|(e, r)| !same_change(e, r));
        if let Some(i) = first_bad {
            violations.push(fail(format!(
                "item {i}: received {:?}, stored {:?}",
                received[i], expected[i]
            )));
        } else if expected.len() != received.len() {
            let i = expected.len().min(received.len());
            violations.push(fail(format!(
                "received {} transitions over ({}, {through}], stored {} (first difference: received {:?}, stored {:?})",
                received.len(),
                w.since,
                expected.len(),
                received.get(i).map(|t| t.revision),
                expected.get(i).map(|t| t.revision),
            )));
        }
    }
    // A resumed watcher never skips: each stream starts at or before where
    // the previous one of the same watcher ended.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (n, w) in history.watches.iter().enumerate() {
        if let Some(&position) = last.get(w.watcher.as_str())
            && !w.snapshot
            && w.since > position
        {
            violations.push(Violation::WatchMismatch {
                watcher: w.watcher.clone(),
                stream: n,
                why: format!("resumed after {} though it had reached {position}", w.since),
            });
        }
        let position = w
            .position
            .max(w.received.last().map_or(w.since, |t| t.revision));
        last.insert(&w.watcher, position);
    }
}

/// The (from, to, cause) triples `agent::decide` (with dispatch's and the
/// pools' relabelled causes) can produce for an existing agent.
pub fn legal_changes() -> BTreeSet<(&'static str, &'static str, &'static str)> {
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let labels = Default::default();
    let report = ExhaustionReport {
        reason: ExhaustionReason::RateLimit,
        explicit_recovery_at: Some(t0 + Duration::hours(1)),
        headers: Vec::new(),
        message: String::new(),
        time_zone: None,
        default_recovery: Duration::hours(1),
        default_billing_recovery: Duration::hours(1),
    };
    let exhaustion = agent::exhaustion_of(&report, &labels, t0);
    let mut states = Vec::new();
    for status in AgentStatus::ALL {
        for ex in [None, Some(exhaustion.clone())] {
            states.push(AgentState {
                status,
                last_heartbeat_at: t0,
                exhaustion: ex,
            });
        }
    }
    let events = [
        Event::Heartbeat,
        Event::StartWork(SlotType::Work),
        Event::StartWork(SlotType::OnCall),
        Event::FinishWork,
        Event::ReportExhausted(report),
        Event::MarkOffline,
        Event::Sweep {
            heartbeat_timeout: Duration::seconds(10),
            offline_allowed: true,
        },
        Event::Sweep {
            heartbeat_timeout: Duration::seconds(10),
            offline_allowed: false,
        },
    ];
    let mut legal = BTreeSet::new();
    // Now: before the recovery (and not silent), and long after (silent, lifted).
    for now in [t0 + Duration::seconds(1), t0 + Duration::hours(2)] {
        for state in &states {
            for event in &events {
                if let Ok(agent::Decision {
                    change: Some(change),
                    ..
                }) = agent::decide(state, &labels, event.clone(), now)
                {
                    legal.insert((
                        change.from.as_str(),
                        change.to.as_str(),
                        change.cause.as_str(),
                    ));
                    // Dispatch relabels StartWork and FinishWork.
                    match change.cause {
                        Cause::WorkStarted => {
                            legal.insert((
                                change.from.as_str(),
                                change.to.as_str(),
                                Cause::Claimed.as_str(),
                            ));
                        }
                        Cause::WorkFinished => {
                            for c in [Cause::ClaimReleased, Cause::ClaimExpired] {
                                legal.insert((
                                    change.from.as_str(),
                                    change.to.as_str(),
                                    c.as_str(),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    use AgentStatus::*;
    for s in AgentStatus::ALL {
        // Status unchanged: cordons and the agent's last transition.
        for c in [
            Cause::Cordoned,
            Cause::Uncordoned,
            Cause::Deleted,
            Cause::Expired,
        ] {
            legal.insert((s.as_str(), s.as_str(), c.as_str()));
        }
        // A pool parks a member wherever it is (at once, at its slot's
        // end, on its return) and releases it to IDLE, or leaves it.
        legal.insert((
            s.as_str(),
            Exhausted.as_str(),
            Cause::PoolExhausted.as_str(),
        ));
        legal.insert((s.as_str(), Idle.as_str(), Cause::PoolReleased.as_str()));
        legal.insert((s.as_str(), s.as_str(), Cause::PoolReleased.as_str()));
    }
    // ResumeAgent: EXHAUSTED (or OFFLINE while parked) to IDLE.
    legal.insert((Exhausted.as_str(), Idle.as_str(), Cause::Resumed.as_str()));
    legal
}

/// Each agent's rows form a legal path.
fn paths(stored: &BTreeMap<i64, &Stored>, violations: &mut Vec<Violation>) {
    let legal = legal_changes();
    let first = stored.keys().next().copied().unwrap_or(0);
    // The agent's status after its last row; `None` after its deletion.
    let mut status: HashMap<&str, Option<AgentStatus>> = HashMap::new();
    for row in stored.values() {
        let fail = |why: String| Violation::IllegalTransition {
            revision: row.revision,
            why,
        };
        let previous = status.get(row.agent_id.as_str()).copied();
        match (row.from, previous) {
            (None, None | Some(None))
                if row.cause == Cause::Registered
                    && !matches!(row.to, AgentStatus::Idle | AgentStatus::Exhausted) =>
            {
                violations.push(fail(format!("registered {}", row.to)))
            }
            (None, None | Some(None)) if row.cause == Cause::Registered => {}
            (None, _) => violations.push(fail(format!(
                "no previous status, cause {} (registered twice?)",
                row.cause.as_str()
            ))),
            (Some(from), Some(Some(was))) if from != was => {
                violations.push(fail(format!("from {from}, but the agent was {was}")))
            }
            (Some(_), Some(None)) => {
                violations.push(fail("a change after the agent's deletion".to_owned()))
            }
            // Unless its registration was pruned.
            (Some(_), None) if first <= 1 => {
                violations.push(fail("a change of an agent never registered".to_owned()))
            }
            _ => {}
        }
        if let Some(from) = row.from
            && !legal.contains(&(from.as_str(), row.to.as_str(), row.cause.as_str()))
        {
            violations.push(fail(format!(
                "{from} -> {} by {} is no decision of the state machine",
                row.to,
                row.cause.as_str()
            )));
        }
        let after = (!matches!(row.cause, Cause::Deleted | Cause::Expired)).then_some(row.to);
        status.insert(&row.agent_id, after);
    }
}

/// One winner per contended take: between two acknowledged takes of one
/// agent, a stored change of it out of BUSY or ON_CALL.
fn takes(history: &History, stored: &BTreeMap<i64, &Stored>, violations: &mut Vec<Violation>) {
    let mut by_agent: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for call in &history.calls {
        if let (true, Outcome::Ok(reply)) = (call.op.takes(), &call.outcome)
            && let (Some(agent), Some(revision)) = (agent_of(call), reply.revision)
        {
            by_agent.entry(agent).or_default().insert(revision);
        }
    }
    let first = stored.keys().next().copied().unwrap_or(1);
    for (agent, revisions) in by_agent {
        let revisions: Vec<i64> = revisions.into_iter().collect();
        // Pairs whose range was pruned cannot be checked.
        for pair in revisions.windows(2).filter(|pair| pair[0] >= first) {
            // Freed: out of BUSY or ON_CALL, or deleted (and registered anew).
            let released = stored.range(pair[0] + 1..pair[1]).any(|(_, row)| {
                row.agent_id == agent
                    && (matches!(row.cause, Cause::Deleted | Cause::Expired)
                        || matches!(row.from, Some(AgentStatus::Busy | AgentStatus::OnCall))
                            && !matches!(row.to, AgentStatus::Busy | AgentStatus::OnCall))
            });
            if !released {
                violations.push(Violation::DoubleTake {
                    agent_id: agent.to_owned(),
                    revisions: (pair[0], pair[1]),
                });
            }
        }
    }
}

/// A call acknowledged before another started has the lower revision.
fn real_time(history: &History, violations: &mut Vec<Violation>) {
    let mut acked: Vec<(usize, u64, u64, i64)> = history
        .calls
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.outcome {
            Outcome::Ok(Reply {
                revision: Some(r), ..
            }) => Some((i, c.start, c.end, *r)),
            _ => None,
        })
        .collect();
    // By end: the highest revision (and its call) acknowledged so far.
    acked.sort_unstable_by_key(|a| a.2);
    let mut by_start = acked.clone();
    by_start.sort_unstable_by_key(|a| a.1);
    let mut best: Option<(i64, usize)> = None;
    let mut e = 0;
    for &(later, start, _, revision) in &by_start {
        while e < acked.len() && acked[e].2 < start {
            if best.is_none_or(|(r, _)| acked[e].3 > r) {
                best = Some((acked[e].3, acked[e].0));
            }
            e += 1;
        }
        if let Some((r, earlier)) = best
            && r > revision
        {
            violations.push(Violation::RealTimeOrder { earlier, later });
        }
    }
}

/// Replies showing an agent older than a transition of it acknowledged
/// before the call began.
fn stale_replies(history: &History, stored: &BTreeMap<i64, &Stored>) -> Vec<StaleReply> {
    // Per agent: (end, revision) of acknowledged transitions, by end.
    let mut acked: HashMap<&str, Vec<(u64, i64)>> = HashMap::new();
    for call in &history.calls {
        if let Outcome::Ok(Reply {
            revision: Some(r), ..
        }) = &call.outcome
            && let Some(row) = stored.get(r)
        {
            acked.entry(&row.agent_id).or_default().push((call.end, *r));
        }
    }
    for list in acked.values_mut() {
        list.sort_unstable();
    }
    let mut stale = Vec::new();
    for (i, call) in history.calls.iter().enumerate() {
        let Outcome::Ok(reply) = &call.outcome else {
            continue;
        };
        let (Some(agent), Some(shown)) = (agent_of(call), reply.agent_revision) else {
            continue;
        };
        let Some(list) = acked.get(agent) else {
            continue;
        };
        let newest = list
            .iter()
            .take_while(|(end, _)| *end < call.start)
            .max_by_key(|(_, r)| *r);
        if let Some(&(end, acknowledged)) = newest
            && acknowledged > shown
        {
            stale.push(StaleReply {
                call: i,
                op: call.op,
                shown,
                acknowledged,
                age: call.start - end,
            });
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        revision: i64,
        agent: &str,
        from: Option<AgentStatus>,
        to: AgentStatus,
        cause: Cause,
    ) -> Stored {
        Stored {
            revision,
            agent_id: agent.into(),
            from,
            to,
            cause,
            actor: String::new(),
        }
    }

    fn ok(op: Op, agent: &str, start: u64, end: u64, revision: Option<i64>) -> Call {
        Call {
            client: "c".into(),
            op,
            agent_id: Some(agent.into()),
            actor: None,
            request_id: None,
            start,
            end,
            outcome: Outcome::Ok(Reply {
                revision,
                agent_revision: revision,
                ..Reply::default()
            }),
        }
    }

    fn base() -> History {
        use AgentStatus::*;
        History {
            calls: vec![
                ok(Op::Register, "a", 0, 1, Some(1)),
                ok(Op::StartWork, "a", 2, 3, Some(2)),
                ok(Op::FinishWork, "a", 4, 5, Some(3)),
            ],
            stored: vec![
                row(1, "a", None, Idle, Cause::Registered),
                row(2, "a", Some(Idle), Busy, Cause::WorkStarted),
                row(3, "a", Some(Busy), Idle, Cause::WorkFinished),
            ],
            watches: Vec::new(),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let report = check(&base());
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn each_guarantee_is_checked() {
        use AgentStatus::*;
        let kinds = |h: &History| -> Vec<String> {
            check(h)
                .violations
                .iter()
                .map(|v| {
                    format!("{v:?}")
                        .split([' ', '{'])
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        let mut gap = base();
        gap.stored.remove(1);
        gap.calls.remove(1);
        assert!(kinds(&gap).contains(&"RevisionGap".to_owned()));

        let mut lost = base();
        lost.stored.pop();
        assert!(kinds(&lost).contains(&"AckMissing".to_owned()));

        let mut stray = base();
        stray
            .stored
            .push(row(4, "a", Some(Idle), Busy, Cause::WorkStarted));
        assert_eq!(kinds(&stray), ["Unexplained"]);
        // ... unless a call of unknown outcome explains it.
        let mut maybe = stray.clone();
        let mut unknown = ok(Op::StartWork, "a", 6, 7, None);
        unknown.outcome = Outcome::Unknown(Some(14));
        maybe.calls.push(unknown.clone());
        assert!(check(&maybe).is_ok());
        // Not one that started after it was acknowledged committed.
        let mut late = maybe.clone();
        late.calls.push(ok(Op::Heartbeat, "a", 8, 9, None));
        late.calls.push(ok(Op::FinishWork, "a", 9, 10, Some(5)));
        late.stored
            .push(row(5, "a", Some(Busy), Idle, Cause::WorkFinished));
        let mut too_late = unknown.clone();
        too_late.start = 11;
        late.calls[3] = too_late;
        assert!(kinds(&late).contains(&"Unexplained".to_owned()));
        // An unknown call explains one transition at most.
        let mut twice = maybe.clone();
        twice.calls.push(ok(Op::FinishWork, "a", 8, 9, Some(5)));
        twice
            .stored
            .push(row(5, "a", Some(Busy), Idle, Cause::WorkFinished));
        twice
            .stored
            .push(row(6, "a", Some(Idle), Busy, Cause::WorkStarted));
        assert_eq!(kinds(&twice), ["Unexplained"]);

        let mut refused = stray.clone();
        let mut no = ok(Op::StartWork, "a", 6, 7, None);
        no.outcome = Outcome::Err(9);
        refused.calls.push(no);
        assert_eq!(kinds(&refused), ["RefusedTookEffect"]);

        let mut illegal = base();
        illegal.stored[2].to = Busy;
        illegal.stored[2].cause = Cause::HeartbeatTimeout;
        illegal.calls.pop();
        assert!(kinds(&illegal).contains(&"IllegalTransition".to_owned()));

        let mut double = base();
        double.stored[2] = row(3, "a", Some(Busy), Busy, Cause::WorkStarted);
        double.calls[2] = ok(Op::StartWork, "a", 2, 4, Some(3));
        let k = kinds(&double);
        assert!(k.contains(&"DoubleTake".to_owned()), "{k:?}");

        let mut order = base();
        order.calls[1].end = 10;
        order.calls[2] = ok(Op::FinishWork, "a", 0, 1, Some(3));
        order.calls[0].end = 0;
        assert!(kinds(&order).contains(&"RealTimeOrder".to_owned()));

        let mut shared = base();
        shared.calls.push(ok(Op::FinishWork, "a", 4, 5, Some(3)));
        assert_eq!(kinds(&shared), ["AckTwice"]);

        let mut watch = base();
        watch.watches.push(WatchStream {
            watcher: "w".into(),
            since: 1,
            snapshot: false,
            agent_ids: None,
            received: vec![watch.stored[2].clone()],
            position: 3,
        });
        assert_eq!(kinds(&watch), ["WatchMismatch"]);
        watch.watches[0].received.insert(0, watch.stored[1].clone());
        assert!(check(&watch).is_ok());
    }

    #[test]
    fn stale_replies_are_measured() {
        let mut h = base();
        let mut beat = ok(Op::Heartbeat, "a", 8, 9, None);
        beat.outcome = Outcome::Ok(Reply {
            agent_revision: Some(2),
            ..Reply::default()
        });
        h.calls.push(beat);
        let report = check(&h);
        assert!(report.is_ok());
        assert_eq!(report.stale_replies.len(), 1);
        assert_eq!(report.stale_replies[0].age, 3);
    }
}
