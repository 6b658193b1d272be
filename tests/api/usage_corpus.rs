//! GetUsage over the fixture corpus (tests/fixtures/sessions) against the
//! hand-computed figures of tests/fixtures/EXPECTED.md: duplicates within
//! and across files, several models, cache tokens, malformed lines, a message
//! without requestId on two lines (one message here; ccusage 20 counts it
//! twice, see EXPECTED.md), and a session spanning midnight UTC.

use std::path::Path;

use fleetcare::proto::v1 as pb;
use pb::UsageGrouping as G;

use crate::helpers::{TestApp, TestDb, test_args};
use crate::pipeline::{SessionRoot, client, run, usage};

const A1: &str = "alice/0b6e3c1a-5f2d-4a8e-9b71-3c2d1e0f4a51";
const A2: &str = "alice/8f4d2b7c-1e9a-4c3b-a6d5-7e8f9a0b1c62";
const A3: &str = "alice/c3a91f5e-7b24-4d6c-8e13-5a7b9c1d2e73";
const B1: &str = "bob/5e2f8a1b-9c3d-4e7f-b0a2-6d4c8e1f3a84";
const B2: &str = "bob/e7b4c9d2-3a6f-4b1e-9d85-2f7a6c3e1b95";

/// (key, input, output, cache creation, cache read, total, messages)
type Row = (&'static str, i64, i64, i64, i64, i64, i64);

pub fn copy_corpus(root: &SessionRoot) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sessions");
    for session in [A1, A2, A3, B1, B2] {
        let rel = format!("{session}.jsonl");
        let content = std::fs::read_to_string(fixtures.join(&rel)).expect("fixture");
        root.write(&rel, &content);
    }
}

fn rows(response: &pb::GetUsageResponse) -> Vec<(String, i64, i64, i64, i64, i64, i64)> {
    response
        .rows
        .iter()
        .map(|r| {
            (
                r.key.clone(),
                r.input_tokens,
                r.output_tokens,
                r.cache_creation_tokens,
                r.cache_read_tokens,
                r.total_tokens,
                r.messages,
            )
        })
        .collect()
}

fn expect(expected: &[Row]) -> Vec<(String, i64, i64, i64, i64, i64, i64)> {
    expected
        .iter()
        .map(|(k, i, o, cc, cr, t, m)| (k.to_string(), *i, *o, *cc, *cr, *t, *m))
        .collect()
}

#[tokio::test]
async fn usage_matches_the_hand_computed_and_ccusage_figures() {
    let db = TestDb::new();
    let root = SessionRoot::new();
    copy_corpus(&root);
    let mut args = test_args(&db.url);
    args.pipeline.session_dir = root.path.clone();
    args.pipeline.pipeline_interval_usage = std::time::Duration::ZERO;
    args.pipeline.pipeline_interval_errors = std::time::Duration::ZERO;
    let app = TestApp::spawn_with(args).await;

    let stats = run(&app, "usage").await.unwrap();
    assert_eq!((stats.scanned, stats.processed, stats.failed), (5, 5, 0));

    let days = usage(&app, G::Day, "").await;
    assert_eq!(
        rows(&days),
        expect(&[
            ("2026-03-14", 36, 90, 1500, 2200, 3826, 3),
            ("2026-03-15", 69, 197, 500, 5900, 6666, 5),
            ("2026-03-16", 65, 217, 2150, 2500, 4932, 3),
            ("2026-03-17", 82, 250, 800, 800, 1932, 2),
        ])
    );
    let totals = days.totals.unwrap();
    assert_eq!(
        (
            totals.input_tokens,
            totals.output_tokens,
            totals.cache_creation_tokens,
            totals.cache_read_tokens,
            totals.total_tokens,
            totals.messages
        ),
        (252, 754, 4950, 11400, 17356, 13)
    );
    assert_eq!(
        totals.models,
        [
            "claude-3-5-haiku-20241022",
            "claude-opus-4-1-20250805",
            "claude-sonnet-4-20250514"
        ]
    );

    assert_eq!(
        rows(&usage(&app, G::Session, "").await),
        expect(&[
            (A1, 52, 140, 1500, 3700, 5392, 4),
            (A2, 42, 130, 400, 4400, 4972, 2),
            (A3, 11, 17, 100, 0, 128, 2),
            (B1, 65, 217, 2150, 2500, 4932, 3),
            (B2, 82, 250, 800, 800, 1932, 2),
        ])
    );
    assert_eq!(
        rows(&usage(&app, G::Model, "").await),
        expect(&[
            ("claude-3-5-haiku-20241022", 14, 24, 100, 500, 638, 3),
            ("claude-opus-4-1-20250805", 124, 380, 1200, 5200, 6904, 4),
            ("claude-sonnet-4-20250514", 114, 350, 3650, 5700, 9814, 6),
        ])
    );
    assert_eq!(
        rows(&usage(&app, G::User, "").await),
        expect(&[
            ("alice", 105, 287, 2000, 8100, 10492, 8),
            ("bob", 147, 467, 2950, 3300, 6864, 5)
        ])
    );
    assert_eq!(
        rows(&usage(&app, G::Day, "bob").await),
        expect(&[
            ("2026-03-16", 65, 217, 2150, 2500, 4932, 3),
            ("2026-03-17", 82, 250, 800, 800, 1932, 2),
        ])
    );

    // A time range: [2026-03-15T00:00Z, 2026-03-16T00:00Z) is exactly the 15th.
    let ts = |s: &str| {
        let at = chrono::DateTime::parse_from_rfc3339(s).unwrap();
        prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: 0,
        }
    };
    let range = client(&app)
        .get_usage(pb::GetUsageRequest {
            group_by: G::Model as i32,
            since: Some(ts("2026-03-15T00:00:00Z")),
            until: Some(ts("2026-03-16T00:00:00Z")),
            user: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let total = range.totals.unwrap();
    assert_eq!((total.total_tokens, total.messages), (6666, 5));

    // Reprocessing every file (a touched corpus) changes nothing: no double counts.
    for session in [A1, A2, A3, B1, B2] {
        root.set_mtime(
            &format!("{session}.jsonl"),
            std::time::Duration::from_secs(600),
        );
    }
    let again = run(&app, "usage").await.unwrap();
    assert_eq!(again.files_hashed, 5);
    assert_eq!(
        usage(&app, G::Day, "").await.totals.unwrap().total_tokens,
        17356
    );

    // The errors processor finds one error in each file but B2.
    let errors = run(&app, "errors").await.unwrap();
    assert_eq!((errors.processed, errors.items_extracted), (5, 4));
}
