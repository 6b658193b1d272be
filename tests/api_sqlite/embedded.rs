//! What only the embedded store does: `fleetcare serve` with nothing but a
//! data directory, one server per file, and a reply that means durable.

use fleetcare::proto::v1 as pb;

use crate::helpers::{ServerProcess, TestDb};

fn data_dir(db: &TestDb) -> String {
    db.dir
        .as_ref()
        .expect("a SQLite test db")
        .display()
        .to_string()
}

fn serve_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fleetcare"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", ""])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fleetcare serve")
}

#[tokio::test]
async fn serve_without_a_database_url_creates_its_data_dir_and_serves() {
    let db = TestDb::new();
    let dir = format!("{}/nested/data", data_dir(&db));
    assert!(!std::path::Path::new(&dir).exists());
    let server = ServerProcess::start(&["--data-dir", &dir]).await;
    let mut client = server.client().await;
    let agent = client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "first".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .expect("register on the embedded store")
        .into_inner()
        .agent
        .unwrap();
    assert_eq!(agent.status, pb::AgentStatus::Idle as i32);
    assert!(
        std::path::Path::new(&dir).join("fleetcare.db").is_file(),
        "the store is a file in --data-dir"
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused_at_start() {
    let db = TestDb::new();
    let dir = data_dir(&db);
    let first = ServerProcess::start(&["--data-dir", &dir]).await;
    let second = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || serve_output(&["--data-dir", &dir])
    })
    .await
    .unwrap();
    assert!(!second.status.success(), "the second server must not start");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another fleetcare process"),
        "unclear refusal: {stderr}"
    );
    // The first one is unharmed.
    let mut client = first.client().await;
    client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "still-serving".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .expect("the first server still serves");
}

#[tokio::test]
async fn every_acknowledged_transition_survives_kill_9() {
    let db = TestDb::new();
    let dir = data_dir(&db);
    let server = ServerProcess::start(&["--data-dir", &dir]).await;
    let mut client = server.client().await;
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let id = format!("agent-{i:02}");
        client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap();
        let started = client
            .start_work(pb::StartWorkRequest {
                agent_id: id,
                slot_type: pb::SlotType::Work as i32,
            })
            .await
            .unwrap()
            .into_inner();
        acknowledged.push(started.transition.unwrap().revision);
    }
    server.kill();

    let server = ServerProcess::start(&["--data-dir", &dir]).await;
    let mut client = server.client().await;
    let history = client
        .list_transitions(pb::ListTransitionsRequest {
            agent_id: String::new(),
            after_revision: 0,
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .transitions;
    let revisions: Vec<i64> = history.iter().map(|t| t.revision).collect();
    assert_eq!(
        revisions,
        (1..=40).collect::<Vec<i64>>(),
        "gap-free after kill -9"
    );
    for revision in acknowledged {
        let t = history.iter().find(|t| t.revision == revision).unwrap();
        assert_eq!(t.to_status, pb::AgentStatus::Busy as i32);
    }
    // Revisions go on from where they were.
    let next = client
        .finish_work(pb::FinishWorkRequest {
            agent_id: "agent-00".into(),
            fencing_token: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.transition.unwrap().revision, 41);
}

#[tokio::test]
async fn migrate_creates_the_embedded_store() {
    let db = TestDb::new();
    let dir = data_dir(&db);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetcare"))
            .args(["migrate", "--data-dir", &dir])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.dir.as_ref().unwrap().join("fleetcare.db").is_file());
}

/// After SIGTERM the WAL is checkpointed into the file and emptied: a copy of
/// `fleetcare.db` alone (what a file-level backup of a stopped server takes)
/// holds every acknowledged transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_every_acknowledged_transition_in_the_database_file() {
    let db = TestDb::new();
    let dir = data_dir(&db);
    let server = ServerProcess::start(&["--data-dir", &dir]).await;
    let mut client = server.client().await;
    let mut acknowledged = Vec::new();
    for i in 0..60 {
        let id = format!("agent-{i:02}");
        let registered = client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                labels: Default::default(),
                quota_pools: Vec::new(),
            })
            .await
            .unwrap()
            .into_inner();
        // The registration's transition is the agent's revision.
        acknowledged.push(registered.agent.unwrap().revision);
        let started = client
            .start_work(pb::StartWorkRequest {
                agent_id: id,
                slot_type: pb::SlotType::Work as i32,
            })
            .await
            .unwrap()
            .into_inner();
        acknowledged.push(started.transition.unwrap().revision);
    }
    let file = db.dir.as_ref().unwrap().join("fleetcare.db");
    let wal = db.dir.as_ref().unwrap().join("fleetcare.db-wal");
    assert!(
        std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0),
        "while serving, the last commits are in the WAL"
    );

    assert!(server.terminate().await, "a clean exit on SIGTERM");
    let left = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(left, 0, "the WAL is empty or gone after a clean stop");

    // The file alone, copied where no WAL is beside it.
    let copy_dir = db.dir.as_ref().unwrap().join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    let copy = copy_dir.join("fleetcare.db");
    std::fs::copy(&file, &copy).unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&copy)
        .read_only(true);
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    let stored: Vec<(i64, String)> =
        sqlx::query_as("SELECT revision, to_status FROM transitions ORDER BY revision")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let revisions: Vec<i64> = stored.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        revisions, acknowledged,
        "every acknowledged transition, and nothing else, in the copy of the file alone"
    );
    assert_eq!(
        stored.iter().filter(|(_, to)| to == "BUSY").count(),
        60,
        "the last transitions too"
    );
}
