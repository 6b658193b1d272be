//! `fleetcare explain-limit`: what the server would infer from a report.

use super::{CliError, ExplainLimitArgs, ReasonArg, print};
use crate::views::RecoveryExplanationView;
use fleetcare_client::pb;

pub async fn run(args: ExplainLimitArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let reason = match args.reason {
        ReasonArg::RateLimit => pb::ExhaustionReason::RateLimit,
        ReasonArg::Billing => pb::ExhaustionReason::Billing,
    };
    let request = pb::ExplainRecoveryRequest {
        reason: reason as i32,
        headers: args
            .header
            .into_iter()
            .map(|(name, value)| pb::Header { name, value })
            .collect(),
        message: args.message,
        time_zone: args.time_zone.unwrap_or_default(),
        agent_id: args.agent.unwrap_or_default(),
        recovery_at: None,
        window: args.window.unwrap_or(pb::QuotaWindow::Unspecified) as i32,
    };
    let response = clients.agents.explain_recovery(request).await?.into_inner();
    let view = RecoveryExplanationView::from(&response);
    print(args.connection.json, &view, || explanation_text(&view))
}

/// `3h 20m`, `4d 0h`, `45s`: how far away, roughly.
fn rough_delay(secs: i64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn explanation_text(v: &RecoveryExplanationView) -> String {
    let mut at = v.recovery_at.clone().unwrap_or_default();
    if let Some(secs) = v.recovery_in_seconds {
        at.push_str(&format!(" (in {})", rough_delay(secs.max(0))));
    }
    let lines = [
        ("recovery at", at),
        ("source", v.recovery_source.clone()),
        ("hint", v.recovery_hint.clone()),
        ("reason", v.reason.clone()),
        ("window", format!("{} ({})", v.window, v.window_evidence)),
        ("server time", v.now.clone().unwrap_or_default()),
    ];
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<13}{v}\n", format!("{k}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_read_roughly() {
        assert_eq!(rough_delay(45), "45s");
        assert_eq!(rough_delay(125), "2m 5s");
        assert_eq!(rough_delay(3 * 3600 + 20 * 60 + 9), "3h 20m");
        assert_eq!(rough_delay(4 * 86_400 + 3600), "4d 1h");
    }

    #[test]
    fn the_explanation_is_six_aligned_lines() {
        let view = RecoveryExplanationView {
            recovery_at: Some("2026-03-02T02:00:00.000Z".into()),
            recovery_in_seconds: Some(50_400),
            recovery_source: "MESSAGE".into(),
            recovery_hint: "resets 2am".into(),
            reason: "RATE_LIMIT".into(),
            now: Some("2026-03-01T12:00:00.000Z".into()),
            window: "FIVE_HOUR".into(),
            window_evidence: "message: \"5-hour limit\"".into(),
        };
        assert_eq!(
            explanation_text(&view),
            "recovery at: 2026-03-02T02:00:00.000Z (in 14h 0m)\n\
             source:      MESSAGE\n\
             hint:        resets 2am\n\
             reason:      RATE_LIMIT\n\
             window:      FIVE_HOUR (message: \"5-hour limit\")\n\
             server time: 2026-03-01T12:00:00.000Z\n"
        );
    }
}
