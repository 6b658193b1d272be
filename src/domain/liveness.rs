//! Liveness rules: when silence means OFFLINE, which agents the sweeper must
//! look at, and how often agents should heartbeat.
//!
//! Heartbeats of online agents are acknowledged from memory and written to the
//! store in batches, at most one flush interval later. So the store's
//! `last_heartbeat_at` may lag the truth by up to that interval, and silence is
//! judged with it added: an agent that heartbeats within its timeout is never
//! marked OFFLINE, whichever replica took its heartbeats.

use chrono::{DateTime, Duration, Utc};

use crate::domain::agent::{AgentState, AgentStatus};
use crate::domain::dispatch;
use crate::domain::transition::Agent;

/// The silence after which the sweeper marks an agent OFFLINE: the configured
/// timeout plus the longest a heartbeat may wait in memory before it is stored.
pub fn silence_timeout(heartbeat_timeout: Duration, flush_interval: Duration) -> Duration {
    heartbeat_timeout
        .checked_add(&flush_interval)
        .unwrap_or(Duration::MAX)
}

/// What the store is asked for: agents the sweeper must decide on. The store
/// only compares indexed columns with these values; [`agent::decide`](crate::domain::agent::decide) then
/// decides each candidate under its row lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepQuery {
    /// Agents in one of these statuses whose last heartbeat is before `silent_before`.
    pub silent_statuses: Vec<AgentStatus>,
    pub silent_before: DateTime<Utc>,
    /// Agents in one of these statuses whose recovery time is at or before `recovered_by`.
    pub recovering_statuses: Vec<AgentStatus>,
    pub recovered_by: DateTime<Utc>,
    /// Agents whose claim's lease ends at or before this instant.
    pub leases_expired_by: DateTime<Utc>,
    /// OFFLINE agents whose last transition is before this instant
    /// (`None`: offline agents are kept).
    pub offline_before: Option<DateTime<Utc>>,
}

impl SweepQuery {
    /// Whether an agent in `state` is a candidate (what the store's query selects).
    pub fn selects(&self, state: &AgentState) -> bool {
        self.selects_held(state, false)
    }

    /// [`Self::selects`] for an agent a quota pool may hold: a held agent
    /// is no candidate at its recovery time (its pool's release wakes it).
    fn selects_held(&self, state: &AgentState, held: bool) -> bool {
        let silent = self.silent_statuses.contains(&state.status)
            && state.last_heartbeat_at < self.silent_before;
        let recovered = !held
            && self.recovering_statuses.contains(&state.status)
            && state
                .exhaustion
                .as_ref()
                .is_some_and(|e| e.recovery.recovery_at <= self.recovered_by);
        silent || recovered
    }

    /// Whether `agent` is a candidate, its claim and OFFLINE time included
    /// (what the store's query selects).
    pub fn selects_agent(&self, agent: &Agent) -> bool {
        let lease_over = agent
            .claim
            .as_ref()
            .is_some_and(|c| dispatch::lease_expired(c, self.leases_expired_by));
        let kept_too_long = self.offline_before.is_some_and(|before| {
            agent.state.status == AgentStatus::Offline && agent.last_transition_at < before
        });
        self.selects_held(&agent.state, agent.pool_holds.is_held()) || lease_over || kept_too_long
    }

    /// Also the OFFLINE agents kept longer than `retention` at `now`
    /// (`dispatch::offline_expiry_cutoff`).
    pub fn with_offline_retention(mut self, retention: Duration, now: DateTime<Utc>) -> Self {
        self.offline_before = dispatch::offline_expiry_cutoff(retention, now);
        self
    }
}

/// The candidates of a sweep at `now`. `silence` is [`silence_timeout`];
/// during the start-up grace (`offline_allowed` false) nobody is silent.
pub fn sweep_query(now: DateTime<Utc>, silence: Duration, offline_allowed: bool) -> SweepQuery {
    let silent_statuses = if offline_allowed {
        AgentStatus::ALL
            .into_iter()
            .filter(|s| *s != AgentStatus::Offline)
            .collect()
    } else {
        Vec::new()
    };
    SweepQuery {
        silent_statuses,
        silent_before: now
            .checked_sub_signed(silence)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        recovering_statuses: vec![AgentStatus::Exhausted],
        recovered_by: now,
        leases_expired_by: now,
        offline_before: None,
    }
}

/// What a heartbeat flush writes: each agent's latest beat, once, in agent-id
/// order (the order a store locks rows in). A heartbeat only moves forward, so
/// an agent's earlier beats change nothing.
pub fn latest_beats(beats: &[(String, DateTime<Utc>)]) -> Vec<(&str, DateTime<Utc>)> {
    let mut latest: std::collections::BTreeMap<&str, DateTime<Utc>> = Default::default();
    for (id, at) in beats {
        latest
            .entry(id.as_str())
            .and_modify(|t| *t = (*t).max(*at))
            .or_insert(*at);
    }
    latest.into_iter().collect()
}

