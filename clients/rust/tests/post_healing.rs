//! PostHealingService through the crate against the real server (see
//! `server/mod.rs` for where the binary comes from): a stalled post gets a
//! thread under a key of the current post window, a post doing well is
//! HEALTHY and one seen too little is LOW_EXPOSURE, neither with an action;
//! the floors are the server's flags.

mod server;

use std::time::{SystemTime, UNIX_EPOCH};

use fleetcare_client::{Clients, pb};
use server::Server;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Three points in the last 30 minutes gaining `impressions` and `engagements`.
fn points(impressions: i64, engagements: i64) -> Vec<pb::MetricPoint> {
    let now = now_secs();
    (0..3)
        .map(|i| pb::MetricPoint {
            observed_at: Some(prost_types::Timestamp {
                seconds: now - 600 * (3 - i),
                nanos: 0,
            }),
            impressions: 10_000 + impressions * i / 2,
            engagements: 50 + engagements * i / 2,
        })
        .collect()
}

async fn claim(
    clients: &Clients,
    post_id: &str,
    points: Vec<pb::MetricPoint>,
) -> pb::EvaluatePostResponse {
    clients
        .posts
        .clone()
        .evaluate_post(pb::EvaluatePostRequest {
            post_id: post_id.into(),
            points,
            now: None,
            claim: true,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn only_a_stalled_post_seen_enough_gets_an_action() {
    let server = Server::start();
    let clients = Clients::connect(&server.address).await.unwrap();

    // 2,000 new impressions, 4 engagements: rate 0.002, a thread.
    let stalled = claim(&clients, "stalled", points(2000, 4)).await;
    assert!(stalled.claimed, "{stalled:?}");
    assert_eq!(stalled.action_type, pb::PostActionType::Thread as i32);
    assert_eq!(stalled.impressions_gained, 2000);
    let action = stalled.action.unwrap();
    // The key names the post window (90 minutes by default) the server's clock was in.
    let created = action.created_at.unwrap().seconds;
    let window = created * 1000 / (90 * 60 * 1000);
    assert!(
        action
            .idempotency_key
            .starts_with(&format!("shealw_{window}_")),
        "{}",
        action.idempotency_key
    );

    // Rate 0.1: healthy (the default --post-healthy-rate is 0.05).
    let healthy = claim(&clients, "healthy", points(2000, 200)).await;
    assert!(!healthy.eligible && !healthy.claimed, "{healthy:?}");
    assert_eq!(
        healthy.ineligible_reason,
        pb::IneligibleReason::Healthy as i32
    );
    assert_eq!((healthy.tier, healthy.idempotency_key.as_str()), (0, ""));

    // 40 new impressions (under the default --post-min-impressions, 100).
    let quiet = claim(&clients, "quiet", points(40, 0)).await;
    assert!(!quiet.eligible && !quiet.claimed, "{quiet:?}");
    assert_eq!(
        quiet.ineligible_reason,
        pb::IneligibleReason::LowExposure as i32
    );
    assert_eq!((quiet.impressions_gained, quiet.sample_count), (40, 3));
}

#[tokio::test]
async fn the_floors_are_the_server_s_flags() {
    let server = Server::start_with(&["--post-healthy-rate", "0.2", "--post-min-impressions", "0"]);
    let clients = Clients::connect(&server.address).await.unwrap();
    // Rate 0.1 is under a 0.2 floor: a comment.
    let engaging = claim(&clients, "engaging", points(2000, 200)).await;
    assert!(engaging.claimed, "{engaging:?}");
    assert_eq!(engaging.action_type, pb::PostActionType::Comment as i32);
    // No floor on exposure: 40 impressions, none engaging, is a stall.
    let quiet = claim(&clients, "quiet", points(40, 0)).await;
    assert!(quiet.claimed, "{quiet:?}");
    assert_eq!(quiet.action_type, pb::PostActionType::Thread as i32);
}
