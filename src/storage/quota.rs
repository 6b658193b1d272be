//! Quota pools in the store, written once for every backend: how a pool's
//! state and an agent's holds are kept as JSON documents, and which pools
//! and members a batch reads ([`pool_rows`], over a backend's
//! [`PoolReads`]). The rules are `domain::quota`'s, applied by
//! `domain::batch`.
//!
//! A pool is a row of `quota_pools` (its name and its state as one JSON
//! document), made the first time it is parked; a pool nobody parked has
//! none and is only a name on its members. An agent's holds live on its own
//! row (`pool_holds`, with `pool_held` saying whether any pool holds it, for
//! the sweeper's index), so the batch that locks an agent reads and writes
//! them with its status.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::agent::Exhaustion;
use crate::domain::batch::{self, Command, PoolCommand, PoolRows};
use crate::domain::quota::{
    Canary, Holds, ParkSource, PoolHold, PoolName, PoolState, Window, WindowPark,
};
use crate::domain::recovery::RecoveryEstimate;
use crate::domain::transition::Agent;
use crate::error::Result;
use crate::storage::decode;

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(what: &str, us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| decode::corrupt(what, &us.to_string()))
}

#[derive(Serialize, Deserialize)]
struct StoredHold {
    episode: i64,
    parked_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct StoredExhaustion {
    reason: String,
    recovery_at: i64,
    source: String,
    hint: String,
}

/// An agent's `pool_holds` document.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct StoredHolds {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pools: BTreeMap<String, StoredHold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    own: Option<StoredExhaustion>,
}

impl StoredHolds {
    pub(crate) fn of(holds: &Holds) -> StoredHolds {
        StoredHolds {
            pools: holds
                .pools
                .iter()
                .map(|(name, h)| {
                    (
                        name.as_str().to_owned(),
                        StoredHold {
                            episode: micros(h.episode),
                            parked_at: micros(h.parked_at),
                            released_at: h.released_at.map(micros),
                        },
                    )
                })
                .collect(),
            own: holds.own.as_ref().map(|e| StoredExhaustion {
                reason: e.reason.as_str().to_owned(),
                recovery_at: micros(e.recovery.recovery_at),
                source: e.recovery.source.as_str().to_owned(),
                hint: e.recovery.hint.clone(),
            }),
        }
    }

    pub(crate) fn holds(self) -> Result<Holds> {
        let mut pools = BTreeMap::new();
        for (name, h) in self.pools {
            let name = PoolName::try_from(name.clone())
                .map_err(|_| decode::corrupt("quota pool", &name))?;
            pools.insert(
                name,
                PoolHold {
                    episode: time("hold episode", h.episode)?,
                    parked_at: time("hold parked_at", h.parked_at)?,
                    released_at: h
                        .released_at
                        .map(|us| time("hold released_at", us))
                        .transpose()?,
                },
            );
        }
        let own = match self.own {
            None => None,
            Some(e) => Some(Exhaustion {
                reason: decode::exhaustion_reason(&e.reason)?,
                recovery: RecoveryEstimate {
                    recovery_at: time("own recovery_at", e.recovery_at)?,
                    source: decode::recovery_source(Some(&e.source))?,
                    hint: e.hint,
                },
            }),
        };
        Ok(Holds { pools, own })
    }
}

/// The `pool_holds` document of `holds`, as JSON text.
pub(crate) fn holds_json(holds: &Holds) -> String {
    serde_json::to_string(&StoredHolds::of(holds)).unwrap_or_else(|_| "{}".into())
}