/// How often agents are asked to heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPacing {
    /// The fleet-wide heartbeat rate to stay under, per second.
    pub max_rate: u32,
    /// Never ask for heartbeats more often than this.
    pub min_interval: Duration,
    /// The configured heartbeat timeout: the interval stays well inside it.
    pub heartbeat_timeout: Duration,
}

impl HeartbeatPacing {
    /// The interval an agent should heartbeat at next, for a fleet of `agents`:
    /// spread so that the fleet stays under `max_rate` (as Nomad paces its
    /// clients), never below `min_interval`, and at most a third of the timeout,
    /// so that two lost heartbeats in a row still do not make an agent OFFLINE.
    /// The cap wins over the rate: liveness matters more than the target.
    pub fn next_interval(&self, agents: usize) -> Duration {
        let rate = i64::from(self.max_rate.max(1));
        let spread = Duration::milliseconds(
            i64::try_from(agents)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000)
                / rate,
        );
        let cap = self.heartbeat_timeout / 3;
        spread.max(self.min_interval).min(cap).max(Duration::zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{self, Exhaustion, ExhaustionReason};
    use crate::domain::recovery::{RecoveryEstimate, RecoverySource};
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn silence_adds_the_flush_interval() {
        assert_eq!(
            silence_timeout(Duration::seconds(120), Duration::seconds(1)),
            Duration::seconds(121)
        );
        assert_eq!(
            silence_timeout(Duration::MAX, Duration::seconds(1)),
            Duration::MAX
        );
    }

    #[test]
    fn a_heartbeat_waiting_in_memory_for_a_whole_flush_interval_is_not_silence() {
        // Heartbeat received at t0 + 119.5 s, stored only with the next flush; the
        // store still says t0. At t0 + 120.5 s the agent has been silent for 1 s.
        let state = AgentState {
            status: AgentStatus::Idle,
            last_heartbeat_at: t0(),
            exhaustion: None,
        };
        let silence = silence_timeout(Duration::seconds(120), Duration::seconds(1));
        let now = t0() + Duration::milliseconds(120_500);
        assert!(!sweep_query(now, silence, true).selects(&state));
        assert!(!agent::needs_sweep(&state, now, silence, true));
        let later = t0() + Duration::milliseconds(121_001);
        assert!(sweep_query(later, silence, true).selects(&state));
    }

    #[test]
    fn pacing_spreads_the_fleet_under_the_target_rate_within_bounds() {
        let pacing = HeartbeatPacing {
            max_rate: 1000,
            min_interval: Duration::seconds(5),
            heartbeat_timeout: Duration::seconds(120),
        };
        assert_eq!(pacing.next_interval(10), Duration::seconds(5));
        assert_eq!(pacing.next_interval(20_000), Duration::seconds(20));
        assert_eq!(pacing.next_interval(100_000), Duration::seconds(40));
        assert_eq!(pacing.next_interval(usize::MAX), Duration::seconds(40));
    }

    fn any_state() -> impl Strategy<Value = AgentState> {
        (
            prop::sample::select(AgentStatus::ALL.to_vec()),
            -400i64..400,
            prop::option::of(-400i64..400),
        )
            // A stored EXHAUSTED agent always has its recovery time.
            .prop_filter("exhausted agents carry a recovery", |(status, _, r)| {
                *status != AgentStatus::Exhausted || r.is_some()
            })
            .prop_map(|(status, hb, recovery)| AgentState {
                status,
                last_heartbeat_at: t0() + Duration::seconds(hb),
                exhaustion: recovery
                    .filter(|_| matches!(status, AgentStatus::Exhausted | AgentStatus::Offline))
                    .map(|r| Exhaustion {
                        reason: ExhaustionReason::RateLimit,
                        recovery: RecoveryEstimate {
                            recovery_at: t0() + Duration::seconds(r),
                            source: RecoverySource::Explicit,
                            hint: String::new(),
                        },
                    }),
            })
    }

    proptest! {
        /// The store's candidate query finds exactly the agents the state machine
        /// would change: the rule lives once, in `decide`, and the query follows it.
        #[test]
        fn the_query_selects_exactly_what_decide_would_change(
            state in any_state(),
            silence in 0i64..300,
            offline_allowed in any::<bool>(),
        ) {
            let silence = Duration::seconds(silence);
            let query = sweep_query(t0(), silence, offline_allowed);
            prop_assert_eq!(
                query.selects(&state),
                agent::needs_sweep(&state, t0(), silence, offline_allowed)
            );
        }
    }
}
