//! The generated clients and the wire contract, checked from `cargo test` so
//! that the README's one test command covers them:
//!
//! - the Python and TypeScript packages' own test suites, against the server
//!   binary cargo just built (each suite starts its servers on fresh databases);
//! - the checked-in generated code is what the protos generate today;
//! - `buf lint` passes on `proto/`, and `buf breaking` finds no wire change
//!   against the last released contract (`proto/released/`);
//! - the README's client examples are the files these suites run;
//! - the Rust client crate reads the one `proto/` (its `proto` is a symlink)
//!   and depends on no server code (`cargo tree -p fleetcare-client`).
//!
//! Each package's set-up script is idempotent (a venv under
//! `clients/python/.venv`, `npm ci` in `clients/typescript`), so the first run
//! on a fresh machine installs what the suites need and later runs skip it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_fleetcare");
/// The contract clients in the wild were generated from; replace it (and
/// only it) when a release changes the protos on purpose.
const RELEASED_CONTRACT: &str = "proto/released/fleetcare-v0.1.0.binpb";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command from the repository root, failing the test with its output.
fn run(program: impl AsRef<Path>, args: &[&str]) -> String {
    let program = program.as_ref();
    let output = Command::new(repo().join(program))
        .args(args)
        .current_dir(repo())
        .env("FLEETCARE_BIN", SERVER_BIN)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        program.display(),
        output.status
    );
    format!("{stdout}{stderr}")
}

/// Every file under `dir` (relative path to content), caches left out.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == "__pycache__") {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// Generates into a scratch directory and compares with the checked-in tree.
fn assert_generated_code_is_current(generate: &str, checked_in: &str) {
    let scratch =
        std::env::temp_dir().join(format!("fleetcare-generated-{}", uuid::Uuid::new_v4()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    run(generate, &[scratch.to_str().unwrap()]);
    let fresh = tree(&scratch);
    let committed = tree(&repo().join(checked_in));
    std::fs::remove_dir_all(&scratch).unwrap();
    assert!(!fresh.is_empty(), "{generate} generated nothing");
    let names = |t: &BTreeMap<PathBuf, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&fresh),
        names(&committed),
        "{checked_in} is stale: run clients/generate and commit the result"
    );
    for (path, content) in &fresh {
        assert!(
            committed[path] == *content,
            "{checked_in}/{} differs from what the protos generate: run clients/generate and commit the result",
            path.display()
        );
    }
}

#[test]
fn python_client_is_current_and_its_suite_passes() {
    run("clients/python/setup.sh", &[]);
    assert_generated_code_is_current(
        "clients/python/generate.sh",
        "clients/python/src/fleetcare/v1",
    );
    let report = run("clients/python/test.sh", &["-q"]);
    assert!(report.contains(" passed"), "{report}");
}

#[test]
fn typescript_client_is_current_and_its_suite_passes() {
    run("clients/typescript/setup.sh", &[]);
    assert_generated_code_is_current(
        "clients/typescript/generate.sh",
        "clients/typescript/src/gen",
    );
    let report = run("clients/typescript/test.sh", &[]);
    assert!(report.contains("# fail 0"), "{report}");
    buf_checks();
}

/// `buf` comes with the TypeScript package's dev dependencies, so it runs
/// after that package's set-up.
fn buf_checks() {
    let buf = "clients/typescript/node_modules/.bin/buf";
    run(buf, &["lint", "proto"]);
    run(buf, &["breaking", "proto", "--against", RELEASED_CONTRACT]);

    // The check is not vacuous: renumbering a field is caught.
    let broken = std::env::temp_dir().join(format!("fleetcare-broken-{}", uuid::Uuid::new_v4()));
    let _ = std::fs::remove_dir_all(&broken);
    let v1 = broken.join("fleetcare/v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::copy(repo().join("proto/buf.yaml"), broken.join("buf.yaml")).unwrap();
    for entry in std::fs::read_dir(repo().join("proto/fleetcare/v1")).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        if path.ends_with("agent_status.proto") {
            assert!(text.contains("  int64 revision = 7;"));
            text = text.replace("  int64 revision = 7;", "  int64 revision = 17;");
        }
        std::fs::write(v1.join(path.file_name().unwrap()), text).unwrap();
    }
    let output = Command::new(repo().join(buf))
        .args([
            "breaking",
            broken.to_str().unwrap(),
            "--against",
            RELEASED_CONTRACT,
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&broken).unwrap();
    assert!(
        !output.status.success(),
        "buf breaking missed a renumbered field"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("\"revision\""),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The README's examples are the files the suites run and the build compiles.
#[test]
fn readme_examples_are_the_tested_files() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for example in [
        "clients/rust/examples/quickstart.rs",
        "clients/python/examples/quickstart.py",
        "clients/typescript/examples/quickstart.ts",
    ] {
        let code = std::fs::read_to_string(repo().join(example)).unwrap();
        assert!(
            readme.contains(&code),
            "README.md does not show {example} as it is; paste the file in"
        );
    }
}

/// The Rust client crate (`clients/rust`) compiles the top-level `proto/`
/// through its symlink (one source of truth, which `cargo package` turns into
/// files), and depends on no server code: no sqlx, axum or OpenTelemetry, and
/// tonic and hyper without their server side.
#[test]
fn rust_client_crate_has_one_proto_source_and_no_server_dependencies() {
    let link = std::fs::read_link(repo().join("clients/rust/proto"))
        .expect("clients/rust/proto is a symlink to the top-level proto/");
    assert_eq!(link, Path::new("../../proto"));

    let output = Command::new(env!("CARGO"))
        .args(["tree", "-p", "fleetcare-client", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p} [{f}]"])
        .current_dir(repo())
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let server_crates = ["fleetcare", "sqlx", "axum", "opentelemetry"];
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let family = name.split(['-', '_']).next().unwrap_or_default();
        assert!(
            name == "fleetcare-client" || !server_crates.contains(&family),
            "fleetcare-client depends on {line}"
        );
        let features = line
            .split_once('[')
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(features, _)| features)
            .unwrap_or_default();
        if ["tonic", "hyper", "hyper-util"].contains(&name) {
            assert!(
                !features
                    .split(',')
                    .any(|f| f.starts_with("server") || f == "router"),
                "fleetcare-client builds {name} with its server side: {line}"
            );
        }
    }
    assert!(tree.lines().any(|l| l.starts_with("tonic ")), "{tree}");
}
