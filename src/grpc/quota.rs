//! `fleetcare.v1.QuotaService`: decode, authorize, call, encode. Parking and
//! releasing a pool go through the committer's pool lane
//! (`Committer::commit_pool`), so their transitions reach the cache and the
//! watchers as every other write's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use crate::domain::agent::AgentStatus;
use crate::domain::auth::Action;
use crate::domain::batch::{self, PoolCommand};
use crate::domain::quota::{self, Parked, Phase, PoolName, PoolState, ReleaseSettings, Window};
use crate::error::{Error, Result};
use crate::grpc::auth::{self, Guard};
use crate::grpc::convert::{self, timestamp};
use crate::grpc::dispatch::MAX_REASON_BYTES;
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::quota_service_server::QuotaService;
use crate::runtime::agents::AgentWrites;
use crate::storage::PoolMembers;

/// At most this many ids and releases in a `GetQuotaPoolResponse`.
const MAX_LISTED: usize = 1000;

pub struct QuotaApi {
    writes: AgentWrites,
    guard: Guard,
    settings: ReleaseSettings,
}

impl QuotaApi {
    pub fn new(writes: AgentWrites, guard: Guard, settings: ReleaseSettings) -> Self {
        QuotaApi {
            writes,
            guard,
            settings,
        }
    }

    /// Every pool's state (those ever parked) and members by status (those
    /// an agent lists), as the store has them now.
    async fn read(&self) -> Result<Pools> {
        let store = self.writes.store();
        let states = store.quota_pool_states().await?.into_iter().collect();
        let mut members: BTreeMap<PoolName, Vec<PoolMembers>> = BTreeMap::new();
        for m in store.quota_pool_members().await? {
            members.entry(m.pool.clone()).or_default().push(m);
        }
        Ok(Pools { states, members })
    }

    /// One pool as listed, and its state (NOT_FOUND when nobody is in it and
    /// it never parked).
    async fn pool(&self, name: &PoolName) -> Result<(pb::QuotaPool, PoolState)> {
        let pools = self.read().await?;
        let state = pools.states.get(name).cloned();
        let members = pools.members.get(name);
        if state.is_none() && members.is_none() {
            return Err(unknown(name));
        }
        let encoded = encode(
            name,
            state.as_ref(),
            members.map_or(&[][..], Vec::as_slice),
            self.writes.now(),
        );
        Ok((encoded, state.unwrap_or_default()))
    }
}

/// What the pools' reads return.
struct Pools {
    states: BTreeMap<PoolName, PoolState>,
    members: BTreeMap<PoolName, Vec<PoolMembers>>,
}

impl Pools {
    /// Every pool, by name: those with a row and those only named by members.
    fn encode(&self, now: DateTime<Utc>) -> Vec<pb::QuotaPool> {
        let names: std::collections::BTreeSet<&PoolName> =
            self.states.keys().chain(self.members.keys()).collect();
        names
            .into_iter()
            .map(|name| {
                encode(
                    name,
                    self.states.get(name),
                    self.members.get(name).map_or(&[][..], Vec::as_slice),
                    now,
                )
            })
            .collect()
    }
}

fn unknown(name: &PoolName) -> Error {
    Error::NotFound {
        kind: "quota pool",
        id: name.to_string(),
    }
}

fn pool_name(field: &str, name: &str) -> Result<PoolName> {
    Ok(quota::pool_name(field, name)?)
}

fn phase_to_pb(phase: Phase) -> pb::QuotaPoolPhase {
    match phase {
        Phase::Open => pb::QuotaPoolPhase::Open,
        Phase::Parked => pb::QuotaPoolPhase::Parked,
        Phase::Releasing => pb::QuotaPoolPhase::Releasing,
    }
}

/// A pool on the wire.
fn encode(
    name: &PoolName,
    state: Option<&PoolState>,
    members: &[PoolMembers],
    now: DateTime<Utc>,
) -> pb::QuotaPool {
    let held: i64 = members.iter().map(|m| m.held).sum();
    let empty = PoolState::default();
    let state = state.unwrap_or(&empty);
    let canary = state.canary.as_ref();
    pb::QuotaPool {
        name: name.to_string(),
        phase: phase_to_pb(state.phase(held, now)) as i32,
        parked_until: state.parked_until(now).map(timestamp),
        windows: state
            .windows
            .iter()
            .map(|(window, park)| pb::QuotaPoolWindow {
                window: convert::window_to_pb(*window) as i32,
                until: Some(timestamp(park.until)),
                in_force: park.until > now,
                source: park.source.as_str().to_owned(),
                hint: park.hint.clone(),
                reported_by: park.reported_by.clone(),
                reported_at: Some(timestamp(park.reported_at)),
            })
            .collect(),
        members: members
            .iter()
            .map(|m| pb::QuotaPoolMembers {
                status: convert::status_to_pb(m.status) as i32,
                count: m.members,
            })
            .collect(),
        held,
        canary_agent_id: canary.map(|c| c.agent_id.clone()).unwrap_or_default(),
        canary_released_at: canary.map(|c| timestamp(c.released_at)),
        canary_completed_at: canary.and_then(|c| c.completed_at).map(timestamp),
        next_release_at: None,
    }
}

