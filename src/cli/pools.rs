//! `fleetcare pools list|get|park|release`.

use super::table::Table;
use super::{CliError, PoolsArgs, PoolsCommand, print};
use crate::views::{PoolDetailView, PoolView};
use fleetcare_client::pb;

pub async fn run(args: PoolsArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let json = args.connection.json;
    match args.command {
        PoolsCommand::List { parked } => {
            let pools = clients
                .quota
                .list_quota_pools(pb::ListQuotaPoolsRequest {
                    parked_only: parked,
                })
                .await?
                .into_inner()
                .pools;
            let pools: Vec<PoolView> = pools.iter().map(PoolView::from).collect();
            print(json, &pools, || pools_table(&pools))
        }
        PoolsCommand::Get { pool } => {
            let answer = clients
                .quota
                .get_quota_pool(pb::GetQuotaPoolRequest { pool })
                .await?
                .into_inner();
            let view = PoolDetailView::from(&answer);
            print(json, &view, || pool_detail(&view))
        }
        PoolsCommand::Park {
            pool,
            until,
            window,
            reason,
        } => {
            let answer = clients
                .quota
                .park_pool(pb::ParkPoolRequest {
                    pool,
                    until: Some(crate::proto::timestamp(until)),
                    window: window as i32,
                    reason,
                })
                .await?
                .into_inner();
            let view = PoolView::from(&answer.pool.unwrap_or_default());
            let parked = answer.members_parked;
            print(json, &view, || {
                format!("{}members parked: {parked}\n", pool_lines(&view))
            })
        }
        PoolsCommand::Release { pool, reason } => {
            let answer = clients
                .quota
                .release_pool(pb::ReleasePoolRequest { pool, reason })
                .await?
                .into_inner();
            let view = PoolView::from(&answer.pool.unwrap_or_default());
            print(json, &view, || pool_lines(&view))
        }
    }
}

/// Members by status, `IDLE=3 EXHAUSTED=2`.
fn members(p: &PoolView) -> String {
    let parts: Vec<String> = p.members.iter().map(|(s, n)| format!("{s}={n}")).collect();
    parts.join(" ")
}

fn pools_table(pools: &[PoolView]) -> String {
    let mut table = Table::new([
        "POOL",
        "PHASE",
        "PARKED UNTIL",
        "WINDOWS",
        "HELD",
        "MEMBERS",
    ]);
    for p in pools {
        let windows: Vec<&str> = p
            .windows
            .iter()
            .filter(|w| w.in_force)
            .map(|w| w.window.as_str())
            .collect();
        table.row(vec![
            p.name.clone(),
            p.phase.clone(),
            p.parked_until.clone().unwrap_or_default(),
            windows.join(","),
            p.held.to_string(),
            members(p),
        ]);
    }
    table.render()
}

/// A pool as `key: value` lines.
fn pool_lines(p: &PoolView) -> String {
    let mut lines = vec![("pool", p.name.clone()), ("phase", p.phase.clone())];
    if let Some(until) = &p.parked_until {
        lines.push(("parked until", until.clone()));
    }
    for w in &p.windows {
        let state = if w.in_force { "in force" } else { "lifted" };
        lines.push((
            "window",
            format!(
                "{} until {} ({state}, {} by {}): {}",
                w.window,
                w.until.clone().unwrap_or_default(),
                w.source,
                w.reported_by,
                w.hint
            ),
        ));
    }
    lines.push(("members", members(p)));
    lines.push(("held", p.held.to_string()));
    if !p.canary_agent_id.is_empty() {
        let mut canary = p.canary_agent_id.clone();
        if let Some(at) = &p.canary_released_at {
            canary.push_str(&format!(" released {at}"));
        }
        if let Some(at) = &p.canary_completed_at {
            canary.push_str(&format!(", completed a work slot {at}"));
        }
        lines.push(("canary", canary));
    }
    if let Some(at) = &p.next_release_at {
        lines.push(("next release", at.clone()));
    }
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<14}{v}\n", format!("{k}:")))
        .collect()
}

fn pool_detail(d: &PoolDetailView) -> String {
    let mut out = pool_lines(&d.pool);
    if !d.held_agent_ids.is_empty() {
        out.push_str(&format!(
            "{:<14}{}\n",
            "held agents:",
            d.held_agent_ids.join(" ")
        ));
    }
    if !d.releases.is_empty() {
        let mut table = Table::new(["AGENT", "RELEASE AT", "RELEASED"]);
        for r in &d.releases {
            table.row(vec![
                r.agent_id.clone(),
                r.release_at.clone().unwrap_or_default(),
                if r.released { "yes" } else { "no" }.to_owned(),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn parked() -> pb::QuotaPool {
        pb::QuotaPool {
            name: "anthropic/acct-42".into(),
            phase: pb::QuotaPoolPhase::Parked as i32,
            parked_until: ts(1_775_037_600),
            windows: vec![pb::QuotaPoolWindow {
                window: pb::QuotaWindow::FiveHour as i32,
                until: ts(1_775_037_600),
                in_force: true,
                source: "EXPLICIT".into(),
                hint: "resets 10am".into(),
                reported_by: "a-1".into(),
                reported_at: ts(1_775_030_000),
            }],
            members: vec![
                pb::QuotaPoolMembers {
                    status: pb::AgentStatus::Busy as i32,
                    count: 1,
                },
                pb::QuotaPoolMembers {
                    status: pb::AgentStatus::Exhausted as i32,
                    count: 2,
                },
            ],
            held: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_pool_is_one_row_with_its_windows_in_force_and_members_by_status() {
        let view = PoolView::from(&parked());
        assert_eq!(
            pools_table(&[view]),
            "POOL               PHASE   PARKED UNTIL              WINDOWS    HELD  MEMBERS\n\
             anthropic/acct-42  PARKED  2026-04-01T10:00:00.000Z  FIVE_HOUR  2     BUSY=1 EXHAUSTED=2\n"
        );
    }

    #[test]
    fn a_pool_shows_each_window_with_where_its_deadline_came_from() {
        let text = pool_lines(&PoolView::from(&parked()));
        assert!(text.contains("phase:        PARKED\n"), "{text}");
        assert!(
            text.contains(
                "window:       FIVE_HOUR until 2026-04-01T10:00:00.000Z (in force, EXPLICIT by a-1): resets 10am\n"
            ),
            "{text}"
        );
        assert!(text.contains("held:         2\n"), "{text}");
    }
}
