//! The agent state machine: pure, with the clock passed in.
//!
//! The store locks an agent's row, hands its state and an [`Event`] to [`decide`],
//! and writes back whatever [`Decision`] comes out, appending a transition when
//! the status changed. Everything that decides *whether* a status may change
//! lives here, so it can be unit-tested without a database.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::domain::labels::Labels;
use crate::domain::recovery::{self, RecoveryEstimate, RecoveryInput};

/// The status of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentStatus {
    Idle,
    Busy,
    OnCall,
    Offline,
    Exhausted,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 5] = [
        AgentStatus::Idle,
        AgentStatus::Busy,
        AgentStatus::OnCall,
        AgentStatus::Offline,
        AgentStatus::Exhausted,
    ];

    /// The spelling stored in the database and shown in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Idle => "IDLE",
            AgentStatus::Busy => "BUSY",
            AgentStatus::OnCall => "ON_CALL",
            AgentStatus::Offline => "OFFLINE",
            AgentStatus::Exhausted => "EXHAUSTED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of slot `StartWork` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotType {
    Work,
    OnCall,
}

impl SlotType {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotType::Work => "WORK",
            SlotType::OnCall => "ON_CALL",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [SlotType::Work, SlotType::OnCall]
            .into_iter()
            .find(|slot| slot.as_str() == s)
    }
}

/// Why an agent is exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExhaustionReason {
    RateLimit,
    Billing,
}

impl ExhaustionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExhaustionReason::RateLimit => "RATE_LIMIT",
            ExhaustionReason::Billing => "BILLING",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "RATE_LIMIT" => Some(ExhaustionReason::RateLimit),
            "BILLING" => Some(ExhaustionReason::Billing),
            _ => None,
        }
    }
}

/// What caused a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Registered,
    WorkStarted,
    WorkFinished,
    HeartbeatResumed,
    HeartbeatTimeout,
    Exhausted,
    Recovered,
    MarkedOffline,
    /// EXHAUSTED to IDLE by `ResumeAgent` (decided by
    /// `dispatch::resume_decision`, committed as `batch::Command::Resume`).
    Resumed,
    /// Out of rotation by `CordonAgent`, status unchanged (decided by
    /// `dispatch::cordon_decision`, committed as `batch::Command::Cordon`).
    Cordoned,
    /// Back in rotation by `UncordonAgent`, status unchanged.
    Uncordoned,
    /// IDLE to BUSY or ON_CALL by `ClaimAgent` (decided by
    /// `dispatch::claim_decision`); the revision is the claim's fencing token.
    Claimed,
    /// The claimed agent back to IDLE by `ReleaseClaim`.
    ClaimReleased,
    /// The claimed agent back to IDLE because its lease ran out (the sweeper).
    ClaimExpired,
    /// Removed by `DeleteAgent`: the agent's last transition, status unchanged.
    Deleted,
    /// Removed by the sweeper after `--offline-agent-retention` OFFLINE: the
    /// agent's last transition, status unchanged.
    Expired,
    /// Parked because a quota pool it is a member of is (`domain::quota`):
    /// IDLE at the report, or later when its slot ends, it returns or it
    /// registers. The transition names the pool.
    PoolExhausted,
    /// Let go by its quota pool's staggered release (or because it left the
    /// pool). The transition names the pool.
    PoolReleased,
}