#[tonic::async_trait]
impl QuotaService for QuotaApi {
    async fn list_quota_pools(
        &self,
        request: Request<pb::ListQuotaPoolsRequest>,
    ) -> Result<Response<pb::ListQuotaPoolsResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListQuotaPools, None)?;
        let pb::ListQuotaPoolsRequest { parked_only } = request.into_inner();
        let mut pools = self.read().await?.encode(self.writes.now());
        if parked_only {
            pools.retain(|p| p.phase() != pb::QuotaPoolPhase::Open);
        }
        Ok(Response::new(pb::ListQuotaPoolsResponse { pools }))
    }

    async fn get_quota_pool(
        &self,
        request: Request<pb::GetQuotaPoolRequest>,
    ) -> Result<Response<pb::GetQuotaPoolResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::GetQuotaPool, None)?;
        let pb::GetQuotaPoolRequest { pool } = request.into_inner();
        let name = pool_name("pool", &pool)?;
        let (mut encoded, state) = self.pool(&name).await?;
        let agents = self.writes.store().pool_agents(&name).await?;
        let members = batch::held_members(&name, &state, &agents);
        let now = self.writes.now();
        encoded.next_release_at = state
            .next_release(&members, &self.settings, now)
            .map(timestamp);
        let released: std::collections::BTreeSet<&str> = members
            .iter()
            .filter(|m| m.released_at.is_some())
            .map(|m| m.agent_id.as_str())
            .collect();
        let releases = quota::release_schedule(&state, &members, &self.settings, now)
            .map(|s| s.releases)
            .unwrap_or_default()
            .into_iter()
            .take(MAX_LISTED)
            .map(|(agent_id, at)| pb::QuotaPoolRelease {
                released: released.contains(agent_id.as_str()),
                agent_id,
                release_at: Some(timestamp(at)),
            })
            .collect();
        let held_agent_ids = agents
            .iter()
            .filter(|a| a.pool_holds.held_by(&name))
            .take(MAX_LISTED)
            .map(|a| a.agent_id.clone())
            .collect();
        Ok(Response::new(pb::GetQuotaPoolResponse {
            pool: Some(encoded),
            releases,
            held_agent_ids,
        }))
    }

    async fn park_pool(
        &self,
        request: Request<pb::ParkPoolRequest>,
    ) -> Result<Response<pb::ParkPoolResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ParkPool, None)?;
        let pb::ParkPoolRequest {
            pool,
            until,
            window,
            reason,
        } = request.into_inner();
        let name = pool_name("pool", &pool)?;
        let until = until.ok_or_else(|| Error::invalid("until is required"))?;
        let until = convert::from_timestamp("until", until)?;
        let until =
            quota::check_park_until("until", until, self.writes.now()).map_err(Error::from)?;
        let window = convert::window_from_pb("window", window)?.unwrap_or(Window::Other);
        validate::bounded_text("reason", &reason, MAX_REASON_BYTES)?;
        let committed = self
            .writes
            .commit_pool(&PoolCommand::Park {
                pool: name.clone(),
                window,
                until,
                reason: reason.clone(),
                actor: caller.name.clone(),
            })
            .await?;
        let members_parked = committed
            .transitions
            .iter()
            .filter(|t| t.to == AgentStatus::Exhausted && t.from != Some(AgentStatus::Exhausted))
            .count() as i64;
        tracing::info!(
            pool = %name,
            window = %window,
            until = %until,
            actor = %caller.name,
            %reason,
            outcome = ?committed.parked.unwrap_or(Parked::Kept),
            members_parked,
            "quota pool parked by an operator"
        );
        Ok(Response::new(pb::ParkPoolResponse {
            pool: Some(self.pool(&name).await?.0),
            members_parked,
        }))
    }

    async fn release_pool(
        &self,
        request: Request<pb::ReleasePoolRequest>,
    ) -> Result<Response<pb::ReleasePoolResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ReleasePool, None)?;
        let pb::ReleasePoolRequest { pool, reason } = request.into_inner();
        let name = pool_name("pool", &pool)?;
        validate::bounded_text("reason", &reason, MAX_REASON_BYTES)?;
        self.writes
            .commit_pool(&PoolCommand::Lift {
                pool: name.clone(),
                actor: caller.name.clone(),
            })
            .await?;
        tracing::info!(pool = %name, actor = %caller.name, %reason, "quota pool released by an operator");
        Ok(Response::new(pb::ReleasePoolResponse {
            pool: Some(self.pool(&name).await?.0),
        }))
    }
}
