//! `fleetcare healing stats`.

use super::table::Table;
use super::{CliError, HealingArgs, HealingCommand, print};
use crate::views::HealingStatsView;
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
    }
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