impl Cause {
    pub const ALL: [Cause; 18] = [
        Cause::Registered,
        Cause::WorkStarted,
        Cause::WorkFinished,
        Cause::HeartbeatResumed,
        Cause::HeartbeatTimeout,
        Cause::Exhausted,
        Cause::Recovered,
        Cause::MarkedOffline,
        Cause::Resumed,
        Cause::Cordoned,
        Cause::Uncordoned,
        Cause::Claimed,
        Cause::ClaimReleased,
        Cause::ClaimExpired,
        Cause::Deleted,
        Cause::Expired,
        Cause::PoolExhausted,
        Cause::PoolReleased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Registered => "REGISTERED",
            Cause::WorkStarted => "WORK_STARTED",
            Cause::WorkFinished => "WORK_FINISHED",
            Cause::HeartbeatResumed => "HEARTBEAT_RESUMED",
            Cause::HeartbeatTimeout => "HEARTBEAT_TIMEOUT",
            Cause::Exhausted => "EXHAUSTED",
            Cause::Recovered => "RECOVERED",
            Cause::MarkedOffline => "MARKED_OFFLINE",
            Cause::Resumed => "RESUMED",
            Cause::Cordoned => "CORDONED",
            Cause::Uncordoned => "UNCORDONED",
            Cause::Claimed => "CLAIMED",
            Cause::ClaimReleased => "CLAIM_RELEASED",
            Cause::ClaimExpired => "CLAIM_EXPIRED",
            Cause::Deleted => "DELETED",
            Cause::Expired => "EXPIRED",
            Cause::PoolExhausted => "POOL_EXHAUSTED",
            Cause::PoolReleased => "POOL_RELEASED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|cause| cause.as_str() == s)
    }
}

/// Why and until when an agent is parked. Kept while the agent is OFFLINE, so
/// that a heartbeat before `recovery.recovery_at` brings it back EXHAUSTED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhaustion {
    pub reason: ExhaustionReason,
    pub recovery: RecoveryEstimate,
}

/// The part of an agent the state machine reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    pub status: AgentStatus,
    pub last_heartbeat_at: DateTime<Utc>,
    pub exhaustion: Option<Exhaustion>,
}

/// What the provider told an exhausted agent, from which its recovery time is inferred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExhaustionReport {
    /// The reason the caller gave; a recognised billing stop overrides it.
    pub reason: ExhaustionReason,
    pub explicit_recovery_at: Option<DateTime<Utc>>,
    pub headers: Vec<(String, String)>,
    pub message: String,
    /// The caller's IANA zone (validated), for wall-clock times that name none.
    pub time_zone: Option<String>,
    pub default_recovery: Duration,
    pub default_billing_recovery: Duration,
}

/// What a report means for an agent with these labels at `now`: the
/// recovery time inferred (wall-clock times in the request's zone, else the
/// agent's `time_zone` label, else UTC) and the reason, which is `BILLING`
/// whenever the report shows a billing stop, whatever the caller said.
pub fn exhaustion_of(report: &ExhaustionReport, labels: &Labels, now: DateTime<Utc>) -> Exhaustion {
    let input = RecoveryInput {
        explicit: report.explicit_recovery_at,
        headers: &report.headers,
        message: &report.message,
        time_zone: recovery::resolve_time_zone(report.time_zone.as_deref(), labels),
        default_recovery: report.default_recovery,
        default_billing_recovery: report.default_billing_recovery,
    };
    let inference = recovery::infer_recovery(&input, now);
    let reason = match inference.billing {
        Some(_) => ExhaustionReason::Billing,
        None => report.reason,
    };
    Exhaustion {
        reason,
        recovery: inference.estimate,
    }
}

/// Something that happened to an existing agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat or a repeated registration.
    Heartbeat,
    StartWork(SlotType),
    FinishWork,
    ReportExhausted(ExhaustionReport),
    MarkOffline,
    /// The sweeper looking at the agent. `offline_allowed` is false during the
    /// start-up grace period, so a restart never marks the whole fleet offline.
    Sweep {
        heartbeat_timeout: Duration,
        offline_allowed: bool,
    },
}

impl Event {
    fn action(&self) -> &'static str {
        match self {
            Event::Heartbeat => "heartbeat",
            Event::StartWork(_) => "start work",
            Event::FinishWork => "finish work",
            Event::ReportExhausted(_) => "report exhausted",
            Event::MarkOffline => "mark offline",
            Event::Sweep { .. } => "sweep",
        }
    }
}

/// A status change to record as a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    pub from: AgentStatus,
    pub to: AgentStatus,
    pub cause: Cause,
}

/// The agent's new state, and the transition to record if its status changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub state: AgentState,
    pub change: Option<StatusChange>,
}

/// A transition the state machine does not allow from the agent's current status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action}: agent is {current}, must be {required}")]
pub struct TransitionRefused {
    pub action: &'static str,
    pub current: AgentStatus,
    pub required: &'static str,
}

