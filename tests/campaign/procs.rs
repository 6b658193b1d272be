//! Real `fleetcare serve` processes (the binary cargo built for this test),
//! started, killed with -9, stopped with SIGTERM, frozen with SIGSTOP and
//! restarted; each killed when dropped. Signals go through kill(1): the crate
//! forbids unsafe code, so no libc::kill.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Sends `signal` (KILL, TERM, STOP, CONT) to process `pid`.
pub fn signal(signal: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// Sends `signal` to the process group `pgid`.
pub fn signal_group(signal: &str, pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .status();
}

/// The health of the server at `addr` as its `grpc.health.v1` says ("" service),
/// `None` when it does not answer within a second.
pub async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .ok()?
        .into_inner()
        .status;
    ServingStatus::try_from(status).ok()
}

pub struct Server {
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Where it listens (a new port at each start).
    pub addr: SocketAddr,
    stopped: bool,
}

impl Server {
    /// Starts `fleetcare serve <args>` on a free port, logging to `log`
    /// (appended across restarts); does not wait for it to serve.
    pub fn start(name: &str, args: Vec<String>, log: PathBuf) -> Server {
        let mut server = Server {
            name: name.into(),
            args,
            log,
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            stopped: false,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        self.addr = format!("127.0.0.1:{}", crate::pg::free_port())
            .parse()
            .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_fleetcare"))
            .args([
                "serve",
                "--listen",
                &self.addr.to_string(),
                "--http-listen",
                "",
            ])
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("CAMPAIGN_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start fleetcare serve");
        self.child = Some(child);
        self.stopped = false;
    }

    /// Waits until it answers SERVING, for at most `within`; fails at once
    /// if it exits meanwhile.
    pub async fn wait_serving(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if health(self.addr).await == Some(ServingStatus::Serving) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let last = log.lines().last().unwrap_or_default().to_owned();
                return Err(format!(
                    "{} exited ({status}) instead of serving: {last}",
                    self.name
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} not SERVING within {within:?}", self.name));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// kill -9, then waits for it to be gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM, then waits for a clean exit (kill -9 after 30 s). Returns
    /// whether it exited by itself with success.
    pub async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if self.stopped
            && let Some(pid) = child.id()
        {
            signal("CONT", pid);
        }
        if let Some(pid) = child.id() {
            signal("TERM", pid);
        }
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                false
            }
        }
    }

    /// SIGSTOP: frozen, its sockets open.
    pub fn freeze(&mut self) {
        if let Some(pid) = self.pid() {
            signal("STOP", pid);
            self.stopped = true;
        }
    }

    /// SIGCONT.
    pub fn thaw(&mut self) {
        if let Some(pid) = self.pid() {
            signal("CONT", pid);
            self.stopped = false;
        }
    }

    /// Starts it again (on a new port) after a kill or a stop.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if let Some(pid) = child.id() {
                signal("CONT", pid);
            }
            let _ = child.start_kill();
        }
    }
}
