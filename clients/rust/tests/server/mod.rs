//! The real fleetcare server for the client's tests: the binary from
//! `FLEETCARE_BIN`, else the `fleetcare` beside this test executable (the
//! workspace's `target/<profile>/`, which `cargo build` or the workspace's
//! `cargo test` makes), on a fresh embedded store in a temporary data
//! directory, removed with the server when the value is dropped (also when a
//! test fails).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// Options every test server gets: nothing scheduled behind the tests' backs.
const QUIET: &[&str] = &[
    "--http-listen",
    "",
    "--heartbeat-timeout",
    "1h",
    "--pipeline-interval-usage",
    "0",
    "--pipeline-interval-errors",
    "0",
];

const STARTUP: Duration = Duration::from_secs(120);

fn fleetcare_bin() -> PathBuf {
    let bin = match std::env::var_os("FLEETCARE_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            // target/<profile>/deps/<this test> -> target/<profile>/fleetcare
            let exe = std::env::current_exe().expect("the test executable's path");
            let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
            profile.join(format!("fleetcare{}", std::env::consts::EXE_SUFFIX))
        }
    };
    assert!(
        bin.is_file(),
        "fleetcare server binary not found at {}: build it (cargo build) or set FLEETCARE_BIN",
        bin.display()
    );
    bin
}

/// The string `field` of a JSON log line whose message is `message` (the
/// server's lines are flat objects; its addresses and these messages need no
/// escaping, so no JSON parser is needed).
fn logged(line: &str, message: &str, field: &str) -> Option<String> {
    if !line.contains(&format!("\"message\":\"{message}\"")) {
        return None;
    }
    let key = format!("\"{field}\":\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}

/// One `fleetcare serve` process on its own data directory.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`, as the server logged it.
    pub address: String,
    dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with `extra` flags after the quiet ones.
    pub fn start_with(extra: &[&str]) -> Server {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-rs-client-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sessions")).unwrap();
        let mut child = Command::new(fleetcare_bin())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--log-format", "json"])
            .arg("--session-dir")
            .arg(dir.join("sessions"))
            .args(QUIET)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the fleetcare server");

        // The server may listen ("serving", with its address) before its store
        // is open, or open the store first ("store open, serving"): a test
        // starts once both are logged. The thread keeps draining stderr.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready, address) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = logs.clone();
        std::thread::spawn(move || {
            let (mut listening, mut store_open, mut sent) = (None, false, false);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(addr) = logged(&line, "serving", "addr") {
                        listening = Some(addr);
                    }
                    store_open |= logged(&line, "store open, serving", "message").is_some();
                    if store_open && let Some(addr) = &listening {
                        sent = ready.send(addr.clone()).is_ok();
                    }
                }
                kept.lock().unwrap().push(line);
            }
        });
        let address = match address.recv_timeout(STARTUP) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "fleetcare did not start:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Server {
            child,
            address,
            dir,
            logs,
        }
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh caller for an auth file, from `fleetcare token new`: its token and
/// its `[[caller]]` entry.
pub fn token_new(name: &str, role: &str) -> (String, String) {
    let output = Command::new(fleetcare_bin())
        .args(["token", "new", "--name", name, "--role", role])
        .output()
        .expect("cannot run fleetcare token new");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (token, entry) = text.split_once('\n').unwrap();
    (token.trim().to_string(), entry.to_string())
}

/// Writes an auth file of `entries` into a directory removed on drop.
pub struct AuthFile {
    pub path: PathBuf,
}

impl AuthFile {
    pub fn new(entries: &[String]) -> AuthFile {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "fleetcare-rs-callers-{}-{}.toml",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, entries.join("\n")).unwrap();
        AuthFile { path }
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
