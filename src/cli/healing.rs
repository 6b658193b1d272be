//! `fleetcare healing stats|policy|pause|resume|decisions`.

use super::table::Table;
use super::{CliError, HealingArgs, HealingCommand, print};
use crate::views::{HealingDecisionView, HealingPauseView, HealingPolicyView, HealingStatsView};
use fleetcare_client::pb;

pub async fn stats(args: HealingArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    match args.command {
        HealingCommand::Stats => {
            let response = clients
                .healing
                .get_healing_statistics(pb::GetHealingStatisticsRequest {})
                .await?
                .into_inner();
            let stats = HealingStatsView::from(&response);
            print(args.connection.json, &stats, || stats_text(&stats))
        }
        HealingCommand::Policy => {
            let response = clients
                .healing
                .get_healing_policy(pb::GetHealingPolicyRequest {})
                .await?
                .into_inner();
            let view = HealingPolicyView::from(&response);
            print(args.connection.json, &view, || policy_text(&view))
        }
        HealingCommand::Pause { reason, group } => {
            let pause = clients
                .healing
                .pause_healing(pb::PauseHealingRequest {
                    group: group.unwrap_or_default(),
                    reason,
                })
                .await?
                .into_inner()
                .pause
                .unwrap_or_default();
            let view = HealingPauseView::from(&pause);
            print(args.connection.json, &view, || {
                format!("paused {}: {}\n", scope(&view.group), view.reason)
            })
        }
        HealingCommand::Resume { group } => {
            let group = group.unwrap_or_default();
            let resumed = clients
                .healing
                .resume_healing(pb::ResumeHealingRequest {
                    group: group.clone(),
                })
                .await?
                .into_inner()
                .resumed;
            let view = serde_json::json!({ "group": group, "resumed": resumed });
            print(args.connection.json, &view, || {
                if resumed {
                    format!("resumed {}\n", scope(&group))
                } else {
                    format!("{} was not paused\n", scope(&group))
                }
            })
        }
        HealingCommand::Decisions { agent, limit } => {
            let decisions = clients
                .healing
                .list_healing_decisions(pb::ListHealingDecisionsRequest {
                    agent_id: agent.unwrap_or_default(),
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .decisions;
            let views: Vec<HealingDecisionView> =
                decisions.iter().map(HealingDecisionView::from).collect();
            print(args.connection.json, &views, || decisions_table(&views))
        }
    }
}

/// "the fleet" or "group x".
fn scope(group: &str) -> String {
    if group.is_empty() {
        "the fleet".to_owned()
    } else {
        format!("group {group}")
    }
}

fn policy_text(v: &HealingPolicyView) -> String {
    let p = &v.policy;
    let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s}s"));
    let mut out = format!(
        "max unhealthy: {}% (at least {}){}\nplans per minute: {} fleet-wide, {} per group\n\
         retry budget: {} per {}, back after {} healthy\nbreakers: open after {} failures in a row, \
         trial after {}\ndry run: {}\n",
        p.max_unhealthy_percent,
        p.min_unhealthy,
        if p.group_by.is_empty() {
            String::new()
        } else {
            format!(", groups by label {}", p.group_by)
        },
        p.max_plans_per_minute,
        p.max_group_plans_per_minute,
        p.retry_budget,
        secs(p.retry_window_seconds),
        secs(p.min_healthy_period_seconds),
        p.breaker_failures,
        secs(p.breaker_cooldown_seconds),
        if p.dry_run { "yes" } else { "no" },
    );
    for pause in &v.pauses {
        out.push_str(&format!(
            "PAUSED {} by {} at {}: {}\n",
            scope(&pause.group),
            pause.paused_by,
            pause.paused_at.as_deref().unwrap_or("-"),
            pause.reason
        ));
    }
    let mut shares = Table::new(["GROUP", "UNHEALTHY", "COUNTED", "ALLOWED"]);
    for s in &v.shares {
        let group = if s.group.is_empty() {
            "(fleet)"
        } else {
            &s.group
        };
        shares.row(vec![
            group.to_owned(),
            s.unhealthy.to_string(),
            s.counted.to_string(),
            s.allowed.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&shares.render());
    if !v.open_breakers.is_empty() {
        let mut table = Table::new(["ERROR TYPE", "STRATEGY", "STATE", "SINCE", "RETRY AT"]);
        for b in &v.open_breakers {
            table.row(vec![
                b.error_type.clone(),
                b.strategy.clone(),
                b.state.clone(),
                b.since.clone().unwrap_or_default(),
                b.retry_at.clone().unwrap_or_default(),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    if !v.spent_budgets.is_empty() {
        let mut table = Table::new(["AGENT", "PLANS (BUDGET SPENT)"]);
        for s in &v.spent_budgets {
            table.row(vec![s.agent_id.clone(), s.plans.to_string()]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

fn decisions_table(views: &[HealingDecisionView]) -> String {
    let mut table = Table::new(["ID", "AGENT", "VERDICT", "REASON", "STRATEGY", "MESSAGE"]);
    for d in views {
        table.row(vec![
            d.id.to_string(),
            d.agent_id.clone(),
            d.verdict.clone(),
            d.reason.clone(),
            d.strategy.clone().unwrap_or_default(),
            d.message.clone(),
        ]);
    }
    table.render()
}

fn percent(rate: f64) -> String {
    format!("{:.0}%", rate * 100.0)
}

fn stats_text(s: &HealingStatsView) -> String {
    let mut out = format!(
        "errors: {} ({} in the last hour)\nactive recoveries: {}\nrecovery success rate: {}\n",
        s.total_errors,
        s.errors_last_hour,
        s.active_recoveries,
        percent(s.overall_success_rate)
    );
    if !s.errors_by_type.is_empty() {
        let mut table = Table::new(["ERROR TYPE", "COUNT"]);
        for c in &s.errors_by_type {
            table.row(vec![c.error_type.clone(), c.count.to_string()]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    if !s.patterns.is_empty() {
        let mut table = Table::new([
            "ERROR TYPE",
            "CONTEXT",
            "STRATEGY",
            "OK",
            "FAILED",
            "SUCCESS",
            "MEAN TIME",
        ]);
        for p in &s.patterns {
            table.row(vec![
                p.error_type.clone(),
                p.context_signature.clone(),
                p.strategy.clone(),
                p.successes.to_string(),
                p.failures.to_string(),
                percent(p.success_rate),
                p.mean_recovery_seconds
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_default(),
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

    #[test]
    fn stats_without_history_are_three_lines() {
        let stats = HealingStatsView::from(&pb::GetHealingStatisticsResponse::default());
        assert_eq!(
            stats_text(&stats),
            "errors: 0 (0 in the last hour)\nactive recoveries: 0\nrecovery success rate: 0%\n"
        );
    }
}
