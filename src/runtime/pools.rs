//! The release of lifted quota pools, run by the sweeper on each tick: for
//! every pool whose windows have all lifted and that still holds members,
//! the members due now (`domain::quota::due_releases`: the canary alone,
//! then the others after its work slot or its timeout, spread and never
//! faster than the rate) are let go through the committer, one
//! `PoolRelease` each. Every replica may do this at once: each release is
//! decided again on the locked agent and pool rows, so a member is released
//! exactly once, and the schedule is derived from stored state only, so the
//! replicas agree on it without talking.

use crate::domain::batch::{self, Command, PoolCommand};
use crate::domain::quota::{self, ReleaseSettings};
use crate::error::Error;
use crate::runtime::clock::Clock;
use crate::runtime::committer::Committer;
use crate::storage::AgentStore;

/// One pass over the pools: how many members were released.
pub async fn release_once(
    store: &dyn AgentStore,
    committer: &Committer,
    clock: &Clock,
    settings: &ReleaseSettings,
) -> Result<usize, Error> {
    let mut released = 0;
    for (pool, state) in store.quota_pool_states().await? {
        let now = clock.now();
        if state.settled || state.episode.is_none() || state.is_parked(now) {
            continue;
        }
        let agents = store.pool_agents(&pool).await?;
        let members = batch::held_members(&pool, &state, &agents);
        if members.iter().all(|m| m.released_at.is_some()) {
            // Nobody left to let go: the pool is not looked at again until
            // it is parked again.
            committer
                .commit_pool(&PoolCommand::Settle { pool: pool.clone() })
                .await?;
            continue;
        }
        let due = quota::due_releases(&state, &members, settings, now);
        let results = futures::future::join_all(due.into_iter().map(|agent_id| {
            committer.submit(Command::PoolRelease {
                pool: pool.clone(),
                agent_id,
                actor: crate::domain::auth::SWEEPER.to_owned(),
            })
        }))
        .await;
        for result in results {
            match result {
                Ok(applied) => {
                    if let Some(t) = applied.transition {
                        released += 1;
                        tracing::info!(
                            agent_id = %t.agent_id,
                            revision = t.revision,
                            pool = %pool,
                            to = %t.to,
                            "released by its quota pool"
                        );
                    }
                }
                // Deleted meanwhile.
                Err(Error::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(released)
}