/// The state of a newly registered agent: registration counts as a heartbeat.
pub fn registered(now: DateTime<Utc>) -> (AgentState, Cause) {
    let state = AgentState {
        status: AgentStatus::Idle,
        last_heartbeat_at: now,
        exhaustion: None,
    };
    (state, Cause::Registered)
}

/// Applies `event` to an agent in `state` (with `labels`) at server time `now`.
pub fn decide(
    state: &AgentState,
    labels: &Labels,
    event: Event,
    now: DateTime<Utc>,
) -> Result<Decision, TransitionRefused> {
    use AgentStatus::*;

    let action = event.action();
    let refuse = |required| TransitionRefused {
        action,
        current: state.status,
        required,
    };
    let unchanged = || Decision {
        state: state.clone(),
        change: None,
    };
    let to = |status: AgentStatus, cause: Cause, exhaustion: Option<Exhaustion>| Decision {
        state: AgentState {
            status,
            last_heartbeat_at: state.last_heartbeat_at,
            exhaustion,
        },
        change: Some(StatusChange {
            from: state.status,
            to: status,
            cause,
        }),
    };

    let decision = match event {
        Event::Heartbeat => {
            let mut decision = match state.status {
                Offline => match &state.exhaustion {
                    // Went offline while parked and the limit has not lifted yet: a heartbeat
                    // must not wake a rate-limited agent early.
                    Some(ex) if ex.recovery.recovery_at > now => {
                        to(Exhausted, Cause::HeartbeatResumed, Some(ex.clone()))
                    }
                    _ => to(Idle, Cause::HeartbeatResumed, None),
                },
                _ => unchanged(),
            };
            decision.state.last_heartbeat_at = now;
            decision
        }
        Event::StartWork(slot) => match state.status {
            Idle => match slot {
                SlotType::Work => to(Busy, Cause::WorkStarted, None),
                SlotType::OnCall => to(OnCall, Cause::WorkStarted, None),
            },
            _ => return Err(refuse("IDLE")),
        },
        Event::FinishWork => match state.status {
            Busy | OnCall => to(Idle, Cause::WorkFinished, None),
            _ => return Err(refuse("BUSY or ON_CALL")),
        },
        Event::ReportExhausted(report) => {
            let exhaustion = exhaustion_of(&report, labels, now);
            to(Exhausted, Cause::Exhausted, Some(exhaustion))
        }
        Event::MarkOffline => match state.status {
            Offline => unchanged(),
            // Keep the exhaustion so that a later heartbeat cannot wake the agent early.
            _ => to(Offline, Cause::MarkedOffline, state.exhaustion.clone()),
        },
        Event::Sweep {
            heartbeat_timeout,
            offline_allowed,
        } => {
            let silent = now - state.last_heartbeat_at > heartbeat_timeout;
            match state.status {
                Offline => unchanged(),
                _ if silent && offline_allowed => {
                    to(Offline, Cause::HeartbeatTimeout, state.exhaustion.clone())
                }
                Exhausted => match &state.exhaustion {
                    Some(ex) if ex.recovery.recovery_at > now => unchanged(),
                    _ => to(Idle, Cause::Recovered, None),
                },
                _ => unchanged(),
            }
        }
    };
    Ok(decision)
}