#[derive(Serialize, Deserialize)]
struct StoredWindow {
    until: i64,
    source: String,
    hint: String,
    reported_by: String,
    reported_at: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredCanary {
    agent_id: String,
    released_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completed_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct StoredPool {
    windows: BTreeMap<String, StoredWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<StoredCanary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    episode: Option<i64>,
    #[serde(default)]
    settled: bool,
}

/// A pool's `state` document, as JSON text.
pub(crate) fn pool_json(state: &PoolState) -> String {
    let stored = StoredPool {
        windows: state
            .windows
            .iter()
            .map(|(window, park)| {
                (
                    window.as_str().to_owned(),
                    StoredWindow {
                        until: micros(park.until),
                        source: park.source.as_str().to_owned(),
                        hint: park.hint.clone(),
                        reported_by: park.reported_by.clone(),
                        reported_at: micros(park.reported_at),
                    },
                )
            })
            .collect(),
        canary: state.canary.as_ref().map(|c| StoredCanary {
            agent_id: c.agent_id.clone(),
            released_at: micros(c.released_at),
            completed_at: c.completed_at.map(micros),
        }),
        episode: state.episode.map(micros),
        settled: state.settled,
    };
    serde_json::to_string(&stored).unwrap_or_else(|_| "{}".into())
}

/// A pool's state from its stored document.
pub(crate) fn pool_state(json: &str) -> Result<PoolState> {
    let stored: StoredPool =
        serde_json::from_str(json).map_err(|_| decode::corrupt("quota pool state", json))?;
    let mut windows = BTreeMap::new();
    for (name, w) in stored.windows {
        let window = Window::parse(&name).ok_or_else(|| decode::corrupt("quota window", &name))?;
        windows.insert(
            window,
            WindowPark {
                until: time("window until", w.until)?,
                source: ParkSource::parse(&w.source)
                    .ok_or_else(|| decode::corrupt("quota window source", &w.source))?,
                hint: w.hint,
                reported_by: w.reported_by,
                reported_at: time("window reported_at", w.reported_at)?,
            },
        );
    }
    let canary = match stored.canary {
        None => None,
        Some(c) => Some(Canary {
            agent_id: c.agent_id,
            released_at: time("canary released_at", c.released_at)?,
            completed_at: c
                .completed_at
                .map(|us| time("canary completed_at", us))
                .transpose()?,
        }),
    };
    Ok(PoolState {
        windows,
        canary,
        episode: stored
            .episode
            .map(|us| time("pool episode", us))
            .transpose()?,
        settled: stored.settled,
    })
}

/// A stored pool name, checked as it is read.
pub(crate) fn pool_name(name: String) -> Result<PoolName> {
    PoolName::try_from(name.clone()).map_err(|_| decode::corrupt("quota pool", &name))
}

/// What one backend reads of pools for a batch, on its transaction.
#[async_trait]
pub(crate) trait PoolReads: Send {
    /// The stored states of `names` (name order), held to commit (Postgres:
    /// `FOR UPDATE`, after the agent rows), as `(name, state document)`;
    /// the pools of `create` (about to be parked) get a row first if they
    /// have none, so that batches parking one pool at once queue on it.
    async fn pool_states(
        &mut self,
        names: &[&str],
        create: &[&str],
    ) -> Result<Vec<(String, String)>>;

    /// Every agent that lists `pool` among its quota pools or that `pool`
    /// holds, but `except`, held to commit (Postgres: `FOR UPDATE` in
    /// agent-id order).
    async fn members(&mut self, pool: &str, except: &[&str]) -> Result<Vec<Agent>>;
}

async fn states(
    reads: &mut dyn PoolReads,
    names: &BTreeSet<PoolName>,
    create: &BTreeSet<PoolName>,
) -> Result<BTreeMap<PoolName, PoolState>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let names: Vec<&str> = names.iter().map(PoolName::as_str).collect();
    let create: Vec<&str> = create.iter().map(PoolName::as_str).collect();
    let mut out = BTreeMap::new();
    for (name, json) in reads.pool_states(&names, &create).await? {
        out.insert(pool_name(name)?, pool_state(&json)?);
    }
    Ok(out)
}

/// The pools a batch of `commands` on `agents` (as locked) is decided on:
/// the states of every pool its agents are in or held by and every pool it
/// names, then the members of each pool a report may park. A batch whose
/// agents are in no pool reads nothing.
pub(crate) async fn pool_rows(
    reads: &mut dyn PoolReads,
    commands: &[Command],
    agents: &[Agent],
) -> Result<PoolRows> {
    let names = batch::pools_read(commands, agents);
    let parking = batch::parking_pools(commands, agents);
    let states = states(reads, &names, &parking).await?;
    let mut members: Vec<Agent> = Vec::new();
    for pool in parking {
        let held: Vec<String> = agents
            .iter()
            .chain(&members)
            .map(|a| a.agent_id.clone())
            .collect();
        let held: Vec<&str> = held.iter().map(String::as_str).collect();
        let read = reads.members(pool.as_str(), &held).await?;
        members.extend(read);
    }
    Ok(PoolRows { states, members })
}

/// The rows a pool command is decided on: the pool's state and, for a park,
/// every member.
pub(crate) async fn pool_command_rows(
    reads: &mut dyn PoolReads,
    command: &PoolCommand,
) -> Result<PoolRows> {
    let pool = command.pool();
    let names = BTreeSet::from([pool.clone()]);
    let create = if command.parks() {
        names.clone()
    } else {
        BTreeSet::new()
    };
    let states = states(reads, &names, &create).await?;
    // A park decides on every member; the other commands only on the
    // pool's row (or, without one, whether it has any member: an unknown
    // pool is NOT_FOUND).
    let members = if command.parks() || states.is_empty() {
        reads.members(pool.as_str(), &[]).await?
    } else {
        Vec::new()
    };
    Ok(PoolRows { states, members })
}

/// A pool command's result, as the store answers it.
#[derive(Debug, Clone)]
pub struct PoolCommitted {
    pub pool: PoolName,
    /// The pool after the command (`None`: it never was parked).
    pub state: Option<PoolState>,
    /// What a park did (`domain::quota::Parked`), for the answer.
    pub parked: Option<crate::domain::quota::Parked>,
    /// The members it changed, as committed, and their transitions.
    pub agents: Vec<Agent>,
    pub transitions: Vec<crate::domain::transition::Transition>,
}

/// A pool command's answer from what it wrote: the pool as written (or as
/// read, `before`, when unchanged), the members it changed and their
/// transitions.
pub(crate) fn committed(
    pool: &PoolName,
    before: Option<PoolState>,
    parked: Option<crate::domain::quota::Parked>,
    writes: batch::Writes,
) -> PoolCommitted {
    let state = writes
        .pools
        .iter()
        .find(|(name, _)| name == pool)
        .map(|(_, s)| s.clone())
        .or(before);
    PoolCommitted {
        pool: pool.clone(),
        state,
        parked,
        agents: writes.changed,
        transitions: writes.transitions,
    }
}