/// Whether the sweeper should look at an agent at all: the store uses the
/// same rule in SQL to find candidates, and [`decide`] re-checks under the row lock.
pub fn needs_sweep(
    state: &AgentState,
    now: DateTime<Utc>,
    heartbeat_timeout: Duration,
    offline_allowed: bool,
) -> bool {
    let event = Event::Sweep {
        heartbeat_timeout,
        offline_allowed,
    };
    // A sweep reads no labels.
    matches!(
        decide(state, &Labels::new(), event, now),
        Ok(Decision {
            change: Some(_),
            ..
        })
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::RecoverySource;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 4, 1, 10, 0, 0).unwrap()
    }

    /// A consistent agent: an EXHAUSTED one is parked for a day.
    fn agent(status: AgentStatus) -> AgentState {
        AgentState {
            status,
            last_heartbeat_at: t0(),
            exhaustion: (status == AgentStatus::Exhausted)
                .then(|| exhaustion(t0() + Duration::days(1))),
        }
    }

    fn exhaustion(until: DateTime<Utc>) -> Exhaustion {
        Exhaustion {
            reason: ExhaustionReason::RateLimit,
            recovery: RecoveryEstimate {
                recovery_at: until,
                source: RecoverySource::Explicit,
                hint: "explicit".into(),
            },
        }
    }

    fn report(message: &str) -> Event {
        Event::ReportExhausted(ExhaustionReport {
            reason: ExhaustionReason::Billing,
            explicit_recovery_at: None,
            headers: vec![],
            message: message.into(),
            time_zone: None,
            default_recovery: Duration::hours(5),
            default_billing_recovery: Duration::hours(24),
        })
    }

    /// `decide` for an agent without labels.
    fn decide_(
        state: &AgentState,
        event: Event,
        now: DateTime<Utc>,
    ) -> Result<Decision, TransitionRefused> {
        decide(state, &Labels::new(), event, now)
    }

    fn sweep(timeout_secs: i64, offline_allowed: bool) -> Event {
        Event::Sweep {
            heartbeat_timeout: Duration::seconds(timeout_secs),
            offline_allowed,
        }
    }

    fn change(decision: &Decision) -> Option<(AgentStatus, AgentStatus, Cause)> {
        decision.change.map(|c| (c.from, c.to, c.cause))
    }

    #[test]
    fn registration_starts_idle_with_a_heartbeat() {
        let (state, cause) = registered(t0());
        assert_eq!(state.status, AgentStatus::Idle);
        assert_eq!(state.last_heartbeat_at, t0());
        assert_eq!(cause, Cause::Registered);
    }

    #[test]
    fn work_slots_move_idle_to_busy_or_on_call_and_back() {
        use AgentStatus::*;
        let d = decide_(&agent(Idle), Event::StartWork(SlotType::Work), t0()).unwrap();
        assert_eq!(change(&d), Some((Idle, Busy, Cause::WorkStarted)));
        let d = decide_(&agent(Idle), Event::StartWork(SlotType::OnCall), t0()).unwrap();
        assert_eq!(change(&d), Some((Idle, OnCall, Cause::WorkStarted)));
        for from in [Busy, OnCall] {
            let d = decide_(&agent(from), Event::FinishWork, t0()).unwrap();
            assert_eq!(change(&d), Some((from, Idle, Cause::WorkFinished)));
        }
    }

    #[test]
    fn start_work_is_refused_from_every_status_but_idle() {
        use AgentStatus::*;
        for from in [Busy, OnCall, Offline, Exhausted] {
            let err = decide_(&agent(from), Event::StartWork(SlotType::Work), t0()).unwrap_err();
            assert_eq!(err.current, from);
            assert!(err.to_string().contains(from.as_str()), "{err}");
        }
    }

    #[test]
    fn finish_work_is_refused_unless_busy_or_on_call() {
        use AgentStatus::*;
        for from in [Idle, Offline, Exhausted] {
            let err = decide_(&agent(from), Event::FinishWork, t0()).unwrap_err();
            assert_eq!(err.current, from);
        }
    }

    #[test]
    fn heartbeat_records_time_and_only_changes_status_when_offline() {
        use AgentStatus::*;
        let later = t0() + Duration::seconds(30);
        for status in [Idle, Busy, OnCall, Exhausted] {
            let d = decide_(&agent(status), Event::Heartbeat, later).unwrap();
            assert_eq!(d.change, None);
            assert_eq!(d.state.status, status);
            assert_eq!(d.state.last_heartbeat_at, later);
        }
        let d = decide_(&agent(Offline), Event::Heartbeat, later).unwrap();
        assert_eq!(change(&d), Some((Offline, Idle, Cause::HeartbeatResumed)));
        assert_eq!(d.state.last_heartbeat_at, later);
    }

    #[test]
    fn heartbeat_does_not_wake_an_agent_that_went_offline_while_exhausted() {
        let mut state = agent(AgentStatus::Offline);
        state.exhaustion = Some(exhaustion(t0() + Duration::hours(1)));
        let d = decide_(&state, Event::Heartbeat, t0() + Duration::minutes(10)).unwrap();
        assert_eq!(
            change(&d),
            Some((
                AgentStatus::Offline,
                AgentStatus::Exhausted,
                Cause::HeartbeatResumed
            ))
        );
        assert_eq!(d.state.exhaustion, state.exhaustion);

        // Once the recovery time has passed the agent comes back idle, exhaustion cleared.
        let d = decide_(&state, Event::Heartbeat, t0() + Duration::hours(2)).unwrap();
        assert_eq!(d.state.status, AgentStatus::Idle);
        assert_eq!(d.state.exhaustion, None);
    }

    #[test]
    fn report_exhausted_works_from_any_status_and_infers_recovery() {
        for from in AgentStatus::ALL {
            let d = decide_(&agent(from), report("quota hit, reset in 12 mins"), t0()).unwrap();
            assert_eq!(
                change(&d),
                Some((from, AgentStatus::Exhausted, Cause::Exhausted))
            );
            let ex = d.state.exhaustion.unwrap();
            assert_eq!(ex.reason, ExhaustionReason::Billing);
            assert_eq!(ex.recovery.recovery_at, t0() + Duration::minutes(12));
            assert_eq!(ex.recovery.source, RecoverySource::Message);
        }
        let d = decide_(&agent(AgentStatus::Idle), report("no hint"), t0()).unwrap();
        let ex = d.state.exhaustion.unwrap();
        assert_eq!(ex.recovery.recovery_at, t0() + Duration::hours(5));
        assert_eq!(ex.recovery.source, RecoverySource::Default);
    }

    #[test]
    fn a_billing_stop_is_recorded_as_billing_whatever_the_caller_said() {
        let mut event = report("You exceeded your current quota: insufficient_quota");
        if let Event::ReportExhausted(r) = &mut event {
            r.reason = ExhaustionReason::RateLimit;
        }
        let d = decide_(&agent(AgentStatus::Idle), event, t0()).unwrap();
        let ex = d.state.exhaustion.unwrap();
        assert_eq!(ex.reason, ExhaustionReason::Billing);
        assert_eq!(ex.recovery.recovery_at, t0() + Duration::hours(24));
        assert_eq!(ex.recovery.hint, "billing: insufficient_quota; default 1d");
    }

    #[test]
    fn wall_clock_times_use_the_request_zone_else_the_agents_label() {
        // t0 is 10:00Z: 03:00 in Los Angeles (PDT), 11:00 in London (BST).
        let labels: Labels = [("time_zone".to_string(), "Europe/London".to_string())].into();
        let mut event = report("limit reached · resets 2pm");
        let d = decide(&agent(AgentStatus::Idle), &labels, event.clone(), t0()).unwrap();
        let at = d.state.exhaustion.unwrap().recovery.recovery_at;
        assert_eq!(at, Utc.with_ymd_and_hms(2026, 4, 1, 13, 0, 0).unwrap());
        if let Event::ReportExhausted(r) = &mut event {
            r.time_zone = Some("America/Los_Angeles".into());
        }
        let d = decide(&agent(AgentStatus::Idle), &labels, event, t0()).unwrap();
        let at = d.state.exhaustion.unwrap().recovery.recovery_at;
        assert_eq!(at, Utc.with_ymd_and_hms(2026, 4, 1, 21, 0, 0).unwrap());
    }

    #[test]
    fn mark_offline_keeps_exhaustion_and_is_idempotent() {
        let mut state = agent(AgentStatus::Exhausted);
        state.exhaustion = Some(exhaustion(t0() + Duration::hours(1)));
        let d = decide_(&state, Event::MarkOffline, t0()).unwrap();
        assert_eq!(
            change(&d),
            Some((
                AgentStatus::Exhausted,
                AgentStatus::Offline,
                Cause::MarkedOffline
            ))
        );
        assert_eq!(d.state.exhaustion, state.exhaustion);
        let again = decide_(&d.state, Event::MarkOffline, t0()).unwrap();
        assert_eq!(again.change, None);
    }

    #[test]
    fn sweep_marks_silent_agents_offline_only_after_the_timeout_and_grace() {
        use AgentStatus::*;
        for status in [Idle, Busy, OnCall, Exhausted] {
            let at_timeout = t0() + Duration::seconds(120);
            let d = decide_(&agent(status), sweep(120, true), at_timeout).unwrap();
            assert_eq!(d.change, None, "{status} at exactly the timeout stays");
            let past = at_timeout + Duration::milliseconds(1);
            let d = decide_(&agent(status), sweep(120, true), past).unwrap();
            assert_eq!(change(&d), Some((status, Offline, Cause::HeartbeatTimeout)));
            let d = decide_(&agent(status), sweep(120, false), past).unwrap();
            assert_ne!(d.state.status, Offline, "grace keeps {status} online");
        }
        let d = decide_(&agent(Offline), sweep(1, true), t0() + Duration::hours(1)).unwrap();
        assert_eq!(d.change, None);
    }

    #[test]
    fn sweep_recovers_exhausted_agents_when_their_time_has_come() {
        let mut state = agent(AgentStatus::Exhausted);
        state.exhaustion = Some(exhaustion(t0() + Duration::seconds(60)));
        let d = decide_(&state, sweep(120, true), t0() + Duration::seconds(59)).unwrap();
        assert_eq!(d.change, None);
        let d = decide_(&state, sweep(120, true), t0() + Duration::seconds(60)).unwrap();
        assert_eq!(
            change(&d),
            Some((AgentStatus::Exhausted, AgentStatus::Idle, Cause::Recovered))
        );
        assert_eq!(d.state.exhaustion, None);
        assert!(needs_sweep(
            &state,
            t0() + Duration::seconds(61),
            Duration::seconds(120),
            true
        ));
        assert!(!needs_sweep(&state, t0(), Duration::seconds(120), true));
    }

    #[test]
    fn statuses_and_causes_round_trip_through_their_spelling() {
        for status in AgentStatus::ALL {
            assert_eq!(AgentStatus::parse(status.as_str()), Some(status));
        }
        for cause in Cause::ALL {
            assert_eq!(Cause::parse(cause.as_str()), Some(cause));
        }
        assert_eq!(AgentStatus::parse("idle"), None);
    }

    mod invariants {
        use super::*;
        use proptest::prelude::*;

        fn any_status() -> impl Strategy<Value = AgentStatus> {
            prop::sample::select(AgentStatus::ALL.to_vec())
        }

        fn any_event() -> impl Strategy<Value = Event> {
            prop_oneof![
                Just(Event::Heartbeat),
                Just(Event::StartWork(SlotType::Work)),
                Just(Event::StartWork(SlotType::OnCall)),
                Just(Event::FinishWork),
                Just(Event::MarkOffline),
                (0i64..600, any::<bool>()).prop_map(|(s, allowed)| sweep(s, allowed)),
                "[a-z0-9 ]{0,40}".prop_map(|m| report(&m)),
            ]
        }

        proptest! {
            /// Whatever happens, a recorded change really changes something, starts
            /// from the current status, and only an EXHAUSTED agent carries an
            /// exhaustion unless it went OFFLINE while parked.
            #[test]
            fn every_decision_is_consistent(
                status in any_status(),
                events in prop::collection::vec((any_event(), 0i64..3600), 1..40),
            ) {
                let mut state = agent(status);
                let mut now = t0();
                for (event, step) in events {
                    now += Duration::seconds(step);
                    if let Ok(d) = decide_(&state, event, now) {
                        if let Some(c) = d.change {
                            prop_assert_eq!(c.from, state.status);
                            prop_assert_eq!(c.to, d.state.status);
                            let refreshes_recovery = c.to == AgentStatus::Exhausted;
                            prop_assert!(c.from != c.to || refreshes_recovery);
                        } else {
                            prop_assert_eq!(d.state.status, state.status);
                        }
                        match d.state.status {
                            AgentStatus::Exhausted => prop_assert!(d.state.exhaustion.is_some()),
                            AgentStatus::Offline => {}
                            _ => prop_assert!(d.state.exhaustion.is_none()),
                        }
                        prop_assert!(d.state.last_heartbeat_at <= now);
                        state = d.state;
                    }
                }
            }
        }
    }
}
